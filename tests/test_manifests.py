"""Bad manifests: every problem reported at once, naming file, line and key; nothing runs."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from tasks.manifest import KEYS, ManifestError, load_agents
from tasks.project import Project

pytestmark = pytest.mark.fast

REPO = Path(__file__).resolve().parent.parent
README = REPO / 'README.md'
SCHEMA = REPO / 'schema' / 'agent.schema.json'

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
    'secret also in env': ('a.yaml', 'env: {ANTHROPIC_API_KEY: x}\nsecrets: [ANTHROPIC_API_KEY]\n',
                           ["agents/a.yaml:2: key 'secrets[0]'", 'also set in env']),
    'secret without a binding': ('a.yaml', 'prompt: hi\nsecrets: [TOKEN]\n',
                                 ["agents/a.yaml:2: key 'secrets[0]'", "'TOKEN' has no binding", 'header: Authorization']),
    'secret bound to a host not allowed': (
        'a.yaml', 'secrets:\n  - {name: GITHUB_TOKEN, hosts: [api.github.com], header: Authorization}\n',
        ["agents/a.yaml:2: key 'secrets[0]'", 'GITHUB_TOKEN is bound to api.github.com, which the bottle may not reach',
         'network.allow_hosts']),
    'secret in a header the proxy cannot set': (
        'a.yaml', 'network: {allow_hosts: [api.github.com]}\nsecrets:\n  - name: GITHUB_TOKEN\n'
                  '    hosts: [api.github.com]\n    header: Host\n',
        ["agents/a.yaml:5: key 'secrets[0].header'", "Host is a header the egress proxy sets or drops itself"]),
    'secret format without a place for it': (
        'a.yaml', 'secrets: [{name: T, hosts: [api.anthropic.com], header: Authorization, format: Bearer}]\n',
        ["agents/a.yaml:1: key 'secrets[0].format'", "must hold \"{}\" exactly once"]),
    'yaml syntax': ('a.yaml', 'prompt: hi\nskills: [a, b\nimage: {}\n', ['agents/a.yaml:', 'YAML syntax error']),
    'not a mapping': ('a.yaml', '- just\n- a list\n', ['agents/a.yaml:1', 'expected a mapping']),
    'missing setup template': ('a.yaml', 'image: {setup: nope.sh.j2}\n',
                               ["agents/a.yaml:1", "'image.setup'", "template 'nope.sh.j2' not found"]),
    'bad debootstrap suite': ('a.yaml', 'image: {base: "debootstrap:Book worm"}\n', ["'image.base'", 'Debian suite']),
    'missing local base': ('a.yaml', 'image: {base: ./rootfs.tar}\n', ["'image.base'", 'neither a directory']),
    'duplicate key': ('a.yaml', 'prompt: a\nprompt: b\n', ["agents/a.yaml:2", "'prompt'", 'twice']),
    'engine on smolvm': ('a.yaml', 'prompt: hi\nengine: worker1\n',
                         ["agents/a.yaml:2: key 'engine'", 'a docker context, but this agent runs on smolvm',
                          'backend: podman']),
    'engine podman does not know': ('a.yaml', 'backend: podman\nengine: no-such-worker\n',
                                    ["agents/a.yaml:2: key 'engine'", "no podman system connection is named "
                                     "'no-such-worker'", 'podman system connection add no-such-worker ssh://']),
    'engine name that is no connection name': ('a.yaml', 'backend: podman\nengine: "-x y"\n',
                                               ["agents/a.yaml:2: key 'engine'", 'is not a podman system connection or '
                                                'docker context name']),
    'engine docker does not know': ('a.yaml', 'backend: docker\nengine: no-such-context\n',
                                    ["agents/a.yaml:2: key 'engine'", "no docker context is named 'no-such-context'",
                                     'docker context create no-such-context --docker host=ssh://']),
}


@pytest.mark.parametrize('case', list(CASES))
def test_bad_manifest_fails_before_any_backend_call(standin, case):
    filename, text, expected = CASES[case]
    (standin.root / 'agents/skills/empty').mkdir(parents=True)
    standin.write(standin.root / 'agents' / filename, text)
    run = standin.doit('launch:a', check=False)
    assert run.returncode != 0
    for part in expected:
        assert part in run.stderr, f'{part!r} missing from:\n{run.stderr}'
    assert 'Traceback' not in run.output
    assert run.calls == []


def test_every_problem_in_every_manifest_is_reported_at_once(standin):
    standin.agent_text('a', 'skils: []\nresources: {memory: 12}\n')
    standin.agent_text('b', 'skills: [missing]\n')
    standin.write(standin.root / 'agents/_defaults.yaml', 'backend: qemu\n')
    run = standin.doit('list', check=False)
    assert run.returncode != 0 and run.calls == []
    for part in ["agents/a.yaml:1: key 'skils'", "agents/a.yaml:2: key 'resources.memory'",
                 "agents/b.yaml:1: key 'skills[0]'", "agents/_defaults.yaml:1: key 'backend'"]:
        assert part in run.stderr, run.stderr
    assert '4 problems' in run.stderr


# --- manifests that once crashed or hung the tool, and what it once accepted

ALIAS_BOMB = 'a: &a [x, x, x, x, x, x, x, x, x]\n' + ''.join(
    f'{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n' for p, c in zip('abcdefgh', 'bcdefghi'))
HOSTILE = {
    'control character in a comment': ({'a.yaml': 'prompt: hi\n# a bell: \x07\n'},
                                       ['agents/a.yaml:2:', 'U+0007', 'not even in a comment']),
    'unhashable secret': ({'a.yaml': 'secrets: [[A]]\n'}, ["agents/a.yaml:1: key 'secrets[0]'", 'got a list']),
    'NUL in an env value': ({'a.yaml': 'env:\n  A: "x\\0y"\n'}, ["agents/a.yaml:2: key 'env.A'", 'NUL']),
    'alias bomb': ({'a.yaml': ALIAS_BOMB}, ['agents/a.yaml:', 'aliases expand to more than']),
    'self-referencing alias': ({'a.yaml': 'env: &e {A: *e}\n'}, ['agents/a.yaml:1:', 'inside the node it refers to']),
    'deep nesting': ({'a.yaml': 'prompt: ' + '[' * 5000 + ']' * 5000 + '\n'}, ['agents/a.yaml:1:', 'nested deeper']),
    'number past the digit limit': ({'a.yaml': 'resources:\n  cpus: ' + '9' * 5000 + '\n'},
                                    ['agents/a.yaml:2:', 'cannot read', 'as int']),
    'int tag on text': ({'a.yaml': 'resources: {cpus: !!int x}\n'}, ['agents/a.yaml:1:', "cannot read 'x' as int"]),
    'NUL in a path': ({'a.yaml': 'skills_dir: "sk\\0ills"\nskills: [x]\n'},
                      ["agents/a.yaml:1: key 'skills_dir'", 'NUL']),
    'path component over 255 bytes': ({'a.yaml': f'prompt_file: {"p" * 256}.md\n'},
                                      ["agents/a.yaml:1: key 'prompt_file'", 'longer than 255 bytes']),
    'setup template with an unknown variable': (
        {'a.yaml': 'image: {setup: mine.sh.j2}\n',
         '../templates/mine.sh.j2': 'echo {{ user }}\n{{ secret_token }}\n'},
        ["agents/a.yaml:1: key 'image.setup'", "'mine.sh.j2' line 2 uses secret_token", 'provides claude_code']),
    'setup template that does not parse': (
        {'a.yaml': 'image:\n  setup: mine.sh.j2\n', '../templates/mine.sh.j2': 'echo {{ user\n'},
        ["agents/a.yaml:2: key 'image.setup'", "'mine.sh.j2' line 1"]),
    'misspelt _defaults.yaml': ({'_default.yaml': 'prompt: hi\n', 'a.yaml': ''},
                                ['agents/_default.yaml: only _defaults.yaml may start with "_"',
                                 'rename it to _defaults.yaml']),
    'prompt and prompt_file in _defaults.yaml': (
        {'_defaults.yaml': 'prompt: hi\nprompt_file: a.md\n', 'a.md': 'hi\n', 'a.yaml': ''},
        ["agents/_defaults.yaml:2: key 'prompt_file'", 'not both']),
    'root as the agent user': ({'a.yaml': 'user:\n  name: root\n'},
                               ["agents/a.yaml:2: key 'user.name'", 'not be root']),
    'empty image reference': ({'a.yaml': 'image: {base: ""}\n'}, ["agents/a.yaml:1: key 'image.base'",
                                                                  'not an image reference']),
    'image reference without a tag': ({'a.yaml': 'image: {base: "debian:"}\n'},
                                      ["agents/a.yaml:1: key 'image.base'", "'debian:' is not an image reference"]),
    'problem traced to _defaults.yaml': ({'_defaults.yaml': 'prompt: hi\nskills: [nope]\n', 'a.yaml': ''},
                                         ["agents/_defaults.yaml:2: key 'skills[0]'", "skill 'nope' not found"]),
    'non-string keys': ({'a.yaml': 'prompt: hi\n1: one\nenv:\n  2: two\n'},
                        ["agents/a.yaml:2: key '1': unknown key", "agents/a.yaml:4: key 'env.2'"]),
    'agent name too long': ({'a' * 89 + '.yaml': ''}, ['at most 88 characters', f'e.g. to {"a" * 88}.yaml']),
    'git URL that is no repository': ({'a.yaml': 'git:\n  - url: ftp://h.example/app\n'},
                                      ["agents/a.yaml:2: key 'git[0].url'", 'expected a repository URL']),
    'git mode misspelt': ({'a.yaml': 'git:\n  - url: https://h.example/app\n    mode: push\n'},
                          ["agents/a.yaml:3: key 'git[0].mode'", 'forward, review, local']),
    'git push pattern that is no ref': ({'a.yaml': 'git:\n  - url: https://h.example/app\n    push: [a..b]\n'},
                                        ["agents/a.yaml:3: key 'git[0].push[0]'", 'branch pattern']),
    'one repository twice': ({'a.yaml': 'git:\n  - url: https://h.example/app\n  - url: git@h.example:app.git\n'},
                             ["agents/a.yaml:3: key 'git[1].url'", 'the same repository as entry 0']),
    'project name in an agent': ({'a.yaml': 'prompt: hi\nproject: mine\n'},
                                 ["agents/a.yaml:2: key 'project'", 'move it to agents/_defaults.yaml']),
    'project name that is no machine name': ({'_defaults.yaml': 'project: my--project\n', 'a.yaml': ''},
                                             ["agents/_defaults.yaml:1: key 'project'", 'letters, digits']),
}


@pytest.mark.parametrize('case', list(HOSTILE))
def test_hostile_manifest_gets_a_clear_error_and_no_backend_call(standin, case):
    files, expected = HOSTILE[case]
    for name, text in files.items():
        standin.write(standin.root / 'agents' / name, text)
    run = standin.doit('list', check=False, timeout=60)
    assert run.returncode == 3, run.output
    for part in expected:
        assert part in run.stderr, f'{part!r} missing from:\n{run.stderr}'
    assert 'Traceback' not in run.output
    assert run.calls == []


SPECIAL_FILES = {
    'manifest is a named pipe': ('a.yaml', os.mkfifo, 'a named pipe'),
    '_defaults.yaml is a named pipe': ('_defaults.yaml', os.mkfifo, 'a named pipe'),
    'manifest links to /dev/zero': ('a.yaml', lambda path: path.symlink_to('/dev/zero'), 'a device'),
    '_defaults.yaml links to /dev/urandom': ('_defaults.yaml', lambda path: path.symlink_to('/dev/urandom'),
                                             'a device'),
    'prompt_file is a named pipe': ('p.md', os.mkfifo, 'a named pipe'),
}


@pytest.mark.parametrize('case', list(SPECIAL_FILES))
def test_only_regular_files_are_read(standin, case):
    name, make, kind = SPECIAL_FILES[case]
    standin.agent_text('b', 'prompt_file: p.md\n')
    path = standin.root / 'agents' / name
    path.unlink(missing_ok=True)
    make(path)
    run = standin.doit('list', check=False, timeout=60)      # a read would block or never end
    assert run.returncode == 3, run.output
    assert f'agents/{name}' in run.stderr and f'is {kind}, not a regular file' in run.stderr, run.stderr
    assert 'Traceback' not in run.output and run.calls == []


def test_oversized_manifest_is_refused(standin):
    standin.agent_text('a', 'prompt: "' + 'x' * (1 << 20) + '"\n')
    run = standin.doit('list', check=False)
    assert run.returncode == 3 and 'agents/a.yaml: is larger than 1048576 bytes' in run.stderr, run.stderr


# --- which backend an agent gets

def machine_backends(run) -> dict[str, str]:
    """agent: backend, from `doit list --all`'s `create machine bottle-<project>-<agent> on <backend>`."""
    found = re.findall(r'create machine bottle-\S+-[0-9a-f]{6}-(\S+) on (\S+) ', run.stdout)
    return dict(found)


