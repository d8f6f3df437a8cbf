"""The bounds of the host logs a guest can make grow, and the writers that keep them.

A guest chooses what it sends (a path of 60 KB, a host name, a TLS hello the proxy cannot parse) and how often:
every refused request is a line in its bottle's egress log, and a daemon a guest speaks to (the egress proxy, the
git gate, the supervisor) may print what went wrong with it. These logs are on the host's disk, so each has a
bound: a field of a line is cut at FIELD_BYTES with its length noted, a daemon's output line at LINE_BYTES, and a
log file holds at most its bound in the live file plus one rotated copy `<name>.1` of the same bound, the oldest
lines going first. The newest lines are always in the live file.

Standard library only: it runs in mitmproxy's environment (addon.py, serve.py, next to it) and in the project's
(the git gate, the supervisor, daemons.lifecycle), which import it as daemons.proxy.logbound. It lives with the
proxy so that a change to it restarts the proxy (the proxy's code digest covers this directory).
"""
from __future__ import annotations

import io
import os
import shutil
import stat
import sys
import threading
from pathlib import Path

MIB = 1024 * 1024
EGRESS_LOG_BYTES = 8 * MIB    # a bottle's live egress.log; with egress.log.1, at most twice this a bottle
DAEMON_LOG_BYTES = 4 * MIB    # a daemon's live <name>.log (its stdout and stderr); with <name>.log.1, twice this
FIELD_BYTES = 1024            # a field of an egress log line (a path, a host, a reason) is cut past this
LINE_BYTES = 4096             # a line a daemon prints is cut past this
ROTATED_SUFFIX = '.1'


def cut(text: str, limit: int = FIELD_BYTES) -> str:
    """`text` if its UTF-8 form is at most `limit` bytes, else its first `limit` bytes (never half a character)
    followed by `...(<n> bytes, cut)`, n being the length it had: whoever reads the log sees that, and how much,
    the guest sent."""
    data = text.encode('utf-8', 'surrogateescape')
    if len(data) <= limit:
        return text
    return data[:limit].decode('utf-8', 'ignore') + f'...({len(data)} bytes, cut)'


def cut_fields(line: dict, limit: int = FIELD_BYTES) -> dict:
    """`line` with each of its text values cut (`cut`); other values as they are."""
    return {key: cut(value, limit) if isinstance(value, str) else value for key, value in line.items()}


def rotated(path: Path) -> Path:
    """Where the older lines of the log at `path` are: `<name>.1`."""
    return path.with_name(path.name + ROTATED_SUFFIX)


class RotatingLog:
    """A log of whole lines at `path` that one process writes: at most `max_bytes` in the live file (a line that
    would take it past the bound starts a new one, the old one becoming `<name>.1` by a rename, which replaces the
    previous `.1`). Each line goes out in one write to a file opened for appending, so a reader sees whole lines;
    the caller keeps its lines well under `max_bytes` (cut_fields). A file at the path that is not the one open
    (removed with its directory and made anew) is opened again."""

    def __init__(self, path: Path, max_bytes: int):
        self.path, self.max_bytes = Path(path), max_bytes
        self._fd: int | None = None

    def write(self, line: str) -> None:
        """Append `line` (a newline is added); raises OSError when the file cannot be written."""
        data = line.rstrip('\n').encode('utf-8', 'surrogateescape') + b'\n'
        fd = self._open()
        if os.fstat(fd).st_size + len(data) > self.max_bytes:
            os.replace(self.path, rotated(self.path))
            self.close()
            fd = self._open()
        _write_all(fd, data)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _open(self) -> int:
        if self._fd is not None:
            try:
                at_path = os.stat(self.path)
            except FileNotFoundError:
                at_path = None
            mine = os.fstat(self._fd)
            if at_path is None or (at_path.st_dev, at_path.st_ino) != (mine.st_dev, mine.st_ino):
                self.close()
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        return self._fd


class BoundedOutput(io.TextIOBase):
    """A daemon's sys.stdout and sys.stderr when both are its log file (daemons.lifecycle makes them so): lines cut
    at LINE_BYTES, and the file kept under `max_bytes`. The daemon holds the file open from its start, so it is not
    renamed away: when a line would take it past the bound, its content is copied to `<name>.1` (temp and rename)
    and the file emptied in place; the descriptor appends, so the next line lands at its start."""

    def __init__(self, fd: int, path: Path | None, max_bytes: int):
        super().__init__()
        self.fd, self.path, self.max_bytes = fd, path, max_bytes
        self._pending = ''
        self._lock = threading.Lock()

    def writable(self) -> bool:
        return True

    @property
    def encoding(self) -> str:       # what a library asks of sys.stderr before it writes text to it
        return 'utf-8'

    def write(self, text: str) -> int:
        with self._lock:
            self._pending += text
            *lines, self._pending = self._pending.split('\n')
            if len(self._pending) > LINE_BYTES:        # a line that never ends is not held in memory either
                lines.append(self._pending)
                self._pending = ''
            for line in lines:
                self._put(cut(line, LINE_BYTES) + '\n')
        return len(text)

    def flush(self) -> None:
        pass        # every whole line is written at once; a partial one waits for its end

    def fileno(self) -> int:
        return self.fd

    def _put(self, line: str) -> None:
        data = line.encode('utf-8', 'surrogateescape')
        try:
            if self.path is not None and os.fstat(self.fd).st_size + len(data) > self.max_bytes:
                self._rotate()
            _write_all(self.fd, data)
        except OSError:
            pass        # a full disk or a removed directory: the daemon goes on without its log

    def _rotate(self) -> None:
        """The live file's lines to `<name>.1` (read by its path: the descriptor only appends), then the live file
        emptied. Without a copy (the path gone or not writable) the older lines are lost, never the bound."""
        older = rotated(self.path)
        temp = older.with_name(f'.{older.name}.tmp')
        try:
            with open(self.path, 'rb') as current, \
                    open(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600), 'wb') as copy:
                shutil.copyfileobj(current, copy)
            os.replace(temp, older)
        except OSError:
            pass
        os.ftruncate(self.fd, 0)


def bound_output(max_bytes: int = DAEMON_LOG_BYTES) -> None:
    """Route this process's sys.stdout and sys.stderr through one BoundedOutput on descriptor 2. Call it first in a
    daemon's main, before any logging handler takes hold of sys.stderr. When stderr is not a regular file (a
    terminal, a pipe: run by hand or by a test), lines are still cut but nothing is rotated."""
    path = None
    try:
        if stat.S_ISREG(os.fstat(2).st_mode):
            path = Path(os.readlink('/proc/self/fd/2'))
    except OSError:
        path = None
    output = BoundedOutput(2, path, max_bytes)
    sys.stdout = sys.stderr = output


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
