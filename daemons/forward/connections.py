"""Engines elsewhere by their CLI's own names: podman's system connections (a podman API service reached over SSH,
`ssh://user@host:port/path/podman.sock`, or on a socket of this host, `unix:///path`) and docker's contexts
(`ssh://user@host`, or a socket). Their host, user and key stay in the CLI's configuration (`podman system
connection add`, containers.conf; `docker context create`, ~/.docker): they are asked of it when needed and kept
nowhere else.
"""
from __future__ import annotations

import functools
import json
import os
import pwd
import shutil
import subprocess
from pathlib import Path
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

LIST_SECONDS = 30
DOCKER_SOCKET = '/var/run/docker.sock'


class EngineError(Exception):
    """An engine's connection could not be read, or is missing; the message says what to do."""


@dataclass(frozen=True)
class Connection:
    name: str
    uri: str
    identity: str          # the key file podman uses for it ('' when none is set, and for docker's)
    cli: str = 'podman'

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
    def known_hosts(self) -> Path | None:
        """The known_hosts file an SSH connection to the worker must check, when it is not ssh's own choice:
        podman's client reads $HOME's (ssh alone would take the password database's home); docker runs ssh, which
        chooses (its config, the password database's home)."""
        return Path.home() / '.ssh' / 'known_hosts' if self.cli == 'podman' else None

    def known_hosts_files(self) -> list[Path]:
        """Where the worker's key must be: for podman $HOME's and the system's file; for docker what the ssh on
        PATH would read (`ssh -G`: its config and its defaults)."""
        if self.known_hosts:
            return [self.known_hosts, Path('/etc/ssh/ssh_known_hosts')]
        argv = ['ssh', '-G', '-p', str(self.port), *(['-l', self.user] if self.user else []), self.host]
        try:
            said = subprocess.run(argv, capture_output=True, text=True, timeout=LIST_SECONDS,
                                  stdin=subprocess.DEVNULL).stdout
        except (OSError, subprocess.TimeoutExpired):
            said = ''
        home = Path(pwd.getpwuid(os.getuid()).pw_dir)
        files = [word for line in said.splitlines() if line.split(' ', 1)[0] in ('userknownhostsfile',
                                                                                  'globalknownhostsfile')
                 for word in line.split()[1:]]
        return [home / word[2:] if word.startswith('~/') else Path(word) for word in files] or \
            [home / '.ssh' / 'known_hosts', Path('/etc/ssh/ssh_known_hosts')]

    def host_key_problem(self) -> str | None:
        """Why the worker's host key cannot be checked, or None: it is in a known_hosts file the connection reads.
        podman's own SSH client would take an unknown key on first use (and append it), and a user's ssh config
        may tell ssh to (accept-new), so no call goes to an engine whose key is not known already."""
        files = self.known_hosts_files()
        for known in files:
            try:
                found = subprocess.run(['ssh-keygen', '-F', self.known_as, '-f', str(known)], capture_output=True,
                                       timeout=LIST_SECONDS, stdin=subprocess.DEVNULL)
            except (OSError, subprocess.TimeoutExpired):
                continue
            if found.returncode == 0 and found.stdout.strip():
                return None
        return (f'the host key of {self.known_as} (engine {self.name}) is in no known_hosts file here '
                f'({", ".join(map(str, files))}); check its fingerprint with the worker\'s admin, then add it '
                f'(`ssh-keyscan -p {self.port} {self.host} >> {files[0]}`) and run again')

    @property
    def socket(self) -> str:
        """The engine's API socket on the worker (podman 4.3.1's `connection add` may have dropped it:
        README, Remote engines)."""
        return unquote(urlsplit(self.uri).path)


@dataclass(frozen=True)
class Engines:
    """How one CLI names its engines elsewhere, lists them and is pointed at one."""
    noun: str                   # what the manifest key `engine` names
    listing: tuple[str, ...]    # the command that lists them, as JSON
    flag: str                   # the option that points a call at one
    add: str                    # how a person adds a worker
    install: str

    def parse(self, out: str) -> list[Connection]:
        if self.flag == '--connection':         # podman: one JSON list
            return [Connection(str(c['Name']), str(c['URI']), str(c.get('Identity') or ''), 'podman')
                    for c in json.loads(out or '[]')]
        return [Connection(str(c['Name']), str(c.get('DockerEndpoint') or ''), '', 'docker')   # a JSON object a line
                for c in map(json.loads, filter(None, out.splitlines()))]


ENGINES = {
    'podman': Engines('podman system connection', ('system', 'connection', 'list', '--format', 'json'),
                      '--connection', 'podman system connection add {name} ssh://USER@HOST/run/podman/podman.sock',
                      'apt-get install podman runc'),
    'docker': Engines('docker context', ('context', 'ls', '--format', '{{json .}}'), '--context',
                      'docker context create {name} --docker host=ssh://USER@HOST', 'apt-get install docker.io'),
}


@functools.cache
def connections(cli: str = 'podman') -> dict[str, Connection]:
    """Every engine elsewhere the CLI knows (podman's system connections, docker's contexts), by name; asked once
    per process."""
    kind = ENGINES[cli]
    exe = shutil.which(cli)
    if exe is None:
        raise EngineError(f'an agent names an engine, but there is no `{cli}` on PATH to ask for its '
                          f'{kind.noun}s; install {cli} (Debian: `{kind.install}`)')
    shown = f'{cli} {" ".join(kind.listing)}'
    try:
        proc = subprocess.run([exe, *kind.listing], capture_output=True, text=True, timeout=LIST_SECONDS,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise EngineError(f'`{shown}` did not answer within {LIST_SECONDS} s') from None
    if proc.returncode != 0:
        raise EngineError(f'`{shown}` failed (exit code {proc.returncode}): {proc.stderr.strip()[:300]}')
    try:
        return {c.name: c for c in kind.parse(proc.stdout)}
    except (ValueError, LookupError, TypeError, AttributeError) as err:
        raise EngineError(f'`{shown}` printed what is not a list of {kind.noun}s ({type(err).__name__}: {err}); '
                          f'is the {cli} on PATH a supported version?') from None


def docker_default_host() -> str:
    """Where a plain `docker` call goes: DOCKER_HOST, else the current context's endpoint (DOCKER_CONTEXT, or the
    one config.json names; asked of docker only then), else the local socket."""
    if os.environ.get('DOCKER_HOST'):
        return os.environ['DOCKER_HOST']
    name = os.environ.get('DOCKER_CONTEXT')
    if not name:
        config = Path(os.environ.get('DOCKER_CONFIG') or Path.home() / '.docker') / 'config.json'
        try:
            name = json.loads(config.read_text()).get('currentContext')
        except (OSError, ValueError, AttributeError):
            name = None
    if name and name != 'default' and shutil.which('docker'):
        try:
            return connections('docker')[name].uri
        except (EngineError, KeyError):
            pass
    return f'unix://{DOCKER_SOCKET}'


def connection(cli: str, name: str) -> Connection:
    try:
        return connections(cli)[name]
    except KeyError:
        kind = ENGINES[cli]
        raise EngineError(f'{cli} has no {kind.noun} named {name!r} any more; add it again '
                          f'(`{kind.add.format(name=name)}`) or change the manifest key engine') from None
