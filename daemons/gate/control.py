"""The git gate of a project, host side: its key, what it serves (bottles.json), the daemon, and
refreshing mirrors on demand. The layout of the state directory is in store.py; the daemon is
serve.py, run with this process's Python.

The egress proxy routes a guest's requests for the gate to 127.0.0.1:<port()>, adding the headers
X-Claude-Bottle (the bottle's name) and X-Claude-Bottle-Gate-Key (the contents of key_file). Requests
without the key are refused: only the proxy may speak to the gate.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from daemons.atomic import write_atomic
from daemons.gate.config import BottlesError, load_bottles, parse_bottles
from daemons.gate.store import LockTimeout, mirror_dir, mirror_lock
from daemons.gate.upstream import Bounds, UpstreamError, host_env, update_mirror
from daemons.lifecycle import probe_json
from daemons.proxy.rules import GATE_KEY_HEADER, LISTEN_HOST
from daemons.service import KeyedService

PROBE_SECONDS = 3.0


class GateError(Exception):
    """Something about the git gate a person has to fix; the message says what, where and what to do."""


class GitGate(KeyedService):
    """`env`: the environment of host-side git, which fetches from and pushes to the upstreams with the
    host's credentials (HOME, SSH_AUTH_SOCK, credential helpers); default os.environ."""
    name = 'gate'
    module = 'daemons.gate.serve'
    error = GateError

    @property
    def bottles_file(self) -> Path:
        return self.state_dir / 'bottles.json'

    @property
    def receipts_file(self) -> Path:
        return self.state_dir / 'receipts.jsonl'

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

    def _config(self) -> str:
        """With the gate's bounds (upstream.Bounds, BOTTLE_GATE_*_SECONDS): a gate started with others is
        started again."""
        bounds = ''.join(f'\0{name}={self.env.get(name, "")}' for name in Bounds.variables().values())
        return hashlib.sha256((super()._config() + bounds).encode()).hexdigest()

    def probe(self) -> bool:
        """The gate at the recorded port answers /health with our key, as the process that wrote the record: with
        the instance it drew at its start (a guest reaches /health too, and learns nothing of the host from it)."""
        record = self.recorded()       # at its start and for `doit status`; doit's up-to-date check only connects
        if not record or 'instance' not in record:
            return False
        try:
            key = self.key_file.read_text().strip()
        except OSError:
            return False
        answer = probe_json((LISTEN_HOST, record['port']), '/health', PROBE_SECONDS, {GATE_KEY_HEADER: key})
        return answer is not None and answer.get('instance') == record['instance']