def test_the_manifest_key_wins_then_the_environment_then_defaults(standin):
    standin.agent_text('own', 'backend: docker\n')
    standin.agent_text('shared', 'prompt: hi\n')
    standin.write(standin.root / 'agents/_defaults.yaml', 'backend: podman\n')
    run = standin.doit('list', '--all', env=standin.env(BOTTLE_BACKEND='smolvm'))
    assert machine_backends(run) == {'own': 'docker', 'shared': 'smolvm'}
    run = standin.doit('list', '--all', env=standin.env(BOTTLE_BACKEND=None))
    assert machine_backends(run) == {'own': 'docker', 'shared': 'podman'}
    (standin.root / 'agents/_defaults.yaml').unlink()
    run = standin.doit('list', '--all', env=standin.env(BOTTLE_BACKEND='podman'))
    assert machine_backends(run) == {'own': 'docker', 'shared': 'podman'}


def test_no_backend_is_looked_for_when_every_agent_names_one_or_a_manifest_is_wrong(standin, tmp_path):
    nothing = tmp_path / 'empty-path'
    nothing.mkdir()
    no_backend_installed = standin.env(PATH=str(nothing), BOTTLE_BACKEND=None)
    standin.write(standin.root / 'agents/_defaults.yaml', 'backend: docker\n')
    standin.agent_text('a', 'prompt: hi\n')
    run = standin.doit('list', '--all', env=no_backend_installed)
    assert machine_backends(run) == {'a': 'docker'}
    (standin.root / 'agents/_defaults.yaml').unlink()
    standin.agent_text('b', 'skils: []\n')
    run = standin.doit('list', env=no_backend_installed, check=False)
    assert run.returncode == 3 and "agents/b.yaml:1: key 'skils'" in run.stderr, run.output


