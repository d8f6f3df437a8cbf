"""Provisioning never lets root follow a path the agent controls.

The agent user plants symbolic links at every name a guest script touches, pointing at files
only root may change (/etc/passwd, a canary made by root); then provisioning runs the script.
Nothing outside the agent's own tree may change content, owner or mode, and provisioning still
works: a planted link is removed, never followed. A link above those names is refused in one line.
"""
from __future__ import annotations

import shlex
import subprocess

import pytest

pytestmark = pytest.mark.extended

HOME = '/home/agent'
SKILLS = f'{HOME}/.claude/skills'
LIST = f'{SKILLS}/.claude-bottle-skills'
PROMPT_DIR = f'{HOME}/.claude-bottle'
PROMPT = f'{PROMPT_DIR}/system-prompt.md'

# Root-owned files a followed link would change: made by root in the guest before each test.
CANARIES = r'''set -eu
echo canary > /etc/canary
echo "not the agent's prompt" > /etc/system-prompt.md
chmod 644 /etc/canary /etc/system-prompt.md
'''

# Everything outside the agent's home where a followed link could write: kind, owner, mode,
# size, time and target of every entry, and the content of every file under /etc and /root.
SNAPSHOT = r'''find / -mindepth 1 -maxdepth 1 -printf '%p %y %U:%G %m %l\n' | sort
find /etc /root /opt /srv /usr/local /home /var -path /home/agent -prune -o \
  -printf '%p %y %U:%G %m %s %T@ %l\n' | sort
find /etc /root -type f -exec sha256sum {} + | sort
'''

REVIEW = {'SKILL.md': '---\nname: review\ndescription: review code\n---\nReview.\n',
          'checklist.md': '- tests\n'}


def provisioned(bottles, agent: str, skills=('review', 'style'), prompt='Be careful.', **env):
    for skill in skills:
        if not (bottles.root / 'agents' / 'skills' / skill).exists():
            bottles.skill(skill, REVIEW if skill == 'review' else None)
    bottles.agent(agent, prompt=prompt, skills=list(skills))
    run = bottles.doit(f'provision:{agent}', env=bottles.env(**env))
    bottles.guest(agent, CANARIES)
    return run


def as_agent(bottles, agent: str, script: str) -> str:
    try:
        return bottles.guest(agent, 'setpriv --reuid agent --regid agent --init-groups -- sh -c '
                             + shlex.quote(f'set -eu; {script}'))
    except subprocess.CalledProcessError as err:
        raise AssertionError(f'as the agent: {script}\n{err.stderr.decode(errors="replace")}') from None


def snapshot(bottles, agent: str) -> list[str]:
    return bottles.guest(agent, SNAPSHOT).splitlines()


def assert_untouched(before: list[str], after: list[str]):
    changed = sorted(set(before) ^ set(after))
    assert not changed, 'outside the agent\'s tree:\n' + '\n'.join(changed)


def assert_real(bottles, agent: str, path: str, kind: str):
    """path is a real directory (kind 'd') or file ('f'), not a link, owned by the agent."""
    out = bottles.guest(agent, f'stat -c "%F %U" {shlex.quote(path)}').strip()
    assert out == {'d': 'directory agent', 'f': 'regular file agent'}[kind], (path, out)


def assert_skill(bottles, agent: str, skill: str, skills_dir: str = SKILLS):
    assert_real(bottles, agent, f'{skills_dir}/{skill}', 'd')
    assert bottles.guest_tree(agent, f'{skills_dir}/{skill}') == bottles.skill_tree(skill)


def test_links_at_the_list_its_temp_and_the_incoming_names_are_not_followed(bottles):
    agent = 'safe-receive'
    provisioned(bottles, agent)
    as_agent(bottles, agent, f'''
        rm {LIST}; ln -s /etc/passwd {LIST}
        ln -s /etc/canary {LIST}.new
        ln -s /etc {SKILLS}/.review.incoming
        ln -s /etc/canary {SKILLS}/.review.old
        ln -s /etc {SKILLS}/.extra.incoming''')
    before = snapshot(bottles, agent)
    bottles.write(bottles.root / 'agents/skills/review/checklist.md', '- tests\n- names\n')
    bottles.skill('extra')
    bottles.agent(agent, prompt='Be careful.', skills=['review', 'extra'])   # style dropped
    run = bottles.doit(f'provision:{agent}')
    assert sorted(run.transferred_skills()) == ['extra', 'review']
    assert_untouched(before, snapshot(bottles, agent))
    assert_skill(bottles, agent, 'review')
    assert_skill(bottles, agent, 'extra')
    assert_real(bottles, agent, LIST, 'f')
    assert sorted(bottles.guest(agent, f'cat {LIST}').split()) == ['extra', 'review']
    left = bottles.guest(agent, f'ls -A {SKILLS}').split()
    assert not [name for name in left if name.endswith(('.incoming', '.old', '.new'))], left


