"""What a person is shown of text a guest wrote (daemons/shown.py), and what an agent may ask a person to
approve (daemons/supervise/asked.py): nothing the guest wrote moves the cursor, fakes a line or hides
itself; a host is one readable name, an international one shown in punycode with its Unicode form marked."""
from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemons import shown
from daemons.supervise import asked
from daemons.supervise.store import SuperviseError

pytestmark = pytest.mark.fast

# What the review used to fake a line or move the cursor, and what hides text or reverses it.
HOSTILE = ['\r', '\n', '\v', '\f', '\x1b[2K', '\x1b[1A', '\x1b]0;title\x07', '\x08', '\x1c', '\x1d', '\x1e',
           '\x7f', '\x85', '\x9b', '\u2028', '\u2029', '\u202e', '\u2066', '\u200b', '\u200d', '\ufeff', '\u00a0',
           '\u3000', '\u3164', '\u2800', '\ufe0f', '\U000e0041', '\ud800', '\ue000']


def raw(text: str) -> list[str]:
    """The characters of `text` a terminal would act on or hide rather than show."""
    return [c for c in text if c != ' ' and (unicodedata.category(c)[0] in 'CZ' or c in shown.INVISIBLE)]


def raw_in_output(output: str) -> list[str]:
    """Those of a command's output, but for the line breaks between its own lines."""
    return [c for line in output.split('\n') for c in raw(line)]


@pytest.mark.parametrize('char', HOSTILE)
def test_each_control_format_bidi_or_invisible_character_is_shown_as_an_escape(char):
    said = shown.text(f'may it reach{char}pypi.org?')
    assert raw(said) == [], said
    assert said.startswith('may it reach\\') and said.endswith('pypi.org?')


def test_the_reviews_rewritten_line_is_one_visible_line():
    reason = 'ok\r\x1b[2Kmay it reach pypi.org? \u202egro.lived\u202c'
    said = shown.field('reason', reason)
    assert said == '    reason: ok\\x0d\\x1b[2Kmay it reach pypi.org? \\u202egro.lived\\u202c'
    assert len(said.splitlines()) == 1


def test_a_long_text_is_cut_and_says_how_much_was_cut():
    assert shown.text('x' * 1200, 500) == 'x' * 500 + '... [700 more characters not shown]'
    assert shown.text('x' * 501, 500).endswith('... [1 more character not shown]')
    assert shown.text('x' * 500, 500) == 'x' * 500
    assert shown.lines('a\rb\nc\u2028d') == ['a\\x0db', 'c\\u2028d']
    assert shown.text(b'\xff\x1b') == '\\xff\\x1b'       # bytes that are not UTF-8 stay visible too


def test_padding_cannot_wrap_into_a_fake_line_and_marks_cannot_stack():
    assert shown.text('ok' + ' ' * 200 + 'host: pypi.org') == 'ok [200 spaces] host: pypi.org'
    assert shown.text('a   b') == 'a   b'
    assert shown.text('e\u0301\u0301\u0301\u0301') == 'e\u0301\u0301\\u0301\\u0301'
    assert shown.lines('    indented code') == ['    indented code']      # a diff keeps its indentation
    assert shown.lines('x' * 5000) == ['x' * 5000]                      # and every line whole


# Inputs the page's visible() must show exactly as shown.text does (tests/test_supervise.py runs it).
PARITY = ['plain', 'a\rb\x1b[2Kc', '\u202egro.ipyp\u202c', 'zw\u200bj\u200d', 'nb\u00a0sp', '\x85\u2028\u2029',
          'ok' + ' ' * 50 + 'host: x', 'e\u0301\u0301\u0301', '\u3164\u2800\ufe0f', 'x' * 600, '\U000e0041',
          '\ue000\U0010fffd', 'tab\there']


@settings(max_examples=300, deadline=None)
@given(st.text(st.characters(codec=None, exclude_categories=()), max_size=80))
def test_no_text_at_all_reaches_the_terminal_with_a_character_it_acts_on(text):
    said = shown.text(text)
    assert raw(said) == []
    assert not any(c in said for c in '\n\r\v\f\x1b\x85\u2028\u2029')


def test_a_person_approves_one_readable_host_name():
    assert asked.host('PyPI.org') == 'pypi.org'
    assert asked.host('xn--pypal-4ve.org') == 'xn--pypal-4ve.org'
    for bad in ('*.pypi.org', 'pypi.org:443', 'https://pypi.org', 'pypi.org/simple', '10.0.0.1', '1.2.3.0x4',
                '[::1]', 'localhost', 'pypi.org.', 'a..b', '-a.org', 'a-.org', 'pypi\u00a0.org', 'pypi.org\x1b',
                'a' * 64 + '.org', ('a' * 60 + '.') * 5 + 'org', '', 'xn--zz.org'):
        with pytest.raises(SuperviseError):
            asked.host(bad)


def test_a_homoglyph_host_is_refused_in_unicode_and_shown_as_punycode_with_its_unicode_marked():
    with pytest.raises(SuperviseError, match='punycode form.*"xn--pypal-4ve.org"'):
        asked.host('p\u0430ypal.org')           # a Cyrillic а
    said = shown.host('xn--pypal-4ve.org')
    assert said.startswith('xn--pypal-4ve.org (an international name; in Unicode "p\u0430ypal.org", which may '
                           'imitate another name)')
    assert shown.host('pypi.org') == 'pypi.org'


def test_what_an_agent_writes_is_bounded():
    with pytest.raises(SuperviseError, match='1001 characters long; keep it to 1000'):
        asked.bounded('reason', 'x' * 1001, asked.REASON_CHARS)
    with pytest.raises(SuperviseError, match='too many'):
        asked.choices([str(n) for n in range(asked.CHOICES + 1)])
    with pytest.raises(SuperviseError, match='the same'):
        asked.choices(['yes', 'yes'])
