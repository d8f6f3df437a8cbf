"""The value kinds of the manifest: each says what it is called, checks a value, gives its JSON Schema and
converts it to what the Agent holds; and how a problem message shows a value (quote, show, printable).

Apart from KEYS, which names a kind for each key, so that the kinds of hosts and repositories (hosts.py,
git.py) and the file reader (yaml_file.py) stand on them without standing on the declaration.
"""
from __future__ import annotations

import difflib
import os
import re
import reprlib
from pathlib import Path
from typing import Callable, Iterator

from tasks.manifest.names import DEBOOTSTRAP, TARBALL_SUFFIXES, is_local_base

MAX_NAME_BYTES = 255         # one path component (Linux NAME_MAX)
MAX_PATH_BYTES = 4095        # a whole path (Linux PATH_MAX without the NUL)


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


def unknown_keys(entry: dict, keys: tuple[str, ...], what: str):
    """(key, problem) for each key of a mapping entry that is not one of `keys`, with the closest one when
    there is one: `what` names the entry ("a secret")."""
    for key in entry:
        if key not in keys:
            close = difflib.get_close_matches(str(key)[:100], keys, n=1)
            yield key, 'unknown key; ' + (f'did you mean {close[0]!r}?' if close else f'{what} has {", ".join(keys)}')


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
