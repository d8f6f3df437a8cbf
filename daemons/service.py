"""A project's service that only the egress proxy may speak to (the git gate, the supervisor).

One daemon per project, `python -P -m <module> <state_dir>`, run with this process's Python and the host's
environment, whose credentials it may use upstream. Its secrets are 0600 files of their own in the state
directory, made under a lock on the first start; `key` is the one the proxy sends along. Once it listens,
the daemon records `<name>.json` {"port", "pid", ...}. A daemon started with other secrets, other
credential variables or other code is restarted (the pid file holds a digest of them, not the secrets).
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import sys
from collections.abc import Mapping
from pathlib import Path

from daemons.atomic import write_atomic
from daemons.lifecycle import Daemon, code_digest, connects, locked
from daemons.proxy.rules import LISTEN_HOST

ROOT = Path(__file__).resolve().parents[1]
# The variables that say how the host reaches upstreams: when one changes (a new ssh agent after a
# login), the running service is restarted to use it.
CREDENTIAL_VARIABLES = ('HOME', 'XDG_CONFIG_HOME', 'SSH_AUTH_SOCK', 'GIT_ASKPASS', 'SSH_ASKPASS', 'GIT_SSH',
                        'GIT_SSH_COMMAND', 'GIT_CONFIG_GLOBAL', 'GIT_CONFIG_SYSTEM', 'GIT_CONFIG_NOSYSTEM')


class KeyedService:
    name = ''                           # the daemon's: its pid, log and record files
    module = ''                         # what `python -m` runs
    secret_names: tuple[str, ...] = ('key',)
    error: type[Exception] = Exception  # what `record()` raises when the service is not running
    start_timeout = 20.0                # seconds its start may take until its probe passes

    def __init__(self, state_dir: Path, env: Mapping[str, str] | None = None):
        """`env`: the daemon's environment; default os.environ."""
        self.state_dir = Path(state_dir)
        self.env = dict(os.environ if env is None else env)

    @property
    def key_file(self) -> Path:
        return self.state_dir / 'key'

    @property
    def port_file(self) -> Path:
        return self.state_dir / f'{self.name}.json'

    def write_bottles(self, bottles: dict) -> None:
        """Check what the service serves for each bottle and write it where the daemon reads it on each request."""
        raise NotImplementedError

    def ensure_running(self) -> bool:
        """Start it unless it is healthy (a crashed or hung one is stopped first); its secrets are made if
        missing. True when it was (re)started."""
        with self._locked():
            for name in self.secret_names:
                if not (self.state_dir / name).exists():
                    write_atomic(self.state_dir / name, secrets.token_urlsafe(32), mode=0o600)
            return self.daemon().ensure_running()

    def running(self) -> bool:
        """Ours, started with the current secrets, credential settings and code, and its recorded port takes a
        connection: doit's up-to-date check, which imports nothing heavy. Never raises."""
        return self.daemon().running()

    def healthy(self) -> bool:
        """Ours, started with the current secrets, credential settings and code, and its probe passes (a
        request of its protocol). Never raises."""
        return self.daemon().healthy()

    def port(self) -> int:
        """The port the running service listens on, on 127.0.0.1."""
        return self.record()['port']

    def stop(self) -> None:
        self.daemon().stop()

    def daemon(self) -> Daemon:
        python_path = os.pathsep.join(p for p in (str(ROOT), self.env.get('PYTHONPATH')) if p)
        return Daemon(self.name, self.state_dir, [sys.executable, '-P', '-m', self.module, self.state_dir,
                                                  *self.arguments()],
                      self.probe, connect=self._connects, env={**self.env, 'PYTHONPATH': python_path},
                      config=self._config(), start_timeout=self.start_timeout)

    def arguments(self) -> list[str]:
        """What the daemon's command line has after its state directory."""
        return []

    def _connects(self) -> bool:
        """The port the running daemon recorded (the process the pid file names) takes a connection."""
        record = self.recorded()
        return bool(record) and record['pid'] == self.daemon().pid() and connects((LISTEN_HOST, record['port']))

    def probe(self) -> bool:
        """Does the running daemon do its job? Asked by `healthy()` and while starting."""
        raise NotImplementedError

    def record(self) -> dict:
        """The running daemon's record, written by that very process."""
        record = self.recorded()
        if not record or record['pid'] != self.daemon().pid():
            raise self.error(f'the {self.name} service of {self.state_dir} is not running; start it (doit launch)')
        return record

    def recorded(self) -> dict | None:
        """The record as the daemon last wrote it ({"port", "pid", ...}, whole numbers), or None."""
        try:
            record = {key: int(value) for key, value in json.loads(self.port_file.read_text()).items()}
            return record if {'port', 'pid'} <= set(record) else None
        except (OSError, ValueError, TypeError, AttributeError):
            return None

    def _config(self) -> str:
        digest = hashlib.sha256(code_digest(ROOT / self.module.rpartition('.')[0].replace('.', '/')).encode())
        for name in self.secret_names:
            try:
                digest.update((self.state_dir / name).read_bytes())
            except OSError:
                digest.update(b'(none)')
            digest.update(b'\0')
        for name in CREDENTIAL_VARIABLES:
            digest.update(f'\0{name}={self.env.get(name, "")}'.encode())
        return digest.hexdigest()

    def _locked(self):
        return locked(self.state_dir / 'key.lock')
