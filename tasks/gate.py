"""The git gate, doit's side: the project's gate daemon.

gate    the project's git gate running (daemons/gate: one process for every bottle, state in .bottle/gate/)
        with every agent's `git:` list, and the egress proxy routing the bottles' requests for
        git.bottle.invalid to it. Up to date while the gate answers its health check and the proxy's
        route points at it (no backend call); when no agent lists a repository, while no gate runs.

provision_git:<agent> (tasks/provision.py) makes the bottle's mirrors from upstream with the host's own
credentials (so a wrong URL or credential fails that agent's launch, not its first clone) and points
the guest's git at the gate. Held pushes are reviewed with `doit held`, `doit approve` and `doit reject`
(tasks/commands/review.py).
"""
from __future__ import annotations

from daemons.gate.control import GitGate
from tasks import services
from tasks.project import Project

WHAT = 'the project\'s git gate'


def gate(project: Project) -> GitGate:
    return GitGate(project.daemon_dir('gate'))


def bottles(project: Project) -> dict:
    """The gate's bottles file: each agent with a `git:` list, and its repositories."""
    return {agent.name: {'repos': [repo.gate_entry() for repo in agent.git]}
            for agent in project.agents.values() if agent.git}


def task(project: Project) -> dict:
    return services.task(project, 'gate', gate(project), bottles(project), WHAT,
                         'no agent lists repositories under git:')


def sync(project: Project, agent_name: str):
    gate(project).sync(agent_name)
