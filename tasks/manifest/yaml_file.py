"""Reading one untrusted YAML file, bounded and line-numbered: only a regular file of bounded size, YAML
loaded with bounded nesting and alias expansion, the line of every key path kept (Document); what is
wrong in a file (Problem), and all that is wrong in the manifests (ManifestError).

Apart because manifests and skills' SKILL.md front matter are read alike, and reading knows no keys
(load.py checks those against KEYS).
"""
from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tasks.manifest.kinds import Index, printable, quote

# Bounds that keep a hostile manifest from hanging the tool or eating memory; a real manifest
# is a few hundred bytes, a few levels deep, with a handful of aliases at most.
MAX_FILE_BYTES = 1 << 20
MAX_DEPTH = 16
MAX_NODES = 10_000           # YAML nodes, every alias expanded
MAX_TEXT = 4 << 20           # characters of all scalars, every alias expanded


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
class Document:
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


def read_text(path: Path, display: str, problems: list[Problem], what: str) -> str | None:
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


def parse(text: str, doc: Document, problems: list[Problem]) -> bool:
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


def _index_lines(loader: _BoundedLoader, node, path: tuple, doc: Document, problems: list[Problem]):
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


def regular_text_problem(path: Path) -> str | None:
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
