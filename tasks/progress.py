"""What a long step is doing, said as it starts, on stderr: doit passes stderr through as it
comes (stdout of an action it holds back), so a terminal and a CI log both see it live. Only
steps that take seconds or more say anything, so a no-op run stays quiet."""
from __future__ import annotations

import sys


def progress(text: str) -> None:
    print(f'claude-bottle: {text} ...', file=sys.stderr, flush=True)
