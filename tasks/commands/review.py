"""The human's answers from the command line: what the supervisor's page does, and the git gate's review.

supervise                         the supervisor's page (its address carries your token: keep it to yourself)
                                  and the requests of the bottles that wait for an answer
held [--id ID [--diff]]           the pushes the git gate holds for review: how many commits, the newest of
                                  them, the files changed with their line counts; --diff the whole change
approve --id ID                   grant a request (a host joins the bottle's rules at once; a push goes
                                  upstream), or forward a held push by its review id; says what was granted
reject --id ID [--reason TEXT]    deny a request (the agent is told the reason), or drop a held push
reject --agent NAME --all         deny every request of that bottle that waits
answer --id ID --text TEXT        answer a question
revoke --agent NAME --host HOST   withdraw a host approved for a bottle

A held push the agent asked to have reviewed is decided through its request either way, so the agent
hears the answer. Decisions made here are recorded as made by your user name. Everything the guest wrote
(a reason, a question, a commit subject, a file name) is printed through daemons/shown.py: one labelled
line per field, nothing that moves the cursor or starts a line, long texts cut with a count.
"""
from __future__ import annotations

import getpass

from daemons import shown
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
    'held_id': {'name': 'held_id', 'long': 'id', 'type': str, 'default': '',
                'help': 'only this held push (its review id), with every commit kept'},
    'diff': {'name': 'diff', 'long': 'diff', 'type': bool, 'default': False,
             'help': 'with --id: the whole change of the push against its base'},
    'all': {'name': 'every', 'long': 'all', 'type': bool, 'default': False,
            'help': 'with --agent: deny every request of that bottle that waits'},
}


