"""backend(name): the process-wide instance of each machine runtime, so all tasks of a run share its one
probe. The runtimes' modules are imported only when asked for (smolvm's or the docker CLI's)."""
from __future__ import annotations

import threading

from tasks.backends.protocol import Backend
from tasks.errors import BottleError

_backends: dict[str, Backend] = {}
_backends_lock = threading.Lock()


def backend(name: str) -> Backend:
    """The process-wide instance of a backend, so all tasks share one probe."""
    with _backends_lock:
        if name not in _backends:
            if name == 'smolvm':
                from tasks.backends.smolvm import Smolvm
                _backends[name] = Smolvm()
            elif name in ('docker', 'podman'):
                from tasks.backends.docker import Docker
                _backends[name] = Docker(name)
            else:
                raise BottleError(f'unknown backend {name!r}; choose smolvm, docker or podman')
        return _backends[name]
