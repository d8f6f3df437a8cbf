"""Agent manifests: `agents/<name>.yaml`, validated before any task runs.

Every manifest key is declared once, in KEYS (type, default, description, the Agent attribute it
becomes); validation, defaults, the Agent, the README's reference table and the JSON Schema in
schema/ all come from there. Every problem in every manifest is collected and reported at once,
each naming the file, the line (where there is one), the key and the fix.

Manifests are untrusted input that must never hang or crash the tool: only regular files of
bounded size are read, YAML is loaded with bounded nesting and alias expansion, and every value
is checked before it is used. Relative paths in a manifest are relative to the directory that
holds it.

    python -m tasks.manifest --reference   the README's reference table
    python -m tasks.manifest --schema      the JSON Schema (committed as schema/agent.schema.json)
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import hashlib
import ipaddress
import json
import os
import re
import reprlib
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

from daemons.proxy.rules import noncanonical_ipv4    # standard library only, shared with the proxy

DEFAULTS_FILE = '_defaults.yaml'
MANIFEST_SUFFIX = '.yaml'

# smolvm's machine-name rules (src/data/mod.rs validate_vm_name): letters,
# digits, '-' and '_', starting alphanumeric, no trailing '-', no '--'.
MACHINE_NAME = re.compile(r'[A-Za-z0-9](?:[A-Za-z0-9_]|-(?!-))*(?<!-)')
MACHINE_PREFIX = 'bottle-'
MAX_MACHINE_NAME = 128
MAX_PROJECT_NAME = 32
MAX_AGENT_NAME = MAX_MACHINE_NAME - len(MACHINE_PREFIX) - MAX_PROJECT_NAME - 1
PROJECT_KEY = 'project'      # the checkout's, so only in _defaults.yaml
BACKENDS = ('smolvm', 'docker', 'podman')
BACKEND_ENV = 'BOTTLE_BACKEND'     # the backend of agents whose manifests name none
DEBOOTSTRAP = 'debootstrap:'
TARBALL_SUFFIXES = ('.tar', '.tar.gz', '.tgz')

# Bounds that keep a hostile manifest from hanging the tool or eating memory; a real manifest
# is a few hundred bytes, a few levels deep, with a handful of aliases at most.
MAX_FILE_BYTES = 1 << 20
MAX_DEPTH = 16
MAX_NODES = 10_000           # YAML nodes, every alias expanded
MAX_TEXT = 4 << 20           # characters of all scalars, every alias expanded
MAX_NAME_BYTES = 255         # one path component (Linux NAME_MAX)
MAX_PATH_BYTES = 4095        # a whole path (Linux PATH_MAX without the NUL)


def default_project_name(root: Path) -> str:
    """The checkout's part of machine names: its directory's name, readable, and a short hash of its
    path, so that two worktrees or clones of one project (even in directories of the same name)
    never share a machine."""
    readable = re.sub(r'[^a-z0-9]+', '-', root.name.lower()).strip('-')[:MAX_PROJECT_NAME - 7] or 'project'
    return f'{readable.rstrip("-")}-{hashlib.sha256(str(root).encode()).hexdigest()[:6]}'


def is_local_base(base: str) -> bool:
    """A root filesystem on this host (directory or tarball), as opposed to an OCI reference."""
    return base.startswith(('./', '../', '/')) or base.endswith(TARBALL_SUFFIXES)


# --- value types: each says what it is called, checks a value, and gives its JSON Schema

_show = reprlib.Repr()
_show.maxstring = _show.maxother = _show.maxlong = 60
_show.maxlevel = 1


def quote(value) -> str:
    """A value as a problem message quotes it: short, and in one line."""
    return _show.repr(value)


def show(value) -> str:
    """A value and its type, as a problem message shows what it got."""
    kind = {dict: 'a mapping', list: 'a list', type(None): 'nothing'}.get(type(value))
    return kind or f'{quote(value)} ({type(value).__name__})'


def printable(text: str) -> str:
    """Text for a one-line message: control and unencodable characters escaped."""
    return ''.join(c if c.isprintable() else c.encode('unicode_escape', 'backslashreplace').decode()
                   for c in text)


class Index(int):
    """A list position in a key path (printed as [i]; a mapping key 0 prints as .0)."""


class Kind:
    """A value type of the manifest."""
    name = ''          # the README's type column

    def problems(self, value) -> Iterator[tuple[tuple, str]]:
        """(path below this key, what is wrong and how to fix it) for each problem."""
        return iter(())

    def schema(self) -> dict:
        raise NotImplementedError

    def convert(self, value, base_dir: Path):
        """The form the Agent holds."""
        return value


class Text(Kind):
    """A string; optionally matching a pattern, at most max_length characters, with an extra rule."""

    def __init__(self, name: str, what: str, pattern: str | None = None, max_length: int | None = None,
                 rule: Callable[[str], str | None] | None = None):
        self.name, self.what, self.max_length, self.rule = name, what, max_length, rule
        self.pattern = re.compile(pattern) if pattern else None

    def problems(self, value):
        error = self.problem(value)
        if error:
            yield (), error

    def problem(self, value) -> str | None:
        if not isinstance(value, str):
            return f'expected {self.what}, got {show(value)}'
        if '\0' in value:
            return 'contains a NUL byte (\\0); remove it'
        try:
            value.encode()
        except UnicodeEncodeError as err:
            return (f'contains {printable(value[err.start:err.end])}, which is not a Unicode character; '
                    'remove it')
        if self.max_length is not None and len(value) > self.max_length:
            return f'expected {self.what} of at most {self.max_length} characters, got {len(value)}'
        if self.pattern and not self.pattern.fullmatch(value):
            return f'{quote(value)} is not {self.what}'
        return self.rule(value) if self.rule else None

    def schema(self):
        schema = {'type': 'string'}
        if self.pattern:
            schema['pattern'] = f'^(?:{self.pattern.pattern})$'
        if self.max_length is not None:
            schema['maxLength'] = self.max_length
        return schema


def _path_problem(value: str) -> str | None:
    if not value:
        return 'expected a path, got an empty text'
    if len(value.encode()) > MAX_PATH_BYTES:
        return f'the path is longer than {MAX_PATH_BYTES} bytes; use a shorter one'
    for part in value.split('/'):
        if len(part.encode()) > MAX_NAME_BYTES:
            return (f'the path component {quote(part)} is longer than '
                    f'{MAX_NAME_BYTES} bytes, which no file system allows; use a shorter name')
    return None


class HostPath(Text):
    """A path on this host, relative to the manifest's directory."""

    def __init__(self, what: str):
        super().__init__('path', what, rule=_path_problem)

    def convert(self, value, base_dir):
        return None if value is None else Path(os.path.abspath(base_dir / value))

    def schema(self):
        return {'type': 'string', 'minLength': 1}


class Integer(Kind):
    def __init__(self, low: int, high: int, unit: str = ''):
        self.low, self.high, self.unit = low, high, unit
        self.name = f'{unit}, {low}-{high}' if unit else f'{low}-{high}'

    def problems(self, value):
        if isinstance(value, bool) or not isinstance(value, int):
            yield (), f'expected a whole number, got {show(value)}'
        elif not self.low <= value <= self.high:
            yield (), f'expected a number between {self.low} and {self.high}, got {quote(value)}'

    def schema(self):
        return {'type': 'integer', 'minimum': self.low, 'maximum': self.high}


class Boolean(Kind):
    name = '`true` or `false`'

    def problems(self, value):
        if not isinstance(value, bool):
            yield (), f'expected true or false, got {show(value)}'

    def schema(self):
        return {'type': 'boolean'}


