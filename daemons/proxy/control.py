"""The egress proxy of a project, host side: mitmproxy's environment, the CA, the doors, the daemon.

One mitmproxy process (serve.py) serves every bottle of the project; each bottle has a door (a host Unix socket
the proxy itself listens on: doors.py) and its own rules and log. The proxy has no TCP listener: a bottle is
known only by its door, which only this user can reach. Files:

    <state_dir>/                      the project's proxy directory (for example .bottle/egress)
        proxy.pid, proxy.log          the proxy daemon (daemons.lifecycle)
        doors.json                    bottle -> door directory, rules file, log file, and where the
                                      project's services (git gate, supervisor) listen; read live by the addon
        ca/mitmproxy-ca.pem           the CA key and certificate, 0600 (ca/ 0700; both repaired before a start
                                      of the proxy): the only copy of the key
        ca/mitmproxy-ca-cert.pem      the CA certificate, for guests
    $TMPDIR/claude-bottle-<uid>/secrets-<hash of state_dir>/secrets.sock
                                      the proxy's hand-over socket (hand_over: the values of the bottles'
                                      bound secrets, which live in the proxy's memory only), 0600 in a 0700
                                      directory, short like a door's path
    <door_dir>/egress.sock            the door, in a short private directory given to open_door (a Unix
                                      socket path holds 107 bytes): mount the directory into a container
                                      (a directory mount keeps working when a restarted proxy recreates
                                      the socket), or pass the socket to smolvm --mount-socket
    <bottle_dir>/                     the bottle's own directory, given to open_door
        egress-rules.json             the rules (daemons/proxy/rules.py), written with write_rules
        egress.log                    one JSON line per request decision

The proxy (serve.py, with the addon addon.py) and the CA maker (ca.py) run with the environment's
Python; this module runs with the project's.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from daemons.atomic import write_atomic
from daemons.lifecycle import Daemon, code_digest, connects, locked, probe_http, probe_json
from daemons.proxy import ca
from daemons.proxy.bound_secrets import HAND_OVER_BYTES, HAND_OVER_SECONDS, peer_credentials, value_refusal
from daemons.proxy.rules import HEALTH_HOST, Rules, route_tag

MITMPROXY_VERSION = '11.0.2'     # the last release for Python 3.11 (11.1 needs 3.12)
HERE = Path(__file__).resolve().parent
SERVE = HERE / 'serve.py'
CA_MAKER = HERE / 'ca.py'
PROBE_SECONDS = 3.0
LISTENER_WAIT_SECONDS = 10.0
UNIX_PATH_MAX = 107                # sun_path holds 108 bytes with the terminating NUL
DOOR_FULL_HEADER = 'X-Claude-Bottle-Door-Full'     # doors.FULL_HEADER (that module runs in mitmproxy's environment)


class ProxyError(Exception):
    """Something about the egress proxy a person has to fix; the message says what and where."""


def venv_dir(cache_dir: Path) -> Path:
    return Path(cache_dir) / f'mitmproxy-{MITMPROXY_VERSION}'


def ensure_venv(cache_dir: Path) -> Path:
    """mitmproxy's own virtual environment in the user cache, made once (this needs PyPI).
    It is built in a temporary directory and renamed into place, so it exists whole or not at all;
    the proxy runs it as `bin/python -c ...`, which, unlike pip's scripts, survives the rename."""
    target = venv_dir(cache_dir)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with locked(target.parent / f'.{target.name}.lock'):     # another run (a checkout beside) may make it now
        if not target.exists():
            _make_venv(target)
    return target


def _make_venv(target: Path) -> None:
    build = Path(tempfile.mkdtemp(dir=target.parent, prefix=f'.{target.name}.'))
    try:
        for argv in ([sys.executable, '-m', 'venv', build],
                     [build / 'bin' / 'python', '-m', 'pip', 'install', '--quiet', '--disable-pip-version-check',
                      f'mitmproxy=={MITMPROXY_VERSION}']):
            proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True)
            if proc.returncode != 0:
                raise ProxyError(f'making the egress proxy environment {target} failed: {" ".join(map(str, argv))} '
                                 f'exited {proc.returncode}; PyPI must be reachable the first time.\n'
                                 f'{(proc.stderr or proc.stdout)[-2000:]}')
        os.rename(build, target)
    finally:
        shutil.rmtree(build, ignore_errors=True)


