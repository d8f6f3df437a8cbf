"""A daemon ends with its project: once its state directory is gone (the checkout deleted) or is another
directory at the same path (deleted and made again), the daemon exits by itself.

exit_when_gone(state_dir) starts a thread that looks every CHECK_SECONDS (BOTTLE_STATE_CHECK_SECONDS in the
daemon's environment, for tests) whether the path still names the directory the daemon started in (its device
and inode; the thread holds the directory open, so its inode number cannot be given to a new directory made
at the same path, a checkout cloned again where it was). When it does not, the thread writes one line to stderr (the daemon's log) and ends the daemon as
`doit` stops it: SIGTERM to its process group (daemons.lifecycle starts each daemon leading a group of its own),
which each daemon answers by shutting down cleanly; if it is still there GRACE_SECONDS later, it exits at once.

Standard library only and nothing imported beyond what a daemon has already: it runs in mitmproxy's environment
(serve.py, next to it, imports it as `statedir`) and in the project's (the git gate, the supervisor import it as
daemons.proxy.statedir). It lives with the proxy so that a change to it restarts the proxy.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time

CHECK_ENV = 'BOTTLE_STATE_CHECK_SECONDS'
CHECK_SECONDS = 15.0
GRACE_SECONDS = 10.0


def exit_when_gone(state_dir: str | os.PathLike) -> threading.Thread:
    """Watch `state_dir` from a daemon thread; the process ends soon after the directory is gone."""
    path = os.path.realpath(state_dir)
    try:
        held = os.open(path, os.O_RDONLY | os.O_DIRECTORY)      # for the life of the process
        info = os.fstat(held)
        started_in = info.st_dev, info.st_ino
    except OSError:
        started_in = None       # gone already: the first look ends the daemon
    thread = threading.Thread(target=_watch, args=(path, started_in, check_seconds()),
                              name='state-dir-watch', daemon=True)
    thread.start()
    return thread


def check_seconds() -> float:
    """CHECK_SECONDS, or the positive number of seconds BOTTLE_STATE_CHECK_SECONDS gives."""
    try:
        seconds = float(os.environ.get(CHECK_ENV, ''))
    except ValueError:
        return CHECK_SECONDS
    return seconds if 0 < seconds < float('inf') else CHECK_SECONDS


def _identity(path: str) -> tuple[int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def _watch(path: str, started_in: tuple[int, int] | None, seconds: float) -> None:
    while True:
        time.sleep(seconds)
        now = _identity(path)
        if now is None or now != started_in:
            break
    print(f'{time.strftime("%Y-%m-%dT%H:%M:%S%z")} exiting: the state directory {path} is '
          f'{"gone" if now is None else "another directory now"} (its checkout was deleted or moved)',
          file=sys.stderr, flush=True)
    pid = os.getpid()
    if os.getpgrp() == pid:
        os.killpg(pid, signal.SIGTERM)      # its children (a git http-backend) go with it, as at a stop
    else:
        os.kill(pid, signal.SIGTERM)
    time.sleep(GRACE_SECONDS)
    os._exit(0)
