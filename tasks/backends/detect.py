"""Which backend works on this host: the default for agents that name none.

The first that works, in order: smolvm when installed, else podman, else docker with
a running engine (or one elsewhere: an ssh:// DOCKER_HOST or current context). Looking costs no backend call (PATH look-ups and one socket
connect), so a no-op run still makes only its one machine probe.
"""
from __future__ import annotations

import os
import shutil
import socket

from daemons.forward.connections import docker_default_host
from tasks.errors import BottleError

ORDER = ('smolvm', 'podman', 'docker')

NEEDS = {
    'smolvm': 'smolvm: Linux with KVM or macOS; install with `curl -sSL https://smolmachines.com/install.sh | bash`',
    'podman': 'podman: `apt-get install podman runc` (Debian), then `./demo.sh configure` as root for the '
              'engine settings these hosts need',
    'docker': 'docker: the docker CLI and a running engine (`apt-get install docker.io`, then start '
              'dockerd; DOCKER_HOST names a non-default socket)',
}


def _docker_engine_running() -> bool:
    host = docker_default_host()
    if host.startswith('ssh://'):
        return True         # an engine elsewhere: its first call says so in words if it is not there
    try:
        if host.startswith('unix://'):
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(2)
                sock.connect(host.removeprefix('unix://'))
        elif host.startswith('tcp://'):
            address, _, port = host.removeprefix('tcp://').rstrip('/').rpartition(':')
            socket.create_connection((address, int(port)), timeout=2).close()
        else:
            return False
    except (OSError, ValueError):
        return False
    return True


def works(name: str) -> bool:
    if shutil.which(name) is None:
        return False
    return name != 'docker' or _docker_engine_running()


def available() -> list[str]:
    return [name for name in ORDER if works(name)]


def default_backend() -> str:
    """The backend of agents whose manifest and environment name none."""
    for name in ORDER:
        if works(name):
            return name
    raise BottleError(
        'no backend works on this host, so there is nowhere to run a bottle. claude-bottle takes the '
        'first that works, in this order: ' + '; '.join(NEEDS[name] for name in ORDER) + '. Install one, '
        'or name one with BOTTLE_BACKEND=smolvm|podman|docker or the manifest key backend.')


def alternatives(missing: str) -> str:
    """A sentence naming the backends that do work here, for a message about one that does not."""
    others = [name for name in available() if name != missing]
    if not others:
        return ''
    return (f' {" and ".join(others)} {"works" if len(others) == 1 else "work"} here: set '
            f'BOTTLE_BACKEND={others[0]} or the manifest key `backend: {others[0]}` to use it.')