def write_rules(path: Path, data: dict) -> Rules:
    """Check `data` against the rules format (rules.py) and write it where the proxy reads it;
    RulesError says what is wrong. The proxy uses it from the next request on."""
    rules = Rules.from_json(data)
    write_atomic(Path(path), json.dumps(rules.to_json(), indent=2) + '\n')
    return rules


@dataclass(frozen=True)
class Door:
    bottle: str
    bottle_dir: Path
    directory: Path

    @classmethod
    def of(cls, bottle: str, entry: dict) -> Door:
        return cls(bottle, Path(entry['dir']), Path(entry['door']))

    @property
    def socket(self) -> Path:
        return self.directory / 'egress.sock'

    @property
    def rules(self) -> Path:
        return self.bottle_dir / 'egress-rules.json'

    @property
    def log(self) -> Path:
        return self.bottle_dir / 'egress.log'


class EgressProxy:
    def __init__(self, state_dir: Path, venv: Path, upstream_ca: Path | None = None, *,
                 door_connections: int | None = None, door_idle: int | None = None):
        """`upstream_ca`: a PEM file of extra CAs the proxy trusts for upstream servers, besides
        the system's (an internal registry's CA; the tests' loopback servers). `door_connections`,
        `door_idle`: instead of the addon's bounds (doors.py: connections one bottle holds at once,
        seconds an idle connection stays)."""
        self.state_dir = Path(state_dir)
        self.venv = Path(venv)
        self.upstream_ca = Path(upstream_ca) if upstream_ca else None
        self.door_bounds = {'bottle_door_connections': door_connections, 'bottle_door_idle': door_idle}
        self.doors_file = self.state_dir / 'doors.json'
        self.ca_dir = self.state_dir / 'ca'
        digest = hashlib.sha256(str(self.state_dir.resolve()).encode()).hexdigest()[:16]
        self.secrets_socket = (Path(tempfile.gettempdir()) / f'claude-bottle-{os.getuid()}' / f'secrets-{digest}'
                               / 'secrets.sock')

    @property
    def ca_cert(self) -> Path:
        """The CA certificate for guests (the key stays in ca/mitmproxy-ca.pem)."""
        return self.ca_dir / 'mitmproxy-ca-cert.pem'

    def ensure_ca(self) -> Path:
        self._make_ca()
        return self.ca_cert

    def renew_ca(self) -> Path:
        """A new CA; a running proxy is restarted to use it. Guests must be given the new certificate."""
        with self._locked():
            self._make_ca('--renew')
            if self.daemon().pid() is not None:
                self.daemon().start()
        return self.ca_cert

    def open_door(self, bottle: str, bottle_dir: Path, door_dir: Path) -> Door:
        """Give the bottle its door, a socket in `door_dir` (made 0700; its parent must be a directory
        only this user can change), and make sure the proxy serves it; idempotent. Returns once a
        health request through the door is answered for this bottle. Neither adding nor removing a
        door restarts the proxy."""
        door = Door(bottle, Path(bottle_dir).resolve(), Path(door_dir))
        _check_socket_path(door.socket)
        with self._locked():
            private_dir(door.directory)
            _stop_old_relay(door)
            doors = self._doors()
            entry = {'door': str(door.directory), 'dir': str(door.bottle_dir), 'rules': str(door.rules),
                     'log': str(door.log)}
            if doors.get(bottle) != entry:
                doors[bottle] = entry
                self._write_doors(doors)
                if self.daemon().pid() is not None:        # the addon opens the new door by itself
                    _wait(lambda: door_answers(door.socket, bottle), LISTENER_WAIT_SECONDS)
            self._ensure_running(doors)
        return door

    def close_door(self, bottle: str) -> bool:
        """Remove the bottle's door (the proxy stops listening on it); the proxy stops with the last door.
        True when this stopped a running proxy."""
        with self._locked():
            doors = self._doors()
            entry = doors.pop(bottle, None)
            if entry:
                door = Door.of(bottle, entry)
                _stop_old_relay(door)
                door.socket.unlink(missing_ok=True)
                try:
                    door.directory.rmdir()
                except OSError:
                    pass            # not empty or already gone: not ours to clear
                self._write_doors(doors)
            if not doors:
                daemon = self.daemon()
                running = daemon.pid() is not None
                daemon.stop()
                return running
            return False

    def bottles(self) -> list[str]:
        """The bottles that have a door: those whose launch opened it and no teardown closed it."""
        return sorted(self._doors())

    def ensure_running(self) -> bool:
        """Start the proxy when it is not healthy (after a crash, a reboot), which opens every door; True
        when it was (re)started. With no doors, nothing runs."""
        with self._locked():
            return self._ensure_running(self._doors())

    def healthy(self) -> bool:
        """The proxy is ours, current, and every door answers for its bottle. Never raises."""
        return self.daemon().healthy()

    def door_open(self, bottle: str) -> bool:
        """The proxy is ours and current and the bottle's door takes a connection: the up-to-date check of a
        bottle's door, cheap and with no backend call. Never raises."""
        try:
            entry = self._doors().get(bottle)
            return bool(entry) and self.daemon().current() and connects(str(Door.of(bottle, entry).socket))
        except (ProxyError, OSError):
            return False

    def door_healthy(self, bottle: str) -> bool:
        """A health request through the bottle's door is answered for it by a current proxy (for `doit
        status`). No backend call; never raises."""
        try:
            entry = self._doors().get(bottle)
            return bool(entry) and self.daemon().current() and door_answers(Door.of(bottle, entry).socket, bottle)
        except (ProxyError, OSError):
            return False

    def route_service(self, name: str, port: int | None, key_file: Path | None) -> None:
        """Send the bottles' requests for the service's name (rules.SERVICES: 'gate', 'supervise') to the
        project's service at this port, with the key in `key_file`; None: it does not run. The addon
        applies it live; a running proxy has applied it when this returns."""
        with self._locked():
            services = {**self._file().get('services', {}), name: {'port': port, 'key_file': str(key_file)}}
            if not port:
                del services[name]
            doors = self._doors()
            self._write_doors(doors, services=services or None)
            listener = next(((bottle, Door.of(bottle, entry).socket) for bottle, entry in doors.items()), None)
            tag = route_tag(port, key_file.read_text().strip()) if port and key_file else None
            # A proxy started from other code or another CA is restarted by the next egress:<agent>,
            # and reads the route at its start: only a current one is waited for.
            if listener and self.daemon().current() and not _wait(
                    lambda: _routes(*listener).get(name) == tag, LISTENER_WAIT_SECONDS):
                raise ProxyError(f'the egress proxy of {self.state_dir} did not take the route to the {name} service '
                                 f'within {LISTENER_WAIT_SECONDS} s; see {self.daemon().log_file}')

    def service_route(self, name: str) -> dict | None:
        """Where the addon sends requests for the service: {"port", "key_file"}, or None. Never raises."""
        try:
            return self._file().get('services', {}).get(name)
        except ProxyError:
            return None

    def hand_over(self, bottle: str, values: Mapping[str, str]) -> None:
        """Give the running proxy the real values of the bottle's bound secrets (secret name -> value), in place
        of the ones it had: the next request uses them, without a restart. They go over the proxy's hand-over
        socket (whose listener must be the proxy's own process) and stay in its memory only: a restarted proxy
        has none until they are handed over again. ProxyError when the proxy is not running or refuses them
        (a secret the bottle's rules do not bind, a value that cannot go in a header); no message quotes a
        value."""
        for name, value in values.items():
            if why := value_refusal(name, value):
                raise ProxyError(f'cannot hand the secrets of bottle {bottle} to the egress proxy: {why}')
        pid = self.daemon().pid()
        if pid is None:
            raise ProxyError(f'the egress proxy of {self.state_dir} is not running, so it cannot take the secrets of '
                             f'bottle {bottle}; launching the agent starts it (doit launch:{bottle})')
        data = json.dumps({'bottle': bottle, 'values': dict(values)}).encode()
        if len(data) > HAND_OVER_BYTES:
            raise ProxyError(f'the secrets of bottle {bottle} take {len(data)} bytes; the egress proxy takes at most '
                             f'{HAND_OVER_BYTES} at once')
        deadline = time.monotonic() + HAND_OVER_SECONDS
        answer = b''
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(HAND_OVER_SECONDS)
                sock.connect(str(self.secrets_socket))
                peer_pid, peer_uid = peer_credentials(sock)
                if peer_pid not in (pid, None) or peer_uid != os.getuid():
                    raise ProxyError(f'{self.secrets_socket} is not served by the egress proxy (pid {pid}); nothing '
                                     'was handed over')
                try:
                    sock.sendall(data)
                    sock.shutdown(socket.SHUT_WR)
                except BrokenPipeError:
                    pass        # answered (a refusal) before it read the whole message: the answer says why
                while len(answer) < HAND_OVER_BYTES and (left := deadline - time.monotonic()) > 0:
                    sock.settimeout(left)
                    if not (chunk := sock.recv(65536)):
                        break
                    answer += chunk
        except OSError as err:
            raise ProxyError(f'cannot hand the secrets of bottle {bottle} to the egress proxy at {self.secrets_socket} '
                             f'({err}); launching the agent again restarts a proxy that does not take them') from None
        try:
            reply = json.loads(answer)
        except ValueError:
            reply = {'error': 'no answer within the deadline' if not answer else 'an answer that is not JSON'}
        if not isinstance(reply, dict) or reply.get('ok') is not True:
            error = reply.get('error') if isinstance(reply, dict) else None
            raise ProxyError(f'the egress proxy refused the secrets of bottle {bottle}: {error or reply}')

    def stop(self) -> None:
        """Stop the proxy; the doors stay registered for the next ensure_running."""
        with self._locked():
            self.daemon().stop()

    def daemon(self) -> Daemon:
        return Daemon('proxy', self.state_dir, self._argv(), self._doors_answer, config=self._config(),
                      connect=lambda: all(connects(str(Door.of(b, e).socket))
                                          for b, e in self._doors_or_none().items()))

    def _config(self) -> str:
        """What the proxy reads only at start: a changed CA or upstream CA file, or addon, restarts it."""
        digest = hashlib.sha256(f'{MITMPROXY_VERSION}\0{code_digest(Path(__file__).parent)}'.encode())
        for path in (self.ca_cert, self.upstream_ca):
            digest.update(f'\0{path}\0'.encode())
            try:
                digest.update(path.read_bytes() if path else b'')
            except OSError:
                digest.update(b'(unreadable)')
        return digest.hexdigest()

    def _ensure_running(self, doors: dict) -> bool:
        if not doors:
            self.daemon().stop()
            return False
        self._make_ca()
        _check_socket_path(self.secrets_socket)
        private_dir(self.secrets_socket.parent)
        for bottle, entry in doors.items():
            private_dir(Door.of(bottle, entry).directory)      # gone after a reboot when it is in /tmp
            _stop_old_relay(Door.of(bottle, entry))
        return self.daemon().ensure_running()

    def _argv(self) -> list[str]:
        settings = [f'confdir={self.ca_dir}',
                    'connection_strategy=lazy',   # no upstream contact before a request is allowed
                    'rawtcp=false',
                    'stream_large_bodies=1m',
                    'http3=false',
                    # HTTP/2 from the client (curl and git offer it) to an HTTP/1.1 upstream makes mitmproxy
                    # open an upstream connection per request: about 11 ms a request instead of 3.5-5 ms.
                    'http2=false',
                    f'bottle_doors={self.doors_file}',
                    f'bottle_secrets={self.secrets_socket}']
        if self.upstream_ca:
            settings.append(f'ssl_verify_upstream_trusted_ca={self.upstream_ca}')
        settings += [f'{name}={value}' for name, value in self.door_bounds.items() if value is not None]
        argv = [self.venv / 'bin' / 'python', SERVE, *settings]
        return [str(a) for a in argv]

    def _doors_answer(self) -> bool:
        doors = self._doors_or_none()
        return bool(doors) and all(door_answers(Door.of(b, e).socket, b) for b, e in doors.items())

    def _make_ca(self, *flags: str) -> None:
        """Make the CA unless it exists, and repair its modes (ca.py), before each start of the proxy; what
        ca.py says (a repaired mode) goes on to our stderr, which doit shows."""
        if not flags and (self.ca_dir / ca.KEY_FILE).exists() and self.ca_cert.exists() and not ca.loose(self.ca_dir):
            return      # spares starting the environment's Python on every launch
        proc = subprocess.run([str(self.venv / 'bin' / 'python'), str(CA_MAKER), str(self.ca_dir), *flags],
                              capture_output=True, text=True, env={**os.environ, 'PYTHONPATH': str(HERE.parent.parent)})
        if proc.returncode != 0:
            raise ProxyError(f'making the egress CA in {self.ca_dir} failed:\n{proc.stderr[-2000:]}')
        if proc.stderr:
            print(proc.stderr.rstrip('\n'), file=sys.stderr, flush=True)

    def _file(self) -> dict:
        try:
            data = json.loads(self.doors_file.read_text())
            if not isinstance(data, dict) or not isinstance(data['bottles'], dict):
                raise TypeError('no "bottles" mapping')
            return data
        except FileNotFoundError:
            return {'bottles': {}}
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ProxyError(f'{self.doors_file} is not a valid doors file ({err}); '
                             'remove it and open the doors again (doit launch)') from None

    def _doors(self) -> dict:
        return self._file()['bottles']

    def _doors_or_none(self) -> dict:
        try:
            return self._doors()
        except ProxyError:
            return {}

    def _write_doors(self, doors: dict, **entries) -> None:
        """The doors file with these doors; its other entries (the services) as they are, or as
        `entries` give them (None removes one)."""
        data = {**self._file(), 'bottles': doors, **entries}
        write_atomic(self.doors_file, json.dumps({k: v for k, v in data.items() if v is not None},
                                                 indent=2, sort_keys=True) + '\n')

    def _locked(self):
        return locked(self.state_dir / 'doors.lock')


