"""The supervisor of a project, host side: its key and the user's token, what it serves (bottles.json),
the daemon. The layout of the state directory is in store.py; the daemon is serve.py, run with this
process's Python; the decisions are in requests.py.

The egress proxy routes a guest's http://supervise.bottle.invalid/mcp to 127.0.0.1:<port()>/mcp, adding
the headers X-Claude-Bottle (the bottle's name) and SUPERVISE_KEY_HEADER (the contents of key_file).
Requests without the key are refused: only the proxy may speak to the supervisor. The human's page is
on 127.0.0.1:<page_port()>, behind the token in token_file (page_url() carries it).
"""
from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import os
import secrets
import sys
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from daemons.gate.engine import CREDENTIAL_VARIABLES
from daemons.lifecycle import Daemon
from daemons.supervise.store import LISTEN_HOST, TOOLS, SuperviseError, bottles_file, db_file
from tasks.atomic import write_atomic

ROOT = Path(__file__).resolve().parents[2]
BOTTLE_KEYS = {'rules', 'approved', 'log', 'wait_seconds'}


class Supervisor:
    def __init__(self, state_dir: Path, gate_state_dir: Path | None = None, env: Mapping[str, str] | None = None):
        """`gate_state_dir`: the project's git gate, whose held pushes the supervisor reviews.
        `env`: the daemon's environment; an approved push goes upstream with the host credentials it
        names (HOME, SSH_AUTH_SOCK, ...); default os.environ."""
        self.state_dir = Path(state_dir)
        self.gate_state_dir = Path(gate_state_dir) if gate_state_dir else None
        self.env = dict(os.environ if env is None else env)

    @property
    def key_file(self) -> Path:
        return self.state_dir / 'key'

    @property
    def token_file(self) -> Path:
        return self.state_dir / 'page-token'

    @property
    def db_file(self) -> Path:
        return db_file(self.state_dir)

    @property
    def port_file(self) -> Path:
        return self.state_dir / 'supervise.json'

    def write_bottles(self, bottles: dict) -> None:
        """Check `bottles` ({"<bottle>": {"rules": <abs path>, "approved": <abs path>, "log": <abs path>,
        "wait_seconds": <int>}}) and write it where the daemon reads it on each request, with the gate's
        state directory; an unchanged file is left alone."""
        for bottle, entry in bottles.items():
            if not isinstance(entry, dict) or set(entry) != BOTTLE_KEYS:
                raise SuperviseError(f'the supervisor\'s entry for bottle {bottle!r} must have exactly the keys '
                                     f'{sorted(BOTTLE_KEYS)}, not {entry!r}')
            for key in ('rules', 'approved', 'log'):
                if not isinstance(entry[key], str) or not Path(entry[key]).is_absolute():
                    raise SuperviseError(f'bottle {bottle!r}: {key} must be an absolute path, not {entry[key]!r}')
            wait = entry['wait_seconds']
            if not isinstance(wait, int) or isinstance(wait, bool) or wait < 0:
                raise SuperviseError(f'bottle {bottle!r}: wait_seconds must be a whole number of seconds, 0 or '
                                     f'more, not {wait!r}')
        text = json.dumps({'gate': str(self.gate_state_dir) if self.gate_state_dir else None, 'bottles': bottles},
                          indent=2, sort_keys=True) + '\n'
        try:
            if bottles_file(self.state_dir).read_text() == text:
                return
        except OSError:
            pass
        write_atomic(bottles_file(self.state_dir), text)

    def ensure_running(self) -> bool:
        """Start the supervisor unless it is healthy (a crashed or hung one is stopped first); its key and
        the page's token are made if missing. True when it was (re)started."""
        with self._locked():
            for secret in (self.key_file, self.token_file):
                if not secret.exists():
                    write_atomic(secret, secrets.token_urlsafe(32), mode=0o600)
            return self.daemon().ensure_running()

    def healthy(self) -> bool:
        """Alive, started with the current key, token and credential settings, and answering a real MCP
        initialize and list_tools with the key. Never raises."""
        return self.daemon().healthy()

    def port(self) -> int:
        """The MCP port of the running supervisor, on 127.0.0.1."""
        return self._running_record()['port']

    def page_port(self) -> int:
        """The page's port of the running supervisor, on 127.0.0.1."""
        return self._running_record()['page_port']

    def page_url(self) -> str:
        """The page's address with the user's token, to print for the user (never to log)."""
        return f'http://{LISTEN_HOST}:{self.page_port()}/?token={self.token_file.read_text().strip()}'

    def stop(self) -> None:
        self.daemon().stop()

    def daemon(self) -> Daemon:
        python_path = os.pathsep.join(p for p in (str(ROOT), self.env.get('PYTHONPATH')) if p)
        return Daemon('supervise', self.state_dir, [sys.executable, '-P', '-m', 'daemons.supervise.serve',
                                                    self.state_dir],
                      self._lists_tools, env={**self.env, 'PYTHONPATH': python_path}, config=self._config())

    def _config(self) -> str:
        """What the daemon takes at start: its key and token (digests: the pid file is not secret) and how
        host git finds credentials."""
        digest = hashlib.sha256()
        for secret in (self.key_file, self.token_file):
            try:
                digest.update(secret.read_bytes())
            except OSError:
                digest.update(b'(none)')
            digest.update(b'\0')
        for name in CREDENTIAL_VARIABLES:
            digest.update(f'\0{name}={self.env.get(name, "")}'.encode())
        return digest.hexdigest()

    def _lists_tools(self) -> bool:
        """An MCP client from the host, with the key, initializes a session with the supervisor at the
        recorded port (as the recorded process) and finds its tools."""
        record = self._port_record()
        if not record or record['pid'] != self.daemon().pid():
            return False
        from daemons.supervise.probe import tool_names     # the MCP client takes a second to import
        key = self.key_file.read_text().strip()
        with ThreadPoolExecutor(1) as pool:     # a loop of its own, whatever the caller runs
            return pool.submit(asyncio.run, tool_names(record['port'], key)).result() >= set(TOOLS)

    def _running_record(self) -> dict:
        record = self._port_record()
        if not record or record['pid'] != self.daemon().pid():
            raise SuperviseError(f'the supervisor of {self.state_dir} is not running; start it (doit launch)')
        return record

    def _port_record(self) -> dict | None:
        try:
            record = json.loads(self.port_file.read_text())
            return {'port': int(record['port']), 'page_port': int(record['page_port']), 'pid': int(record['pid'])}
        except (OSError, ValueError, KeyError, TypeError):
            return None

    @contextmanager
    def _locked(self):
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.state_dir / 'key.lock', 'a') as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield
