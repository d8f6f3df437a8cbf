"""What a long step is doing, said as it starts, on stderr: doit passes stderr through as it
comes (stdout of an action it holds back), so a terminal and a CI log both see it live. Only
steps that take seconds or more say anything, so a no-op run stays quiet.

A daemon stopped because nothing uses it any more is said in one line on stdout: what doit shows of a
clean action (stderr it holds back there), of teardown and of prune (verbosity 2)."""
from __future__ import annotations

import sys

UNUSED = 'no agent uses it'


def progress(text: str) -> None:
    print(f'claude-bottle: {text} ...', file=sys.stderr, flush=True)


def stopped(what: str, why: str = UNUSED) -> None:
    print(f'stopped {what}: {why}', flush=True)
