"""What a person is shown of text a guest wrote (a reason, a question, a commit subject, a file name, a
refused path): the one function every command that prints such text uses (`text`, `field`, `lines`), and
`host` for a host name. The supervisor's page has the same rules in its own script (page.py, `visible`).

Nothing the guest wrote can move the cursor, clear the screen, start a new line or hide itself:

- control characters (C0, DEL, C1), format characters (the bidi overrides and isolates, the zero-width
  ones, U+FEFF, the tag characters), line and paragraph separators, surrogates, private-use and unassigned
  code points, every space but the plain one (a no-break space looks like one), and the characters that
  render as nothing (Hangul fillers, the Braille blank, variation selectors, the combining grapheme
  joiner) are shown as escapes: `\\x1b`, `\\u202e`;
- a text longer than its limit is cut, and says how many characters were cut; a run of spaces in a field
  is shown as its count, and combining marks past two in a row as escapes;
- a field is one labelled line (`field`); a text of many lines (a diff) is shown line by line (`lines`),
  split at `\\n` only.

Standard library only: the daemons import it.
"""
from __future__ import annotations

import re
import unicodedata

LIMIT = 500         # characters of one text shown by default
MARKS = 2           # combining marks in a row shown as they are
SPACES = 3          # spaces in a row shown as they are
_SPACES = re.compile(' {%d,}' % (SPACES + 1))
ESCAPED_CATEGORIES = frozenset({'Cc', 'Cf', 'Cs', 'Co', 'Cn', 'Zl', 'Zp', 'Zs'})
INVISIBLE = frozenset('\u034f\u115f\u1160\u17b4\u17b5\u180b\u180c\u180d\u180e\u180f\u2800\u3164\uffa0')


def hidden(char: str) -> bool:
    """Whether `char` is shown as an escape."""
    if char == ' ':
        return False
    code = ord(char)
    return (unicodedata.category(char) in ESCAPED_CATEGORIES or char in INVISIBLE
            or 0xFE00 <= code <= 0xFE0F or 0xE0100 <= code <= 0xE01EF)


def escape(char: str) -> str:
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:        # a byte that was not UTF-8, read with surrogateescape
        return f'\\x{code - 0xDC00:02x}'
    return f'\\x{code:02x}' if code < 0x100 else f'\\u{code:04x}' if code < 0x10000 else f'\\U{code:08x}'


def text(value: object, limit: int = LIMIT, fold_spaces: bool = True) -> str:
    """`value` (a str, or bytes read as UTF-8) as one line a terminal shows as it is: escapes for what
    `hidden` names and for every combining mark past MARKS in a row (they stack over the text around), a run
    of more than SPACES spaces as its count (padding would wrap the terminal's line into what looks like a
    line of its own; `fold_spaces=False` for code, whose indentation is its meaning), at most `limit` of its
    characters, then how many more there were."""
    if isinstance(value, bytes):
        value = value.decode('utf-8', 'surrogateescape')
    value = '' if value is None else str(value)
    shown, marks = [], 0
    for c in value[:limit]:
        marks = marks + 1 if unicodedata.category(c) in ('Mn', 'Me') else 0
        shown.append(escape(c) if hidden(c) or marks > MARKS else c)
    said = ''.join(shown)
    if fold_spaces:
        said = _SPACES.sub(lambda run: f' [{len(run[0])} spaces] ', said)
    cut = len(value) - limit
    return said + (f'... [{cut} more character{"s" if cut != 1 else ""} not shown]' if cut > 0 else '')


def field(label: str, value: object, limit: int = LIMIT, indent: str = '    ') -> str:
    """One labelled line: `    label: value`, the value through `text`."""
    return f'{indent}{label}: {text(value, limit)}'


def lines(value: str, limit: int | None = None) -> list[str]:
    """A text of many lines (a diff, an error), one shown line per `\\n`-separated line, each through `text`
    with its spaces as they are; whole unless `limit` is given."""
    return [text(line, len(line) if limit is None else limit, fold_spaces=False) for line in value.split('\n')]


def unicode_form(name: str) -> str | None:
    """The Unicode form of an international host name (a label starting `xn--`); None for any other name,
    or one that does not decode."""
    if not any(label.startswith('xn--') for label in name.split('.')):
        return None
    try:
        return name.encode('ascii').decode('idna')
    except (UnicodeError, ValueError):
        return None


def host(name: str) -> str:
    """A host name as a person is shown it: an international name stays in its ASCII form (punycode), and
    its Unicode form follows, marked as such, since it may imitate another name."""
    unicode = unicode_form(name)
    return text(name, 300) + (f' (an international name; in Unicode "{text(unicode, 300)}", which may imitate '
                              'another name)' if unicode else '')
