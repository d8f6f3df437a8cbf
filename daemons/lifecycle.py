"""Start, check and stop one host daemon, detached from whoever starts it (doit, a test).

A daemon has a name and a state directory, where it keeps:

    <name>.pid    JSON {"pid", "start_time", "argv", "state_dir", "config"}, replaced atomically
    <name>.log    its stdout and stderr, appended across restarts, with a line per start; older lines in <name>.log.1
    <name>.lock   serialises starting and stopping between processes (parallel doit runs)
    <name>.starts JSON {"started", "deaths"}: when the running one passed its health check, and its recent
                  deaths (a crash loop: see below); removed by a stop

A process is this daemon only when it is exactly what this state directory started: the pid file's
pid, with the start time recorded (field 22 of /proc/<pid>/stat, fixed at fork), running the recorded
command line (/proc/<pid>/cmdline), and the pid file names this very state directory. So a pid the
kernel reused after a crash, or the daemon of the project this one was copied from (`cp -a` with its
`.bottle/`), is never adopted and never signalled: the copy starts its own.

Two checks, neither of which makes a backend call or raises:
  running()  ours, started with the current `config`, and `connect` reaches it (a connect to its port or
             socket): cheap, for doit's up-to-date checks, so a no-op run imports nothing heavy;
  healthy()  ours, current, and `probe` passes (a real request of its protocol): at its start, which
             is not complete until it answers, and for `doit status`.
A daemon started with another `config` (a fingerprint of what it was started with: files it read
at start, say) is neither, so `ensure_running` restarts it with the current one.

A crash loop is counted, backed off and ends in words. A daemon that passed its health check and is found
gone by `ensure_running` within `crash_window` of that start died (a stop, `stop()` or `start()`, removes the
record, so it is never taken for a death; one that exits before its check passes fails its start in words). Each death is said on stderr, and it is started again after a wait that grows (`backoff`, then
twice that, at most BACKOFF_MAX_SECONDS); the `crash_limit`-th death within `crash_window` seconds raises
DaemonError instead, with the log's end and what to do, and it is not started again until the first of those
deaths is older than the window or the record is removed. One found healthy `settle` seconds after its start
has settled: its deaths are forgotten.

The log is on the host's disk, and a guest can make a daemon print (a refused TLS hello in the proxy, a failed
fetch in the git gate, an odd call to the supervisor). It is bounded twice: each start finds the file at most
logbound.DAEMON_LOG_BYTES (a bigger one becomes <name>.log.1), which bounds any daemon across restarts; and
the project's daemons bound it while they run (logbound.bound_output, first thing in their main), since the
file they hold open cannot be renamed away from them from here.
"""
from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from daemons.atomic import write_atomic
from daemons.proxy.logbound import DAEMON_LOG_BYTES, rotated

POLL_SECONDS = 0.05
CONNECT_SECONDS = 2.0
CRASH_LIMIT = 3                 # deaths within CRASH_WINDOW_SECONDS after which it is not started again
CRASH_WINDOW_SECONDS = 600.0
SETTLE_SECONDS = 30.0           # found healthy this long after its start: its deaths are forgotten
BACKOFF_SECONDS = 1.0           # the wait before starting one that died; doubled for each further death
BACKOFF_MAX_SECONDS = 8.0


