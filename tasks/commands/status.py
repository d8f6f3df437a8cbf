"""status: every agent at a glance, from one backend probe and doit's own up-to-date information.

For each agent: its backend and machine state, its image (built or not), whether its egress door
answers, for an agent with repositories whether the git gate answers and how many of its pushes
wait for review, for a supervised agent whether the supervisor answers and how many of its requests
wait for the human, its secrets by name (where each goes and how many requests used it, never a
value), what the next `doit launch:<agent>` would run and why (doit's reasons, as `doit info` gives
them, for every task on the way), and the requests its fence refused lately.
"""
from __future__ import annotations

from pathlib import Path

from doit.globals import Globals
from doit.loader import load_tasks

from daemons.gate import review
from daemons import shown
from daemons.proxy.refusals import refusals, secret_uses
from daemons.supervise import requests
from tasks import egress, forward, gate, supervise
from tasks.backends.disk import DISK_LABEL, NOT_BOUNDED
from tasks.backends.protocol import on
from tasks.backends.pick import backend
from tasks.image import image_of
from tasks.project import Project, action

BLOCKED_SHOWN = 3


def task(project: Project, dodo: dict) -> dict:
    return {
        'actions': [(status, [project, dodo])],
        'uptodate': [False],        # asked for by name: it looks every time
        'verbosity': 2,
    }


@action
def status(project: Project, dodo: dict):
    tasks = {t.name: t for t in load_tasks(dodo, allow_delayed=True)}
    producers = {target: t.name for t in tasks.values() for target in t.targets}
    proxy = egress.proxy(project)
    git_gate = gate.gate(project)
    gate_state = _answering(git_gate)
    held = [push.bottle for push in review.held(git_gate.state_dir)]
    supervisor = supervise.supervisor(project)
    supervisor_state = _answering(supervisor)
    waiting = [request.bottle for request in requests.pending(supervisor.state_dir)] \
        if supervisor.db_file.exists() else []
    for agent in project.agents.values():
        machine = backend(agent.backend, agent.engine).machine(agent.machine)      # one probe per engine, shared
        image = image_of(project, agent.recipe)
        print(f'{agent.name}: {agent.machine} on {on(agent.backend, agent.engine)}, '
              f'{machine.state if machine else "no machine"}; image {image.key}'
              f'{"" if image.manifest.exists() else " (not built)"}; egress door '
              f'{"open" if proxy.door_healthy(agent.name) else _stopped("closed", proxy.daemon())}'
              + (f'; door forwarded to the worker {_forward_state(project, agent)}' if forward.forwarded(agent) else '')
              + (f'; git gate {gate_state}, {held.count(agent.name)} push(es) held for review' if agent.git else '')
              + (f'; supervisor {supervisor_state}, {waiting.count(agent.name)} request(s) waiting (doit supervise)'
                 if agent.supervise else ''))
        disk = (machine.labels.get(DISK_LABEL) if machine else None)
        if disk and disk.startswith(NOT_BOUNDED):
            print(f'  disk {shown.text(disk, 300)}')
        pending = list(_would_run(f'launch:{agent.name}', tasks, producers))
        if pending:
            print('  next launch runs:')
            for name, why in pending:
                print(f'    {name}: {why}')
        else:
            print('  next launch: nothing to do but attach')
        if agent.secrets:
            uses = secret_uses(egress.door(project, agent.name).log)
            for secret in agent.secrets:
                print(f'  secret {secret.name}: goes in {secret.header} to {", ".join(secret.hosts)}; used by '
                      f'{uses.get(secret.name, 0)} request(s)')
        for line in _blocked(egress.door(project, agent.name).log):
            print(f'  blocked: {line}')


def _answering(service) -> str:
    """A service's state in words, from a real request of its protocol (not the up-to-date check's connect)."""
    if service.healthy():
        return 'answering'
    return 'not answering (it runs: see its log)' if service.running() else _stopped('not running', service.daemon())


def _forward_state(project: Project, agent) -> str:
    """The forward of the agent's worker in a word, from its protocol (the SSH connection and the worker's sockets)."""
    there = forward.forward(project, agent.engine)
    daemon = there.daemon()
    if daemon.pid() is None:
        return _stopped('stopped', daemon)
    return 'up' if there.healthy() else 'not answering'


def _stopped(state: str, daemon) -> str:
    """The state, and why the daemon is left stopped when it died too often (daemons/lifecycle.py)."""
    crash_loop = daemon.crash_loop()
    return f'{state} ({crash_loop})' if crash_loop else state


def _would_run(root: str, tasks: dict, producers: dict):
    """(task, why) for each task with actions that `doit <root>` would run, dependencies first."""
    seen, order = set(), []

    def visit(name: str):
        if name in seen or name not in tasks:
            return
        seen.add(name)
        task = tasks[name]
        for dep in task.task_dep + [producers[f] for f in task.file_dep if f in producers]:
            visit(dep)
        order.append(task)
    visit(root)
    remade = {}                     # target -> the pending task that makes it again
    for task in order:
        if not task.actions or task.name == root:
            continue
        inputs = [f for f in task.file_dep if f in remade]
        if inputs:                  # doit can only tell once that task has run: it will
            why = '; '.join(f'{Path(f).name} is remade by {remade[f]}' for f in inputs)
        else:
            state = Globals.dep_manager.get_status(task, tasks, get_log=True)
            if state.status == 'up-to-date':
                continue
            why = _why(state.reasons)
        remade.update(dict.fromkeys(task.targets, task.name))
        yield task.name, why


def _why(reasons: dict) -> str:
    said = [_short(str(check)) for check, _, _ in reasons.get('uptodate_false') or []]
    for key, words in (('missing_target', 'missing'), ('changed_file_dep', 'changed'),
                       ('missing_file_dep', 'missing input'), ('added_file_dep', 'new input'),
                       ('removed_file_dep', 'dropped input')):
        said += [f'{words} {Path(item).name}' for item in reasons.get(key) or []]
    if reasons.get('has_no_dependencies'):
        said.append('it always runs')
    return '; '.join(said) or 'never ran'


def _short(text: str, limit: int = 100) -> str:
    return text if len(text) <= limit else text[:limit - 3] + '...'


def _blocked(log: Path) -> list[str]:
    """The last refusals in the bottle's egress log, oldest first; what the guest sent in them (a path, a
    host) through daemons/shown.py, never raw to the terminal."""
    return [shown.text(f'{r["time"] or "?"} {r["method"] or ""} {r["host"] or ""}{r["path"] or ""}: '
                       f'{r["reason"] or ""}', 1000) for r in reversed(refusals(log, BLOCKED_SHOWN))]
