"""prune: remove what no current agent or recipe of the project uses, and say what and how much.

- image directories in .bottle/images/ whose key no current agent's recipe has, and the engine's
  tag of each (docker/podman; on every engine elsewhere the project's bottles use or used, too; another
  checkout that still needs that image loads it again from its own archive);
- the state of agents whose manifest is gone: their machine (only one this project made), door,
  state directory and the hosts approved for them through the supervisor;
- debootstrap bases in the user cache that this version of claude-bottle can no longer use (made
  with other debootstrap options, or named the old way). Bases of other suites, still current for
  other projects, stay.

Then the project's daemons no bottle uses any more are stopped (tasks/lifetime.py), each said in one line.

Never touches what a current agent needs. Run by hand (`doit prune`), never as part of a launch;
a second run finds nothing.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from daemons.supervise import approved
from tasks import egress, lifetime
from tasks.backends.pick import backend
from tasks.backends.protocol import PROJECT_LABEL, BackendMissing, on
from tasks.bases import debootstrap_name
from tasks.cache import cache_dir
from tasks.errors import BottleError
from tasks.image import image_of
from tasks.project import Project, action

BASE_FILE = re.compile(r'debootstrap-(?P<suite>[a-z0-9.-]+?)(?:-(?P<options>[0-9a-f]{8}))?-(?P<arch>[A-Za-z0-9_]+)\.tar')


def task(project: Project) -> dict:
    return {
        'actions': [(prune, [project])],
        'uptodate': [False],        # asked for by name: it looks every time
        'verbosity': 2,
    }


@action
def prune(project: Project):
    engines = _engines(project)
    removed = _gone_agents(project, engines) + _old_images(project, engines) + _superseded_bases()   # machines first
    lifetime.stop_unused(project)       # after the gone agents' doors closed
    if not removed:
        print('prune: nothing to remove')
        return
    for what, size in removed:
        print(f'prune: removed {what}' + (f' ({_size(size)})' if size else ''))
    print(f'prune: {_size(sum(size for _, size in removed))} freed')


def _old_images(project: Project, engines: dict[str, set[str]]) -> list[tuple[str, int]]:
    current = {image_of(project, agent.recipe).key for agent in project.agents.values()}
    removed = []
    images = project.state_dir / 'images'
    for directory in sorted(images.iterdir()) if images.is_dir() else []:
        if directory.name in current or not directory.is_dir():
            continue
        try:
            engine = json.loads((directory / 'image.json').read_text())['backend']
        except (OSError, ValueError, KeyError):
            engine = None           # never finished: nothing in an engine
        size = _bytes(directory)
        shutil.rmtree(directory)
        removed.append((f'image {directory.name} ({directory})', size))
        if engine:
            for elsewhere in [None, *sorted(engines.get(engine, ()))]:    # loaded into each engine its bottles use
                removed += _forget_image(engine, elsewhere, directory.name)
    return removed


def _engines(project: Project) -> dict[str, set[str]]:
    """The engines elsewhere (podman system connections) the project's bottles use or used, by backend."""
    used: dict[str, set[str]] = {}
    for agent in project.agents.values():
        if agent.engine:
            used.setdefault(agent.backend, set()).add(agent.engine)
    return used


def _forget_image(name: str, engine: str | None, key: str) -> list[tuple[str, int]]:
    where = on(name, engine)
    try:
        return [(f'image {key} from {where}', 0)] if backend(name, engine).forget_image(key) else []
    except BackendMissing:
        return []                   # its CLI is gone, and with it whatever it held
    except BottleError as err:      # another checkout's machine still runs on it, or the engine is away
        print(f'prune: kept image {key} in {where}: {str(err).splitlines()[-1]}')
        return []


def _gone_agents(project: Project, engines: dict[str, set[str]]) -> list[tuple[str, int]]:
    removed = []
    agents = project.state_dir / 'agents'
    for state in sorted(agents.iterdir()) if agents.is_dir() else []:
        if state.name in project.agents or not state.is_dir():
            continue
        try:
            placed = json.loads((state / 'machine.json').read_text())
        except (OSError, ValueError):
            placed = None
        if placed:
            engine = placed.get('engine')
            if engine:
                engines.setdefault(placed['backend'], set()).add(engine)
            runtime = backend(placed['backend'], engine)
            machine = runtime.machine(placed['machine'])
            if machine is not None and machine.labels.get(PROJECT_LABEL) == project.label:
                runtime.delete(placed['machine'])
                removed.append((f'machine {placed["machine"]} on {on(placed["backend"], engine)} (agent '
                                f'{state.name} has no manifest)', 0))
        egress.close_door(project, state.name)
        size = _bytes(state)
        shutil.rmtree(state)
        removed.append((f'state of agent {state.name} ({state})', size))
    for agent, hosts in approved.recorded(project.daemon_dir('supervise')).items():
        if agent not in project.agents:
            size = hosts.stat().st_size
            approved.forget(hosts)
            removed.append((f'hosts approved for agent {agent} ({hosts})', size))
    return removed


def _superseded_bases() -> list[tuple[str, int]]:
    removed = []
    bases = cache_dir() / 'bases'
    for tarball in sorted(bases.glob('debootstrap-*.tar')) if bases.is_dir() else []:
        match = BASE_FILE.fullmatch(tarball.name)
        if not match or match['arch'] != os.uname().machine:
            continue
        if f'{debootstrap_name(match["suite"])}-{match["arch"]}.tar' == tarball.name:
            continue                # what this version builds for that suite
        size = tarball.stat().st_size
        tarball.unlink()
        removed.append((f'base {tarball}', size))
    return removed


def _bytes(path: Path) -> int:
    return sum(p.lstat().st_size for p in path.rglob('*') if p.is_file() and not p.is_symlink())


def _size(count: int) -> str:
    for unit in ('bytes', 'KB', 'MB', 'GB'):
        if count < 1000 or unit == 'GB':
            return f'{count:.0f} {unit}' if unit == 'bytes' else f'{count:.1f} {unit}'
        count /= 1000

