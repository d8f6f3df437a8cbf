"""The backend protocol: what every machine runtime provides (the abstract Backend, which keeps the one probe
per run), the records it speaks in (Machine, MachineSpec, ImageBuild), its errors and its labels, and how a
backend command is run. docker.py and smolvm.py implement it; tasks.backends.backend() picks one.

Machine state comes from one probe per doit run (`machine ls --json` on smolvm), cached here and kept in step
with what this process changes, so the up-to-date checks of any number of agents cost a single call.
"""
from __future__ import annotations

import signal
import subprocess
import threading
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from tasks.errors import BottleError
from tasks.progress import progress

WORKLOAD = ['sleep', 'infinity']   # keeps a build machine up; all work is done through exec
ID_LABEL = 'claude-bottle.id'
AGENT_LABEL = 'claude-bottle.agent'
PROJECT_LABEL = 'claude-bottle.project'


class BackendMissing(BottleError):
    """The runtime's CLI is not installed."""


class BackendError(BottleError):
    """A backend command failed; the message carries its stderr."""


@dataclass(frozen=True)
class Machine:
    name: str
    state: str
    labels: Mapping[str, str] = field(default_factory=dict)

    @property
    def identity(self) -> str | None:
        """Changes when the machine is recreated, not when it is restarted."""
        return self.labels.get(ID_LABEL)

    @property
    def running(self) -> bool:
        return self.state == 'running'


@dataclass(frozen=True)
class MachineSpec:
    name: str
    image: Path                      # the packed image artifact
    image_key: str                   # its content address (names it in an engine's image store)
    cpus: int
    memory_mib: int
    labels: Mapping[str, str]
    env: Mapping[str, str]
    door: Path                       # the bottle's one way out: a Unix socket on the host...
    guest_door: str                  # ...where the guest finds it; the machine has no network card
    workload: tuple[str, ...]        # the machine's main process, run again on every start
    disk_gib: int | None = None      # what the guest may write, in GiB (None: not bounded)...
    disk: Path | None = None         # ...on a filesystem in this host file
    writable: Mapping[str, str] = field(default_factory=dict)   # guest paths it may write (the rest of its
    #                                root is read-only), each with the uid:gid it gets if the image lacks it
    engine_files: str | None = None  # on an engine elsewhere: the worker's directory of the confinement files
    #                                (then `door` is the worker's forwarded socket: daemons/forward)


@dataclass(frozen=True)
class ImageBuild:
    key: str                         # the recipe's content address
    machine: str                     # name of the throwaway build machine
    base: str                        # an OCI reference, or an absolute path to a local base
    setup: str                       # shell script run as root in the build machine
    files: Mapping[str, Path]        # guest path -> host file, copied in before the setup
    artifact: Path                   # where the packed image must end up


def on(backend: str, engine: str | None) -> str:
    """Where a machine is, in words: `podman`, `podman engine worker1` (engine: a podman system connection)."""
    return f'{backend} engine {engine}' if engine else backend