def tasks(project: Project):
    commands = (
        (show_requests, 'supervise', 'Show the supervisor\'s page address and the requests waiting for you.', ()),
        (show_held, 'held', 'List the pushes the git gate holds for review (doit held [--id ID [--diff]]).',
         ('held_id', 'diff')),
        (approve, 'approve', 'Grant a request, or forward a held push (doit approve --id ID).', ('id',)),
        (reject, 'reject', 'Deny a request, or drop a held push (doit reject --id ID [--reason TEXT]); every '
                           'waiting request of a bottle (doit reject --agent NAME --all).', ('id', 'reason', 'agent', 'all')),
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
    return review.find(gate.gate(project).state_dir, decided_id) is not None


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
    print(f'supervise: {len(waiting)} request(s) wait for an answer, oldest first')
    gate_state = gate.gate(project).state_dir
    for request in waiting:
        for line in _request_lines(request, gate_state):
            print(line)
    print('decide with `doit approve --id ID`, `doit reject --id ID --reason TEXT` or '
          '`doit answer --id ID --text TEXT`; deny all of a bottle with `doit reject --agent NAME --all`')


def _request_lines(request, gate_state) -> list[str]:
    """A waiting request as labelled lines, what the guest wrote through shown."""
    asked = request.payload
    head = {'egress': 'asks to reach a host', 'push': 'asks to have a held push reviewed',
            'question': 'asks a question'}[request.kind]
    said = [f'request {request.id}: {request.bottle} {head} ({request.created})']
    if request.kind == 'egress':
        said += [f'    host: {shown.host(asked["host"])}', shown.field('reason', asked['reason'])]
    elif request.kind == 'question':
        said.append(shown.field('question', asked['question'], 2000))
        said += [shown.field(f'choice {n}', choice, 100) for n, choice in enumerate(asked['choices'], 1)]
    else:
        item = review.find(gate_state, asked['review_id'])
        said += _push_lines(item, 20) if item else [
            f'    held push {asked["review_id"]}: no longer held (approved or rejected by other means); deny it']
    return said


def _push_lines(push: review.Held, commits: int) -> list[str]:
    """What a held push adds, as the gate computed it: the count, the newest `commits` commits (and how many
    more), the files with their line counts against the base."""
    said = [shown.field('held push', push.id), shown.field('ref', push.ref), shown.field('repository', push.repo),
            f'    commits: {push.old[:12] if push.old.strip("0") else "(a new ref)"}..{push.new[:12]}, '
            f'{push.count} new to the upstream']
    listed = push.commits[:commits]
    said += [f'      {shown.text(commit, 250)}' for commit in listed]
    if push.count > len(listed):
        said.append(f'      ... {push.count - len(listed)} more commit(s) not shown (doit held --id {push.id} '
                    'shows the newest 50, --diff the whole change)')
    total = len(push.files) + push.files_more
    said.append(f'    files changed: {total}, +{push.added} -{push.deleted} lines against '
                f'{"nothing (a history of its own)" if push.base == review.EMPTY_TREE else push.base[:12]}')
    if push.note:
        said.append(shown.field('note', push.note, 1000))
    for path, added, deleted, *kind in push.files:
        counts = 'binary' if added is None else f'+{added} -{deleted}'
        said.append(f'      {counts:>14}  {shown.text(path, 300)}' + (f' ({kind[0]})' if kind and kind[0] else ''))
    if push.files_more:
        said.append(f'      ... {push.files_more} more file(s) not shown (doit held --id {push.id} --diff)')
    return said


@action
def show_held(project: Project, held_id: str, diff: bool):
    state_dir = gate.gate(project).state_dir
    if diff and not held_id:
        raise BottleError('held --diff needs --id: doit held --id ID --diff (`doit held` lists the ids)')
    if held_id:
        push = review.find(state_dir, held_id)
        if push is None:
            raise BottleError(f"no push is held for review as '{shown.text(held_id, 40)}'; `doit held` lists them")
        pushes = [push]
    else:
        pushes = review.held(state_dir)
    if not pushes:
        print('held: no push waits for review')
        return
    for push in pushes:
        current = review.gate_ref(state_dir, push)
        newer = review.superseded_by(state_dir, push, current) if current != push.new else None
        print(f'held push {push.id}: {push.bottle} pushed at {push.time}'
              + (f' (superseded by {newer}: the agent pushed again)' if newer else ''))
        for line in _push_lines(push, review.COMMITS_KEPT if held_id else 10):
            print(line)
        if diff:
            print('    the whole change:')
            for line in shown.lines(review.diff(state_dir, push)):
                print(f'    | {line}')
    print('approve one with `doit approve --id ID`, or drop it with `doit reject --id ID`'
          + ('' if diff else '; `doit held --id ID --diff` shows the whole change'))


@action
def approve(project: Project, decided_id: str):
    def through_request(request_id: str):
        decided = requests.approve(_state(project), request_id, _by())
        print(f'approve: request {request_id} granted: {requests.granted(decided)}')
        if decided.kind == 'push' and decided.answer and decided.answer.strip():
            _upstream_said(decided.answer)

    def held_push(state_dir):
        push = review.find(state_dir, decided_id)
        output = review.approve(state_dir, decided_id)
        print(f'approve: held push {decided_id} granted: {shown.text(push.ref, 300)} at {push.new[:12]} to '
              f'{push.repo} for bottle {push.bottle}, forwarded upstream')
        _upstream_said(output)

    _decide(project, decided_id, 'approve', through_request, held_push)


def _upstream_said(output: str) -> None:
    if output.strip():
        print('the upstream said:')
        for line in shown.lines(output.strip()):
            print(f'    | {line}')


@action
def reject(project: Project, decided_id: str, reason: str, agent: str, every: bool):
    if every or agent:
        if not (every and agent) or decided_id:
            raise BottleError('to deny every waiting request of a bottle: doit reject --agent NAME --all (without '
                              '--id); one request: doit reject --id ID')
        denied = requests.deny_all(_state(project), agent, _by(), reason)
        print(f'reject: {len(denied)} waiting request(s) of {agent} denied'
              + (f': {", ".join(one.id for one in denied)}' if denied else ''))
        return

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
        raise BottleError(f"no request or held push has the id '{shown.text(decided_id, 40)}'; `doit supervise` "
                          'lists the requests, `doit held` the held pushes')


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
