"""Bad manifests: every problem reported at once, naming file, line and key; nothing runs."""
from __future__ import annotations

import pytest

CASES = {
    'unknown key': ('a.yaml', 'prompt: hi\nskils: [review]\n',
                    ["agents/a.yaml:2", "'skils'", "did you mean 'skills'"]),
    'wrong type': ('a.yaml', 'resources:\n  cpus: two\n',
                   ["agents/a.yaml:2", "'resources.cpus'", 'expected a whole number']),
    'list expected': ('a.yaml', 'skills: review\n', ["agents/a.yaml:1", "'skills'", 'expected a list']),
    'bad host': ('a.yaml', 'network:\n  allow_hosts: ["not a host"]\n',
                 ["agents/a.yaml:2", "'network.allow_hosts[0]'", 'host name']),
    'bad machine name (dot)': ('my.agent.yaml', 'prompt: hi\n', ['agents/my.agent.yaml', 'machine name', 'rename']),
    'bad machine name (double hyphen)': ('a--b.yaml', 'prompt: hi\n', ['agents/a--b.yaml', 'no "--"']),
    'bad machine name (trailing hyphen)': ('bad-.yaml', 'prompt: hi\n', ['agents/bad-.yaml', 'trailing']),
    'missing skill': ('a.yaml', 'skills: [nope]\n',
                      ["agents/a.yaml:1", "'skills[0]'", "skill 'nope' not found", 'agents/skills/nope']),
    'skill without SKILL.md': ('a.yaml', 'skills: [empty]\n', ["'skills[0]'", 'no SKILL.md']),
    'missing prompt_file': ('a.yaml', 'prompt_file: prompts/a.md\n',
                            ["agents/a.yaml:1", "'prompt_file'", 'does not exist']),
    'prompt and prompt_file': ('a.yaml', 'prompt: hi\nprompt_file: x.md\n', ["'prompt_file'", 'not both']),
    'secret also in env': ('a.yaml', 'env: {TOKEN: x}\nsecrets: [TOKEN]\n', ["'secrets[0]'", 'also set in env']),
    'yaml syntax': ('a.yaml', 'prompt: hi\nskills: [a, b\nimage: {}\n', ['agents/a.yaml:', 'YAML syntax error']),
    'not a mapping': ('a.yaml', '- just\n- a list\n', ['agents/a.yaml:1', 'expected a mapping']),
    'missing setup template': ('a.yaml', 'image: {setup: nope.sh.j2}\n',
                               ["agents/a.yaml:1", "'image.setup'", "template 'nope.sh.j2' not found"]),
    'bad debootstrap suite': ('a.yaml', 'image: {base: "debootstrap:Book worm"}\n', ["'image.base'", 'Debian suite']),
    'missing local base': ('a.yaml', 'image: {base: ./rootfs.tar}\n', ["'image.base'", 'neither a directory']),
    'duplicate key': ('a.yaml', 'prompt: a\nprompt: b\n', ["agents/a.yaml:2", "'prompt'", 'twice']),
}


@pytest.mark.parametrize('case', list(CASES))
def test_i_bad_manifest_fails_before_any_backend_call(standin, case):
    filename, text, expected = CASES[case]
    (standin.root / 'agents/skills/empty').mkdir(parents=True)
    standin.write(standin.root / 'agents' / filename, text)
    run = standin.doit('launch:a', check=False)
    assert run.returncode != 0
    for part in expected:
        assert part in run.stderr, f'{part!r} missing from:\n{run.stderr}'
    assert 'Traceback' not in run.output
    assert run.calls == []


def test_i_every_problem_in_every_manifest_is_reported_at_once(standin):
    standin.agent_text('a', 'skils: []\nresources: {memory: 12}\n')
    standin.agent_text('b', 'skills: [missing]\n')
    standin.write(standin.root / 'agents/_defaults.yaml', 'backend: qemu\n')
    run = standin.doit('list', check=False)
    assert run.returncode != 0 and run.calls == []
    for part in ["agents/a.yaml:1: key 'skils'", "agents/a.yaml:2: key 'resources.memory'",
                 "agents/b.yaml:1: key 'skills[0]'", "agents/_defaults.yaml:1: key 'backend'"]:
        assert part in run.stderr, run.stderr
    assert '4 problems' in run.stderr


def test_shared_defaults_apply_to_every_agent(standin):
    standin.skill('shared')
    standin.write(standin.root / 'agents/_defaults.yaml',
                  'skills: [shared]\nresources: {cpus: 3}\nimage: {claude_code: 0.0.0-test}\n')
    standin.agent('a', prompt='hi')
    standin.agent('b', prompt='hi', resources={'cpus': 1})
    info = standin.doit('info', 'provision:a', check=False).stdout
    assert 'provision_skill:a:shared' in info
    run = standin.doit('machine', 'prompt')
    creates = {c[c.index('--name') + 1]: c for c in run.calls if c[:2] == ['machine', 'create']}
    assert creates['bottle-a'][creates['bottle-a'].index('--cpus') + 1] == '3'
    assert creates['bottle-b'][creates['bottle-b'].index('--cpus') + 1] == '1'
