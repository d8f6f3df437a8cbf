"""The supervisor, doit's side: the project's supervisor daemon, and what each bottle gets of it.

supervisor  the project's supervisor running (daemons/supervise: one process for every bottle, state in
            .bottle/supervise/) for every agent with `supervise: true`, and the egress proxy routing the
            bottles' requests for supervise.bottle.invalid to it. Up to date while it answers a real MCP
            initialize and list_tools from the host and the proxy's route points at it (no backend
            call); when no agent is supervised, while none runs.

provision_supervise:<agent> (tasks/provision.py) registers it in the guest's Claude Code. The human answers
on the supervisor's page or with `doit supervise`, `doit approve` and the rest (tasks/review.py).

Hosts the human approves for a bottle are kept in .bottle/supervise/approved/<agent>.json, outside the
agent's own state, so they outlive relaunches and teardowns until revoked; allowlist:<agent> merges them
into every rendering of the bottle's rules.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from daemons.supervise.engine import Supervisor
from tasks import egress, gate, services
from tasks.backends import BottleError
from tasks.manifest import Agent
from tasks.project import Project

WHAT = 'the project\'s supervisor'


def supervisor(project: Project) -> Supervisor:
    return Supervisor(project.state_dir / 'supervise', gate.gate(project).state_dir, os.environ)


def approved_dir(project: Project) -> Path:
    return project.state_dir / 'supervise' / 'approved'


def approved_file(project: Project, agent_name: str) -> Path:
    return approved_dir(project) / f'{agent_name}.json'


def approved_text(project: Project, agent: Agent) -> str | None:
    """The approved hosts file of a supervised agent as it is, for the allowlist's config; None when there
    is none (or the agent is not supervised: approvals are part of supervision)."""
    try:
        return approved_file(project, agent.name).read_text() if agent.supervise else None
    except FileNotFoundError:
        return None
    except OSError as err:
        return f'(unreadable: {err})'       # approved_hosts says it when the allowlist is written


def approved_hosts(project: Project, agent: Agent) -> list[str]:
    """The hosts the human approved for a supervised agent."""
    text = approved_text(project, agent)
    if text is None:
        return []
    try:
        hosts = json.loads(text)
        if isinstance(hosts, list) and all(isinstance(host, str) for host in hosts):
            return hosts
    except ValueError:
        pass
    raise BottleError(f'{approved_file(project, agent.name)} is not a list of approved hosts; fix it, or remove '
                      f'it to drop every approval of {agent.name}')


def bottles(project: Project) -> dict:
    """The supervisor's bottles file: each supervised agent's rules, approved hosts, egress log and wait."""
    served = {}
    for agent in project.agents.values():
        if agent.supervise:
            door = egress.door(project, agent.name)
            served[agent.name] = {'rules': str(door.rules), 'approved': str(approved_file(project, agent.name)),
                                  'log': str(door.log), 'wait_seconds': agent.supervise_wait}
    return served


def task(project: Project) -> dict:
    return services.task(project, 'supervise', supervisor(project), bottles(project), WHAT,
                         'no agent has supervise: true')
