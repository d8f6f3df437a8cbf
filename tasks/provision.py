"""Provisioning: what goes into a running machine, one task per artifact.

provision_prompt:<agent>        the rendered prompt, copied to the guest (0600, agent-owned)
provision_skill:<agent>:<skill> one skill directory, moved as one tar stream in one exec
provision_skills:<agent>        skills dropped from the manifest, removed from the guest
provision:<agent>               all of the above for one agent

Each step records the identity of the machine it provisioned (`machine_id`), so an
unchanged prompt or skill is never copied twice, while a machine recreated by doit
or behind its back gets everything again. An agent's steps run one after another
(parallelism is across agents), since they all talk to the same machine.
"""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

from doit.tools import config_changed

from tasks import guest
from tasks.backends import BottleError, backend
from tasks.checks import SameMachine
from tasks.manifest import Agent
from tasks.project import Project, action
from tasks.prompt import prompt_file

FAMILIES = {
    'provision_prompt': 'copy each agent\'s rendered prompt into its machine',
    'provision_skill': 'copy one skill directory into an agent\'s machine',
    'provision_skills': 'remove skills dropped from a manifest from the machine',
}

# Guest side of one skill transfer: unpack next to the old copy, then swap, so the
# skill is never half there. Arguments: skills dir, skill name, owner uid:gid.
RECEIVE_SKILL = r'''set -eu
dir=$1 name=$2 owner=$3
[ -d "$dir" ] || { mkdir -p "$dir"; chown "$owner" "$dir"; }
incoming="$dir/.$name.incoming"
rm -rf "$incoming"; mkdir "$incoming"
tar -x -f - -C "$incoming" --no-same-owner
chown -R "$owner" "$incoming"
rm -rf "${dir:?}/$name"; mv "$incoming" "$dir/$name"
grep -qxF "$name" "$dir/{managed}" 2>/dev/null || echo "$name" >> "$dir/{managed}"
'''.replace('{managed}', guest.MANAGED_SKILLS)

# Remove managed skills not in the keep list. The list lives in an agent-writable
# dir, so every name read from it is checked before anything is removed.
PRUNE_SKILLS = r'''set -eu
dir=$1; shift
list="$dir/{managed}"
[ -f "$list" ] || exit 0
keep=" $* "
: > "$list.new"
while IFS= read -r name; do
  case "$name" in ''|*/*|.*) continue ;; esac
  case "$keep" in
    *" $name "*) echo "$name" >> "$list.new" ;;
    *) rm -rf "${dir:?}/$name" ;;
  esac
done < "$list"
mv "$list.new" "$list"
'''.replace('{managed}', guest.MANAGED_SKILLS)


def tasks(project: Project):
    for family, doc in FAMILIES.items():
        yield {'basename': family, 'name': None, 'doc': doc}
    for agent in project.agents.values():
        steps = [_prompt_step(project, agent)]
        steps += [_skill_step(agent, skill) for skill in agent.skills]
        steps.append(_prune_step(agent))
        names = [f'{step["basename"]}:{step["name"]}' for step in steps]
        for step, previous in zip(steps, [f'start:{agent.name}'] + names):
            yield {**step, 'task_dep': [previous]}
        yield {
            'name': agent.name,
            'doc': f'provision {agent.machine}: prompt and {len(agent.skills)} skill(s)',
            'actions': None,
            'task_dep': names,
        }


def _owner(agent: Agent) -> dict:
    return {'uid': agent.user.uid, 'gid': agent.user.uid}


def _prompt_step(project: Project, agent: Agent) -> dict:
    source = prompt_file(project, agent.name)
    return {
        'basename': 'provision_prompt', 'name': agent.name,
        'doc': f'copy the prompt of {agent.name} to {guest.prompt_path(agent)}',
        'actions': [(copy_prompt, [agent, source])],
        'file_dep': [source],
        'uptodate': [config_changed({'to': guest.prompt_path(agent), **_owner(agent)}), SameMachine(agent)],
    }


def _skill_step(agent: Agent, skill: str) -> dict:
    source = agent.skill_dir(skill)
    files = sorted(p for p in source.rglob('*') if p.is_file())
    return {
        'basename': 'provision_skill', 'name': f'{agent.name}:{skill}',
        'doc': f'copy skill {skill} to {guest.skills_dir(agent)}/{skill} in {agent.machine}',
        'actions': [(copy_skill, [agent, skill])],
        'file_dep': files,
        'uptodate': [config_changed({'to': guest.skills_dir(agent), **_owner(agent)}), SameMachine(agent)],
    }


def _prune_step(agent: Agent) -> dict:
    return {
        'basename': 'provision_skills', 'name': agent.name,
        'doc': f'remove skills of {agent.name} that its manifest no longer lists',
        'actions': [(prune_skills, [agent])],
        'uptodate': [config_changed({'keep': sorted(agent.skills), 'in': guest.skills_dir(agent)}),
                     SameMachine(agent)],
    }


def _current_identity(agent: Agent) -> str:
    machine = backend(agent.backend).machine(agent.machine)
    if machine is None or not machine.running:
        raise BottleError(f'machine {agent.machine} is not running; run `doit launch:{agent.name}`')
    return machine.identity


@action
def copy_prompt(agent: Agent, source: Path):
    identity = _current_identity(agent)
    runtime = backend(agent.backend)
    if source.stat().st_size:
        runtime.copy_in(agent.machine, source, guest.prompt_path(agent), mode=0o600, **_owner(agent))
    else:   # no prompt: Claude starts without the flag, and no stale prompt stays behind
        runtime.exec(agent.machine, ['rm', '-f', guest.prompt_path(agent)])
    return {'machine_id': identity}


@action
def copy_skill(agent: Agent, skill: str):
    identity = _current_identity(agent)
    stream = io.BytesIO()
    with tarfile.open(fileobj=stream, mode='w') as tar:
        for path in sorted(agent.skill_dir(skill).rglob('*')):
            tar.add(path, arcname=str(path.relative_to(agent.skill_dir(skill))), recursive=False)
    owner = f'{agent.user.uid}:{agent.user.uid}'
    backend(agent.backend).exec(agent.machine, ['sh', '-c', RECEIVE_SKILL, 'sh', guest.skills_dir(agent),
                                                skill, owner], stdin=stream.getvalue())
    return {'machine_id': identity}


@action
def prune_skills(agent: Agent):
    identity = _current_identity(agent)
    backend(agent.backend).exec(agent.machine, ['sh', '-c', PRUNE_SKILLS, 'sh', guest.skills_dir(agent),
                                                *agent.skills])
    return {'machine_id': identity}
