"""The human's answers from the command line: what the supervisor's page does, and the git gate's review.

supervise                         the supervisor's page (its address carries your token: keep it to yourself)
                                  and the requests of the bottles that wait for an answer
held                              the pushes the git gate holds for review, with their commits
approve --id ID                   grant a request (a host joins the bottle's rules at once; a push goes
                                  upstream), or forward a held push by its review id
reject --id ID [--reason TEXT]    deny a request (the agent is told the reason), or drop a held push
answer --id ID --text TEXT        answer a question
revoke --agent NAME --host HOST   withdraw a host approved for a bottle

A held push the agent asked to have reviewed is decided through its request either way, so the agent
hears the answer. Decisions made here are recorded as made by your user name.
"""
from __future__ import annotations

import getpass

from daemons.gate import review
from daemons.supervise import requests
from daemons.supervise.store import SuperviseError, load_bottles
from tasks import gate, supervise
from tasks.errors import BottleError
from tasks.project import Project, action

PARAMS = {
    'id': {'name': 'decided_id', 'long': 'id', 'type': str, 'default': '',
           'help': 'a request id (`doit supervise` lists them) or a held push\'s review id (`doit held`)'},
    'reason': {'name': 'reason', 'long': 'reason', 'type': str, 'default': '',
               'help': 'why, told to the agent'},
    'text': {'name': 'text', 'long': 'text', 'type': str, 'default': '', 'help': 'the answer'},
    'agent': {'name': 'agent', 'long': 'agent', 'type': str, 'default': '', 'help': 'the bottle\'s agent'},
    'host': {'name': 'host', 'long': 'host', 'type': str, 'default': '', 'help': 'the approved host'},
}


def tasks(project: Project):
    commands = (
        (show_requests, 'supervise', 'Show the supervisor\'s page address and the requests waiting for you.', ()),
        (show_held, 'held', 'List the pushes the git gate holds for review, with their commits.', ()),
        (approve, 'approve', 'Grant a request, or forward a held push (doit approve --id ID).', ('id',)),
        (reject, 'reject', 'Deny a request, or drop a held push (doit reject --id ID [--reason TEXT]).',
         ('id', 'reason')),
        (answer, 'answer', 'Answer a question of an agent (doit answer --id ID --text TEXT).', ('id', 'text')),
        (revoke, 'revoke', 'Withdraw a host approved for a bottle (doit revoke --agent NAME --host HOST).',
         ('agent', 'host')),
    )
    for command, name, doc, params in commands:
        yield {
            'basename': name,
            'doc': doc,
            'actions': [(command, [project])],
            'params': [PARAMS[param] for param in params],
            'uptodate': [False],
            'verbosity': 2,
        }


def _state(project: Project):
    return supervise.supervisor(project).state_dir


def _by() -> str:
    return f'{getpass.getuser()} (command line)'


def _required(value: str, option: str, command: str):
    if not value:
        raise BottleError(f'{command} needs {option}: doit {command} {option} ... (`doit supervise` and `doit held` '
                          'list what waits)')


def _request_for(project: Project, decided_id: str) -> str | None:
    """The supervisor request `decided_id` names: itself, or the pending request about that held push."""
    state_dir = _state(project)
    if not state_dir.exists():
        return None
    if requests.get(state_dir, decided_id) is not None:
        return decided_id
    return next((r.id for r in requests.pending(state_dir)
                 if r.kind == 'push' and r.payload['review_id'] == decided_id), None)


def _is_held(project: Project, decided_id: str) -> bool:
    return any(item.id == decided_id for item in review.held(gate.gate(project).state_dir))


@action
def show_requests(project: Project):
    state_dir = _state(project)
    served = supervise.supervisor(project)
    if not load_bottles(state_dir)[1]:
        print('supervise: no agent is supervised (supervise: false everywhere)')
        return
    try:
        print(f'page: {served.page_url()}')
    except SuperviseError:
        print('page: the supervisor is not running; `doit supervisor` (or any launch) starts it')
    waiting = requests.pending(state_dir)
    if not waiting:
        print('supervise: no request waits for an answer')
        return
    for request in waiting:
        asked = request.payload
        what = {'egress': lambda: f'may it reach {asked["host"]}? because: {asked["reason"]}',
                'push': lambda: f'review push {asked["review_id"]}: {asked["ref"]} at {asked["new"][:12]} to '
                                f'{asked["repo"]}',
                'question': lambda: asked['question'] + (f' (one of: {", ".join(asked["choices"])})'
                                                         if asked['choices'] else '')}[request.kind]()
        print(f'{request.id}: {request.bottle} asks ({request.created}): {what}')
    print('decide with `doit approve --id ID`, `doit reject --id ID --reason TEXT` or '
          '`doit answer --id ID --text TEXT`')


@action
def show_held(project: Project):
    state_dir = gate.gate(project).state_dir
    pushes = review.held(state_dir)
    if not pushes:
        print('held: no push waits for review')
        return
    for push in pushes:
        current = review.gate_ref(state_dir, push)
        newer = review.superseded_by(state_dir, push, current) if current != push.new else None
        print(f'{push.id}: {push.bottle} pushed {push.ref} of {push.repo}, {push.old[:12]}..{push.new[:12]} '
              f'at {push.time}' + (f' (superseded by {newer}: the agent pushed again)' if newer else ''))
        for commit in push.commits:
            print(f'    {commit}')
    print('approve one with `doit approve --id ID`, or drop it with `doit reject --id ID`')


@action
def approve(project: Project, decided_id: str):
    def through_request(request_id: str):
        decided = requests.approve(_state(project), request_id, _by())
        print(f'approve: request {request_id} of {decided.bottle} approved')
        if decided.kind == 'push' and decided.answer and decided.answer.strip():
            print(decided.answer.rstrip())

    def held_push(state_dir):
        output = review.approve(state_dir, decided_id)
        print(f'approve: {decided_id} forwarded upstream' + (f'\n{output.rstrip()}' if output.strip() else ''))

    _decide(project, decided_id, 'approve', through_request, held_push)


@action
def reject(project: Project, decided_id: str, reason: str):
    def through_request(request_id: str):
        decided = requests.deny(_state(project), request_id, _by(), reason)
        print(f'reject: request {request_id} of {decided.bottle} denied'
              + ('; nothing went upstream' if decided.kind == 'push' else ''))

    def held_push(state_dir):
        review.reject(state_dir, decided_id)
        print(f'reject: {decided_id} dropped; nothing went upstream')

    _decide(project, decided_id, 'reject', through_request, held_push)


def _decide(project: Project, decided_id: str, command: str, through_request, held_push):
    """A request by its id, or the one about a held push; else the held push itself."""
    _required(decided_id, '--id', command)
    if request_id := _request_for(project, decided_id):
        through_request(request_id)
    elif _is_held(project, decided_id):
        held_push(gate.gate(project).state_dir)
    else:
        raise BottleError(f'no request or held push has the id {decided_id!r}; `doit supervise` lists the '
                          'requests, `doit held` the held pushes')


@action
def answer(project: Project, decided_id: str, text: str):
    _required(decided_id, '--id', 'answer')
    _required(text, '--text', 'answer')
    decided = requests.answer(_state(project), decided_id, _by(), text)
    print(f'answer: request {decided_id} of {decided.bottle} answered')


@action
def revoke(project: Project, agent: str, host: str):
    _required(agent, '--agent', 'revoke')
    _required(host, '--host', 'revoke')
    requests.revoke(_state(project), agent, host)
    print(f'revoke: {host} is no longer approved for {agent}: the proxy refuses it from the next request on, '
          '(one the manifest allows is back with its next launch)')
