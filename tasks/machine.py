"""The agent's machine: created from its image, started, and torn down.

machine:<agent>   `create --from <image>` with the agent's resources and labels, no network
                  card, and its egress door (egress:<agent>, opened first) mounted, the door's
                  relay as the workload and the proxy variables in its environment. Recreated
                  when the image or this config changes, and when the machine was deleted or
                  replaced outside doit.
start:<agent>     the machine running; starting is idempotent.
teardown:<agent>  machine stopped and deleted, its egress door closed, the agent's state dir
                  removed; the project's daemons no other bottle uses stopped (tasks/lifetime.py).
"""
from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

from doit.tools import config_changed

from tasks import egress, forward, guest, lifetime
from tasks.backends import confine
from tasks.backends.disk import outermost
from tasks.backends.pick import backend
from tasks.backends.protocol import AGENT_LABEL, ID_LABEL, PROJECT_LABEL, BackendMissing, MachineSpec, on
from tasks.checks import MachineAbsent, MachineRunning, PathAbsent, SameMachine
from tasks.errors import BottleError
from tasks.image import Image, image_of
from tasks.manifest import Agent
from tasks.project import Project, action, write_json

IMAGE_LABEL = 'claude-bottle.image'


def tasks(project: Project):
    for agent in project.agents.values():
        image = image_of(project, agent.recipe)
        config = {'name': agent.machine, 'image': image.key, 'cpus': agent.cpus, 'memory_mib': agent.memory_mib,
                  'disk_gib': agent.disk_gib, 'writable': outermost(guest.writable_paths(agent)),   # skills in /tmp: no change
                  'env': machine_env(agent), 'backend': agent.backend,
                  **({'engine': agent.engine} if agent.engine else {}),      # this host's: as before engines
                  'door': [str(egress.door_socket(project, agent.name)), guest.DOOR],
                  'door_mount': 'read-only',       # machines made before the door was read-only are made again
                  'confinement': confine.LEVEL,    # and those made with another kernel surface (backends/confine.py)
                  'workload': list(guest.DOOR_RELAY)}
        yield {
            'name': agent.name,
            'doc': f'create machine {agent.machine} on {on(agent.backend, agent.engine)} from image {image.key}',
            'actions': [(create, [project, agent, image])],
            'task_dep': [f'egress:{agent.name}',      # an engine mounts the door's directory at create
                         *([f'forward:{agent.engine}'] if forward.forwarded(agent) else [])],   # ...on the worker
            'file_dep': [image.manifest],
            'uptodate': [config_changed(config), SameMachine(agent)],
            'clean': [(delete, [project, agent])],
        }


def start_tasks(project: Project):
    for agent in project.agents.values():
        yield {
            'name': agent.name,
            'doc': f'start machine {agent.machine}',
            'actions': [(start, [agent])],
            'task_dep': [f'machine:{agent.name}'],
            'uptodate': [MachineRunning(agent)],
        }


def teardown_tasks(project: Project):
    for agent in project.agents.values():
        state = project.agent_dir(agent.name)
        yield {
            'name': agent.name,
            'doc': f'stop and delete {agent.machine}, close its egress door and forget its state',
            'actions': [(delete, [project, agent]), (egress.close_door, [project, agent.name]),
                        (shutil.rmtree, [state], {'ignore_errors': True}), (stop_unused, [project])],
            'uptodate': [MachineAbsent(agent), PathAbsent(state, 'state dir')],
            'verbosity': 2,         # the daemons it stops, in a line each
        }


def machine_env(agent: Agent) -> dict[str, str]:
    """The manifest's variables, then the egress variables, which a manifest cannot override:
    they are the bottle's only way out."""
    return {**agent.env, **guest.EGRESS_ENV}


def placement(project: Project, agent: Agent) -> Path:
    """The record of where the agent's machine is: after the manifest moves the agent to another
    backend or engine, or the machine's name changes (a new `project` name; names without one, from before
    checkouts had their own), the old machine is still found and taken down."""
    return project.agent_dir(agent.name) / 'machine.json'


def _ours(project: Project, backend_name: str, engine: str | None, name: str):
    """The machine of that name on that backend if it exists; an error if it belongs to someone else."""
    machine = backend(backend_name, engine).machine(name)
    if machine is not None and machine.labels.get(PROJECT_LABEL) != project.label:
        raise BottleError(
            f'a machine named {name} exists on {on(backend_name, engine)} but was not made by this checkout '
            f'({project.root}); delete it with the {backend_name} CLI, or give this checkout its own '
            f'`project` name in agents/_defaults.yaml')
    return machine


def _delete_everywhere(project: Project, agent: Agent):
    """Delete the agent's machine, and the one its record names if that is another (on another
    backend or engine, or under another name)."""
    try:
        record = json.loads(placement(project, agent).read_text())
        previous = (record['backend'], record.get('engine'), record['machine'])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        previous = None
    if previous and previous != (agent.backend, agent.engine, agent.machine):
        where, engine, name = previous
        try:
            machine = backend(where, engine).machine(name)
            if machine is not None and machine.labels.get(PROJECT_LABEL) != project.label:
                # a record that came with a copy of another checkout's .bottle/: that machine is not ours
                print(f'note: {name} on {on(where, engine)} belongs to another checkout; left alone')
            elif machine is not None:
                backend(where, engine).delete(name)
        except BackendMissing:
            print(f'note: {name} may still exist on {on(where, engine)}, whose CLI is gone')
        except BottleError as err:      # an engine gone or unreachable: the record stays for the next try
            raise BottleError(f'{name} on {on(where, engine)}, where agent {agent.name} ran before, could not be '
                              f'taken down: {err}') from None
    if _ours(project, agent.backend, agent.engine, agent.machine) is not None:
        backend(agent.backend, agent.engine).delete(agent.machine)


@action
def create(project: Project, agent: Agent, image: Image):
    _delete_everywhere(project, agent)
    identity = uuid.uuid4().hex
    door, files = egress.door_socket(project, agent.name), None
    if forward.forwarded(agent):            # the door as the worker has it, forwarded from this host's
        there = forward.forward(project, agent.engine)
        door, files = Path(there.door(agent.name)), there.files_dir()
    backend(agent.backend, agent.engine).create(MachineSpec(
        name=agent.machine, image=image.artifact, image_key=image.key, cpus=agent.cpus,
        memory_mib=agent.memory_mib, env=machine_env(agent), door=door, engine_files=files,
        guest_door=guest.DOOR, workload=guest.DOOR_RELAY, disk_gib=agent.disk_gib,
        disk=disk_file(project, agent), writable=guest.writable_paths(agent),
        labels={AGENT_LABEL: agent.name, PROJECT_LABEL: project.label, IMAGE_LABEL: image.key,
                ID_LABEL: identity}))
    write_json(placement(project, agent), {'backend': agent.backend, 'engine': agent.engine, 'machine': agent.machine})
    return {'machine_id': identity}


def disk_file(project: Project, agent: Agent) -> Path:
    """Where the bottle's disk lives on the host (tasks/backends/disk.py), beside its other state."""
    return project.agent_dir(agent.name).resolve() / 'disk.img'


@action
def start(agent: Agent):
    backend(agent.backend, agent.engine).start(agent.machine)


@action
def delete(project: Project, agent: Agent):
    _delete_everywhere(project, agent)


stop_unused = action(lifetime.stop_unused)