class Choice(Kind):
    def __init__(self, *options: str):
        self.options = options
        self.name = ', '.join(f'`{o}`' for o in options)

    def problems(self, value):
        if not isinstance(value, str) or value not in self.options:
            yield (), f'expected one of {", ".join(self.options)}, got {show(value)}'

    def schema(self):
        return {'enum': list(self.options)}


class ListOf(Kind):
    def __init__(self, item: Text, name: str, unique: bool = False):
        self.item, self.name, self.unique = item, name, unique

    def problems(self, value):
        if not isinstance(value, list):
            yield (), f'expected a list (one "- item" per line, or [a, b]), got {show(value)}'
            return
        seen = set()
        for i, entry in enumerate(value):
            error = self.item.problem(entry)
            if error:
                yield (Index(i),), error
            elif self.unique and entry in seen:
                yield (Index(i),), f'{entry!r} is listed twice; keep one'
            seen.add(entry if not error else None)

    def schema(self):
        schema = {'type': 'array', 'items': self.item.schema()}
        if self.unique:
            schema['uniqueItems'] = True
        return schema

    def convert(self, value, base_dir):
        return tuple(value)


class EnvValue(Kind):
    """A plain value for an environment variable: text, number or true/false, no NUL byte."""
    text = Text('text', 'text')

    def problems(self, value):
        if isinstance(value, str):
            yield from self.text.problems(value)
        elif not isinstance(value, (int, float, bool)):
            yield (), f'expected a plain value (text, number or true/false), got {show(value)}'

    def schema(self):
        return {'type': ['string', 'number', 'boolean']}


class EnvMap(Kind):
    """NAME: value; maps from _defaults.yaml and the agent merge variable by variable."""
    name = 'map of NAME: value'

    def __init__(self, names: Text):
        self.names, self.values = names, EnvValue()

    def problems(self, value):
        if not isinstance(value, dict):
            yield (), f'expected a mapping of NAME: value, got {show(value)}'
            return
        for key, entry in value.items():
            for below, error in self.values.problems(entry):
                yield (key,) + below, error
            error = self.names.problem(key)
            if error:
                yield (key,), error

    def schema(self):
        return {'type': 'object', 'propertyNames': self.names.schema(), 'additionalProperties': self.values.schema()}

    def convert(self, value, base_dir):
        return {name: ('true' if v is True else 'false' if v is False else str(v)) for name, v in value.items()}


def _root_refused(name: str) -> str | None:
    if name == 'root':
        return 'the agent user must not be root (Claude Code refuses to skip permissions as root); use e.g. agent'
    return None


class UserName(Text):
    def __init__(self):
        super().__init__('user name', 'a user name (lowercase letters, digits, _ and -, at most 32)',
                         r'[a-z_][a-z0-9_-]{0,31}', rule=_root_refused)

    def schema(self):
        return {**super().schema(), 'not': {'const': 'root'}}


# An OCI image reference (the grammar of distribution/reference): [host[:port]/]path[:tag][@digest].
_DOMAIN_PART = r'[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?'
_PATH_PART = r'[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*'
IMAGE_REFERENCE = re.compile(
    rf'(?:(?:{_DOMAIN_PART}(?:\.{_DOMAIN_PART})*|\[[0-9A-Fa-f:]+\])(?::[0-9]+)?/)?'
    rf'{_PATH_PART}(?:/{_PATH_PART})*'
    r'(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?'
    r'(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9A-Fa-f]{32,})?')
DEBIAN_SUITE = re.compile(r'[a-z]+')
MAX_REFERENCE = 512


def _base_problem(base: str) -> str | None:
    if base.startswith(DEBOOTSTRAP):
        if not DEBIAN_SUITE.fullmatch(base.removeprefix(DEBOOTSTRAP)):
            return f'{quote(base)}: name a Debian suite after "debootstrap:", e.g. debootstrap:bookworm'
        return None
    if is_local_base(base):
        return _path_problem(base)
    if len(base) > MAX_REFERENCE or not IMAGE_REFERENCE.fullmatch(base) or len(base.split(':')[0]) > 255:
        return (f'{quote(base)} is not an image reference such as debian:bookworm-slim or '
                'registry.example.com/team/image:tag (lowercase name, a tag after ":"), nor a local '
                'root filesystem (./rootfs/, ./rootfs.tar) nor debootstrap:<suite>')
    return None


class ImageBase(Text):
    name = 'image reference, local path or `debootstrap:<suite>`'

    def __init__(self):
        super().__init__(self.name, 'an image base', rule=_base_problem)

    def schema(self):
        return {'type': 'string', 'anyOf': [
            {'pattern': f'^{DEBOOTSTRAP}{DEBIAN_SUITE.pattern}$'},
            {'pattern': r'^(?:\./|\.\./|/)|(?:' + '|'.join(re.escape(s) for s in TARBALL_SUFFIXES) + ')$'},
            {'pattern': f'^(?:{IMAGE_REFERENCE.pattern})$', 'maxLength': MAX_REFERENCE}]}


class GuestPath(Text):
    """An absolute path inside the guest, plain enough to go into a shell script unquoted."""

    def __init__(self):
        super().__init__('absolute guest path', 'an absolute guest path of letters, digits, ".", "_" and "-" '
                         'such as /home/agent', pattern=r'(?:/(?!\.\.?(?:/|$))[A-Za-z0-9._-]{1,255})+',
                         max_length=MAX_PATH_BYTES)


class TemplateName(Text):
    def __init__(self):
        super().__init__('template', 'a template file name in templates/, such as image-setup.sh.j2',
                         rule=_path_problem)


@dataclass(frozen=True)
class Key:
    """One manifest key: its dotted path, type, default, meaning, and the Agent attribute it becomes
    (`recipe.x` and `user.x` go to the Recipe and the GuestUser)."""
    path: str
    kind: Kind
    default: Any
    description: str
    attribute: str
    default_text: str | None = None    # the README's default column, when the value alone says too little


SKILL_NAME = Text('name', 'a skill directory name (letters, digits, ".", "_" and "-")',
                  r'[A-Za-z0-9][A-Za-z0-9._-]*', max_length=MAX_NAME_BYTES)
ENV_NAME = Text('name', 'an environment variable name such as API_TOKEN', r'[A-Za-z_][A-Za-z0-9_]*',
                max_length=MAX_NAME_BYTES)
HOST_NAME = Text('host name', 'a host name such as api.anthropic.com',
                 r'(?=.{1,253}$)(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*'
                 r'[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?', max_length=253)

WILDCARD = '*.'
HTTP_METHODS = ('GET', 'HEAD', 'POST', 'PUT', 'PATCH', 'DELETE', 'OPTIONS')
# What Claude Code itself needs, from its network documentation (code.claude.com/docs/en/network-config):
# the API, and claude.ai and platform.claude.com for signing in. Telemetry and error reports
# (statsig.anthropic.com, sentry.io, in older versions of that page) are left out on purpose.
CLAUDE_CODE_HOSTS = ['api.anthropic.com', 'claude.ai', 'platform.claude.com']


def _host_problem(host: str) -> str | None:
    name = host.removeprefix(WILDCARD)
    if noncanonical_ipv4(name):
        return f'{quote(name)} is an address in a form resolvers accept but rules cannot check; write it as a.b.c.d'
    if host.startswith(WILDCARD) and name.replace('.', '').isdigit():
        return f'{quote(host)}: an address has no subdomains; write the address alone'
    return None


def _network_problem(text: str) -> str | None:
    try:
        ipaddress.ip_network(text)
    except ValueError as err:
        return (f'{quote(text)} is not a network ({err}); write an address and its prefix length, '
                'such as 10.20.0.0/16 or 192.168.5.7/32')
    return None


