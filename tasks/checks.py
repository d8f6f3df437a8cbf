"""Up-to-date checks that ask the machine.

Each reads the backend's one-per-run machine probe, so checking any number of
agents costs one CLI call. Each is a class with a readable repr, because
`doit info` prints the checks that failed. A check never raises (an exception
there aborts the whole doit run with a traceback): when the backend cannot answer,
whatever the reason, the check says "not up to date" and the task's action reports
the real error in words.
"""
from __future__ import annotations

from pathlib import Path

from tasks.backends.pick import backend
from tasks.manifest import Agent


class _Check:
    def __init__(self, agent: Agent):
        self.agent = agent

    def __call__(self, task, values):
        try:
            return self.holds(backend(self.agent.backend, self.agent.engine).machine(self.agent.machine), values)
        except Exception:    # BottleError or worse: the action meets it again and reports it
            return False


class SameMachine(_Check):
    """Holds while the agent's machine is the one this task last worked on, as
    recorded by its action (`machine_id`): a recreated machine has a new
    identity, a restarted one keeps it."""

    def holds(self, machine, values):
        recorded = values.get('machine_id')
        return machine is not None and recorded is not None and machine.identity == recorded

    def __repr__(self):
        return f'{self.agent.machine} is still the machine this task last worked on'


class MachineRunning(_Check):
    def holds(self, machine, values):
        return machine is not None and machine.running

    def __repr__(self):
        return f'machine {self.agent.machine} is running'


class MachineAbsent(_Check):
    def holds(self, machine, values):
        return machine is None

    def __repr__(self):
        return f'machine {self.agent.machine} does not exist'


class FileExists:
    """For artifacts too large to hash as a file_dep: their presence is the check."""

    def __init__(self, path: Path, what: str):
        self.path, self.what = path, what

    def __call__(self, task, values):
        return self.path.is_file()

    def __repr__(self):
        return f'{self.what} {self.path} exists'


class PathAbsent:
    def __init__(self, path: Path, what: str):
        self.path, self.what = path, what

    def __call__(self, task, values):
        return not self.path.exists()

    def __repr__(self):
        return f'{self.what} {self.path} is gone'
