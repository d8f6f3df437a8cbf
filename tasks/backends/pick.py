"""backend(name, engine): the process-wide instance of each machine runtime (on each engine: a podman system
connection, or None for this host's), so all tasks of a run share its one probe. The runtimes' modules are
imported only when asked for (smolvm's or the docker CLI's)."""
from __future__ import annotations

import threading

from tasks.backends.protocol import Backend
from tasks.errors import BottleError

_backends: dict[tuple[str, str | None], Backend] = {}
_backends_lock = threading.Lock()


def backend(name: str, engine: str | None = None) -> Backend:
    """The process-wide instance of a backend on an engine (None: this host's), so all tasks share one probe
    of each."""
    with _backends_lock:
        if (name, engine) not in _backends:
            if name == 'smolvm' and engine is None:
                from tasks.backends.smolvm import Smolvm
                _backends[name, engine] = Smolvm()
            elif name in ('docker', 'podman'):
                from tasks.backends.docker import Docker
                _backends[name, engine] = Docker(name, engine)
            elif engine is not None:
                raise BottleError(f'engine {engine!r}: only podman and docker run bottles on an engine elsewhere, '
                                  f'not {name}')
            else:
                raise BottleError(f'unknown backend {name!r}; choose smolvm, docker or podman')
        return _backends[name, engine]
