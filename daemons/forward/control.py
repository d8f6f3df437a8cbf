"""The door forward of a project's bottles on one worker, host side: the daemon (serve.py), its checks, and where
the bottles' files are on the worker.

On the worker, everything is under the SSH user's `~/.claude-bottle/<project key>/` (0700): `<bottle key>/`
holds the bottle's forwarded door, `egress.sock` (its directory is what the machine mounts, read-only, as the
door's directory), and `files/` the confinement files the machines mount (the seccomp profile, which podman
reads on the worker, hosts, resolv.conf). The keys are hashes (of this host and the checkout's path; of the
bottle's name): a socket path holds at most 107 bytes, and two checkouts or control hosts sharing a worker
never share a directory.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

from daemons.forward.connections import EngineError, connection
from daemons.forward.serve import FILES, REMOVE, SOCKET, remote_shell, ssh_argv
from daemons.lifecycle import Daemon, DaemonError, code_digest, connects

ROOT = Path(__file__).resolve().parents[2]
PROBE_SECONDS = 10.0
MUX_ONLY = 'claude-bottle-forward.invalid'
START_SECONDS = 60.0
# What the worker said when it could not be reached, and what to do about it.
HINTS = (('Host key verification failed', 'its host key is not known here: check the key with the worker\'s '
          'admin, then add it (`ssh-keyscan -p {port} {host} >> ~/.ssh/known_hosts`) and launch again'),
         ('Permission denied', 'the key used for it ({identity}) is not accepted there'),
         ('Connection refused', 'nothing answers SSH on {host} port {port}: is the worker (its sshd) up?'),
         ('timed out', '{host} port {port} does not answer: is the worker up and reachable?'),
         ('Could not resolve', '{host} is not a name this host can resolve'),
         ('forwarding failed', 'the worker refused the forward: its sshd needs AllowStreamLocalForwarding (and, '
          'with OpenSSH 9.2, AllowTcpForwarding) yes'))


def bottle_key(bottle: str) -> str:
    return hashlib.sha256(bottle.encode()).hexdigest()[:12]


class Forward:
    def __init__(self, state_dir: Path, cli: str, engine: str, project_key: str, doors: Mapping[str, Path],
                 files: Path, env: Mapping[str, str] | None = None):
        """`doors`: each bottle on this worker and its door on this host; `files`: the directory whose files the
        worker gets in files/."""
        self.state_dir = Path(state_dir)
        self.cli, self.engine, self.project_key = cli, engine, project_key
        self.doors = dict(sorted(doors.items()))
        self.files = Path(files)
        self.env = dict(os.environ if env is None else env)
        digest = hashlib.sha256(f'{self.state_dir}\0{engine}'.encode()).hexdigest()[:16]
        # OpenSSH's control socket: a short private path, as the doors' (a socket path holds 107 bytes)
        self.control = Path(tempfile.gettempdir()) / f'claude-bottle-{os.getuid()}' / f'ssh-{digest}' / 'master'
        self.name = f'forward-{engine}'

    # -- where things are on the worker

    def home(self) -> str:
        try:
            record = json.loads((self.state_dir / f'{self.name}.json').read_text())
            if record['pid'] == self.daemon('').pid() and str(record['home']).startswith('/'):
                return str(record['home'])
        except (OSError, ValueError, LookupError, TypeError):
            pass
        raise EngineError(f'the forward to {self.cli} engine {self.engine} is not running; launch again')

    def base(self) -> str:
        return f'{self.home()}/.claude-bottle/{self.project_key}'

    def door(self, bottle: str) -> str:
        """The bottle's door on the worker: its machine mounts this socket's directory."""
        return f'{self.base()}/{bottle_key(bottle)}/{SOCKET}'

    def files_dir(self) -> str:
        return f'{self.base()}/{FILES}'

    # -- the daemon

    @staticmethod
    def cli_of(state_dir: Path, engine: str) -> str:
        """The CLI whose engine a running forward serves, as it recorded; podman when it recorded none."""
        try:
            cli = json.loads((Path(state_dir) / f'forward-{engine}.json').read_text())['cli']
            return cli if cli in ('podman', 'docker') else 'podman'
        except (OSError, ValueError, LookupError, TypeError):
            return 'podman'

    def daemon(self, config: str | None = None) -> Daemon:
        """The daemon; `config` '' to stop or find it whatever it was started with (no call to the CLI)."""
        python_path = os.pathsep.join(p for p in (str(ROOT), self.env.get('PYTHONPATH')) if p)
        return Daemon(self.name, self.state_dir,
                      [sys.executable, '-P', '-m', 'daemons.forward.serve', self.state_dir, self.cli, self.engine,
                       self.project_key, self.files, self.control,
                       *(f'{bottle_key(bottle)}={door}' for bottle, door in self.doors.items())],
                      self.probe, connect=lambda: connects(str(self.control)), env={**self.env, 'PYTHONPATH': python_path},
                      config=self._config() if config is None else config, start_timeout=START_SECONDS)

    def _config(self) -> str:
        """Restarted when its code, its bottles, its files, the connection or the SSH environment change."""
        digest = hashlib.sha256(code_digest(Path(__file__).parent).encode())
        conn = connection(self.cli, self.engine)
        digest.update(f'{conn.uri}\0{conn.identity}\0'.encode())
        for path in sorted(self.files.iterdir()) if self.files.is_dir() else []:
            digest.update(path.name.encode() + b'\0' + path.read_bytes() + b'\0')
        for name in ('HOME', 'SSH_AUTH_SOCK'):
            digest.update(f'{name}={self.env.get(name, "")}\0'.encode())
        return digest.hexdigest()

    def running(self) -> bool:
        """Ours, current, and its SSH connection takes a connection: the up-to-date check. Never raises."""
        try:
            return self.daemon().running()
        except EngineError:
            return False

    def healthy(self) -> bool:
        """Ours, current, and the probe passes: for `doit status`. Never raises."""
        try:
            return self.daemon().healthy()
        except EngineError:
            return False

    def probe(self) -> bool:
        """The SSH connection is up and every bottle's door is a socket on the worker."""
        try:
            doors = [self.door(bottle) for bottle in self.doors]
        except EngineError:
            return False
        # Through the running connection only: were it gone, ssh would try the name itself, which never resolves.
        mux = ['ssh', '-S', str(self.control), '-o', 'BatchMode=yes', '-o', 'ConnectTimeout=5', MUX_ONLY]
        check = 'for s; do test -S "$s" || exit 1; done'
        try:
            return subprocess.run([*mux, remote_shell(check, *doors)],
                                  capture_output=True, timeout=PROBE_SECONDS, stdin=subprocess.DEVNULL,
                                  env=self.env).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False

    def ensure_running(self, what: str) -> bool:
        """Start it unless it is healthy; True when it was (re)started. `what`: the bottles, for the error."""
        daemon = self.daemon()
        try:
            return daemon.ensure_running()
        except DaemonError:
            raise EngineError(self._why_not(what, daemon)) from None

    def stop(self) -> str | None:
        """Stop the forward and remove the project's directory on the worker; what went wrong there, if anything
        (a worker that cannot be reached keeps it until the next stop)."""
        self.daemon('').stop()
        (self.state_dir / f'{self.name}.json').unlink(missing_ok=True)
        try:
            removed = subprocess.run([*ssh_argv(self.cli, self.engine), remote_shell(REMOVE, self.project_key)],
                                     capture_output=True, timeout=PROBE_SECONDS * 3, stdin=subprocess.DEVNULL,
                                     env=self.env)
        except (OSError, subprocess.TimeoutExpired, EngineError) as err:
            return str(err)
        return None if removed.returncode == 0 else removed.stderr.decode(errors='replace').strip()[-200:]

    def _why_not(self, what: str, daemon: Daemon) -> str:
        conn = connection(self.cli, self.engine)
        said = [line.strip() for line in daemon.log_tail(30).splitlines() if line.strip()]
        last = next((line for line in reversed(said) if not line.startswith('the SSH connection')), 'nothing')
        values = {'host': conn.host, 'port': conn.port, 'identity': conn.identity or 'ssh\'s default key'}
        hint = next((text.format(**values) for sign, text in HINTS if any(sign in line for line in said[-10:])),
                    f'check that `ssh -p {conn.port} {conn.user + "@" if conn.user else ""}{conn.host}` works from here')
        return (f'{what} on {self.cli} engine {self.engine}: the door could not be forwarded to the worker '
                f'{conn.host} over SSH ({last[:200]}); {hint}. Its log: {daemon.log_file}')


def project_key(root: Path) -> str:
    """The checkout's directory name on workers: this host and its path, hashed."""
    return hashlib.sha256(f'{socket.gethostname()}\0{Path(root).resolve()}'.encode()).hexdigest()[:12]
