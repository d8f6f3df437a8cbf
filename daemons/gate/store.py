"""The gate's state directory, shared by the daemon, its hooks and the review functions:

    <state_dir>/
        key                   the secret only the egress proxy sends along (0600)
        bottles.json          what the gate serves (config.py)
        gate.json             {"port", "pid", "instance"} of the running daemon, written by it (0600)
        gate.pid, gate.log    the daemon (daemons.lifecycle)
        receipts.jsonl        one JSON line per push, approval and rejection
        held/<id>.json        pushes held for review
        mirrors/<bottle>/<path>.git        a bare mirror per bottle and repository
        mirrors/<bottle>/<path>.git.lock   taken while anything changes that mirror's refs

Kept free of the project's heavier modules: the hooks import it on every push.
"""
from __future__ import annotations

import fcntl
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

ZERO = '0' * 40
LOCK_SECONDS = 600.0        # a push or a refresh holds a mirror's lock at most about this long


class LockTimeout(Exception):
    """A mirror stayed locked longer than LOCK_SECONDS; the message names it."""


def mirror_dir(state_dir: Path, bottle: str, path: str) -> Path:
    return Path(state_dir) / 'mirrors' / bottle / f'{path}.git'


@contextmanager
def mirror_lock(mirror: Path, seconds: float = LOCK_SECONDS):
    """Held while a push, a refresh or an approval changes or reads-then-changes the mirror's refs, so
    each sees the refs the one before it left. Between processes (the daemon, approve) and threads.
    Waited for at most `seconds`."""
    mirror.parent.mkdir(parents=True, exist_ok=True)
    with open(mirror.parent / f'{mirror.name}.lock', 'a') as lock:
        deadline = time.monotonic() + seconds
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise LockTimeout(f'{mirror} stayed locked for {seconds:g} s by another push or '
                                      'refresh; try again') from None
                time.sleep(0.02)
        yield


def append_receipt(state_dir: Path, **fields) -> None:
    """One line in receipts.jsonl, written whole by one append (concurrent hooks do not interleave)."""
    line = json.dumps({'time': now(), **fields}, sort_keys=True) + '\n'
    fd = os.open(Path(state_dir) / 'receipts.jsonl', os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def held_dir(state_dir: Path) -> Path:
    return Path(state_dir) / 'held'


def held_file(state_dir: Path, held_id: str) -> Path:
    return held_dir(state_dir) / f'{held_id}.json'


def now() -> str:
    return time.strftime('%Y-%m-%dT%H:%M:%S%z')
