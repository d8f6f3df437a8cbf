"""forward:<engine>: the doors of the project's bottles on an engine elsewhere, forwarded to its worker.

An agent whose manifest names an `engine` reached over SSH (a podman system connection or a docker context
`ssh://...`) runs on the
worker, and the fence stays here: its egress door, a socket on this host, is forwarded to the worker by one SSH
connection per worker (daemons/forward: OpenSSH's control master with a `-R` per bottle), which also gives the
worker the confinement files its machines mount. Up to date while that connection runs and takes a connection
(no backend call, no SSH round trip); the next launch starts it again when it died or was killed, and the
machines on the worker stay as they are. machine:<agent> of such an agent depends on it; it is stopped when
no bottle of the project on that worker is left (tasks/lifetime.py), and by `doit clean`.
"""
from __future__ import annotations

from daemons.forward.connections import connection
from daemons.forward.control import Forward, project_key
from tasks import egress
from tasks.backends import confine
from tasks.manifest import Agent
from tasks.progress import progress, stopped
from tasks.backends.protocol import on
from tasks.errors import BottleError
from tasks.project import Project, action



def forwarded(agent: Agent) -> bool:
    """The agent runs on an engine reached over SSH: its door goes there through a forward."""
    return bool(agent.engine) and connection(agent.backend, agent.engine).ssh


def by_engine(project: Project) -> dict[str, list[Agent]]:
    """The agents on each engine reached over SSH. An engine is one worker, named once: a podman connection and a
    docker context of one name would be two, which the names cannot tell apart."""
    engines: dict[str, list[Agent]] = {}
    for agent in project.agents.values():
        if forwarded(agent):
            engines.setdefault(agent.engine, []).append(agent)
    for engine, agents in engines.items():
        if len({agent.backend for agent in agents}) > 1:
            raise BottleError(f'engine {engine} is named by agents on podman and on docker '
                              f'({", ".join(sorted(a.name for a in agents))}): a podman connection and a docker '
                              'context need names of their own; rename one')
    return engines


def forward(project: Project, engine: str) -> Forward:
    """The forward of every bottle the manifests put on that engine, launched or not: adding one restarts it,
    launching one does not."""
    agents = by_engine(project).get(engine, [])
    cli = agents[0].backend if agents else 'podman'
    return Forward(project.daemon_dir('forward'), cli, engine, project_key(project.root),
                   {agent.name: egress.door_socket(project, agent.name) for agent in agents},
                   confine.confinement_dir())


def tasks(project: Project):
    for engine, agents in by_engine(project).items():
        yield {
            'name': engine,
            'doc': f'forward the doors of {", ".join(a.name for a in agents)} to the worker of '
                   f'{on(agents[0].backend, engine)}',
            'actions': [(ensure, [project, engine])],
            'uptodate': [lambda task, values, engine=engine: forward(project, engine).running()],
            'clean': [(stop, [project, engine])],
            'verbosity': 2,
        }


@action
def ensure(project: Project, engine: str):
    confine.write_files()                       # what the worker gets, written here first
    there = forward(project, engine)
    agents = ', '.join(sorted(there.doors))
    progress(f'forwarding the doors of {agents} to the worker of {on(there.cli, engine)}')
    there.ensure_running(f'agent{"s" if "," in agents else ""} {agents}')


def stop(project: Project, engine: str):
    gone = Forward(project.daemon_dir('forward'), Forward.cli_of(project.daemon_dir('forward'), engine), engine,
                   project_key(project.root), {}, confine.confinement_dir())
    if gone.daemon('').pid() is not None:
        problem = gone.stop()
        stopped(f'the door forward to {on(gone.cli, engine)}')
        if problem:
            print(f'note: the directory of this checkout on the worker of {on(gone.cli, engine)} stays: {problem}')


def stop_unused(project: Project, bottles: list[Agent]):
    """Stop the forward of each worker no bottle (an agent with an open door) is on any more."""
    used = {agent.engine for agent in bottles if agent.engine}
    for pid_file in sorted(project.daemon_dir('forward').glob('forward-*.pid')):
        engine = pid_file.name.removeprefix('forward-').removesuffix('.pid')
        if engine not in used:
            stop(project, engine)
