"""The git gate, doit's side: the project's gate daemon, and the review of held pushes.

gate              the project's git gate running (daemons/gate: one process for every bottle, state in
                  .bottle/gate/) with every agent's `git:` list, and the egress proxy routing the bottles' requests
                  for git.bottle.invalid to it. Up to date while the gate answers its health check and
                  the proxy's route points at it (no backend call); when no agent lists a repository,
                  while no gate runs.
held              the pushes held for review, with their commits.
approve --id ID   forward the held push's exact commit upstream (fast-forward only); refused when the
                  agent pushed that ref again since.
reject --id ID    drop the held push; nothing goes upstream.

provision_git:<agent> (tasks/provision.py) makes the bottle's mirrors from upstream with the host's own
credentials (so a wrong URL or credential fails that agent's launch, not its first clone) and points
the guest's git at the gate.
"""
from __future__ import annotations

import functools

from doit.tools import config_changed

from daemons.gate import review
from daemons.gate.engine import GateError, GitGate
from daemons.lifecycle import DaemonError
from daemons.proxy.engine import ProxyError
from tasks import egress
from tasks.backends import BottleError
from tasks.project import Project, action

REVIEW_ID = {'name': 'held_id', 'long': 'id', 'type': str, 'default': '',
             'help': 'the review id the agent was given when it pushed (`doit held` lists them)'}


def gate(project: Project) -> GitGate:
    return GitGate(project.state_dir / 'gate')


def bottles(project: Project) -> dict:
    """The gate's bottles file: each agent with a `git:` list, and its repositories."""
    return {agent.name: {'repos': [repo.gate_entry() for repo in agent.git]}
            for agent in project.agents.values() if agent.git}


class GateServing:
    """The gate answers its health check, and the proxy routes the gate's name to it."""

    def __init__(self, project: Project):
        self.project = project

    def __call__(self, task, values):
        try:
            served = gate(self.project)
            return served.healthy() and egress.proxy(self.project).service_route('gate') == _route(served)
        except Exception:       # whatever the reason, the action meets it again and says it
            return False

    def __repr__(self):
        return 'the project\'s git gate answers and the egress proxy routes git.bottle.invalid to it'


class GateStopped:
    def __init__(self, project: Project):
        self.project = project

    def __call__(self, task, values):
        return gate(self.project).daemon().pid() is None

    def __repr__(self):
        return 'no git gate runs for this project (no agent lists repositories under git:)'


def task(project: Project) -> dict:
    served = bottles(project)
    if not served:
        return {
            'doc': 'stop the project\'s git gate: no agent lists repositories under git:',
            'actions': [(close_gate, [project])],
            'uptodate': [GateStopped(project)],
        }
    return {
        'doc': f'run the project\'s git gate for {", ".join(sorted(served))} and route the bottles to it',
        'actions': [(open_gate, [project, served])],
        'uptodate': [config_changed(served), GateServing(project)],
        'clean': [(close_gate, [project])],
    }


def review_tasks(project: Project):
    yield {
        'basename': 'held',
        'doc': 'list the pushes the git gate holds for review, with their commits',
        'actions': [(show_held, [project])],
        'uptodate': [False],
        'verbosity': 2,
    }
    for decide, doc in ((approve, 'forward a held push upstream: exactly the commit the agent pushed'),
                        (reject, 'drop a held push; nothing goes upstream')):
        yield {
            'basename': decide.__name__,
            'doc': f'{doc} (doit {decide.__name__} --id ID)',
            'actions': [(decide, [project])],
            'params': [REVIEW_ID],
            'uptodate': [False],
            'verbosity': 2,
        }


def _route(served: GitGate) -> dict:
    return {'port': served.port(), 'key_file': str(served.key_file)}


def in_words(func):
    """The gate's errors say what to fix: they fail the task as they are."""
    @functools.wraps(func)
    def run(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except (GateError, review.ReviewError, DaemonError, ProxyError) as err:
            raise BottleError(str(err)) from None
    return run


@action
@in_words
def open_gate(project: Project, served: dict):
    running = gate(project)
    running.write_bottles(served)
    running.ensure_running()
    egress.proxy(project).route_service('gate', running.port(), running.key_file)


@in_words
def sync(project: Project, agent_name: str):
    gate(project).sync(agent_name)


@action
@in_words
def close_gate(project: Project):
    gate(project).stop()
    egress_proxy = egress.proxy(project)
    if egress_proxy.doors_file.exists():
        egress_proxy.route_service('gate', None, None)


@action
@in_words
def show_held(project: Project):
    pushes = review.held(gate(project).state_dir)
    if not pushes:
        print('held: no push waits for review')
        return
    state_dir = gate(project).state_dir
    for push in pushes:
        current = review.gate_ref(state_dir, push)
        newer = review.superseded_by(state_dir, push, current) if current != push.new else None
        print(f'{push.id}: {push.bottle} pushed {push.ref} of {push.repo}, {push.old[:12]}..{push.new[:12]} '
              f'at {push.time}' + (f' (superseded by {newer}: the agent pushed again)' if newer else ''))
        for commit in push.commits:
            print(f'    {commit}')
    print('approve one with `doit approve --id ID`, or drop it with `doit reject --id ID`')


def _needs_id(held_id: str, verb: str):
    if not held_id:
        raise BottleError(f'name the push: doit {verb} --id ID (`doit held` lists the ids)')


@action
@in_words
def approve(project: Project, held_id: str):
    _needs_id(held_id, 'approve')
    output = review.approve(gate(project).state_dir, held_id)
    print(f'approve: {held_id} forwarded upstream' + (f'\n{output.rstrip()}' if output.strip() else ''))


@action
@in_words
def reject(project: Project, held_id: str):
    _needs_id(held_id, 'reject')
    review.reject(gate(project).state_dir, held_id)
    print(f'reject: {held_id} dropped; nothing went upstream')
