"""The supervisor of a project, host side: its key and the user's token, what it serves (bottles.json),
the daemon. The layout of the state directory is in store.py; the daemon is serve.py, run with this
process's Python; the decisions are in requests.py.

The egress proxy routes a guest's http://supervise.bottle.invalid/mcp to 127.0.0.1:<port()>/mcp, adding
the headers X-Claude-Bottle (the bottle's name) and SUPERVISE_KEY_HEADER (the contents of key_file).
Requests without the key are refused: only the proxy may speak to the supervisor. The human's page is
on 127.0.0.1:<page_port()>, behind the token in token_file (page_url() carries it).
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from daemons.atomic import write_atomic
from daemons.proxy.rules import LISTEN_HOST
from daemons.service import KeyedService
from daemons.supervise.store import TOOLS, SuperviseError, bottles_file, db_file

BOTTLE_KEYS = {'rules', 'approved', 'log', 'wait_seconds'}


class Supervisor(KeyedService):
    name = 'supervise'
    module = 'daemons.supervise.serve'
    secret_names = ('key', 'page-token')
    error = SuperviseError

    def __init__(self, state_dir: Path, gate_state_dir: Path | None = None, env: Mapping[str, str] | None = None):
        """`gate_state_dir`: the project's git gate, whose held pushes the supervisor reviews.
        `env`: the daemon's environment; an approved push goes upstream with the host credentials it
        names (HOME, SSH_AUTH_SOCK, ...); default os.environ."""
        super().__init__(state_dir, env)
        self.gate_state_dir = Path(gate_state_dir) if gate_state_dir else None

    @property
    def token_file(self) -> Path:
        return self.state_dir / 'page-token'

    @property
    def db_file(self) -> Path:
        return db_file(self.state_dir)

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

    def page_port(self) -> int:
        """The page's port of the running supervisor, on 127.0.0.1."""
        return self.record()['page_port']

    def page_url(self) -> str:
        """The page's address with the user's token, to print for the user (never to log)."""
        return f'http://{LISTEN_HOST}:{self.page_port()}/?token={self.token_file.read_text().strip()}'

    def probe(self) -> bool:
        """An MCP client from the host, with the key, initializes a session with the supervisor at the
        recorded port (as the recorded process) and finds its tools."""
        record = self.recorded()
        if not record or record['pid'] != self.daemon().pid():
            return False
        import asyncio
        from concurrent.futures import ThreadPoolExecutor

        from daemons.supervise.probe import tool_names     # the MCP client takes a second to import
        key = self.key_file.read_text().strip()
        with ThreadPoolExecutor(1) as pool:     # a loop of its own, whatever the caller runs
            return pool.submit(asyncio.run, tool_names(record['port'], key)).result() >= set(TOOLS)