HOST_PATTERN = Text('host', 'a host name such as api.github.com, or *.github.com for that domain and every '
                    'name under it', rf'(?:\*\.)?(?:{HOST_NAME.pattern.pattern})', max_length=255,
                    rule=_host_problem)
PATH_PREFIX = Text('path prefix', 'a path prefix starting with "/" such as /repos/acme/ (no spaces)',
                   r'/[!-~]*', max_length=2048)
NETWORK = Text('network', 'a network such as 10.20.0.0/16', rule=_network_problem)


@dataclass(frozen=True)
class HostEntry:
    """One allowed host: a name, or `*.domain` for the domain and every name under it, optionally
    narrowed to some methods and path prefixes."""
    host: str
    methods: tuple[str, ...] | None = None
    paths: tuple[str, ...] | None = None

    @property
    def name(self) -> str:
        return self.host.removeprefix(WILDCARD)

    def rule(self) -> dict:
        """The entry in the rules format of daemons/proxy/rules.py."""
        entry = {'domain' if self.host.startswith(WILDCARD) else 'host': self.name.lower()}
        if self.methods:
            entry['methods'] = list(self.methods)
        if self.paths:
            entry['paths'] = list(self.paths)
        return entry


class HostList(Kind):
    """Allowed hosts: each a host name, `*.domain`, or {host, methods, paths}."""
    name = 'list of hosts: `name`, `*.domain` or `{host, methods, paths}`'
    ENTRY_KEYS = ('host', 'methods', 'paths')

    def problems(self, value):
        if not isinstance(value, list):
            yield (), f'expected a list (one "- host" per line, or [a, b]), got {show(value)}'
            return
        for i, entry in enumerate(value):
            at = (Index(i),)
            if isinstance(entry, str):
                yield from ((at + below, error) for below, error in HOST_PATTERN.problems(entry))
            elif isinstance(entry, dict):
                yield from ((at + below, error) for below, error in self._entry_problems(entry))
            else:
                yield at, (f'expected a host name, *.domain or a mapping such as {{host: api.github.com, '
                           f'methods: [GET], paths: [/repos/acme/]}}, got {show(entry)}')

    def _entry_problems(self, entry: dict):
        for key in entry:
            if key not in self.ENTRY_KEYS:
                close = difflib.get_close_matches(str(key)[:100], self.ENTRY_KEYS, n=1)
                yield (key,), ('unknown key; ' + (f'did you mean {close[0]!r}?' if close else
                                                  f'a host entry has {", ".join(self.ENTRY_KEYS)}'))
        if 'host' not in entry:
            yield (), 'a host entry needs host: NAME or *.DOMAIN'
        else:
            yield from ((('host',) + below, error) for below, error in HOST_PATTERN.problems(entry['host']))
        for key, item_problem in (('methods', self._method_problem), ('paths', PATH_PREFIX.problem)):
            if key not in entry:
                continue
            items = entry[key]
            if not isinstance(items, list) or not items:
                yield (key,), (f'expected a non-empty list, such as {key}: '
                               f'{"[GET, HEAD]" if key == "methods" else "[/repos/acme/]"}, got {show(items)}; '
                               f'leave {key} out to allow any')
                continue
            for j, item in enumerate(items):
                error = item_problem(item)
                if error:
                    yield (key, Index(j)), error

    @staticmethod
    def _method_problem(method) -> str | None:
        if not isinstance(method, str) or method not in HTTP_METHODS:
            return f'expected an HTTP method in capitals, one of {", ".join(HTTP_METHODS)}; got {show(method)}'
        return None

    def schema(self):
        return {'type': 'array', 'items': {'anyOf': [HOST_PATTERN.schema(), {
            'type': 'object', 'required': ['host'], 'additionalProperties': False,
            'properties': {'host': HOST_PATTERN.schema(),
                           'methods': {'type': 'array', 'minItems': 1, 'items': {'enum': list(HTTP_METHODS)}},
                           'paths': {'type': 'array', 'minItems': 1, 'items': PATH_PREFIX.schema()}}}]}}

    def convert(self, value, base_dir):
        return tuple(HostEntry(entry) if isinstance(entry, str) else HostEntry(
            entry['host'], tuple(entry['methods']) if 'methods' in entry else None,
            tuple(entry['paths']) if 'paths' in entry else None) for entry in value)


HOSTS = HostList()

# A repository URL as git takes it: https://host[:port]/path, ssh://[user@]host[:port]/path or the
# scp-like [user@]host:path. The path is plain (letters, digits, ".", "_", "~", "-" and "/").
_REPO_HOST = r'(?P<host>[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)'
_REPO_PATH = r'(?P<path>(?!\.\.?/)[A-Za-z0-9._~-]+(?:/(?!\.\.?(?:/|$))[A-Za-z0-9._~-]+)*)/?'
REPO_URLS = (
    re.compile(rf'https://{_REPO_HOST}(?::(?P<port>[0-9]{{1,5}}))?/{_REPO_PATH}'),
    re.compile(rf'ssh://(?:(?P<user>[a-z_][a-z0-9_.-]*)@)?{_REPO_HOST}(?::(?P<port>[0-9]{{1,5}}))?/{_REPO_PATH}'),
    re.compile(rf'(?:(?P<user>[a-z_][a-z0-9_.-]*)@)?{_REPO_HOST}:(?!/){_REPO_PATH}'),
)
GIT_MODES = ('forward', 'review', 'local')
MAX_PUSH_MB = 10240
# What git check-ref-format refuses in a ref, but for "*", which patterns use.
_BAD_REF = re.compile(r'[\x00-\x20\x7f~^:?\[\\]|\.\.|//|@\{|^/|/$|\.lock(?:/|$)|/\.|^\.|\.$')


@dataclass(frozen=True)
class GitRepo:
    """A repository the agent reaches only through the git gate."""
    url: str
    push: tuple[str, ...] | None       # full ref patterns; None: the agent's default, set by load_agents
    mode: str
    max_push_mb: int

    @property
    def parts(self) -> re.Match:
        return next(m for m in (pattern.fullmatch(self.url) for pattern in REPO_URLS) if m)

    @property
    def path(self) -> str:
        return self.parts['path'].removesuffix('.git')

    @property
    def gate_path(self) -> str:
        """Where the gate serves it: host (with an https port other than 443), then the path without
        `.git`; the same for every URL form of one repository."""
        match = self.parts
        https_port = match['port'] if self.url.startswith('https://') and match['port'] not in (None, '443') else None
        return f'{match["host"].lower()}{":" + https_port if https_port else ""}/{self.path}'

    def url_forms(self) -> tuple[str, ...]:
        """The URL prefixes git may be given for this repository (https, ssh and scp-like), each
        rewritten to the gate; a longer URL (`repo-2`) shares the prefix and reaches the gate too,
        which answers for listed repositories only."""
        match = self.parts
        host, path = match['host'].lower(), self.path
        user = match.groupdict().get('user') or 'git'
        https = f'https://{host}{":" + match["port"] if self.url.startswith("https://") and match["port"] else ""}'
        return (f'{https}/{path}', f'ssh://{user}@{host}/{path}', f'{user}@{host}:{path}')

    def gate_entry(self) -> dict:
        """The repository in the gate's bottles file (daemons/gate)."""
        return {'upstream': self.url, 'path': self.gate_path, 'push': list(self.push or ()), 'mode': self.mode,
                'max_push_bytes': self.max_push_mb << 20}


def full_ref_pattern(pattern: str) -> str:
    """A `push` pattern as a full ref: a branch pattern (`agent/a/*`) is under refs/heads/."""
    return pattern if pattern.startswith('refs/') else f'refs/heads/{pattern}'


class GitRepoList(Kind):
    """Repositories the agent clones and pushes through the git gate."""
    name = 'list of `{url, push, mode, max_push_mb}`'
    ENTRY_KEYS = ('url', 'push', 'mode', 'max_push_mb')
    EXAMPLE = '{url: https://github.com/acme/app.git, push: [agent/reviewer/*], mode: review}'

    def problems(self, value):
        if not isinstance(value, list):
            yield (), f'expected a list of repositories such as - {self.EXAMPLE}, got {show(value)}'
            return
        seen: dict[str, int] = {}
        for i, entry in enumerate(value):
            at = (Index(i),)
            if not isinstance(entry, dict):
                yield at, f'expected a mapping such as {self.EXAMPLE}, got {show(entry)}'
                continue
            for key in entry:
                if key not in self.ENTRY_KEYS:
                    close = difflib.get_close_matches(str(key)[:100], self.ENTRY_KEYS, n=1)
                    yield at + (key,), ('unknown key; ' + (f'did you mean {close[0]!r}?' if close else
                                                           f'a repository has {", ".join(self.ENTRY_KEYS)}'))
            url = entry.get('url')
            if not isinstance(url, str) or not any(p.fullmatch(url) for p in REPO_URLS):
                yield at + ('url',), (f'expected a repository URL such as https://github.com/acme/app.git, '
                                      f'ssh://git@github.com/acme/app.git or git@github.com:acme/app.git, '
                                      f'got {show(url)}')
            else:
                path = GitRepo(url, None, 'review', 1).gate_path
                if path in seen:
                    yield at + ('url',), f'the same repository as entry {seen[path]} ({path}); keep one'
                seen.setdefault(path, i)
            push = entry.get('push', [])
            if not isinstance(push, list) or ('push' in entry and not push):
                yield at + ('push',), (f'expected a non-empty list of branch patterns such as [agent/reviewer/*], '
                                       f'got {show(push)}; leave push out for agent/<agent>/*')
            else:
                for j, pattern in enumerate(push):
                    if not isinstance(pattern, str) or not pattern or _BAD_REF.search(pattern) \
                            or pattern.count('*') > 1 or pattern.startswith('refs/') and pattern.count('/') < 2:
                        yield at + ('push', Index(j)), (
                            f'expected a branch pattern such as agent/reviewer/* (or a full ref pattern such '
                            f'as refs/tags/v*), with at most one "*", got {show(pattern)}')
            if 'mode' in entry:
                yield from ((at + ('mode',) + below, error) for below, error in Choice(*GIT_MODES).problems(
                    entry['mode']))
            if 'max_push_mb' in entry:
                yield from ((at + ('max_push_mb',) + below, error) for below, error in Integer(
                    1, MAX_PUSH_MB, 'MiB').problems(entry['max_push_mb']))

    def schema(self):
        return {'type': 'array', 'items': {
            'type': 'object', 'required': ['url'], 'additionalProperties': False,
            'properties': {'url': {'type': 'string', 'anyOf': [
                               {'pattern': '^(?:' + re.sub(r'\?P<\w+>', '', p.pattern) + ')$'} for p in REPO_URLS]},
                           'push': {'type': 'array', 'minItems': 1, 'items': {'type': 'string', 'minLength': 1}},
                           'mode': {'enum': list(GIT_MODES)},
                           'max_push_mb': {'type': 'integer', 'minimum': 1, 'maximum': MAX_PUSH_MB}}}}

    def convert(self, value, base_dir):
        return tuple(GitRepo(entry['url'], tuple(full_ref_pattern(p) for p in entry['push']) if 'push' in entry
                             else None, entry.get('mode', GIT_DEFAULT_MODE), entry.get('max_push_mb', 100))
                     for entry in value)


GIT_DEFAULT_MODE = 'review'
MAX_SUPERVISE_WAIT = 3600     # Claude Code's per-server timeout is set past it; "pending" comes long before

KEYS: tuple[Key, ...] = (
    Key('prompt', Text('text', 'text'), '',
        'the system prompt; Claude starts with `--append-system-prompt-file` only when it is non-empty', 'prompt'),
    Key('prompt_file', HostPath('a path to the prompt file'), None,
        'the prompt from a file instead (not both in one file; an agent\'s own key wins over `_defaults.yaml`)',
        'prompt_file'),
    Key('skills', ListOf(SKILL_NAME, 'list of skill names', unique=True), [],
        'each is a directory `<skills_dir>/<name>/` with a `SKILL.md`', 'skills'),
    Key('skills_dir', HostPath('a path to the skills directory'), 'skills',
        'where skills live (so `agents/skills/`)', 'skills_dir'),
    Key('image.base', ImageBase(), 'debian:bookworm-slim',
        'an OCI reference; a local root filesystem (`./rootfs/`, `./rootfs.tar`, `.tar.gz`, `.tgz`); or '
        '`debootstrap:<suite>` (built locally, no registry)', 'recipe.base'),
    Key('image.setup', TemplateName(), 'image-setup.sh.j2',
        'the setup script template, looked up in `templates/`; it may use only the variables the setup '
        'provides. The default one installs git, curl, socat and ca-certificates with apt only when the '
        'base lacks them, Claude Code, and the agent user', 'recipe.setup'),
    Key('image.claude_code', Text('version', 'a Claude Code version such as 2.1.328',
                                  r'[0-9][0-9A-Za-z.+-]*', max_length=128), '2.1.328',
        'the Claude Code release installed in the image', 'recipe.claude_code'),
    Key('image.packages', ListOf(Text('name', 'a Debian package name', r'[a-z0-9][a-z0-9.+-]+', max_length=128),
                                 'list of Debian package names'), [],
        'extra Debian packages (installed with apt, so they need network at build time)', 'recipe.packages'),
    Key('image.run', ListOf(Text('text', 'a shell line'), 'list of shell lines'), [],
        'extra setup steps, run as root after the rest', 'recipe.run'),
    Key('resources.cpus', Integer(1, 64), 2, 'virtual CPUs', 'cpus'),
    Key('resources.memory', Integer(256, 1 << 20, 'MiB'), 2048, 'memory', 'memory_mib'),
    Key('network.allow_hosts', HOSTS, [],
        'what the bottle may reach: `api.github.com` (that name), `*.github.com` (that domain and every name '
        'under it), or `{host: api.github.com, methods: [GET, HEAD], paths: [/repos/acme/]}` (only those '
        'methods and path prefixes); skills add theirs (`allow_hosts:` in their `SKILL.md` front matter). '
        'Enforced by the project\'s egress proxy, the bottle\'s only way out; a change applies at the next '
        'launch without recreating the machine', 'hosts'),
    Key('network.allow_private', ListOf(NETWORK, 'list of networks', unique=True), [],
        'loopback, private or link-local networks (CIDR) that allowed hosts may resolve to, for internal '
        'registries and tests; every such address is refused otherwise', 'allow_private'),
    Key('network.claude_code_hosts', HOSTS, CLAUDE_CODE_HOSTS,
        'what Claude Code itself needs, allowed besides `allow_hosts`; `[]` leaves them out', 'claude_code_hosts'),
    Key('git', GitRepoList(), [],
        'repositories the agent clones, fetches and pushes through the project\'s git gate, never with a '
        'credential of its own: `url` (https, ssh or scp-like), `push` (branch patterns it may push, default '
        '`agent/<agent>/*`; a `refs/tags/...` pattern allows tags), `mode` (`forward`: upstream at once; '
        '`review`, the default: held until a person approves; `local`: kept in the gate), `max_push_mb` '
        '(default 100)', 'git'),
    Key('supervise', Boolean(), True,
        'the project\'s supervisor in the bottle\'s Claude Code (an MCP server named `supervise`): the agent asks '
        'it for a host, a push review or an answer, and the human decides on the supervisor\'s page or with '
        '`doit approve`; `false` leaves it out', 'supervise'),
    Key('supervise_wait', Integer(0, MAX_SUPERVISE_WAIT, 'seconds'), 600,
        'how long a question to the supervisor waits for the human before the agent is told "still pending" '
        '(it checks later)', 'supervise_wait'),
    Key('env', EnvMap(ENV_NAME), {},
        'plain environment variables of the machine (merged with `_defaults.yaml` variable by variable)', 'env'),
    Key('secrets', ListOf(ENV_NAME, 'list of variable names', unique=True), [],
        'host environment variables handed to Claude at attach time only (never written anywhere)', 'secrets'),
    Key('user.name', UserName(), 'agent',
        'the non-root user Claude runs as', 'user.name'),
    Key('user.uid', Integer(1, 60000), 1000,
        'its uid (and gid); an account or group of the base that has it (`ubuntu`, `node`) is renamed to be the '
        'agent\'s', 'user.uid'),
    Key('user.home', GuestPath(), '/home/agent', 'its home directory', 'user.home'),
    Key(PROJECT_KEY, Text('name', 'a short name such as acme-main (letters, digits, "-" and "_")',
                          MACHINE_NAME.pattern, max_length=MAX_PROJECT_NAME), None,
        'only in `_defaults.yaml`: the checkout\'s part of machine names (`bottle-<project>-<agent>`), so that '
        'worktrees and clones side by side never share a machine; give each checkout its own', 'project',
        default_text='the checkout directory\'s name and a hash of its path, such as `main-3f2a1c`'),
    Key('backend', Choice(*BACKENDS), None, 'where the bottle runs', 'backend',
        default_text=f'`{BACKEND_ENV}` (it also overrides `_defaults.yaml`), else the first that works '
                     'here: smolvm, podman, docker'),
)
KEY = {key.path: key for key in KEYS}
SECTIONS = {
    'image': 'what goes into the agent image',
    'resources': 'the machine\'s size',
    'network': 'what the machine may reach',
    'user': 'the user Claude runs as in the guest',
}
TOP_LEVEL = list(dict.fromkeys(key.path.split('.')[0] for key in KEYS))


# --- what load_agents returns

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
    hosts: tuple[HostEntry, ...]
    allow_private: tuple[str, ...]
    claude_code_hosts: tuple[HostEntry, ...]
    env: dict[str, str]
    secrets: tuple[str, ...]
    user: GuestUser
    backend: str
    project: str
    git: tuple[GitRepo, ...] = ()
    supervise: bool = True
    supervise_wait: int = 600
    skill_hosts: tuple[HostEntry, ...] = ()     # declared by the agent's skills (SKILL_HOSTS_KEY)

    @property
    def machine(self) -> str:
        return machine_name(self.project, self.name)

    @property
    def egress_rules(self) -> dict:
        """The bottle's rules in the format of daemons/proxy/rules.py: the manifest's hosts, its
        skills' and Claude Code's, each entry once; its git repositories gated, so that the gate is
        the only way to them."""
        entries = dict.fromkeys(self.hosts + self.skill_hosts + self.claude_code_hosts)
        rules = {'hosts': [entry.rule() for entry in entries], 'allow_private': list(self.allow_private)}
        if self.git:
            rules['gated'] = [{'host': repo.parts['host'].lower(), 'path': f'/{repo.path}'} for repo in self.git]
        return rules

    def skill_dir(self, skill: str) -> Path:
        return self.skills_dir / skill


@dataclass(frozen=True)
class Problem:
    file: str                 # as shown to the user
    line: int | None
    key: str | None           # dotted key path; None for a problem with the whole file
    text: str

    def __str__(self):
        where = f'{self.file}:{self.line}' if self.line else self.file
        return f'{where}: key {self.key!r}: {self.text}' if self.key is not None else f'{where}: {self.text}'


class ManifestError(Exception):
    """All problems found in the manifests, one per line."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        count = f'{len(problems)} problem' + ('s' if len(problems) > 1 else '')
        super().__init__(f'{count} in agent manifests; nothing was run:\n'
                         + '\n'.join(f'  {p}' for p in problems))


# --- reading one file

class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that refuses deep nesting, self-referencing aliases and alias expansion past
    MAX_NODES nodes or MAX_TEXT characters, turns values it cannot construct (`!!int x`, an
    integer past Python's digit limit) into errors with a position, and remembers each node's
    value so that every key, whatever its type, gets its line."""

    def __init__(self, text: str):
        super().__init__(text)
        self.depth = self.deepest = self.nodes = self.text_size = 0
        self.shapes: dict[str, tuple[int, int, int]] = {}   # anchor: expanded nodes, characters, height
        self.open_anchors: set[str] = set()
        self.own_pairs: dict[yaml.MappingNode, list] = {}    # before `<<` merges flatten them
        self.values: dict[yaml.Node, Any] = {}

    def _grow(self, nodes: int, text: int, deepest: int, mark):
        self.nodes += nodes
        self.text_size += text
        self.deepest = max(self.deepest, deepest)
        if self.deepest > MAX_DEPTH:
            raise _TooComplex(None, None, f'nested deeper than {MAX_DEPTH} levels', mark)
        if self.nodes > MAX_NODES or self.text_size > MAX_TEXT:
            raise _TooComplex(None, None, f'aliases expand to more than {MAX_NODES} values or {MAX_TEXT} '
                              'characters', mark)

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            if event.anchor in self.open_anchors:
                raise _TooComplex(None, None, f'alias *{printable(event.anchor)} is inside the node it refers to',
                                  event.start_mark)
            nodes, text, height = self.shapes.get(event.anchor, (1, 0, 1))
            self._grow(nodes, text, self.depth + height, event.start_mark)
            return super().compose_node(parent, index)
        before = (self.nodes, self.text_size, self.deepest)
        self.depth += 1
        self.deepest = self.depth
        self._grow(1, len(getattr(event, 'value', '')), self.depth, event.start_mark)
        if event.anchor:
            self.open_anchors.add(event.anchor)
        try:
            node = super().compose_node(parent, index)
        finally:
            self.open_anchors.discard(event.anchor)
        height = self.deepest - self.depth + 1
        self.depth -= 1
        if event.anchor:
            self.shapes[event.anchor] = (self.nodes - before[0], self.text_size - before[1], height)
        self.deepest = max(before[2], self.deepest)
        if isinstance(node, yaml.MappingNode):
            self.own_pairs[node] = list(node.value)
        return node

    def construct_object(self, node, deep=False):
        try:
            value = super().construct_object(node, deep)
        except yaml.YAMLError:
            raise
        except Exception as err:    # a scalar constructor given what it cannot read (ValueError, ...)
            why = f': {str(err).split(";")[0]}' if isinstance(err, ValueError) else ''
            raise yaml.constructor.ConstructorError(
                None, None, f'cannot read {quote(node.value)} as {node.tag.rsplit(":", 1)[-1]}{why}',
                node.start_mark) from None
        self.values[node] = value
        return value


class _TooComplex(yaml.composer.ComposerError):
    pass


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, 'a directory'), (stat.S_ISFIFO, 'a named pipe'),
                       (stat.S_ISCHR, 'a device'), (stat.S_ISBLK, 'a device'), (stat.S_ISSOCK, 'a socket')):
        if test(mode):
            return kind
    return 'not a regular file'


