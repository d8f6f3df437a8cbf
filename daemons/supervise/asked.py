"""What an agent may ask of the human, checked before anything is recorded: a host name a person can read
and approve, texts of a bounded length, a few choices, and a bounded number of requests waiting per bottle.
Every refusal is a SuperviseError whose words the agent reads as the tool's error.
"""
from __future__ import annotations

import re

from daemons.supervise.store import SuperviseError

PENDING_PER_BOTTLE = 20     # requests of one bottle waiting for the human at once
STATUSES_KEPT = 20          # status reports kept per bottle (the page shows the latest)
REASON_CHARS = 1000
QUESTION_CHARS = 2000
CHOICES = 10
CHOICE_CHARS = 100
STATUS_CHARS = 1000
HOST_CHARS = 253
_LABEL = re.compile(r'[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?')


def host(name: str) -> str:
    """The host name an agent asks for, lower case: ASCII letters, digits, hyphens and dots, at least two
    labels, the last starting with a letter (so no IP address in any form); an international name in its
    punycode form (`xn--`), which must decode. No wildcard, port, scheme or path: a person approves exactly
    one name (the manifest can still name others)."""
    if not isinstance(name, str) or not name:
        raise SuperviseError('the host is empty; ask for a name such as "pypi.org"')
    if not name.isascii():
        try:
            suggested = f' (as punycode: "{name.encode("idna").decode("ascii")}")'
        except UnicodeError:
            suggested = ''
        raise SuperviseError('the host holds characters other than ASCII letters, digits, hyphens and dots; ask '
                             f'for an international name in its punycode form{suggested}')
    lowered = name.lower()
    labels = lowered.split('.')
    if (len(lowered) > HOST_CHARS or len(labels) < 2 or not all(_LABEL.fullmatch(label) for label in labels)
            or not labels[-1][0].isalpha()):
        raise SuperviseError(f'{name[:HOST_CHARS]!r} is not a host name a person can approve: ask for one name such '
                             'as "pypi.org" (letters, digits, hyphens and dots), without a scheme, port, path or '
                             'wildcard, and not an IP address')
    for label in labels:
        if label.startswith('xn--'):
            try:
                label.encode('ascii').decode('idna')
            except UnicodeError:
                raise SuperviseError(f'{label!r} in the host is not valid punycode') from None
    return lowered


def bounded(what: str, value: str, limit: int) -> str:
    if not isinstance(value, str):
        raise SuperviseError(f'the {what} must be text')
    if len(value) > limit:
        raise SuperviseError(f'the {what} is {len(value)} characters long; keep it to {limit} at most')
    return value


def choices(values: list[str] | None) -> list[str]:
    values = list(values or [])
    if len(values) > CHOICES:
        raise SuperviseError(f'{len(values)} choices are too many; give {CHOICES} at most')
    if len(set(values)) != len(values):
        raise SuperviseError('two choices are the same; give each once')
    return [bounded('choice', value, CHOICE_CHARS) for value in values]


def too_many(waiting: int) -> SuperviseError:
    return SuperviseError(f'this bottle has {waiting} requests waiting for the human, the most it may have at once; '
                          'wait for their answers (check_request) before asking more, or ask the same thing again '
                          'to wait for the request already made')
