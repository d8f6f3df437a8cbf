"""Generated manifests, hostile ones included: each project either loads, or fails with problems that
each name the file (and the key and its line, when the problem is about a key); never another
exception, never a hang, never a backend call. Thousands are validated in-process; a sample runs
through the real command line with smolvm, podman and docker on PATH recording any call."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tasks.manifest import BACKEND_ENV, KEYS, SECTIONS, Agent, ManifestError, load_agents
from tasks.project import Project

pytestmark = pytest.mark.extended

REPO = Path(__file__).resolve().parent.parent
SPECIAL = ('fifo', 'dev-zero', 'dev-urandom', 'directory', 'dangling', 'loop')

# What every generated project holds besides its manifests: files the manifests' values may name.
FIXTURE = {
    'agents/p.md': 'a prompt\n',
    'agents/skills/s/SKILL.md': '---\nname: s\ndescription: s\n---\n',
    'agents/skills/nomd/other.md': 'x\n',
    'agents/skills/hosts/SKILL.md': '---\nname: h\nallow_hosts: ["*.h.example", {host: h.example, methods: [GET]}]\n---\n',
    'agents/skills/badhosts/SKILL.md': '---\nname: b\nallow_hosts: [{host: "b example"}]\n---\n',
    'agents/skills/unclosed/SKILL.md': '---\nname: u\n',
    'agents/rootfs/etc/os-release': 'ID=debian\n',
    'agents/r.tar': 'not really a tarball\n',
    'templates/good.j2': 'echo {{ user }} {{ uid }}{% for p in packages %} {{ p }}{% endfor %}\n',
    'templates/undeclared.j2': '{% if packages %}{{ nope }}{% endif %}\n',
    'templates/syntax.j2': 'echo {{ user \n',
    'templates/runtime.j2': 'echo {{ uid + "x" }}\n',
    'templates/include.j2': '{% include "undeclared.j2" %}\n',
    'templates/self.j2': '{% include "self.j2" %}\n',
}
FIXTURE_SPECIAL = {'agents/fifo.md': 'fifo', 'agents/zero.md': 'dev-zero', 'agents/skills/f': 'fifo',
                   'templates/fifo.j2': 'fifo'}

# Per key: values that work (with the fixture), then values that must be refused.
GOOD = {
    'prompt': ['hi', '', 'x' * 5000],
    'prompt_file': ['p.md'],
    'skills': [['s'], [], ['hosts']],
    'skills_dir': ['skills'],
    'image.base': ['debian:bookworm-slim', 'debootstrap:bookworm', './rootfs', './r.tar',
                   'r.example:5000/a/b_c:1.2@sha256:' + 'a' * 64],
    'image.setup': ['image-setup.sh.j2', 'good.j2'],
    'image.claude_code': ['2.1.328', '0.0.0-test'],
    'image.packages': [['git', 'g++'], []],
    'image.run': [['echo hi', '{{ user }}'], []],
    'resources.cpus': [1, 64],
    'resources.memory': [256, 1 << 20],
    'resources.disk': [1, 20, 1 << 14],
    'network.allow_hosts': [['api.anthropic.com'], [], ['*.github.com', {'host': 'api.github.com', 'methods': ['GET'],
                                                                         'paths': ['/repos/a/']}]],
    'network.allow_private': [['10.20.0.0/16', '127.0.0.1'], []],
    'network.hosts': [{}, {'registry.internal': '10.20.0.5', 'Six.Example': 'fd00::5'}],
    # never [] here: a valid secret below is bound to the Anthropic API, which must then be allowed
    'network.claude_code_hosts': [['api.anthropic.com'], ['api.anthropic.com', 'claude.ai']],
    'env': [{'A': 'x', 'B': 1.5, 'C': True, 'D': 10 ** 30}, {}],
    'secrets': [['ANTHROPIC_API_KEY'], [], [{'name': 'T', 'hosts': ['api.anthropic.com'], 'header': 'Authorization',
                                              'format': 'Bearer {}'}, 'CLAUDE_CODE_OAUTH_TOKEN']],
    'user.name': ['agent', 'a_b-1'],
    'user.uid': [1, 60000],
    'user.home': ['/home/agent', '/srv/a.b'],
    'backend': ['smolvm', 'podman', 'docker'],
    'engine': ['worker1', 'w-2.example'],   # with backend podman or docker (manifest_data sees to it), known to them
    'project': ['acme-main', 'x_1'],       # valid in _defaults.yaml only: in an agent's file, a problem
    'git': [[], [{'url': 'https://github.com/acme/app.git'}],
            [{'url': 'git@github.com:acme/app.git', 'push': ['agent/x/*', 'refs/tags/v*'], 'mode': 'forward',
              'max_push_mb': 10}, {'url': 'ssh://git@h.example:2222/a/b', 'mode': 'local'}]],
    'supervise': [True, False],
    'supervise_wait': [0, 600, 3600],
}
BAD = {
    'prompt': [None, ['x']],
    'prompt_file': ['missing.md', 'fifo.md', 'zero.md', 'skills', 'x' * 300, 'a\0b', ''],
    'skills': [['nope'], ['nomd'], ['f'], ['s', 's'], ['x' * 300], ['../s'], 's', ['badhosts'], ['unclosed']],
    'skills_dir': ['x' * 300, 'a\0b', 'missing', 'p.md', ''],
    'image.base': ['debootstrap:', './missing.tar', './fifo.md', '', 'debian:', 'Debian:x', 'a' * 600,
                   '/' + 'x' * 300, 'a:b:c', 'a@sha256:abc'],
    'image.setup': ['undeclared.j2', 'syntax.j2', 'runtime.j2', 'include.j2', 'self.j2', 'missing.j2', 'fifo.j2',
                    '../dodo.py', 'a\0b', 'x' * 300, ''],
    'image.claude_code': [2.1, 'x', '1' * 200],
    'image.packages': [['Bad Name'], [['git']]],
    'image.run': [[None], 'echo'],
    'resources.cpus': [0, 65, -1, True, 10 ** 100, 2.5, '2'],
    'resources.memory': [255, (1 << 20) + 1, 10 ** 30],
    'resources.disk': [0, -1, (1 << 14) + 1, True, 2.5, '20', '20G'],
    'network.allow_hosts': [['not a host'], ['a' * 300], [None], ['*.1.2.3.4'], ['0x7f000001'], [{'methods': ['GET']}],
                            [{'host': 'a.b', 'methods': []}], [{'host': 'a.b', 'methods': ['get']}],
                            [{'host': 'a.b', 'paths': ['x']}], [{'host': 'a.b', 'port': 1}]],
    'network.allow_private': [['10.0.0.1/8'], ['nope'], ['10.0.0.0/8', '10.0.0.0/8'], '10.0.0.0/8'],
    'network.hosts': [['a.example'], {'a.example': 'nope'}, {'a.example': 5}, {'1.2.3.4': '10.0.0.1'},
                      {'bad name': '10.0.0.1'}, {'a.example': '10.0.0.0/8'}, {'0x7f000001': '127.0.0.1'}],
    'network.claude_code_hosts': ['api.anthropic.com', [['x']]],
    'env': [{'A': 'x\0y'}, {'A': [1]}, {'1A': 'x'}, {'A': None}, {'T': 'x'}, ['A']],
    'secrets': [[['T']], ['T'], ['ANTHROPIC_API_KEY', 'ANTHROPIC_API_KEY'], ['bad name'], [{}],
                [{'name': 'T', 'hosts': ['x.example'], 'header': 'Authorization'}],
                [{'name': 'T', 'hosts': ['api.anthropic.com'], 'header': 'Host'}],
                [{'name': 'T', 'hosts': ['api.anthropic.com'], 'header': 'A', 'format': 'no braces'}],
                [{'name': 'T', 'hosts': [], 'header': 'A'}], [{'name': 'T', 'header': 'A', 'host': ['a.b']}]],
    'user.name': ['root', 'Agent', 'a' * 40, ''],
    'user.uid': [0, 60001, None],
    'user.home': ['home', '/', '/home/a b', '/home/../etc', '/x' * 3000],
    'backend': ['qemu', None],
    'engine': ['', 'a b', '-x', 'x' * 65, 5, ['w'], 'unknown-worker'],
    'project': ['a--b', '-x', 'x' * 40, 5, ''],
    'git': ['https://h.example/a', [None], [{'url': 'ftp://h.example/a'}], [{'url': 'https://h.example/a/../b'}],
            [{'url': 'https://h.example/a', 'push': []}], [{'url': 'https://h.example/a', 'mode': 'push'}],
            [{'url': 'https://h.example/a', 'push': ['a..b']}], [{'url': 'https://h.example/a', 'max_push_mb': 0}],
            [{'url': 'https://h.example/a'}, {'url': 'https://h.example/a.git'}],
            [{'url': 'https://h.example/a', 'pusj': ['x']}]],
    'supervise': ['yes', 1, None, 'true'],
    'supervise_wait': [-1, 3601, True, '600', 1.5],
}

ALIAS_BOMB = 'a: &a ["x","x","x","x","x","x","x","x","x"]\n' + ''.join(
    f'{c}: &{c} [*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p}]\n' for p, c in zip('abcdefgh', 'bcdefghi'))
HOSTILE_LINES = [
    'prompt: hi # \x07 a bell in a comment\n', 'prompt: "\x1b[31m"\n', 'secrets: [[A]]\n', 'env: {A: "x\\0y"}\n',
    ALIAS_BOMB, 'env: &e {A: *e}\n', 'skills: &s [*s]\n', 'prompt: ' + '[' * 3000 + ']' * 3000 + '\n',
    '{a: ' * 2000 + '}' * 2000 + '\n', ''.join(' ' * i + f'k{i}:\n' for i in range(40)),
    'resources: {cpus: ' + '9' * 5000 + '}\n', 'resources: {cpus: !!int x}\n', 'prompt: !!timestamp x\n',
    'prompt: 2001-13-45\n', 'prompt: !!binary "%%"\n', 'prompt: !!python/object/apply:os.system [id]\n',
    'user: {name: root}\n', 'image: {base: ""}\n', 'image: {base: "debian:"}\n', 'prompt_file: "' + 'x' * 300 + '"\n',
    'skills_dir: "a\\0b"\n', '? [a]\n: b\n', 'skills: !!set {a, b}\n', 'prompt: *undefined\n', 'a: &a 1\nb: &a 2\n',
    'prompt: a\n---\nprompt: b\n', '\ufeffprompt: x\n', 'prompt: "\\ud800"\n', 'x: &x {prompt: hi}\n<<: *x\n',
    'resources:\n  <<: {cpus: 3}\n  cpus: 4\n', '1: 2\n', 'null: x\n', 'yes: no\n', '.nan: 1\n', 'env: {.inf: 1}\n',
    '- a list\n', '"just text"\n', '~\n', 'prompt: hi\nprompt: again\n', 'image:\n', 'image: [base]\n',
    'prompt: |\n  text\n\tbad tab\n', '%YAML 1.1\n---\na: 1\n', '!!map {a: 1}\n', 'prompt: !!str\n',
    'env: !!omap [a: 1]\n', 'skills: !!pairs [a: 1]\n', 'prompt: &a\n',
]
YAMLISH_TOKENS = st.sampled_from(list(':-[]{},&*!|>\'"#%@?` \n\t\\') + [
    '\x00', '\x07', '\x85', '\u2028', '\ufeff', 'é', '日', '\U0001f600', 'a', '1', 'prompt', 'skills'])


def yamlish(min_size=0, max_size=60):
    return st.lists(YAMLISH_TOKENS, min_size=min_size, max_size=max_size).map(''.join)


RANDOM_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(min_value=10 ** 20) | st.floats()
    | st.text(max_size=20) | st.text(st.characters(codec=None), max_size=5) | st.dates(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5) | st.integers(), inner,
                                                               max_size=3),
    max_leaves=8)
VALUES = {path: st.sampled_from(GOOD[path]) for path in GOOD}
WRONG_VALUES = {path: st.sampled_from(BAD[path]) | RANDOM_VALUES for path in BAD}
ONE_IN_FOUR = st.integers(0, 3)
KEY_LISTS = st.lists(st.sampled_from(KEYS), max_size=6)
SECTION_NAMES = st.sampled_from(list(SECTIONS))
ONE_IN_SIX, ONE_IN_NINE = st.integers(0, 5), st.integers(0, 8)
MISSPELT = st.sampled_from(['skils', 'promt', 'imag', 'zzz']) | st.text(max_size=8)


@st.composite
def manifest_data(draw, wrong=True) -> dict:
    """A mapping built from the declared keys with values that work, or also (when `wrong`)
    misspelt and unknown keys, and wrong and random values."""
    data: dict = {}
    for key in draw(KEY_LISTS):
        value = draw(WRONG_VALUES[key.path] if wrong and draw(ONE_IN_FOUR) == 0 else VALUES[key.path])
        section, _, inner = key.path.rpartition('.')
        if section:
            if not isinstance(data.get(section), dict):
                data[section] = {}
            data[section][inner] = value
        else:
            data[inner] = value
    if not wrong:
        if 'engine' in data:
            data['backend'] = 'podman'      # an engine elsewhere is a podman connection or docker context
        return data
    if draw(ONE_IN_SIX) == 0:
        data[draw(MISSPELT)] = draw(RANDOM_VALUES)
    if draw(ONE_IN_NINE) == 0:
        data[draw(SECTION_NAMES)] = draw(RANDOM_VALUES)
    return data


def dumped(data) -> str:
    return yaml.safe_dump(data, allow_unicode=True, sort_keys=False)


HOSTILE = st.lists(st.sampled_from(HOSTILE_LINES), min_size=1, max_size=3).map(''.join)
INSERTED = yamlish(1, 4)
RANDOM_TEXT = yamlish()
RANDOM_BYTES = st.binary(max_size=40)
KINDS = st.integers(0, 9)


@st.composite
def manifest_text(draw) -> bytes:
    kind = draw(KINDS)
    if kind == 0:
        text = dumped(draw(manifest_data()))
    elif kind == 1:
        text = draw(HOSTILE)
    elif kind == 2:
        text = dumped(draw(manifest_data())) + draw(HOSTILE)
    elif kind == 3:    # a valid manifest with something inserted somewhere
        text = dumped(draw(manifest_data()))
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(INSERTED) + text[at:]
    elif kind == 4:
        text = draw(RANDOM_TEXT)
    elif kind == 5:
        return draw(RANDOM_BYTES)
    else:
        text = dumped(draw(manifest_data()))
    return text.encode('utf-8', 'surrogatepass')


PLAIN_NAMES = st.sampled_from(['a.yaml', 'b.yaml', 'c.yaml', '_defaults.yaml'])
ODD_NAMES = st.sampled_from(['_default.yaml', 'x.yml', 'a--b.yaml', 'bad-.yaml', 'my.agent.yaml', 'a' * 130 + '.yaml',
                             'ünï.yaml', 'a\nb.yaml', '.#a.yaml', '-a.yaml', '.yaml']) | st.text(
    st.characters(blacklist_characters='/\0', codec='utf-8'), min_size=1, max_size=20).map(
    lambda name: name + '.yaml')
SPECIAL_OR_NOT = st.integers(0, 9)
ONE_IN_THREE = st.integers(0, 2)
PLAIN_NAME_LISTS = st.lists(PLAIN_NAMES, min_size=1, max_size=3, unique=True)
SPECIALS = st.sampled_from(SPECIAL)
NAME_LISTS = st.lists(st.one_of(PLAIN_NAMES, PLAIN_NAMES, PLAIN_NAMES, ODD_NAMES), min_size=1, max_size=3,
                      unique=True)


@st.composite
def projects(draw) -> dict:
    """agents/<file>: bytes, or a kind of special file. One in three is made to work."""
    if draw(ONE_IN_THREE) == 0:
        return {f'agents/{name}': dumped(draw(manifest_data(wrong=False))).encode()
                for name in draw(PLAIN_NAME_LISTS)}
    return {f'agents/{name}': draw(SPECIALS) if draw(SPECIAL_OR_NOT) == 0 else draw(manifest_text())
            for name in draw(NAME_LISTS)}


def make(root: Path, files: dict):
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if content == 'fifo':
            os.mkfifo(path)
        elif content == 'dev-zero':
            path.symlink_to('/dev/zero')
        elif content == 'dev-urandom':
            path.symlink_to('/dev/urandom')
        elif content == 'directory':
            path.mkdir()
        elif content == 'dangling':
            path.symlink_to(root / 'nowhere')
        elif content == 'loop':
            path.symlink_to(path.name)
        else:
            path.write_bytes(content if isinstance(content, bytes) else content.encode())


def make_project(root: Path, files: dict):
    make(root, {**FIXTURE, **FIXTURE_SPECIAL, **files})


@contextmanager
def manifests_in(root: Path, files: dict):
    """The generated files in a project that already holds the fixture, for one example."""
    make(root, files)
    try:
        yield
    finally:
        for rel in files:
            path = root / rel
            path.rmdir() if path.is_dir() and not path.is_symlink() else path.unlink()


@contextmanager
def no_backend_variable():
    with mock.patch.dict(os.environ):
        os.environ.pop(BACKEND_ENV, None)
        yield


def load(project: Project):
    """(agents, problems, default_backend calls) of the project, in-process."""
    calls = []

    def default_backend():
        calls.append(1)
        return 'smolvm'

    try:
        agents = load_agents(project.agents_dir, project.root, project.setup_template_problem, default_backend,
                             lambda backend: set(GOOD['engine']))
    except ManifestError as err:
        # only an engine's problem may need the backend detection chose (an engine on smolvm)
        assert calls == [] or {problem.key for problem in err.problems} == {'engine'}, \
            'the backend was looked for although a manifest is wrong'
        return None, err, calls
    return agents, None, calls


def assert_well_reported(err: ManifestError):
    assert err.problems
    for problem in err.problems:
        text = str(problem)
        assert '\n' not in text and '\r' not in text, text
        assert problem.file.startswith('agents/') and problem.text, text
        if problem.key is not None:
            assert problem.line is not None, f'a problem with a key has no line: {text}'
            assert f': key {problem.key!r}: ' in text
    for line in str(err).splitlines()[1:]:
        assert re.match(r'  agents/', line), line


@pytest.fixture(scope='module')
def fixture_project(tmp_path_factory) -> Project:
    """One project for all in-process examples (its templates are compiled once)."""
    root = tmp_path_factory.mktemp('mf-fuzz')
    make_project(root, {})
    return Project(root)


@settings(max_examples=1200, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(files=projects())
def test_generated_projects_load_or_fail_with_a_clear_problem_per_line(fixture_project, files):
    with manifests_in(fixture_project.root, files), no_backend_variable():
        agents, err, calls = load(fixture_project)
    if err is not None:
        assert_well_reported(err)
    else:
        assert len(calls) <= 1
        for name, agent in agents.items():
            assert isinstance(agent, Agent) and agent.name == name
            assert agent.backend in ('smolvm', 'docker', 'podman') and agent.user.name != 'root'
            assert 1 <= agent.cpus <= 64 and all('\0' not in v for v in agent.env.values())


# --- the real command line, with backends that record any call

# Records any call and fails, but for the listings of engines elsewhere that reading the manifests asks for.
FAKE_BACKEND = ('#!/bin/sh\ncase "$*" in\n'
                '"system connection list --format json") echo \'' + json.dumps(
                    [{'Name': name, 'URI': f'ssh://root@{name}/run/podman/podman.sock'} for name in GOOD['engine']])
                + '\'; exit 0 ;;\n'
                '"context ls --format {{json .}}") ' + ''.join(
                    f"echo '{json.dumps({'Name': name, 'DockerEndpoint': f'ssh://root@{name}'})}'; "
                    for name in GOOD['engine']) + 'exit 0 ;;\n'
                'esac\nprintf "%s\\n" "$0 $*" >> "$BACKEND_CALLS"\nexit 1\n')


@settings(max_examples=25, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(projects())
def test_the_command_line_exits_3_with_the_same_problems_and_calls_no_backend(files):
    with tempfile.TemporaryDirectory(prefix='mf-') as tmp, no_backend_variable():
        root, fakes = Path(tmp) / 'project', Path(tmp) / 'bin'
        make_project(root, files)
        agents, err, _ = load(Project(root))
        shutil.copy(REPO / 'dodo.py', root / 'dodo.py')
        fakes.mkdir()
        for name in ('smolvm', 'podman', 'docker'):
            (fakes / name).write_text(FAKE_BACKEND)
            (fakes / name).chmod(0o755)
        calls = Path(tmp) / 'calls'
        env = {**os.environ, 'PYTHONPATH': str(REPO), 'PATH': f'{fakes}:{os.environ["PATH"]}',
               'BACKEND_CALLS': str(calls), 'XDG_CACHE_HOME': str(Path(tmp) / 'cache')}
        run = subprocess.run([sys.executable, '-m', 'doit', 'list'], cwd=root, env=env, capture_output=True,
                             text=True, errors='backslashreplace', timeout=60, stdin=subprocess.DEVNULL)
        output = run.stdout + run.stderr
        assert 'Traceback' not in output, output
        assert not calls.exists(), calls.read_text()
        if err is None:
            assert run.returncode == 0, output
        else:
            assert run.returncode == 3, output
            for problem in err.problems:
                assert str(problem) in run.stderr, f'{problem} missing from:\n{run.stderr}'
