"""The git gate of a project, host side: its key, what it serves (bottles.json), the daemon, and
refreshing mirrors on demand. The layout of the state directory is in store.py; the daemon is
serve.py, run with this process's Python.

The egress proxy routes a guest's requests for the gate to 127.0.0.1:<port()>, adding the headers
X-Claude-Bottle (the bottle's name) and X-Claude-Bottle-Gate-Key (the contents of key_file). Requests
without the key are refused: only the proxy may speak to the gate.
"""
from __future__ import annotations

import fcntl
import hashlib
import http.client
import json
import os
import secrets
import sys
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path

from daemons.gate.config import BottlesError, load_bottles, parse_bottles
from daemons.gate.store import LISTEN_HOST, LockTimeout, mirror_dir, mirror_lock
from daemons.gate.upstream import UpstreamError, host_env, update_mirror
from daemons.lifecycle import Daemon
from daemons.proxy.rules import GATE_KEY_HEADER
from tasks.atomic import write_atomic

ROOT = Path(__file__).resolve().parents[2]
PROBE_SECONDS = 3.0
# The variables that say how the host reaches upstreams: when one changes (a new ssh agent after a
# login), the running gate is restarted to use it.
CREDENTIAL_VARIABLES = ('HOME', 'XDG_CONFIG_HOME', 'SSH_AUTH_SOCK', 'GIT_ASKPASS', 'SSH_ASKPASS', 'GIT_SSH',
                        'GIT_SSH_COMMAND', 'GIT_CONFIG_GLOBAL', 'GIT_CONFIG_SYSTEM', 'GIT_CONFIG_NOSYSTEM')


class GateError(Exception):
    """Something about the git gate a person has to fix; the message says what, where and what to do."""


class GitGate:
    def __init__(self, state_dir: Path, env: Mapping[str, str] | None = None):
        """`env`: the environment of host-side git, which fetches from and pushes to the upstreams
        with the host's credentials (HOME, SSH_AUTH_SOCK, credential helpers); default os.environ."""
        self.state_dir = Path(state_dir)
        self.env = dict(os.environ if env is None else env)

    @property
    def key_file(self) -> Path:
        return self.state_dir / 'key'

    @property
    def bottles_file(self) -> Path:
        return self.state_dir / 'bottles.json'

    @property
    def receipts_file(self) -> Path:
        return self.state_dir / 'receipts.jsonl'

    @property
    def port_file(self) -> Path:
        return self.state_dir / 'gate.json'

    def write_bottles(self, bottles: dict) -> None:
        """Check `bottles` ({"<bottle>": {"repos": [...]}}, see config.py) and write it where the gate
        reads it on each request; an unchanged file is left alone."""
        try:
            parsed = parse_bottles({'bottles': bottles})
        except BottlesError as err:
            raise GateError(f'the git gate\'s bottles are not valid: {err}') from None
        text = json.dumps({'bottles': {bottle: {'repos': [repo.to_json() for repo in repos]}
                                       for bottle, repos in parsed.items()}}, indent=2, sort_keys=True) + '\n'
        try:
            if self.bottles_file.read_text() == text:
                return
        except OSError:
            pass
        write_atomic(self.bottles_file, text)

    def ensure_running(self) -> bool:
        """Start the gate unless it is healthy (a crashed or hung one is stopped first); its key is made
        if missing. True when it was (re)started."""
        with self._locked():
            if not self.key_file.exists():
                write_atomic(self.key_file, secrets.token_urlsafe(32), mode=0o600)
            return self.daemon().ensure_running()

    def healthy(self) -> bool:
        """Alive, started with the current key and credential settings, and answering. Never raises."""
        return self.daemon().healthy()

    def port(self) -> int:
        """The port the running gate listens on, on 127.0.0.1."""
        record = self._port_record()
        if not record or record['pid'] != self.daemon().pid():
            raise GateError(f'the git gate of {self.state_dir} is not running; start it (doit launch)')
        return record['port']

    def stop(self) -> None:
        self.daemon().stop()

    def sync(self, bottle: str) -> None:
        """Make or refresh each of the bottle's mirrors from its upstream now, with the host's credentials."""
        try:
            repos = load_bottles(self.bottles_file).get(bottle)
        except BottlesError as err:
            raise GateError(str(err)) from None
        if repos is None:
            raise GateError(f'bottle {bottle!r} has no repositories in {self.bottles_file}')
        for repo in repos:
            mirror = mirror_dir(self.state_dir, bottle, repo.path)
            try:
                with mirror_lock(mirror):
                    update_mirror(mirror, repo, host_env(self.env))
            except (UpstreamError, LockTimeout) as err:
                raise GateError(f'the git gate could not fetch {repo.upstream} for bottle {bottle} with the host\'s '
                                f'credentials into {mirror}; check that `git ls-remote {repo.upstream}` works on this '
                                f'machine. git said:\n{err}') from None

    def daemon(self) -> Daemon:
        python_path = os.pathsep.join(p for p in (str(ROOT), self.env.get('PYTHONPATH')) if p)
        return Daemon('gate', self.state_dir, [sys.executable, '-P', '-m', 'daemons.gate.serve', self.state_dir],
                      self._answers, env={**self.env, 'PYTHONPATH': python_path}, config=self._config())

    def _config(self) -> str:
        """What the daemon takes at start: its key (a digest of it: the pid file is not secret) and how
        host git finds credentials."""
        digest = hashlib.sha256()
        try:
            digest.update(self.key_file.read_bytes())
        except OSError:
            digest.update(b'(no key)')
        for name in CREDENTIAL_VARIABLES:
            digest.update(f'\0{name}={self.env.get(name, "")}'.encode())
        return digest.hexdigest()

    def _answers(self) -> bool:
        """The gate at the recorded port answers /health with our key, as the recorded process."""
        record = self._port_record()
        if not record:
            return False
        connection = http.client.HTTPConnection(LISTEN_HOST, record['port'], timeout=PROBE_SECONDS)
        try:
            connection.request('GET', '/health', headers={GATE_KEY_HEADER: self.key_file.read_text().strip()})
            response = connection.getresponse()
            return response.status == 200 and json.loads(response.read()).get('pid') == record['pid']
        except (OSError, ValueError, http.client.HTTPException):
            return False
        finally:
            connection.close()

    def _port_record(self) -> dict | None:
        try:
            record = json.loads(self.port_file.read_text())
            return {'port': int(record['port']), 'pid': int(record['pid'])}
        except (OSError, ValueError, KeyError, TypeError):
            return None

    @contextmanager
    def _locked(self):
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.state_dir / 'key.lock', 'a') as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield
