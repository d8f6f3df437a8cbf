"""The agent's machine: created from its image, started, and torn down.

machine:<agent>   `create --from <image>` with the agent's resources, labels and egress
                  flags (a packed image does not keep the allowlist, so they are passed
                  every time). Recreated when the image or this config changes, and when
                  the machine was deleted or replaced outside doit.
start:<agent>     the machine running; starting is idempotent.
teardown:<agent>  machine stopped and deleted, the agent's state dir removed.
"""
from __future__ import annotations

import shutil
import uuid

from doit.tools import config_changed

from tasks.backends import AGENT_LABEL, ID_LABEL, PROJECT_LABEL, BottleError, MachineSpec, backend
from tasks.checks import MachineAbsent, MachineRunning, PathAbsent, SameMachine
from tasks.image import Image, image_of
from tasks.manifest import Agent
from tasks.project import Project, action

IMAGE_LABEL = 'claude-bottle.image'


def tasks(project: Project):
    for agent in project.agents.values():
        image = image_of(project, agent.recipe)
        config = {'image': image.key, 'cpus': agent.cpus, 'memory_mib': agent.memory_mib,
                  'allow_hosts': agent.allow_hosts, 'env': agent.env, 'backend': agent.backend}
        yield {
            'name': agent.name,
            'doc': f'create machine {agent.machine} from image {image.key}',
            'actions': [(create, [project, agent, image])],
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
            'doc': f'stop and delete {agent.machine} and forget its state',
            'actions': [(delete, [project, agent]), (shutil.rmtree, [state], {'ignore_errors': True})],
            'uptodate': [MachineAbsent(agent), PathAbsent(state, 'state dir')],
        }


def _ours(project: Project, agent: Agent):
    """The agent's machine if it exists; an error if that name belongs to someone else."""
    machine = backend(agent.backend).machine(agent.machine)
    if machine is not None and machine.labels.get(PROJECT_LABEL) != project.label:
        raise BottleError(
            f'a machine named {agent.machine} exists on {agent.backend} but was not made by this '
            f'project ({project.root}); delete it with the {agent.backend} CLI, or rename '
            f'agents/{agent.name}.yaml')
    return machine


@action
def create(project: Project, agent: Agent, image: Image):
    runtime = backend(agent.backend)
    if _ours(project, agent) is not None:
        runtime.delete(agent.machine)
    identity = uuid.uuid4().hex
    runtime.create(MachineSpec(
        name=agent.machine, image=image.artifact, image_key=image.key, cpus=agent.cpus, memory_mib=agent.memory_mib,
        labels={AGENT_LABEL: agent.name, PROJECT_LABEL: project.label, IMAGE_LABEL: image.key,
                ID_LABEL: identity},
        env=agent.env, allow_hosts=agent.allow_hosts))
    return {'machine_id': identity}


@action
def start(agent: Agent):
    backend(agent.backend).start(agent.machine)


@action
def delete(project: Project, agent: Agent):
    if _ours(project, agent) is not None:
        backend(agent.backend).delete(agent.machine)
