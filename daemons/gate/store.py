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

import errno
import fcntl
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

ZERO = '0' * 40
FAULT_VARIABLE = 'BOTTLE_GATE_FAULT'
FAULT_WAIT_SECONDS = 120.0
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


class ReceiptError(Exception):
    """A receipt could not be written whole (a full disk): nothing of it is in receipts.jsonl."""


def append_receipt(state_dir: Path, **fields) -> None:
    """One whole line in receipts.jsonl, on disk (fsync) before this returns, or nothing and ReceiptError.
    Under the file's lock: a line an earlier crash left cut is dropped first, so every line parses; a short
    write (a full disk) is taken back."""
    line = (json.dumps({'time': now(), **fields}, sort_keys=True) + '\n').encode()
    path = Path(state_dir) / 'receipts.jsonl'
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as err:
        raise ReceiptError(f'the receipt cannot be written to {path}: {err.strerror}') from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = _whole_lines(fd)
        checkpoint('receipt')
        try:
            if os.write(fd, line) != len(line):
                raise OSError(errno.ENOSPC, 'No space left on device')
            os.fsync(fd)
        except OSError as err:
            os.ftruncate(fd, size)
            raise ReceiptError(f'the receipt cannot be written to {path}: {err.strerror}') from None
    finally:
        os.close(fd)


def checkpoint(point: str) -> None:
    """A place where the fault-injection tests (tests/test_gate_faults.py) stop a push. Only when the gate
    runs with BOTTLE_GATE_FAULT=DIR and the test made DIR/<point>.armed: the first process to come here
    makes DIR/<point>.reached and waits (FAULT_WAIT_SECONDS at most) for DIR/<point>.go, while the test
    kills the gate or fills its disk. Without the variable (always, outside those tests) it does nothing."""
    directory = os.environ.get(FAULT_VARIABLE)
    if not directory:
        return
    armed, reached, go = (Path(directory) / f'{point}.{what}' for what in ('armed', 'reached', 'go'))
    try:
        if not armed.exists() or reached.exists():
            return
        reached.write_text(f'{os.getpid()}\n')
    except OSError:
        return
    deadline = time.monotonic() + FAULT_WAIT_SECONDS
    while not go.exists() and time.monotonic() < deadline:
        time.sleep(0.02)


def _whole_lines(fd: int) -> int:
    """The file's size once a cut last line (no newline at its end) is dropped."""
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b'\n':
        return size
    tail = os.pread(fd, min(size, 1 << 20), max(0, size - (1 << 20)))
    keep = size - len(tail) + tail.rfind(b'\n') + 1 if b'\n' in tail else 0
    os.ftruncate(fd, keep)
    return keep


def held_dir(state_dir: Path) -> Path:
    return Path(state_dir) / 'held'


def held_file(state_dir: Path, held_id: str) -> Path:
    return held_dir(state_dir) / f'{held_id}.json'


def now() -> str:
    return time.strftime('%Y-%m-%dT%H:%M:%S%z')