# --- one declaration per key: the README's table and the JSON Schema come from it

def test_readme_holds_the_table_the_declarations_print():
    table = subprocess.run([sys.executable, '-m', 'tasks.manifest', '--reference'], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout
    section = README.read_text().split('## Manifest reference', 1)[1].split('\n## ', 1)[0]
    rows = ''.join(line + '\n' for line in section.splitlines() if line.startswith('|'))
    assert rows == table
    assert table.count('\n') == len(KEYS) + 2


def test_committed_schema_is_what_the_declarations_give():
    printed = subprocess.run([sys.executable, '-m', 'tasks.manifest', '--schema'], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout
    assert SCHEMA.read_text() == printed, 'regenerate: python -m tasks.manifest --schema > schema/agent.schema.json'


def test_every_manifest_in_the_repository_validates_against_the_schema():
    validator = schema_validator()
    manifests = sorted((REPO / 'agents').glob('*.yaml'))
    assert manifests
    for path in manifests:
        errors = [e.message for e in validator.iter_errors(yaml.safe_load(path.read_text()))]
        assert errors == [], f'{path}: {errors}'


AGREE = {   # manifest: does the tool accept it (with agents/skills/s present)?
    'prompt: hi\nskills: [s]\nresources: {cpus: 4, memory: 4096}\n': True,
    'image: {base: "ghcr.io/org/img:1.0", packages: [git]}\nuser: {name: dev, uid: 1001, home: /home/dev}\n': True,
    'env: {A: 1, B: x, C: true}\nsecrets: [ANTHROPIC_API_KEY, {name: T, hosts: [a.example], header: X-Key}]\n'
    'network: {allow_hosts: [a.example]}\n': True,
    'secrets: [{name: T, hosts: [a.example], header: X-Key, format: nothing}]\n': False,
    'skils: [s]\n': False,
    'resources: {cpus: 0}\n': False,
    'image: {base: "debian:"}\n': False,
    'user: {name: root}\n': False,
    'prompt: hi\nprompt_file: p.md\n': False,
    'backend: qemu\n': False,
    'backend: podman\nengine: worker-1.example\n': True,
    'engine: "worker 1"\n': False,
    'env: {1A: x}\n': False,
    'secrets: [ANTHROPIC_API_KEY, ANTHROPIC_API_KEY]\n': False,
}


@pytest.mark.parametrize('text', list(AGREE))
def test_schema_and_tool_agree(text, tmp_path):
    (tmp_path / 'agents/skills/s').mkdir(parents=True)
    (tmp_path / 'agents/skills/s/SKILL.md').write_text('s\n')
    (tmp_path / 'agents/p.md').write_text('p\n')
    (tmp_path / 'agents/a.yaml').write_text(text)
    project = Project(tmp_path)
    try:
        load_agents(project.agents_dir, tmp_path, project.setup_template_problem, lambda: 'smolvm')
        accepted = True
    except ManifestError:
        accepted = False
    assert accepted == AGREE[text]
    assert schema_validator().is_valid(yaml.safe_load(text)) == AGREE[text]


def schema_validator():
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)
