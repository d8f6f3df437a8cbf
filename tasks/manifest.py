"""Agent manifests: `agents/<name>.yaml`, validated before any task runs.

Every problem in every manifest is collected and reported at once, each naming
the file (and line), the key and the fix. Relative paths in a manifest are
relative to the directory that holds it.
"""
from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

DEFAULTS_FILE = '_defaults.yaml'

# smolvm's machine-name rules (src/data/mod.rs validate_vm_name): letters,
# digits, '-' and '_', starting alphanumeric, no trailing '-', no '--'.
MACHINE_NAME = re.compile(r'[A-Za-z0-9](?:[A-Za-z0-9_]|-(?!-))*(?<!-)')
MACHINE_PREFIX = 'bottle-'
MAX_MACHINE_NAME = 128
SKILL_NAME = re.compile(r'[A-Za-z0-9][A-Za-z0-9._-]*')
ENV_NAME = re.compile(r'[A-Za-z_][A-Za-z0-9_]*')
USER_NAME = re.compile(r'[a-z_][a-z0-9_-]*')
HOST_NAME = re.compile(r'(?=.{1,253}$)(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*'
                       r'[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?')
BACKENDS = ('smolvm', 'docker', 'podman')
BACKEND_ENV = 'BOTTLE_BACKEND'     # the backend of agents whose own manifest names none
DEBOOTSTRAP = 'debootstrap:'
TARBALL_SUFFIXES = ('.tar', '.tar.gz', '.tgz')


def is_local_base(base: str) -> bool:
    """A root filesystem on this host (directory or tarball), as opposed to an OCI reference."""
    return base.startswith(('./', '../', '/')) or base.endswith(TARBALL_SUFFIXES)

BUILTIN_DEFAULTS: dict[str, Any] = {
    'prompt': '',
    'skills': [],
    'skills_dir': 'skills',
    'image': {
        'base': 'debian:bookworm-slim',
        'setup': 'image-setup.sh.j2',
        'claude_code': '2.1.328',
        'packages': [],
        'run': [],
    },
    'resources': {'cpus': 2, 'memory': 2048},
    'network': {'allow_hosts': []},
    'env': {},
    'secrets': [],
    'user': {'name': 'agent', 'uid': 1000, 'home': '/home/agent'},
    'backend': 'smolvm',
}


