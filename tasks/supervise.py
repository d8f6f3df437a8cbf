"""The supervisor, doit's side: the project's supervisor daemon, and what each bottle gets of it.

supervisor  the project's supervisor running (daemons/supervise: one process for every bottle, state in
            .bottle/supervise/) for every agent with `supervise: true`, and the egress proxy routing the
            bottles' requests for supervise.bottle.invalid to it. Up to date while it answers a real MCP
            initialize and list_tools from the host and the proxy's route points at it (no backend
            call); when no agent is supervised, while none runs.

provision_supervise:<agent> (tasks/provision.py) registers it in the guest's Claude Code. The human answers
on the supervisor's page or with `doit supervise`, `doit approve` and the rest (tasks/commands/review.py).

Hosts the human approves for a bottle are kept by daemons/supervise/approved.py in
.bottle/supervise/approved/<agent>.json, outside the agent's own state, so they outlive relaunches and
teardowns until revoked; allowlist:<agent> (tasks/egress.py) merges them into every rendering of the
bottle's rules.
"""
from __future__ import annotations

import os

from daemons.supervise import approved
from daemons.supervise.control import Supervisor
from tasks import egress, gate, services
from tasks.project import Project

WHAT = 'the project\'s supervisor'


def supervisor(project: Project) -> Supervisor:
    return Supervisor(project.daemon_dir('supervise'), gate.gate(project).state_dir, os.environ)


def bottles(project: Project) -> dict:
    """The supervisor's bottles file: each supervised agent's rules, approved hosts, egress log and wait."""
    served = {}
    for agent in project.agents.values():
        if agent.supervise:
            door = egress.door(project, agent.name)
            served[agent.name] = {'rules': str(door.rules),
                                  'approved': str(approved.file(project.daemon_dir('supervise'), agent.name)),
                                  'log': str(door.log), 'wait_seconds': agent.supervise_wait}
    return served


def task(project: Project) -> dict:
    return services.task(project, 'supervise', supervisor(project), bottles(project), WHAT,
                         'no agent has supervise: true')
