"""Errors meant for people. A task's action that meets one of IN_WORDS fails with its message, one line or
a paragraph, never a traceback (tasks.project.action): doit names the task and records nothing for it, so
the next run does it again."""
from __future__ import annotations

from daemons.forward.connections import EngineError
from daemons.gate.control import GateError
from daemons.gate.review import ReviewError
from daemons.hostprograms import HostProgramMissing
from daemons.lifecycle import DaemonError
from daemons.proxy.control import ProxyError
from daemons.proxy.rules import RulesError
from daemons.supervise.store import SuperviseError


class BottleError(Exception):
    """An error of the task graph meant for people (a backend's, a manifest's, a project's)."""


# Every error whose message says what to fix: the graph's own and the daemons' (the proxy, its rules, the git
# gate and its reviews, the supervisor, a daemon that would not start), and a missing host program.
IN_WORDS = (BottleError, HostProgramMissing, DaemonError, ProxyError, RulesError, GateError, ReviewError,
            SuperviseError, EngineError)