class ManifestError(Exception):
    """All problems found in the manifests, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        count = f'{len(problems)} problem' + ('s' if len(problems) > 1 else '')
        super().__init__(f'{count} in agent manifests; nothing was run:\n'
                         + '\n'.join(f'  {p}' for p in problems))


# --- value checkers: each returns an error text, or None when the value is fine

def _text(value):
    if not isinstance(value, str):
        return f'expected text, got {_show(value)}'


def _integer(low, high=None):
    def check(value):
        if isinstance(value, bool) or not isinstance(value, int):
            return f'expected a whole number, got {_show(value)}'
        if value < low or (high is not None and value > high):
            span = f'between {low} and {high}' if high is not None else f'at least {low}'
            return f'expected a number {span}, got {value}'
    return check


def _matching(pattern: re.Pattern, what: str):
    def check(value):
        if not isinstance(value, str):
            return f'expected {what}, got {_show(value)}'
        if not pattern.fullmatch(value):
            return f'{value!r} is not {what}'
    return check


def _absolute_path(value):
    if not isinstance(value, str) or not value.startswith('/'):
        return f'expected an absolute guest path such as /home/agent, got {_show(value)}'


def _scalar(value):
    if not isinstance(value, (str, int, float, bool)):
        return f'expected a plain value (text, number or true/false), got {_show(value)}'


def _choice(*options):
    def check(value):
        if value not in options:
            return f'expected one of {", ".join(options)}, got {_show(value)}'
    return check


class ListOf:
    def __init__(self, item):
        self.item = item


class MapOf:
    def __init__(self, key, value):
        self.key, self.value = key, value


SCHEMA: dict[str, Any] = {
    'prompt': _text,
    'prompt_file': _text,
    'skills': ListOf(_matching(SKILL_NAME, 'a skill directory name')),
    'skills_dir': _text,
    'image': {
        'base': _text,
        'setup': _text,
        'claude_code': _matching(re.compile(r'[0-9][0-9A-Za-z.+-]*'), 'a Claude Code version such as 2.1.328'),
        'packages': ListOf(_matching(re.compile(r'[a-z0-9][a-z0-9.+-]+'), 'a Debian package name')),
        'run': ListOf(_text),
    },
    'resources': {'cpus': _integer(1, 64), 'memory': _integer(256)},
    'network': {'allow_hosts': ListOf(_matching(HOST_NAME, 'a host name such as api.anthropic.com'))},
    'env': MapOf(_matching(ENV_NAME, 'an environment variable name'), _scalar),
    'secrets': ListOf(_matching(ENV_NAME, 'an environment variable name')),
    'user': {
        'name': _matching(USER_NAME, 'a user name (lowercase letters, digits, _ and -)'),
        'uid': _integer(1, 60000),
        'home': _absolute_path,
    },
    'backend': _choice(*BACKENDS),
}


def _show(value) -> str:
    kind = {dict: 'a mapping', list: 'a list', type(None): 'nothing'}.get(type(value))
    return kind or f'{value!r} ({type(value).__name__})'


@dataclass(frozen=True)
class GuestUser:
    name: str
    uid: int
    home: str


@dataclass(frozen=True)
class Recipe:
    """Everything that goes into an agent image."""
    base: str
    setup: str
    claude_code: str
    packages: tuple[str, ...]
    run: tuple[str, ...]
    user: GuestUser
    backend: str
    source_dir: Path = field(compare=False)  # where a relative `base` path is resolved


@dataclass(frozen=True)
class Agent:
    name: str
    manifest: Path
    prompt: str
    prompt_file: Path | None
    skills: tuple[str, ...]
    skills_dir: Path
    recipe: Recipe
    cpus: int
    memory_mib: int
    allow_hosts: tuple[str, ...]
    env: dict[str, str]
    secrets: tuple[str, ...]
    user: GuestUser
    backend: str

    @property
    def machine(self) -> str:
        return MACHINE_PREFIX + self.name

    def skill_dir(self, skill: str) -> Path:
        return self.skills_dir / skill


class _Document:
    """One YAML file: its data, and the line of every key path."""

    def __init__(self, path: Path, display: str, problems: list[str]):
        self.path, self.display, self.problems = path, display, problems
        self.lines: dict[tuple, int] = {}
        self.data: dict = {}
        try:
            text = path.read_text()
            node = yaml.compose(text, Loader=yaml.SafeLoader)
            data = yaml.safe_load(text)
        except yaml.MarkedYAMLError as err:
            mark = err.problem_mark or err.context_mark
            where = f':{mark.line + 1}' if mark else ''
            self.problems.append(f'{display}{where}: YAML syntax error: {err.problem or err}; '
                                 'fix the syntax (indentation, quoting, a missing ":")')
            return
        except (OSError, UnicodeDecodeError) as err:
            self.problems.append(f'{display}: cannot read the file: {err}')
            return
        if data is None:
            return
        if not isinstance(data, dict):
            self.problems.append(f'{display}:1: expected a mapping of keys such as prompt:, skills:, '
                                 f'image:, got {_show(data)}')
            return
        self._index(node, ())
        self.data = data

    def _index(self, node, path):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, value_node in node.value:
                key = key_node.value
                self.lines[path + (key,)] = key_node.start_mark.line + 1
                if key in seen:
                    self.report(path + (key,), 'the key appears twice; keep one')
                seen.add(key)
                self._index(value_node, path + (key,))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self.lines[path + (i,)] = item.start_mark.line + 1
                self._index(item, path + (i,))

    def line_of(self, path) -> int | None:
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return None

    def report(self, path, message):
        line = self.line_of(tuple(path))
        where = f':{line}' if line else ''
        self.problems.append(f'{self.display}{where}: key {_key(path)!r}: {message}')

    def has(self, path) -> bool:
        return tuple(path) in self.lines

    def check(self, schema=SCHEMA, data=None, path=()):
        data = self.data if data is None else data
        for key, value in data.items():
            here = path + (key,)
            if key not in schema:
                close = difflib.get_close_matches(str(key), list(schema), n=1)
                hint = f'did you mean {close[0]!r}?' if close else f'valid keys here: {", ".join(schema)}'
                self.report(here, f'unknown key; {hint}')
                continue
            self._check_value(schema[key], value, here)

    def _check_value(self, rule, value, path):
        if isinstance(rule, dict):
            if not isinstance(value, dict):
                self.report(path, f'expected a mapping with keys {", ".join(rule)}, got {_show(value)}')
            else:
                self.check(rule, value, path)
        elif isinstance(rule, ListOf):
            if not isinstance(value, list):
                self.report(path, f'expected a list (- item per line), got {_show(value)}')
                return
            for i, item in enumerate(value):
                error = rule.item(item)
                if error:
                    self.report(path + (i,), error)
        elif isinstance(rule, MapOf):
            if not isinstance(value, dict):
                self.report(path, f'expected a mapping of NAME: value, got {_show(value)}')
                return
            for key, item in value.items():
                error = rule.key(key) or rule.value(item)
                if error:
                    self.report(path + (key,), error)
        else:
            error = rule(value)
            if error:
                self.report(path, error)


def _key(path) -> str:
    text = ''
    for part in path:
        text += f'[{part}]' if isinstance(part, int) else (f'.{part}' if text else str(part))
    return text


def _merge(base: dict, over: dict) -> dict:
    """Maps merge key by key; lists and values replace."""
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_agents(agents_dir: Path, display_root: Path, templates: Callable[[str], bool]) -> dict[str, Agent]:
    """Read and validate every agents/*.yaml; raise ManifestError listing all problems.
    `templates(name)` says whether a template of that name exists."""
    problems: list[str] = []

    def display(path: Path) -> str:
        try:
            return str(path.relative_to(display_root))
        except ValueError:
            return str(path)

    defaults = {}
    defaults_path = agents_dir / DEFAULTS_FILE
    if defaults_path.exists():
        doc = _Document(defaults_path, display(defaults_path), problems)
        doc.check()
        defaults = doc.data

    from_env = os.environ.get(BACKEND_ENV)
    if from_env and from_env not in BACKENDS:
        problems.append(f'{BACKEND_ENV}={from_env} in the environment: not a backend; '
                        f'use one of {", ".join(BACKENDS)}')

    agents = {}
    for path in sorted(agents_dir.glob('*.yaml')):
        if path.name.startswith('_'):
            continue
        doc = _Document(path, display(path), problems)
        name = path.stem
        machine = MACHINE_PREFIX + name
        if not MACHINE_NAME.fullmatch(name) or len(machine) > MAX_MACHINE_NAME:
            fixed = re.sub(r'-+', '-', re.sub(r'[^A-Za-z0-9_-]', '-', name)).strip('-_') or 'agent'
            problems.append(
                f'{doc.display}: the agent name {name!r} comes from the file name and must become the '
                f'machine name {machine!r}: use only letters, digits, "-" and "_", start with a letter '
                f'or digit, no "--", no trailing "-", at most {MAX_MACHINE_NAME - len(MACHINE_PREFIX)} '
                f'characters; rename the file, e.g. to {fixed}.yaml')
        doc.check()
        spec = _merge(BUILTIN_DEFAULTS, defaults)
        if from_env:
            spec['backend'] = from_env
        agent = _build(name, path, doc, _merge(spec, doc.data), defaults_path, display, problems, templates)
        if agent:
            agents[name] = agent
    if problems:
        raise ManifestError(problems)
    return agents


def _build(name, path, doc, spec, defaults_path, display, problems, templates) -> Agent | None:
    """Cross-key checks on the merged spec; the Agent only when no problem was found so far."""

    def report(key_path, message):
        if doc.has(key_path) or not defaults_path.exists():
            doc.report(key_path, message)
        else:
            problems.append(f'{display(defaults_path)} (for {display(path)}): key {_key(key_path)!r}: {message}')

    base_dir = path.parent
    prompt_file = None
    if doc.has(('prompt',)) and doc.has(('prompt_file',)):
        doc.report(('prompt_file',), 'give either prompt (inline text) or prompt_file, not both')
    if isinstance(spec.get('prompt_file'), str) and not (doc.has(('prompt',))):
        prompt_file = (base_dir / spec['prompt_file']).resolve()
        if not prompt_file.is_file():
            report(('prompt_file',), f'file {display(prompt_file)} does not exist; create it or fix the '
                                     'path (relative to the manifest\'s directory)')
    skills_dir = (base_dir / str(spec.get('skills_dir', 'skills'))).resolve()
    skills = spec.get('skills') if isinstance(spec.get('skills'), list) else []
    for i, skill in enumerate(skills):
        if not isinstance(skill, str) or not SKILL_NAME.fullmatch(skill):
            continue
        where = skills_dir / skill
        if skills.count(skill) > 1 and skills.index(skill) < i:
            report(('skills', i), f'skill {skill!r} is listed twice; keep one')
        elif not where.is_dir():
            report(('skills', i), f'skill {skill!r} not found: no directory {display(where)}; create it with '
                                  f'a SKILL.md, or remove {skill!r} from skills')
        elif not (where / 'SKILL.md').is_file():
            report(('skills', i), f'skill {skill!r} has no SKILL.md in {display(where)}; add one '
                                  '(Claude Code loads a skill from its SKILL.md)')
    base = spec['image'].get('base') if isinstance(spec.get('image'), dict) else None
    if isinstance(base, str) and base.startswith(DEBOOTSTRAP):
        if not re.fullmatch(r'[a-z]+', base.removeprefix(DEBOOTSTRAP)):
            report(('image', 'base'), f'{base!r}: name a Debian suite after "debootstrap:", '
                                      'e.g. debootstrap:bookworm')
    elif isinstance(base, str) and is_local_base(base):
        where = (base_dir / base).resolve()
        if not (where.is_dir() or (where.is_file() and where.name.endswith(TARBALL_SUFFIXES))):
            report(('image', 'base'), f'local base {display(where)} is neither a directory nor a '
                                      f'tarball ({", ".join(TARBALL_SUFFIXES)}); fix the path (relative '
                                      'to the manifest\'s directory) or use an image name such as '
                                      'debian:bookworm-slim')
    setup = spec['image'].get('setup') if isinstance(spec.get('image'), dict) else None
    if isinstance(setup, str) and not templates(setup):
        report(('image', 'setup'), f'template {setup!r} not found in templates/; add it there, or leave '
                                   'the key out for the built-in image-setup.sh.j2')
    env = spec.get('env') if isinstance(spec.get('env'), dict) else {}
    secrets = spec.get('secrets') if isinstance(spec.get('secrets'), list) else []
    for i, secret in enumerate(secrets):
        if secret in env:
            report(('secrets', i), f'{secret!r} is also set in env; a secret comes only from the host '
                                   'environment at attach time, so remove it from env')
    if problems:
        return None
    user = GuestUser(**spec['user'])
    recipe = Recipe(base=spec['image']['base'], setup=spec['image']['setup'],
                    claude_code=str(spec['image']['claude_code']),
                    packages=tuple(spec['image']['packages']), run=tuple(spec['image']['run']),
                    user=user, backend=spec['backend'], source_dir=base_dir)
    return Agent(
        name=name, manifest=path, prompt=spec['prompt'] if prompt_file is None else '',
        prompt_file=prompt_file, skills=tuple(skills), skills_dir=skills_dir, recipe=recipe,
        cpus=spec['resources']['cpus'], memory_mib=spec['resources']['memory'],
        allow_hosts=tuple(spec['network']['allow_hosts']),
        env={k: _env_text(v) for k, v in env.items()}, secrets=tuple(secrets), user=user,
        backend=spec['backend'])


def _env_text(value) -> str:
    if isinstance(value, bool):
        return 'true' if value else 'false'
    return str(value)
