"""podman's system connections: the engine's own name for a podman API service reached over SSH
(`ssh://user@host:port/path/podman.sock`) or on a socket of this host (`unix:///path`). Its host, user and key
stay in podman's configuration (`podman system connection add`, containers.conf): they are asked of podman when
needed and kept nowhere else.
"""
from __future__ import annotations

import functools
import json
import shutil
import subprocess
from pathlib import Path
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

LIST_SECONDS = 30


class EngineError(Exception):
    """podman's connections could not be read, or one is missing; the message says what to do."""


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
    def known_as(self) -> str:
        """The worker's name in known_hosts: `host`, or `[host]:port` off port 22."""
        return self.host if self.port == 22 else f'[{self.host}]:{self.port}'

    @property
    def known_hosts(self) -> Path:
        """The user's known_hosts as podman finds it: under $HOME."""
        return Path.home() / '.ssh' / 'known_hosts'

    def host_key_problem(self) -> str | None:
        """Why the worker's host key cannot be checked, or None: it is in ~/.ssh/known_hosts or the system's.
        podman's own SSH client would take an unknown key on first use (and append it), so no call goes to an
        engine whose key is not known already."""
        files = [self.known_hosts, Path('/etc/ssh/ssh_known_hosts')]
        for known in files:
            try:
                found = subprocess.run(['ssh-keygen', '-F', self.known_as, '-f', str(known)], capture_output=True,
                                       timeout=LIST_SECONDS, stdin=subprocess.DEVNULL)
            except (OSError, subprocess.TimeoutExpired):
                continue
            if found.returncode == 0 and found.stdout.strip():
                return None
        return (f'the host key of {self.known_as} (podman engine {self.name}) is in no known_hosts file here '
                f'({files[0]}, {files[1]}); check its fingerprint with the worker\'s admin, then add it '
                f'(`ssh-keyscan -p {self.port} {self.host} >> {files[0]}`) and run again')

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
        raise EngineError(f'an agent names an engine, but there is no `{cli}` on PATH to ask for its connections; '
                          f'install {cli} (Debian: `apt-get install podman runc`)')
    try:
        proc = subprocess.run([exe, 'system', 'connection', 'list', '--format', 'json'], capture_output=True,
                              text=True, timeout=LIST_SECONDS, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise EngineError(f'`{cli} system connection list` did not answer within {LIST_SECONDS} s') from None
    if proc.returncode != 0:
        raise EngineError(f'`{cli} system connection list` failed (exit code {proc.returncode}): '
                          f'{proc.stderr.strip()[:300]}')
    try:
        listed = json.loads(proc.stdout or '[]')
        return {str(c['Name']): Connection(str(c['Name']), str(c['URI']), str(c.get('Identity') or ''))
                for c in listed}
    except (ValueError, LookupError, TypeError, AttributeError) as err:
        raise EngineError(f'`{cli} system connection list --format json` printed what is not a list of '
                          f'connections ({type(err).__name__}: {err}); is it podman 4 or later?') from None


def connection(cli: str, name: str) -> Connection:
    try:
        return connections(cli)[name]
    except KeyError:
        raise EngineError(f'podman has no system connection named {name!r} any more; add it again '
                          f'(`podman system connection add {name} ssh://USER@HOST/run/podman/podman.sock`) or '
                          'change the manifest key engine') from None