def door_answers(door_socket: Path, bottle: str) -> bool:
    """A health request through the door reaches the proxy and is answered for this bottle: its health, or the
    refusal of a door holding as many connections as it may (the proxy answers; the bottle is busy)."""
    answer = probe_http(str(door_socket), f'http://{HEALTH_HOST}/', PROBE_SECONDS)
    if answer is None:
        return False
    status, headers, body = answer
    if status == 503:
        return headers.get(DOOR_FULL_HEADER.lower()) == bottle
    try:
        return status == 200 and json.loads(body).get('bottle') == bottle
    except (ValueError, AttributeError):
        return False


def _routes(bottle: str, door_socket: Path) -> dict:
    """The services the addon routes now, as its health answer through the bottle's door says."""
    return (_health(bottle, str(door_socket)) or {}).get('services', {})


def _health(bottle: str, door: str) -> dict | None:
    """The proxy's health answer for the bottle through its door, or None when it gives none (within
    PROBE_SECONDS and a size bound: whatever answers on the door is not trusted)."""
    answer = probe_json(door, f'http://{HEALTH_HOST}/', PROBE_SECONDS)
    return answer if answer is not None and answer.get('bottle') == bottle else None


def _stop_old_relay(door: Door) -> None:
    """A socat relay an earlier version ran for this door (its pid file in the bottle's directory) is
    stopped: the proxy listens on the door itself now."""
    if (door.bottle_dir / 'door-relay.pid').exists():
        Daemon('door-relay', door.bottle_dir, []).stop()


def _check_socket_path(path: Path) -> None:
    text = str(path)
    if len(text.encode()) > UNIX_PATH_MAX:
        raise ProxyError(f'the door {text} is {len(text.encode())} bytes long; a Unix socket path holds at '
                         f'most {UNIX_PATH_MAX}: move the project to a shorter path')


def private_dir(path: Path) -> None:
    """Make `path` (and a missing parent) mode 0700; refuse one that another user could change or
    that is a symbolic link: whoever can swap the door can speak for the bottle."""
    for directory in (path.parent, path):
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            pass
        except OSError as err:
            raise ProxyError(f'cannot make the door directory {directory}: {err}') from None
        info = os.lstat(directory)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
            raise ProxyError(f'{directory} must be a directory of yours that no one else can use (mode 0700); '
                             'remove it and launch again')


def _wait(condition: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