def read_regular(path: Path, limit: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of a regular file of at most `limit` bytes. O_NONBLOCK so that opening a named
    pipe does not wait for a writer; the file is then refused by what fstat says it is."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
    except OSError:
        os.close(fd)
        raise
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise _Unreadable(f'is {_file_kind(info.st_mode)}, not a regular file')
    with os.fdopen(fd, 'rb') as file:
        data = file.read(limit + 1)
    if len(data) > limit:
        raise _Unreadable(f'is larger than {limit} bytes')
    return data


class _Unreadable(Exception):
    pass


YAML_LINE_BREAK = re.compile(r'\r\n|[\n\r\x85\u2028\u2029]')


def _line_at(text, offset: int) -> int:
    """The line of a position, counted as YAML counts lines (text) or by newlines (bytes)."""
    if isinstance(text, bytes):
        return text.count(b'\n', 0, offset) + 1
    return len(YAML_LINE_BREAK.findall(text, 0, offset)) + 1


@dataclass
class _Document:
    """One YAML file: its valid values by declared key, the keys given with a wrong value, and
    the line of every key path."""
    path: Path
    display: str
    lines: dict[tuple, int] = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    values: dict[str, Any] = field(default_factory=dict)
    invalid: set[str] = field(default_factory=set)

    def line_of(self, path: tuple) -> int | None:
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return None

    def problem(self, path: tuple, text: str) -> Problem:
        return Problem(self.display, self.line_of(path), _key_text(path), text)

    def has(self, key: str) -> bool:
        return key in self.values or key in self.invalid


def _key_text(path) -> str:
    text = ''
    for part in path:
        if isinstance(part, Index):
            text += f'[{part}]'
        else:
            part = printable(part) if isinstance(part, str) else quote(part)
            text += f'.{part}' if text else part
    return text


def _read_document(path: Path, display: str, problems: list[Problem]) -> _Document | None:
    """The file parsed, its keys indexed and checked against KEYS; None when it cannot be read."""
    doc = _Document(path, display)
    text = _read_text(path, display, problems, 'a manifest must be a regular YAML file')
    if text is None or not _parse(text, doc, problems):
        return None
    if doc.data is None:
        doc.data = {}
        return doc
    if not isinstance(doc.data, dict):
        problems.append(Problem(display, doc.lines.get(()),
                                None, f'expected a mapping of keys such as prompt:, skills:, image:, '
                                      f'got {show(doc.data)}'))
        return None
    _check(doc, problems)
    return doc


def _read_text(path: Path, display: str, problems: list[Problem], what: str) -> str | None:
    """The text of a bounded regular UTF-8 file, or None with the problem reported."""
    def whole_file(line, text):
        problems.append(Problem(display, line, None, text))

    try:
        raw = read_regular(path)
    except _Unreadable as err:
        whole_file(None, f'{err}; {what}')
        return None
    except (OSError, ValueError) as err:
        whole_file(None, f'cannot read the file ({printable(getattr(err, "strerror", None) or str(err))}); '
                         'fix or remove it')
        return None
    try:
        return raw.decode()
    except UnicodeDecodeError as err:
        whole_file(_line_at(raw, err.start), 'the file is not UTF-8 text; save it as UTF-8')
        return None


def _parse(text: str, doc: _Document, problems: list[Problem]) -> bool:
    """YAML text into doc.data, with the line of every key path in doc.lines (the whole document's
    at ()); False, with the problem reported, when it is not YAML that may be read."""
    def whole_file(line, message):
        problems.append(Problem(doc.display, line, None, message))

    loader = None
    try:
        loader = _BoundedLoader(text)
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.reader.ReaderError as err:
        whole_file(_line_at(text, err.position),
                   f'character {printable(chr(err.character))} (U+{err.character:04X}) is not allowed in YAML, '
                   'not even in a comment; remove it')
        return False
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        message = printable(': '.join(filter(None, [err.context, err.problem])) or str(err))
        fix = {_TooComplex: 'write the values out instead of the aliases or nesting',
               yaml.composer.ComposerError: 'keep one document, with each anchor (&name) once and before its '
                                            'aliases (*name)',
               yaml.constructor.ConstructorError: 'remove the tag or fix the value'}.get(
            type(err), 'fix the syntax (indentation, quoting, a missing ":")')
        kind = 'YAML syntax error' if isinstance(err, (yaml.scanner.ScannerError, yaml.parser.ParserError)) \
            else 'YAML error'
        whole_file(mark.line + 1 if mark else None, f'{kind}: {message}; {fix}')
        return False
    except yaml.YAMLError as err:
        whole_file(None, f'YAML error: {printable(str(err))}')
        return False
    finally:
        if loader:
            loader.dispose()
    doc.data = data
    if node is not None:
        doc.lines[()] = node.start_mark.line + 1
        if isinstance(data, dict):
            _index_lines(loader, node, (), doc, problems)
    return True


def _index_lines(loader: _BoundedLoader, node, path: tuple, doc: _Document, problems: list[Problem]):
    if isinstance(node, yaml.MappingNode):
        seen = set()
        for key_node, _ in loader.own_pairs.get(node, ()):
            if key_node in loader.values:            # not a `<<` merge key
                key = loader.values[key_node]
                if key in seen:
                    problems.append(Problem(doc.display, key_node.start_mark.line + 1,
                                            _key_text(path + (key,)), 'the key appears twice; keep one'))
                seen.add(key)
        for key_node, value_node in node.value:      # own keys come after merged ones, so they win
            key = loader.values.get(key_node)
            doc.lines[path + (key,)] = key_node.start_mark.line + 1
            _index_lines(loader, value_node, path + (key,), doc, problems)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            doc.lines[path + (Index(i),)] = item.start_mark.line + 1
            _index_lines(loader, item, path + (Index(i),), doc, problems)


def _check(doc: _Document, problems: list[Problem]):
    """Every key against KEYS; valid values go to doc.values."""

    def unknown(path, choices):
        close = difflib.get_close_matches(str(path[-1])[:100], choices, n=1)
        hint = f'did you mean {close[0]!r}?' if close else f'valid keys here: {", ".join(choices)}'
        problems.append(doc.problem(path, f'unknown key; {hint}'))

    def leaf(key: Key, value, path):
        errors = list(key.kind.problems(value))
        for below, error in errors:
            problems.append(doc.problem(path + below, error))
        if errors:
            doc.invalid.add(key.path)
        else:
            doc.values[key.path] = value

    for name, value in doc.data.items():
        if name in KEY:
            leaf(KEY[name], value, (name,))
        elif name in SECTIONS:
            inner = [key.path.split('.', 1)[1] for key in KEYS if key.path.startswith(f'{name}.')]
            if not isinstance(value, dict):
                problems.append(doc.problem((name,), f'expected a mapping with keys {", ".join(inner)}, '
                                                     f'got {show(value)}'))
                doc.invalid.update(f'{name}.{k}' for k in inner)
                continue
            for sub, sub_value in value.items():
                if isinstance(sub, str) and f'{name}.{sub}' in KEY:
                    leaf(KEY[f'{name}.{sub}'], sub_value, (name, sub))
                else:
                    unknown((name, sub), inner)
        else:
            unknown((name,), TOP_LEVEL)


# --- all manifests

def load_agents(agents_dir: Path, root: Path, setup_problem: Callable[[Recipe], str | None],
                default_backend: Callable[[], str]) -> dict[str, Agent]:
    """Read and validate every agents/*.yaml of the project at `root`; raise ManifestError listing
    all problems. Paths in problems are shown relative to `root`.

    `setup_problem(recipe)` says why the recipe's setup template cannot be used, or None.
    `default_backend()` picks the backend of agents whose manifests and environment name none;
    it is called at most once, and only when every manifest is valid (it may raise BottleError)."""
    problems: list[Problem] = []

    def display(path: Path) -> str:
        try:
            return printable(str(path.relative_to(root)))
        except ValueError:
            return printable(str(path))

    try:
        entries = sorted(agents_dir.iterdir()) if agents_dir.is_dir() else []
    except OSError as err:
        raise ManifestError([Problem(display(agents_dir), None, None,
                                     f'cannot list the directory: {err.strerror}')]) from None
    defaults = None
    manifests = []
    for path in entries:
        name = path.name
        if name.startswith('.'):      # editors' lock and backup files, never agents
            continue
        if name == DEFAULTS_FILE:
            defaults = _read_document(path, display(path), problems)
        elif name.startswith('_') and name.endswith(MANIFEST_SUFFIX):
            problems.append(Problem(display(path), None, None,
                                    f'only {DEFAULTS_FILE} may start with "_" (agent names start with a letter '
                                    f'or digit); rename it to {DEFAULTS_FILE} if it holds shared defaults, or '
                                    'give the agent a name without the "_"'))
        elif name.endswith('.yml'):
            problems.append(Problem(display(path), None, None,
                                    f'manifests end in {MANIFEST_SUFFIX}; rename it to '
                                    f'{printable(name[:-4])}{MANIFEST_SUFFIX}'))
        elif name.endswith(MANIFEST_SUFFIX):
            manifests.append(path)
    if defaults is not None:
        _check_prompt_keys(defaults, problems)

    from_env = os.environ.get(BACKEND_ENV) or None
    if from_env and from_env not in BACKENDS:
        problems.append(Problem(f'{BACKEND_ENV}={printable(from_env)} in the environment', None, None,
                                f'not a backend; use one of {", ".join(BACKENDS)}'))

    drafts = []
    setup_checked: dict[Recipe, str | None] = {}
    for path in manifests:
        name = path.name[:-len(MANIFEST_SUFFIX)]
        name_problem = _agent_name_problem(name, display(path))
        if name_problem:
            problems.append(name_problem)
        doc = _read_document(path, display(path), problems)
        if doc is None:
            continue
        _check_prompt_keys(doc, problems)
        draft = _Draft(name, doc, defaults, display, from_env, default_project_name(root))
        found = list(draft.check())
        problems.extend(found)
        if found or draft.blocked or name_problem:
            continue
        # The setup does not depend on the backend, which may not be chosen yet.
        recipe = draft.recipe(draft.backend or BACKENDS[0])
        if recipe not in setup_checked:
            setup_checked[recipe] = setup_problem(recipe)
        if setup_checked[recipe]:
            problems.append(draft.report('image.setup', ('image', 'setup'), printable(setup_checked[recipe])))
        drafts.append(draft)
    if problems:
        raise ManifestError(list(dict.fromkeys(problems)))   # a _defaults.yaml problem once, not per agent

    detected = []

    def backend_of(draft: _Draft) -> str:
        if draft.backend:
            return draft.backend
        if not detected:
            detected.append(default_backend())
        return detected[0]

    return {draft.name: draft.agent(backend_of(draft)) for draft in drafts}


def machine_name(project: str, agent: str) -> str:
    return f'{MACHINE_PREFIX}{project}-{agent}'


def _agent_name_problem(name: str, display: str) -> Problem | None:
    if MACHINE_NAME.fullmatch(name) and len(name) <= MAX_AGENT_NAME:
        return None
    fixed = re.sub(r'-+', '-', re.sub(r'[^A-Za-z0-9_-]', '-', name)).strip('-_')[:MAX_AGENT_NAME]
    fixed = re.sub(r'[-_]+$', '', fixed) or 'agent'
    return Problem(display, None, None,
                   f'the agent name comes from the file name and becomes part of the machine name '
                   f'{printable(MACHINE_PREFIX)}<project>-<name>: use only letters, digits, "-" and "_", start with a '
                   f'letter or digit, no "--", no trailing "-", at most {MAX_AGENT_NAME} characters; rename '
                   f'the file, e.g. to {fixed}{MANIFEST_SUFFIX}')


def _check_prompt_keys(doc: _Document, problems: list[Problem]):
    if doc.has('prompt') and doc.has('prompt_file'):
        problems.append(doc.problem(('prompt_file',), 'give either prompt (inline text) or prompt_file, not both'))


class _Draft:
    """One agent's values, merged from its manifest, _defaults.yaml and the declared defaults."""

    def __init__(self, name: str, doc: _Document, defaults: _Document | None, display, from_env: str | None,
                 default_project: str):
        self.name, self.doc, self.display, self.default_project = name, doc, display, default_project
        self.base_dir = doc.path.parent
        self.values: dict[str, Any] = {}
        self.sources: dict[str, _Document] = {}   # where each value was given
        self.wrong: set[str] = set()              # keys whose given value is wrong (already reported)
        own_prompt = doc.has('prompt') or doc.has('prompt_file')
        for key in KEYS:
            # An agent's own prompt or prompt_file replaces both of _defaults.yaml's.
            layers = [doc] if defaults is None or (own_prompt and key.path in ('prompt', 'prompt_file')) \
                else [defaults, doc]
            self.values[key.path] = self._merged(key, layers)
        # The agent's own key, then the environment (a choice for this run), then _defaults.yaml.
        own = doc.values['backend'] if doc.has('backend') and 'backend' not in doc.invalid else None
        self.backend = own or from_env or self.values['backend']
        self.skill_hosts: tuple[HostEntry, ...] = ()

    def _merged(self, key: Key, layers: list[_Document]):
        if isinstance(key.kind, EnvMap):      # maps merge entry by entry
            given = [d for d in layers if d.has(key.path)]
        else:
            given = [d for d in layers if d.has(key.path)][-1:]
        if any(key.path in d.invalid for d in given):
            self.wrong.add(key.path)
            return key.default
        if given:
            self.sources[key.path] = given[-1]
        if isinstance(key.kind, EnvMap):
            return {name: value for d in given for name, value in d.values[key.path].items()}
        return given[0].values[key.path] if given else key.default

    @property
    def blocked(self) -> bool:
        return bool(self.wrong)

    def report(self, key: str, path: tuple, text: str) -> Problem:
        return self.sources.get(key, self.doc).problem(path, text)

    def check(self) -> Iterator[Problem]:
        """Checks across keys and against the file system, of the values that are valid."""
        values, wrong = self.values, self.wrong
        if self.doc.has(PROJECT_KEY):
            yield self.doc.problem((PROJECT_KEY,), f'the project name is the checkout\'s, shared by all its agents: '
                                                   f'move it to agents/{DEFAULTS_FILE}')
        prompt_file = KEY['prompt_file'].kind.convert(values['prompt_file'], self.base_dir)
        if prompt_file is not None:
            error = _regular_text_problem(prompt_file)
            if error:
                yield self.report('prompt_file', ('prompt_file',),
                                  f'{self.display(prompt_file)} {error} fix the path (relative to the '
                                  'manifest\'s directory)')
        skills_dir = KEY['skills_dir'].kind.convert(values['skills_dir'], self.base_dir)
        for i, skill in enumerate(values['skills'] if not wrong & {'skills', 'skills_dir'} else ()):
            where = skills_dir / skill
            info = _stat(where)
            if isinstance(info, str) or not stat.S_ISDIR(info.st_mode):
                yield self.report('skills', ('skills', Index(i)),
                                  f'skill {skill!r} not found: no directory {self.display(where)}; create it '
                                  f'with a SKILL.md, or remove {skill!r} from skills')
                continue
            info = _stat(where / 'SKILL.md')
            if isinstance(info, str) or not stat.S_ISREG(info.st_mode):
                yield self.report('skills', ('skills', Index(i)),
                                  f'skill {skill!r} has no SKILL.md in {self.display(where)}; add one '
                                  '(Claude Code loads a skill from its SKILL.md)')
                continue
            problems: list[Problem] = []
            self.skill_hosts += skill_hosts(where / 'SKILL.md', self.display(where / 'SKILL.md'), problems)
            yield from problems
        base = values['image.base']
        if 'image.base' not in wrong and is_local_base(base) and not base.startswith(DEBOOTSTRAP):
            where = Path(os.path.abspath(self.base_dir / base))
            info = _stat(where)
            if isinstance(info, str) or not (stat.S_ISDIR(info.st_mode) or (
                    stat.S_ISREG(info.st_mode) and where.name.endswith(TARBALL_SUFFIXES))):
                yield self.report('image.base', ('image', 'base'),
                                  f'local base {self.display(where)} is neither a directory nor a tarball '
                                  f'({", ".join(TARBALL_SUFFIXES)}); fix the path (relative to the manifest\'s '
                                  'directory) or use an image name such as debian:bookworm-slim')
        for i, secret in enumerate(values['secrets']):
            if secret in values['env']:
                yield self.report('secrets', ('secrets', Index(i)),
                                  f'{secret!r} is also set in env; a secret comes only from the host '
                                  'environment at attach time, so remove it from env')

    def _fields(self, backend: str) -> dict:
        """Agent attributes by KEYS' `attribute`, with the `recipe.` and `user.` ones grouped."""
        groups: dict[str, dict] = {'': {}, 'recipe': {}, 'user': {}}
        for key in KEYS:
            group, _, attribute = key.attribute.rpartition('.')
            groups[group][attribute] = key.kind.convert(self.values[key.path], self.base_dir)
        fields = groups['']
        fields['backend'] = backend
        fields['project'] = fields['project'] or self.default_project
        fields['git'] = tuple(repo if repo.push else dataclasses.replace(repo, push=(f'refs/heads/agent/{self.name}/*',))
                              for repo in fields['git'])
        fields['user'] = GuestUser(**groups['user'])
        fields['recipe'] = Recipe(**groups['recipe'], user=fields['user'], backend=backend,
                                  source_dir=self.base_dir)
        if fields['prompt_file'] is not None:
            fields['prompt'] = ''
        return fields

    def recipe(self, backend: str) -> Recipe:
        return self._fields(backend)['recipe']

    def agent(self, backend: str) -> Agent:
        return Agent(name=self.name, manifest=self.doc.path, skill_hosts=self.skill_hosts, **self._fields(backend))


# --- hosts a skill declares

SKILL_HOSTS_KEY = 'allow_hosts'
FRONT_MATTER_FENCE = '---'


def skill_hosts(path: Path, display: str, problems: list[Problem]) -> tuple[HostEntry, ...]:
    """The hosts a SKILL.md declares under `allow_hosts:` in its YAML front matter (the block between
    the first line `---` and the next), in the manifests' syntax; a file without front matter
    declares none. Its problems are reported with the SKILL.md's own lines."""
    text = _read_text(path, display, problems, 'a skill needs a regular SKILL.md')
    if text is None:
        return ()
    lines = YAML_LINE_BREAK.split(text)
    if lines[0].rstrip() != FRONT_MATTER_FENCE:
        return ()
    end = next((n for n, line in enumerate(lines[1:], 1) if line.rstrip() == FRONT_MATTER_FENCE), None)
    if end is None:
        problems.append(Problem(display, 1, None, f'the front matter opened by "{FRONT_MATTER_FENCE}" on line 1 '
                                                  f'is never closed; end it with a line "{FRONT_MATTER_FENCE}"'))
        return ()
    doc = _Document(path, display)
    # The fence line left blank, so that YAML counts the lines as the file does.
    if not _parse('\n'.join([''] + lines[1:end]) + '\n', doc, problems):
        return ()
    if doc.data is None:
        return ()
    if not isinstance(doc.data, dict):
        problems.append(Problem(display, doc.lines.get(()), None,
                                f'the front matter must be a mapping such as name:, description:, got {show(doc.data)}'))
        return ()
    if SKILL_HOSTS_KEY not in doc.data:
        return ()
    value = doc.data[SKILL_HOSTS_KEY]
    found = [doc.problem((SKILL_HOSTS_KEY,) + below, error) for below, error in HOSTS.problems(value)]
    problems.extend(found)
    return () if found else HOSTS.convert(value, path.parent)


def _stat(path: Path) -> os.stat_result | str:
    """os.stat, or why it failed (a missing file, a symlink loop, a name too long)."""
    try:
        return os.stat(path)
    except (OSError, ValueError) as err:
        return getattr(err, 'strerror', None) or str(err)


def _regular_text_problem(path: Path) -> str | None:
    try:
        read_regular(path).decode()
    except _Unreadable as err:
        return f'{err};'
    except FileNotFoundError:
        return 'does not exist; create it or'
    except UnicodeDecodeError:
        return 'is not UTF-8 text; save it as UTF-8 or'
    except (OSError, ValueError) as err:
        return f'cannot be read ({getattr(err, "strerror", None) or err});'
    return None


# --- the README's table and the JSON Schema, from KEYS

def _default_text(key: Key) -> str:
    if key.default_text is not None:
        return key.default_text
    if key.default == '':
        return 'empty'
    if key.default is None:
        return ''
    if isinstance(key.default, (list, dict, str)):
        return f'`{json.dumps(key.default)}`' if not isinstance(key.default, str) else f'`{key.default}`'
    return str(key.default)


def reference_table() -> str:
    rows = ['| key | type | default | meaning |', '|---|---|---|---|']
    rows += [f'| `{key.path}` | {key.kind.name} | {_default_text(key)} | {key.description} |' for key in KEYS]
    return '\n'.join(rows) + '\n'


def json_schema() -> dict:
    def property_of(key: Key) -> dict:
        schema = {'description': key.description, **key.kind.schema()}
        if key.default is not None:
            schema['default'] = key.default
        return schema

    properties: dict[str, Any] = {}
    for key in KEYS:
        section, _, inner = key.path.rpartition('.')
        if section:
            properties.setdefault(section, {'description': SECTIONS[section], 'type': 'object',
                                            'properties': {}, 'additionalProperties': False})
            properties[section]['properties'][inner] = property_of(key)
        else:
            properties[inner] = property_of(key)
    return {
        '$schema': 'https://json-schema.org/draft/2020-12/schema',
        'title': 'claude-bottle agent manifest (agents/<name>.yaml, agents/_defaults.yaml)',
        'type': ['object', 'null'],
        'properties': properties,
        'additionalProperties': False,
        'not': {'required': ['prompt', 'prompt_file']},
    }


def schema_text() -> str:
    return json.dumps(json_schema(), indent=2) + '\n'


def main():
    parser = argparse.ArgumentParser(prog='python -m tasks.manifest', description=__doc__.split('\n\n')[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument('--reference', action='store_true', help="print the README's manifest reference table")
    what.add_argument('--schema', action='store_true', help='print the manifests\' JSON Schema')
    args = parser.parse_args()
    print(reference_table() if args.reference else schema_text(), end='')


if __name__ == '__main__':
    main()