def run(argv: list[str], *, stdin: bytes | None = None, check: bool = True,
        timeout: float | None = None, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a backend command; on failure raise BackendError showing its stderr, and when it runs past
    `timeout` seconds, one saying so."""
    try:
        proc = subprocess.run(argv, input=stdin, stdin=None if stdin is not None else subprocess.DEVNULL,
                              capture_output=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise BackendError(f'`{_shown(argv)}` did not finish within {timeout:g} s and was stopped') from None
    if check and proc.returncode != 0:
        raise failure(proc)
    return proc


def failure(proc: subprocess.CompletedProcess) -> BackendError:
    """The error of a backend command that failed, showing its stderr."""
    err = proc.stderr.decode(errors='replace').strip() or proc.stdout.decode(errors='replace').strip()
    how = (f'was killed by {_signal_name(-proc.returncode)}' if proc.returncode < 0
           else f'failed with exit code {proc.returncode}')
    return BackendError(f'`{_shown(proc.args)}` {how}:\n{err or "(it printed nothing)"}')


def _shown(argv: list[str]) -> str:
    return ' '.join(argv[:6]) + (' ...' if len(argv) > 6 else '')


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f'signal {number}'


class Backend(ABC):
    """What every runtime provides; the probe cache lives here, once for all."""

    name: str
    artifact_name: str               # file name of a packed image inside its image dir

    def __init__(self):
        self._machines: dict[str, Machine] | None = None
        self._lock = threading.Lock()

    # -- state: one probe per run, kept in step with our own changes

    def machine(self, name: str) -> Machine | None:
        with self._lock:
            if self._machines is None:
                self._machines = self._probe()
            return self._machines.get(name)

    def _remember(self, name: str, machine: Machine | None):
        with self._lock:
            if self._machines is None:
                return
            if machine is None:
                self._machines.pop(name, None)
            else:
                self._machines[name] = machine

    def create(self, spec: MachineSpec):
        added = self._create(spec) or {}
        self._remember(spec.name, Machine(spec.name, 'created', {**spec.labels, **added}))

    def start(self, name: str):
        self._start(name)
        known = self.machine(name)
        if known:
            self._remember(name, Machine(name, 'running', known.labels))

    def stop(self, name: str):
        self._stop(name)
        known = self.machine(name)
        if known:
            self._remember(name, Machine(name, 'stopped', known.labels))

    def delete(self, name: str):
        self._delete(name)
        self._remember(name, None)

    # -- image builds: the steps both runtimes share

    @contextmanager
    def build_machine(self, name: str):
        """A throwaway machine: a leftover of an interrupted build is removed first, and
        this one is removed afterwards, also when the build fails."""
        if self.machine(name):
            self.delete(name)
        try:
            yield
        except BaseException:
            try:
                if self.machine(name):
                    self.delete(name)
            except BottleError:
                pass    # the build's own error says more; the next build removes the leftover
            raise
        self.delete(name)

    def set_up(self, build: ImageBuild):
        """In the just-created build machine: start, stage files, run the setup, stop."""
        self._remember(build.machine, Machine(build.machine, 'created'))
        self.start(build.machine)
        progress(f'running the image setup in {build.machine}')
        for guest_path, host_path in build.files.items():
            self.copy_in(build.machine, host_path, guest_path, mode=0o644, uid=0, gid=0)
        self.exec(build.machine, ['sh', '-s'], stdin=build.setup.encode())
        self.stop(build.machine)

    # -- what each runtime implements

    @abstractmethod
    def _probe(self) -> dict[str, Machine]:
        """Every machine the runtime knows, in one call."""

    @abstractmethod
    def build_image(self, build: ImageBuild):
        """Build machine from the base, run the setup, stop, pack into build.artifact."""

    @abstractmethod
    def _create(self, spec: MachineSpec) -> dict[str, str] | None:
        """Make the machine; return the labels it got besides spec.labels, if any."""

    @abstractmethod
    def _start(self, name: str): ...

    @abstractmethod
    def _stop(self, name: str): ...

    @abstractmethod
    def _delete(self, name: str): ...

    def forget_image(self, key: str) -> bool:
        """Remove what the runtime itself holds of the image `key`, if anything (its packed file is
        the caller's); True when something was removed."""
        return False

    @abstractmethod
    def copy_in(self, name: str, src: Path, dest: str, *, mode: int, uid: int, gid: int):
        """Copy one host file into the running machine, atomically, with owner and mode. Root
        writes it: only for destinations in directories no one but root can change (a file
        for the agent user goes through exec as that user)."""

    @abstractmethod
    def exec(self, name: str, argv: list[str], *, stdin: bytes | None = None, user: str = 'root') -> str:
        """Run argv as `user` (a user name of the guest) in the running machine; return stdout,
        raise on failure."""

    @abstractmethod
    def attach_argv(self, name: str, argv: list[str], *, user: str, home: str,
                    env: Mapping[str, str]) -> list[str]:
        """The host command that runs argv on a terminal as `user`, with `env` besides (NAME: value on the
        command line: a secret's placeholder, never a value)."""
