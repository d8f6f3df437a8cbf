"""How long the project's daemons live: as long as a bottle uses them.

A bottle is an agent with an open egress door (the proxy's doors file, .bottle/egress/doors.json: its launch
opened the door, and its teardown, `doit clean` or `doit prune` closes it). Every bottle uses the egress proxy,
which stops with the last door (daemons/proxy/control.py); a bottle whose manifest has a `git:` list uses the
git gate; a supervised one the supervisor; one on an engine elsewhere the forward to its worker. teardown:<agent>
and `doit prune` end with stop_unused, which stops the gate, the supervisor and each forward when no bottle uses
them, each said in one line; `doit clean` stops them through the
clean of their own tasks. A stopped daemon is started again by the next launch that needs it.

A daemon whose project is deleted cannot be told: it exits by itself once its state directory is gone
(daemons/proxy/statedir.py).
"""
from __future__ import annotations

from tasks import egress, forward, gate, services, supervise
from tasks.manifest import Agent
from tasks.progress import UNUSED
from tasks.project import Project


def stop_unused(project: Project) -> None:
    """Stop the gate and the supervisor if no bottle uses them; idempotent, and never another checkout's
    (a daemon is ours only as its pid file records it: daemons/lifecycle.py)."""
    bottles = [project.agents[name] for name in egress.proxy(project).bottles() if name in project.agents]
    for name, service, what, uses in (('gate', gate.gate(project), gate.WHAT, _uses_gate),
                                      ('supervise', supervise.supervisor(project), supervise.WHAT, _supervised)):
        if service.daemon().pid() is not None and not any(uses(agent) for agent in bottles):
            services.stop(project, name, service, what, UNUSED)
    forward.stop_unused(project, bottles)


def _uses_gate(agent: Agent) -> bool:
    return bool(agent.git)


def _supervised(agent: Agent) -> bool:
    return bool(agent.supervise)