def test_a_pruned_skill_and_the_lists_temp_as_links_are_removed_not_followed(bottles):
    agent = 'safe-prune'
    provisioned(bottles, agent)
    as_agent(bottles, agent, f'''
        rm -r {SKILLS}/style; ln -s /etc {SKILLS}/style
        ln -s /etc/canary {LIST}.new''')
    before = snapshot(bottles, agent)
    bottles.agent(agent, prompt='Be careful.', skills=['review'])
    run = bottles.doit(f'provision:{agent}')
    assert run.transferred_skills() == [] and run.count('exec') == 1     # the prune alone
    assert_untouched(before, snapshot(bottles, agent))
    assert bottles.guest(agent, f'ls -A {SKILLS}').split() == ['.claude-bottle-skills', 'review']
    assert bottles.guest(agent, f'cat {LIST}').split() == ['review']
    assert_skill(bottles, agent, 'review')


def test_a_link_planted_at_the_skills_dir_is_replaced_by_a_real_directory(bottles):
    agent = 'safe-dir'
    provisioned(bottles, agent)
    as_agent(bottles, agent, f'rm -rf {SKILLS}; ln -s /etc {SKILLS}')
    before = snapshot(bottles, agent)
    bottles.agent(agent, prompt='Be careful.', skills=['review'])     # the prune runs first alone
    assert bottles.doit(f'provision:{agent}').count('exec') == 1
    assert_untouched(before, snapshot(bottles, agent))
    assert bottles.guest(agent, f'test -L {SKILLS} || echo unlinked').strip() == 'unlinked'
    as_agent(bottles, agent, f'rm -rf {SKILLS}; ln -s /etc {SKILLS}')
    bottles.write(bottles.root / 'agents/skills/review/checklist.md', '- edited\n')
    assert bottles.doit(f'provision:{agent}').transferred_skills() == ['review']
    assert_untouched(before, snapshot(bottles, agent))
    assert_real(bottles, agent, SKILLS, 'd')
    assert_skill(bottles, agent, 'review')


def test_links_at_the_prompt_and_its_temp_are_not_followed(bottles):
    agent = 'safe-prompt'
    provisioned(bottles, agent)
    as_agent(bottles, agent, f'rm {PROMPT}; ln -s /etc/passwd {PROMPT}; ln -s /etc/canary {PROMPT}.incoming')
    before = snapshot(bottles, agent)
    bottles.agent(agent, prompt='Now be bold.', skills=['review', 'style'])
    run = bottles.doit(f'provision:{agent}')
    assert run.count('cp') == 1 and run.count('exec') == 0
    assert_untouched(before, snapshot(bottles, agent))
    assert_real(bottles, agent, PROMPT, 'f')
    assert bottles.guest(agent, f'cat {PROMPT}') == bottles.prompt_text(agent)
    assert bottles.guest(agent, f'stat -c %a {PROMPT}').strip() == '600'
    assert bottles.guest(agent, f'ls -A {PROMPT_DIR}').split() == ['system-prompt.md']


def test_a_link_planted_at_the_prompt_dir_is_replaced_by_a_real_directory(bottles):
    agent = 'safe-promptdir'
    provisioned(bottles, agent)
    as_agent(bottles, agent, f'rm -rf {PROMPT_DIR}; ln -s /etc {PROMPT_DIR}')
    before = snapshot(bottles, agent)
    bottles.agent(agent, prompt='Now be bold.', skills=['review', 'style'])
    bottles.doit(f'provision:{agent}')
    assert_untouched(before, snapshot(bottles, agent))
    assert_real(bottles, agent, PROMPT_DIR, 'd')
    assert bottles.guest(agent, f'cat {PROMPT}') == bottles.prompt_text(agent)
    # no prompt: the removal, too, takes the link away instead of following it
    as_agent(bottles, agent, f'rm -rf {PROMPT_DIR}; ln -s /etc {PROMPT_DIR}')
    bottles.agent(agent, prompt='', skills=['review', 'style'])
    bottles.doit(f'provision:{agent}')
    assert_untouched(before, snapshot(bottles, agent))
    gone = bottles.guest(agent, f'test -e {PROMPT_DIR} || test -L {PROMPT_DIR} || echo gone')
    assert gone.strip() == 'gone'


def test_a_link_above_the_names_a_script_owns_is_refused_in_one_line(bottles):
    agent = 'safe-above'
    provisioned(bottles, agent)
    as_agent(bottles, agent, f'mv {HOME}/.claude {HOME}/claude-real; ln -s /etc {HOME}/.claude')
    before = snapshot(bottles, agent)
    bottles.write(bottles.root / 'agents/skills/review/checklist.md', '- edited\n')
    run = bottles.doit(f'provision:{agent}', check=False)
    assert run.returncode != 0 and 'Traceback' not in run.output
    assert (f'claude-bottle: {HOME}/.claude is a symbolic link, which provisioning does not follow; '
            'remove it in the bottle and run doit again') in run.output.splitlines()
    assert_untouched(before, snapshot(bottles, agent))
    as_agent(bottles, agent, f'rm {HOME}/.claude; mv {HOME}/claude-real {HOME}/.claude')
    bottles.doit(f'provision:{agent}')
    assert_skill(bottles, agent, 'review')


def test_a_skills_dir_outside_the_home_planted_as_a_link_is_not_followed_by_root(bottles):
    agent = 'safe-outside'
    skills = '/tmp/safe-skills'          # /tmp: the agent may make it, so root does not
    bottles.skill('review', REVIEW)
    bottles.agent(agent, prompt='Be careful.', skills=['review'])
    bottles.doit(f'provision_git:{agent}')         # root's own writes to /etc (CA, gitconfig) come first
    bottles.guest(agent, CANARIES)
    as_agent(bottles, agent, f'ln -s /etc {skills}')
    before = snapshot(bottles, agent)
    bottles.doit(f'provision:{agent}', env=bottles.env(CLAUDE_BOTTLE_GUEST_SKILLS_DIR=skills))
    assert_untouched(before, snapshot(bottles, agent))
    assert_skill(bottles, agent, 'review', skills)


def test_root_copies_a_file_only_below_directories_root_owns(podman, tmp_path):
    """The docker backend's copy_in (for root-owned files such as a CA certificate) refuses a
    destination below a link or a directory of the agent, and leaves no temporary file."""
    from tasks.backends.docker import Docker
    from tasks.backends.protocol import BackendError
    agent = 'safe-copy'
    provisioned(podman, agent)
    as_agent(podman, agent, f'ln -s /etc {HOME}/etc')
    before = snapshot(podman, agent)
    source = tmp_path / 'ca.crt'
    source.write_text('not a certificate\n')
    runtime = Docker('podman')
    for dest, below in ((f'{HOME}/etc/passwd', f'{HOME}/etc'), (f'{HOME}/ca.crt', HOME)):
        try:
            runtime.copy_in(podman.machine(agent), source, dest, mode=0o644, uid=0, gid=0)
        except BackendError as err:
            assert (f'claude-bottle: not writing {dest} as root: {below} is a symbolic link or not owned '
                    'by root') in str(err).splitlines()
        else:
            raise AssertionError(f'root wrote {dest}')
    assert_untouched(before, snapshot(podman, agent))
    assert not [n for n in podman.guest(agent, f'ls -A {HOME}').split() if n.startswith('ca.crt')]
    runtime.copy_in(podman.machine(agent), source, '/usr/local/share/ca-certificates/safe.crt',
                    mode=0o644, uid=0, gid=0)
    assert podman.guest(agent, 'stat -c "%U %a" /usr/local/share/ca-certificates/safe.crt').split() == \
        ['root', '644']
    copied = [n for n in podman.guest(agent, 'ls -A /usr/local/share/ca-certificates').split() if 'safe' in n]
    assert copied == ['safe.crt']                  # and no temporary file beside it
