"""The bottle task graph end to end, the same scenarios on every backend."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
import uuid

from tasks.backends.disk import DISK_FILE
from tests.bottles import TEST_CLAUDE_VERSION
from tests.scenario import (HOME, PROMPT, SKILLS, TEST_SECRET, TEST_SECRET_NETWORK, assert_fully_provisioned,
                            path_without, placeholder_of, setup_agent)


def image_key(bottles) -> str:
    return next((bottles.root / '.bottle/images').glob('*/image.json')).parent.name


def test_first_launch_packs_once_and_provisions_everything(bottles):
    bottles.own_images()
    setup_agent(bottles)
    run = bottles.doit('launch:a')
    assert run.count('pack') == 1
    assert f'claude-bottle: building image {image_key(bottles)} on ' in run.stderr     # it says what takes long
    assert bottles.backend.machine_state(bottles.machine('a')) == 'running'
    assert 'Be careful with production.' in bottles.prompt_text('a')
    assert oct((bottles.root / '.bottle/agents/a/prompt.md').stat().st_mode & 0o777) == '0o600'
    assert_fully_provisioned(bottles)
    assert bottles.guest('a', f'stat -c %U {SKILLS}/review/scripts/lint.sh').strip() == 'agent'
    assert sorted(run.transferred_skills()) == ['review', 'style']
    assert 'doit launch:a' in run.stdout          # no terminal: prints how to attach


def test_relaunch_without_changes_makes_one_probe_and_nothing_else(bottles):
    for name in 'abc':
        setup_agent(bottles, name)
    bottles.doit('provision')
    again = bottles.doit('launch:a')
    assert again.count('probe') == 1
    assert sum(again.kinds.values()) == 1, again.calls
    assert 'claude-bottle:' not in again.output        # quiet: no long step ran
    everyone = bottles.doit()                      # the default: every agent provisioned
    assert everyone.kinds == {'probe': 1}, everyone.calls


def test_one_edited_skill_file_is_one_transfer(bottles):
    setup_agent(bottles)
    bottles.doit('launch:a')
    (bottles.root / 'agents/skills/review/examples/two.md').write_text('two, edited\n')
    run = bottles.doit('launch:a')
    assert run.transferred_skills() == ['review']
    assert run.count('exec') == 1 and run.count('cp') == 0
    assert run.count('create') == run.count('pack') == run.count('start') == 0
    assert bottles.guest('a', f'cat {SKILLS}/review/examples/two.md') == 'two, edited\n'


def test_a_file_deleted_from_a_skill_is_deleted_in_the_guest(bottles):
    setup_agent(bottles)
    bottles.doit('launch:a')
    (bottles.root / 'agents/skills/review/examples/one.md').unlink()
    run = bottles.doit('launch:a')
    assert run.transferred_skills() == ['review']
    assert_fully_provisioned(bottles)


def test_changed_prompt_copies_only_the_prompt(bottles):
    setup_agent(bottles)
    bottles.doit('launch:a')
    setup_agent(bottles, prompt='Now be bold.')
    run = bottles.doit('launch:a')
    assert run.count('cp') == 1 and run.count('exec') == 0
    assert run.count('create') == run.count('pack') == 0
    assert 'Now be bold.' in bottles.guest('a', f'cat {PROMPT}')


def test_removed_skill_leaves_the_guest_and_added_skill_alone_is_copied(bottles):
    setup_agent(bottles)
    bottles.doit('launch:a')
    setup_agent(bottles, skills=('review',))
    run = bottles.doit('launch:a')
    assert run.transferred_skills() == [] and run.count('cp') == 0
    assert bottles.guest('a', f'ls {SKILLS}').split() == ['review']
    bottles.skill('extra')
    setup_agent(bottles, skills=('review', 'extra'))
    run = bottles.doit('launch:a')
    assert run.transferred_skills() == ['extra'] and run.count('cp') == 0
    assert run.count('create') == run.count('pack') == 0
    assert_fully_provisioned(bottles)


def test_skills_the_agent_made_itself_survive_a_prune(bottles):
    setup_agent(bottles)
    bottles.doit('launch:a')
    bottles.guest('a', f'mkdir -p {SKILLS}/own && echo mine > {SKILLS}/own/SKILL.md')
    setup_agent(bottles, skills=('review',))
    bottles.doit('launch:a')
    assert sorted(bottles.guest('a', f'ls {SKILLS}').split()) == ['own', 'review']


def test_machine_deleted_behind_doits_back_is_recreated_and_reprovisioned(bottles):
    setup_agent(bottles)
    bottles.doit('launch:a')
    bottles.backend.delete_behind_back(bottles.machine('a'))
    run = bottles.doit('launch:a')
    assert run.count('pack') == 0 and run.count('create') == 1
    # the egress CA's certificate, the agent's curlrc and the prompt; the skills as tar streams
    assert run.count('cp') == 3 and sorted(run.transferred_skills()) == ['review', 'style']
    assert_fully_provisioned(bottles)


def test_machine_stopped_behind_doits_back_is_started_and_nothing_recopied(bottles):
    setup_agent(bottles)
    bottles.doit('launch:a')
    bottles.backend.stop_behind_back(bottles.machine('a'))
    run = bottles.doit('launch:a')
    assert run.count('start') == 1
    assert run.count('cp') == run.count('exec') == run.count('create') == 0
    assert bottles.backend.machine_state(bottles.machine('a')) == 'running'
    assert_fully_provisioned(bottles)


def test_two_agents_with_one_recipe_share_one_pack(bottles):
    bottles.own_images()
    setup_agent(bottles, 'a')
    setup_agent(bottles, 'b', skills=('review',))
    run = bottles.doit('launch:a', 'launch:b')
    assert run.count('pack') == 1
    assert_fully_provisioned(bottles, 'a')
    assert_fully_provisioned(bottles, 'b')


def test_changed_recipe_repacks_and_recreates_only_its_agents(bottles):
    bottles.own_images()
    setup_agent(bottles, 'a')
    setup_agent(bottles, 'b')
    bottles.doit('provision')
    setup_agent(bottles, 'b', image={'run': ['echo v2 > /etc/recipe-version']})
    run = bottles.doit('provision')
    assert run.count('pack') == 1
    assert run.count('create', bottles.machine('b')) == 1 and run.count('create', bottles.machine('a')) == 0
    assert run.count('cp', bottles.machine('b')) == 3          # the CA, the curlrc and b's prompt, into the new machine
    assert sorted(run.transferred_skills()) == ['review', 'style']
    assert bottles.guest('b', 'cat /etc/recipe-version') == 'v2\n'
    assert_fully_provisioned(bottles, 'a')
    assert_fully_provisioned(bottles, 'b')


def test_four_agents_in_parallel_threads_are_all_provisioned(bottles):
    for name in 'abcd':
        setup_agent(bottles, name, prompt=f'I am {name}.')
    bottles.doit('-n', '4', '-P', 'thread', 'provision')
    for name in 'abcd':
        assert_fully_provisioned(bottles, name)
        assert f'I am {name}.' in bottles.guest(name, f'cat {PROMPT}')
    assert bottles.doit('-n', '4', '-P', 'thread', 'provision').kinds == {'probe': 1}


def test_missing_backend_cli_is_one_clear_paragraph(bottles):
    setup_agent(bottles)
    cli = bottles.backend.cli
    run = bottles.doit('launch:a', check=False,
                       env=bottles.env(PATH=path_without({cli}, bottles.env()['PATH'], bottles.root.parent)))
    assert run.returncode != 0
    assert f'{cli} is not installed' in run.output and 'Traceback' not in run.output


def test_a_pack_killed_midway_is_never_taken_for_an_image(bottles):
    bottles.own_images()
    setup_agent(bottles)
    images = bottles.root / '.bottle/images'
    said = bottles.root.parent / 'image-stderr.txt'
    with open(said, 'w') as stderr:
        proc = subprocess.Popen([sys.executable, '-m', 'doit', 'image'], cwd=bottles.root,
                                env=bottles.env(**bottles.backend.stall_pack_env()),
                                stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
    deadline = time.monotonic() + 600
    while not any(p.stat().st_size for p in images.glob('*/.partial-*/*') if p.is_file()):
        assert proc.poll() is None and time.monotonic() < deadline, 'the pack never started'
        time.sleep(0.05)
    # each long step said what it does as it began, while the pack is still running
    steps = [line.split(' ', 2)[1] for line in said.read_text().splitlines() if line.startswith('claude-bottle: ')]
    packing = 'packing' if bottles.backend.cli == 'smolvm' else 'saving'   # an engine may have the image already
    assert 'building' in steps and steps[-1] == packing, steps
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not list(images.glob('*/image.json'))
    run = bottles.doit('launch:a')
    assert run.count('pack') == 1
    assert not list(images.glob('*/.partial-*'))
    assert_fully_provisioned(bottles)


def test_teardown_forgets_and_the_next_launch_rebuilds_the_bottle_not_the_image(bottles):
    setup_agent(bottles)
    bottles.doit('launch:a')
    bottles.doit('teardown:a')
    assert bottles.backend.machine_state(bottles.machine('a')) is None
    assert not (bottles.root / '.bottle/agents/a').exists()
    assert bottles.doit('teardown:a').count('delete') == 0      # nothing left to tear down
    run = bottles.doit('launch:a')
    assert run.count('pack') == 0 and run.count('create') == 1
    assert_fully_provisioned(bottles)


def test_clean_removes_machines_images_and_prompts(bottles):
    setup_agent(bottles)
    bottles.doit('provision')
    bottles.doit('clean')
    assert bottles.backend.machine_state(bottles.machine('a')) is None
    assert not list((bottles.root / '.bottle/images').glob('*/image.json'))
    assert not (bottles.root / '.bottle/agents/a/prompt.md').exists()


def test_doit_info_names_the_edited_skill_file(bottles):
    setup_agent(bottles)
    bottles.doit('provision')
    (bottles.root / 'agents/skills/review/checklist.md').write_text('- more\n')
    info = bottles.doit('info', 'provision_skill:a:review', check=False)
    assert 'checklist.md' in info.stdout and 'status     : run' in info.stdout


def test_guest_skills_dir_can_be_overridden(bottles):
    setup_agent(bottles)
    bottles.doit('provision', env=bottles.env(CLAUDE_BOTTLE_GUEST_SKILLS_DIR='/opt/skills'))
    assert sorted(bottles.guest('a', 'ls /opt/skills').split()) == ['review', 'style']
    assert bottles.guest('a', 'stat -c %U /opt/skills/review/SKILL.md').strip() == 'agent'


# --- attach on a real terminal ------------------------------------------------------------------

def test_attach_runs_claude_as_the_agent_with_the_prompt_flag_on_a_tty(bottles):
    setup_agent(bottles)
    attached = bottles.backend.attach(bottles, 'a', bottles.env())
    assert attached.ok, attached.output
    info = attached.claude
    assert info['user'] == 'agent' and info['uid'] != '0' and info['home'] == HOME
    assert info['args'] == f'--append-system-prompt-file {PROMPT}'
    assert info['tty'] == 'yes'


def test_attach_without_a_prompt_omits_the_prompt_flag(bottles):
    setup_agent(bottles, prompt='')
    attached = bottles.backend.attach(bottles, 'a', bottles.env())
    assert attached.ok, attached.output
    assert attached.claude['args'] == ''
    assert bottles.guest('a', f'test -e {PROMPT} && echo yes || echo no').strip() == 'no'


def test_attach_refuses_on_a_terminal_when_a_secret_is_not_set(bottles):
    setup_agent(bottles, secrets=[TEST_SECRET], network=TEST_SECRET_NETWORK)
    attached = bottles.backend.attach(bottles, 'a', bottles.env(BOTTLE_TEST_SECRET=None))
    assert not attached.ok
    assert 'BOTTLE_TEST_SECRET' in attached.output and 'Traceback' not in attached.output


def test_claude_holds_a_placeholder_and_the_secret_is_nowhere_on_disk_nor_in_argv(bottles):
    """The secret's value goes to the egress proxy only (tests/test_fence.py follows it into a request); Claude
    gets the bottle's placeholder, the same at the next attach, and a rotated value changes nothing the guest has."""
    secret = f'sk-test-{uuid.uuid4().hex}'
    setup_agent(bottles, secrets=[TEST_SECRET], network=TEST_SECRET_NETWORK)
    attached = bottles.backend.attach(bottles, 'a', bottles.env(BOTTLE_TEST_SECRET=secret))
    assert attached.ok, attached.output
    placeholder = placeholder_of(bottles, 'a', 'BOTTLE_TEST_SECRET')
    assert placeholder.startswith('bottle-placeholder-BOTTLE_TEST_SECRET-') and secret not in placeholder
    assert attached.claude['secret_sha256'] == hashlib.sha256(placeholder.encode()).hexdigest()
    rotated = f'sk-test-{uuid.uuid4().hex}'
    again = bottles.backend.attach(bottles, 'a', bottles.env(BOTTLE_TEST_SECRET=rotated))
    assert again.ok, again.output
    assert again.claude['secret_sha256'] == hashlib.sha256(placeholder.encode()).hexdigest()
    for needle in (secret.encode(), rotated.encode()):
        for place in [bottles.root, *bottles.backend.state_dirs()]:
            for path in place.rglob('*'):
                # a bottle's disk file is GiBs of mostly holes: what the guest wrote is read through its mount
                if path.is_file() and not path.is_symlink() and path.name != DISK_FILE:
                    assert needle not in path.read_bytes(), f'the secret is in {path}'
    for argv in bottles.backend.calls_since(0):
        assert secret not in ' '.join(argv) and rotated not in ' '.join(argv)


def test_shared_defaults_apply_to_every_agent(standin):
    standin.skill('shared')
    standin.write(standin.root / 'agents/_defaults.yaml',         # the stand-in images' Claude Code, in the cache
                  f'skills: [shared]\nresources: {{cpus: 3}}\nimage: {{claude_code: {TEST_CLAUDE_VERSION}}}\n')
    standin.agent('a', prompt='hi')
    standin.agent('b', prompt='hi', resources={'cpus': 1})
    info = standin.doit('info', 'provision:a', check=False).stdout
    assert 'provision_skill:a:shared' in info
    run = standin.doit('machine', 'prompt')
    creates = {c[c.index('--name') + 1]: c for c in run.calls if c[:2] == ['machine', 'create']}
    a, b = creates[standin.machine('a')], creates[standin.machine('b')]
    assert a[a.index('--cpus') + 1] == '3' and b[b.index('--cpus') + 1] == '1'