@contextmanager
def locked(lock_file: Path):
    """Hold an exclusive lock on `lock_file` (made, with its directory, if missing): between processes."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, 'a') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@functools.cache
def code_digest(package: Path) -> str:
    """A digest of the Python code of a daemon's package, for its `config`: a daemon still running the
    code of an earlier claude-bottle is restarted with the current one."""
    digest = hashlib.sha256()
    for source in sorted(Path(package).glob('*.py')):
        digest.update(f'{source.name}\0'.encode() + source.read_bytes() + b'\0')
    return digest.hexdigest()


class DaemonError(Exception):
    """A daemon that would not start or stop; the message says which, where its log is, and its end."""


class Daemon:
    def __init__(self, name: str, state_dir: Path, argv: Sequence[str],
                 probe: Callable[[], bool] = lambda: True, *, connect: Callable[[], bool] = lambda: True,
                 env: Mapping[str, str] | None = None, config: str = '', start_timeout: float = 20.0,
                 stop_timeout: float = 5.0, crash_limit: int = CRASH_LIMIT,
                 crash_window: float = CRASH_WINDOW_SECONDS, settle: float = SETTLE_SECONDS,
                 backoff: float = BACKOFF_SECONDS):
        """`probe` says whether the running daemon does its job (a request of its protocol); `connect`,
        cheaply, whether it is there to be spoken to (a connect to its port: see `connects`). Both must
        return within a few seconds. `start_timeout` bounds the wait for the first good probe. The crash
        loop's bounds (module docstring): `crash_limit` deaths within `crash_window` seconds, `settle`,
        `backoff`."""
        self.name = name
        self.state_dir = Path(os.path.realpath(state_dir))
        self.argv = [str(a) for a in argv]
        self.probe = probe
        self.connect = connect
        self.env = dict(os.environ if env is None else env)
        self.config = config
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.crash_limit = crash_limit
        self.crash_window = crash_window
        self.settle = settle
        self.backoff = backoff
        self.pid_file = self.state_dir / f'{name}.pid'
        self.log_file = self.state_dir / f'{name}.log'
        self.lock_file = self.state_dir / f'{name}.lock'
        self.starts_file = self.state_dir / f'{name}.starts'

    def pid(self) -> int | None:
        """The pid of the running daemon, or None: no pid file, or its process is gone (a crash),
        or the pid now belongs to another process, or the pid file is not this state directory's."""
        record = self._record()
        return record['pid'] if record and self._ours(record) else None

    def current(self) -> bool:
        """Ours, alive and started with the current config; no probe. Never raises."""
        record = self._record()
        return record is not None and record['config'] == self.config and self._ours(record)

    def running(self) -> bool:
        """Current, and `connect` reaches it: the cheap check for doit's up-to-date. Never raises."""
        return self.current() and _passes(self.connect)

    def healthy(self) -> bool:
        """Current, and the probe passes. Never raises."""
        return self.current() and _passes(self.probe)

    def ensure_running(self) -> bool:
        """Start the daemon unless it is healthy; a crashed or hung one is stopped first. True when it was
        (re)started. One that died is started again after a wait, and not after `crash_limit` deaths
        within `crash_window`: DaemonError (the module docstring)."""
        with self._locked():
            starts = self._starts()
            if self.healthy():
                if starts['deaths'] and starts['started'] is not None and time.time() - starts['started'] >= self.settle:
                    # It settled: its deaths are forgotten (a death of this one still counts).
                    write_atomic(self.starts_file, json.dumps({'started': starts['started'], 'deaths': []}))
                return False
            now = time.time()
            deaths = [death for death in starts['deaths'] if now - death[1] < self.crash_window]
            started = starts['started']     # when the last one passed its check; gone since, it died
            if started is not None and now - started < self.crash_window and self.pid() is None:
                deaths.append([started, now])
                write_atomic(self.starts_file, json.dumps({'started': None, 'deaths': deaths}))
                if len(deaths) < self.crash_limit:
                    wait = min(self.backoff * 2 ** (len(deaths) - 1), BACKOFF_MAX_SECONDS)
                    print(f'claude-bottle: {self.name} died {_duration(now - started)} or less after '
                          f'its start ({len(deaths)} of {self.crash_limit} deaths within '
                          f'{_duration(self.crash_window)} before it is left stopped); starting it again in '
                          f'{wait:g} s. Its log: {self.log_file}', file=sys.stderr, flush=True)
                    time.sleep(wait)
            if len(deaths) >= self.crash_limit:
                raise DaemonError(self._crash_loop(deaths))
            self._stop()
            self._start()
            return True

    def start(self) -> int:
        """Start it (stopping a previous instance first) and wait until the probe passes; its deaths are
        forgotten."""
        with self._locked():
            self._stop()
            self.starts_file.unlink(missing_ok=True)
            return self._start()

    def stop(self) -> None:
        """SIGTERM to the daemon's process group, SIGKILL after `stop_timeout`; the pid file goes, and the
        record of its starts and deaths: a stop is no death."""
        with self._locked():
            self._stop()
            self.starts_file.unlink(missing_ok=True)

    def crash_loop(self) -> str | None:
        """Why it is left stopped, in a few words (for `doit status`), or None: it is not. Never raises."""
        deaths = [death for death in self._starts()['deaths'] if time.time() - death[1] < self.crash_window]
        if len(deaths) < self.crash_limit:
            return None
        return f'left stopped after dying {len(deaths)} times within {_duration(self.crash_window)}; see {self.log_file}'

    def log_tail(self, lines: int = 20) -> str:
        """The last `lines` lines of the log, from its rotated file too when the live one has fewer."""
        found = []
        for path in (self.log_file, rotated(self.log_file)):
            try:
                found = path.read_text(errors='replace').splitlines()[-(lines - len(found)):] + found
            except OSError:
                continue
            if len(found) >= lines:
                break
        return '\n'.join(found) if found else '(no log)'

    def _locked(self):
        return locked(self.lock_file)

    def _starts(self) -> dict:
        """The record of its last start and recent deaths ([started, found dead], wall-clock seconds);
        empty when missing or unreadable."""
        try:
            record = json.loads(self.starts_file.read_text())
            started = record['started']
            return {'started': None if started is None else float(started),
                    'deaths': [[float(started), float(found)] for started, found in record['deaths']]}
        except (OSError, ValueError, KeyError, TypeError):
            return {'started': None, 'deaths': []}

    def _crash_loop(self, deaths: list[list[float]]) -> str:
        first = min(found for _, found in deaths)
        lived = max(found - started for started, found in deaths)
        again = time.strftime('%H:%M:%S', time.localtime(first + self.crash_window))
        return (f'{self.name} died {len(deaths)} times within {_duration(self.crash_window)}, each time '
                f'{_duration(lived)} or less after it had started and passed its health check; it is left stopped.\n'
                f'Read its log {self.log_file} for why it exits (its end is below) and fix that; `doit status` '
                f'shows what runs.\n'
                f'The next run starts it again after {again}, when the first of these deaths is '
                f'{_duration(self.crash_window)} old, or once you remove {self.starts_file} (a stop of the '
                f'daemon removes it too).\n'
                f'The end of its log:\n'
                f'{self.log_tail()}')

    def _record(self) -> dict | None:
        try:
            record = json.loads(self.pid_file.read_text())
            argv = record['argv']
            if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
                return None
            state_dir = record.get('state_dir')      # None: written by a version that did not record it
            return {'pid': int(record['pid']), 'start_time': int(record['start_time']), 'argv': argv,
                    'state_dir': None if state_dir is None else str(state_dir),
                    'config': str(record.get('config', ''))}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None

    def _ours(self, record: dict) -> bool:
        """The recorded process is alive and is exactly what this state directory started."""
        if record['state_dir'] is not None and record['state_dir'] != str(self.state_dir):
            return False            # the pid file came with a copy of another project's state
        return _alive(record['pid'], record['start_time']) and _cmdline(record['pid']) == record['argv']

    def _start(self) -> int:
        try:
            if self.log_file.stat().st_size > DAEMON_LOG_BYTES:
                os.replace(self.log_file, rotated(self.log_file))
        except FileNotFoundError:
            pass
        with open(self.log_file, 'a') as log:
            log.write(f'--- {time.strftime("%Y-%m-%dT%H:%M:%S%z")} starting {self.name}: {" ".join(self.argv)}\n')
        log_fd = os.open(self.log_file, os.O_WRONLY | os.O_APPEND)
        try:
            # A new session: no controlling terminal, and doit's Ctrl-C does not reach it.
            pid = os.posix_spawnp(self.argv[0], self.argv, self.env, setsid=True, file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, log_fd, 1),
                (os.POSIX_SPAWN_DUP2, log_fd, 2)])
        except OSError as err:
            raise DaemonError(f'{self.name}: cannot run {self.argv[0]!r}: {err}') from None
        finally:
            os.close(log_fd)
        start_time = _start_time(pid)
        write_atomic(self.pid_file, json.dumps({'pid': pid, 'start_time': start_time, 'argv': self.argv,
                                                'state_dir': str(self.state_dir), 'config': self.config}))
        deadline = time.monotonic() + self.start_timeout
        started = time.time()
        while True:
            if not _alive(pid, start_time):
                self.pid_file.unlink(missing_ok=True)
                raise DaemonError(f'{self.name} exited while starting; the end of its log {self.log_file}:\n'
                                  f'{self.log_tail()}')
            if self.healthy():
                # Passed: from now on, found gone, it died (ensure_running counts it).
                write_atomic(self.starts_file, json.dumps({'started': started, 'deaths': self._starts()['deaths']}))
                return pid
            if time.monotonic() > deadline:
                self._stop()
                raise DaemonError(f'{self.name} (pid {pid}) did not pass its health check within '
                                  f'{self.start_timeout:g} s and was stopped; the end of its log '
                                  f'{self.log_file}:\n{self.log_tail()}')
            time.sleep(POLL_SECONDS)

    def _stop(self) -> None:
        record = self._record()
        if record and self._ours(record):
            pid, start_time = record['pid'], record['start_time']
            for sig, wait in ((signal.SIGTERM, self.stop_timeout), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(pid, sig)     # the daemon leads its own group: its children go too
                except ProcessLookupError:
                    break
                if _wait_gone(pid, start_time, wait):
                    break
            else:
                raise DaemonError(f'{self.name} (pid {pid}) survived SIGKILL; see {self.log_file}')
        self.pid_file.unlink(missing_ok=True)


def connects(address: tuple[str, int] | str, seconds: float = CONNECT_SECONDS) -> bool:
    """A TCP (host, port) or Unix socket path accepts a connection: the cheap `connect` of a daemon."""
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(seconds)
            sock.connect(address)
        return True
    except OSError:
        return False


PROBE_BYTES = 64 * 1024     # a health answer is a few hundred bytes


class _DeadlineSocket(socket.socket):
    """A socket whose every receive ends by one deadline for the whole exchange, so an answer dripped a
    byte at a time cannot keep a probe waiting past it."""

    def __init__(self, family: int, deadline: float):
        super().__init__(family, socket.SOCK_STREAM)
        self.deadline = deadline

    def recv_into(self, buffer, nbytes: int = 0, flags: int = 0) -> int:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError('the answer did not come within the deadline')
        self.settimeout(remaining)
        return super().recv_into(buffer, nbytes, flags)


def probe_http(address: tuple[str, int] | str, url: str, seconds: float, headers: Mapping[str, str] | None = None,
               limit: int = PROBE_BYTES) -> tuple[int, dict[str, str], bytes] | None:
    """GET `url` (a path, or an absolute URL for a proxy) over a TCP (host, port) or a Unix socket path: (status,
    headers with lower-case names, body), or None when no whole answer came. The whole exchange within `seconds`
    and `limit` bytes of body, whatever the other end does (it may not be what it should be). Never raises."""
    import http.client      # asked at a start and by `doit status`, never by a no-op run
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    connection = http.client.HTTPConnection('localhost')
    try:
        connection.sock = _DeadlineSocket(family, time.monotonic() + seconds)
        connection.sock.settimeout(seconds)
        connection.sock.connect(address)
        connection.request('GET', url, headers=dict(headers or {}))
        response = connection.getresponse()
        body = response.read(limit + 1)
        if len(body) > limit:
            return None
        return response.status, {name.lower(): value for name, value in response.getheaders()}, body
    except (OSError, ValueError, http.client.HTTPException):
        return None
    finally:
        connection.close()


def probe_json(address: tuple[str, int] | str, url: str, seconds: float, headers: Mapping[str, str] | None = None,
               limit: int = PROBE_BYTES) -> dict | None:
    """The JSON object `probe_http` got with status 200, or None for anything else. Never raises."""
    answer = probe_http(address, url, seconds, headers, limit)
    if answer is None or answer[0] != 200:
        return None
    try:
        data = json.loads(answer[2])
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _duration(seconds: float) -> str:
    seconds = max(seconds, 0)
    if seconds < 120:
        return f'{seconds:.0f} s' if seconds >= 10 else f'{seconds:.1f} s'
    return f'{seconds / 60:.0f} minutes'


def _passes(check: Callable[[], bool]) -> bool:
    try:
        return bool(check())
    except Exception:        # the caller's check: any failure of it means no
        return False


def _cmdline(pid: int) -> list[str] | None:
    try:
        with open(f'/proc/{pid}/cmdline', 'rb') as cmdline:
            return [arg.decode(errors='surrogateescape') for arg in cmdline.read().split(b'\0')[:-1]]
    except OSError:
        return None


def _start_time(pid: int) -> int:
    return int(_stat_fields(pid)[19])


def _stat_fields(pid: int) -> list[str]:
    """Fields 3 onwards of /proc/<pid>/stat (the command name, field 2, may hold spaces)."""
    with open(f'/proc/{pid}/stat') as stat:
        return stat.read().rsplit(')', 1)[1].split()


def _alive(pid: int, start_time: int) -> bool:
    try:
        fields = _stat_fields(pid)
    except (OSError, IndexError):
        return False
    if int(fields[19]) != start_time:
        return False
    if fields[0] in ('Z', 'X'):
        try:
            os.waitpid(pid, os.WNOHANG)     # our own child that exited: reap it
        except ChildProcessError:
            pass
        return False
    return True


def _wait_gone(pid: int, start_time: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while _alive(pid, start_time):
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL_SECONDS)
    return True
