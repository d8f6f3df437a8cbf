"""Engines elsewhere: a bottle whose manifest names an `engine` runs on that podman system connection, the
engine's own name for a podman API service reached over SSH (`ssh://user@host:port/path/podman.sock`) or a
socket of this host (`unix:///path`). Its host, user and key stay in podman's configuration
(`podman system connection add`, containers.conf): claude-bottle asks podman for them and keeps none.

What the graph needs of a connection: that it exists (the manifest check), the argv prefix that speaks to it
(`podman --connection NAME`), and, for an SSH one, where to reach the worker to forward the bottle's door
(its host, port, user and key: tasks/backends/worker.py).
"""
from __future__ import annotations

import functools
import json
import shutil
import subprocess
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from tasks.errors import BottleError

LIST_SECONDS = 30


def on(backend: str, engine: str | None) -> str:
    """Where a machine is, in words: `podman`, `podman engine worker1`."""
    return f'{backend} engine {engine}' if engine else backend


@dataclass(frozen=True)
class Connection:
    name: str
    uri: str
    identity: str          # the key file podman uses for it ('' when none is set)

    @property
    def ssh(self) -> bool:
        return urlsplit(self.uri).scheme == 'ssh'

    @property
    def host(self) -> str:
        return urlsplit(self.uri).hostname or ''

    @property
    def port(self) -> int:
        return urlsplit(self.uri).port or 22

    @property
    def user(self) -> str:
        return unquote(urlsplit(self.uri).username or '')

    @property
    def socket(self) -> str:
        """The engine's API socket on the worker (podman 4.3.1's `connection add` may have dropped it:
        README, Remote engines)."""
        return unquote(urlsplit(self.uri).path)


@functools.cache
def connections(cli: str = 'podman') -> dict[str, Connection]:
    """Every system connection podman knows, by name; asked once per process."""
    exe = shutil.which(cli)
    if exe is None:
        raise BottleError(f'an agent names an engine, but there is no `{cli}` on PATH to ask for its connections; '
                          f'install {cli} (Debian: `apt-get install podman runc`)')
    try:
        proc = subprocess.run([exe, 'system', 'connection', 'list', '--format', 'json'], capture_output=True,
                              text=True, timeout=LIST_SECONDS, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise BottleError(f'`{cli} system connection list` did not answer within {LIST_SECONDS} s') from None
    if proc.returncode != 0:
        raise BottleError(f'`{cli} system connection list` failed (exit code {proc.returncode}): '
                          f'{proc.stderr.strip()[:300]}')
    try:
        listed = json.loads(proc.stdout or '[]')
        return {str(c['Name']): Connection(str(c['Name']), str(c['URI']), str(c.get('Identity') or ''))
                for c in listed}
    except (ValueError, LookupError, TypeError, AttributeError) as err:
        raise BottleError(f'`{cli} system connection list --format json` printed what is not a list of '
                          f'connections ({type(err).__name__}: {err}); is it podman 4 or later?') from None


def connection(cli: str, name: str) -> Connection:
    try:
        return connections(cli)[name]
    except KeyError:
        raise BottleError(f'podman has no system connection named {name!r} any more; add it again '
                          f'(`podman system connection add {name} ssh://USER@HOST/run/podman/podman.sock`) or '
                          'change the manifest key engine') from None
