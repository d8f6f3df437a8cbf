"""Requests from bottles and the human's decisions on them: what the MCP tools, the page and the command
line call. A decision takes effect here, whoever makes it: an approved host joins the bottle's rules,
an approved push goes upstream through the gate.

Every decision is bound to one request: it is made once (a decided request stays decided), recorded
with who made it ("page", or the OS user on the command line) and when. What an agent asks is checked
first (asked.py): a bottle has a bounded number of requests waiting, and the same thing asked again is
the request already waiting. What a decision granted is said from the stored request (`granted`).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from daemons.gate import review
from daemons.proxy import rules
from daemons.shown import host as shown_host
from daemons.shown import text as shown_text
from daemons.supervise import approved, asked
from daemons.supervise.store import (PENDING, Request, SuperviseError, connect, insert, load_bottles, now,
                                     row_request)

RECENT = 20             # decided requests shown besides the pending ones
ABANDONED_KEPT = 100    # abandoned requests kept per bottle (an agent can abandon as many as it likes)


def bottle_entry(state_dir: Path, bottle: str) -> dict:
    """What the supervisor knows of `bottle` (its rules, approved hosts, egress log, wait)."""
    entry = load_bottles(state_dir)[1].get(bottle)
    if entry is None:
        raise SuperviseError(f'bottle {bottle!r} is not served by this supervisor; relaunch it')
    return entry


def ask_egress(state_dir: Path, bottle: str, host: str, reason: str) -> Request:
    bottle_entry(state_dir, bottle)
    name = asked.host(host)
    try:
        rules.Rules.from_json({'hosts': [{'host': name}]})
    except rules.RulesError as err:
        raise SuperviseError(f'{name!r} cannot be allowed: {err}') from None
    return _insert(state_dir, bottle, 'egress', {'host': name, 'reason': asked.bounded('reason', reason,
                                                                                         asked.REASON_CHARS)}, ('host',))


def ask_push(state_dir: Path, bottle: str, review_id: str) -> Request:
    bottle_entry(state_dir, bottle)
    item = review.find(_gate(state_dir), review_id) if isinstance(review_id, str) else None
    if item is None or item.bottle != bottle:
        raise SuperviseError(f'no push of this bottle is held for review as {str(review_id)[:40]!r}; the id is the '
                             'one `git push` printed ("held for review as ...")')
    return _insert(state_dir, bottle, 'push', {'review_id': item.id, 'repo': item.repo, 'ref': item.ref,
                                               'new': item.new}, ('review_id',))


def ask_question(state_dir: Path, bottle: str, question: str, choices: list[str] | None) -> Request:
    bottle_entry(state_dir, bottle)
    return _insert(state_dir, bottle, 'question', {'question': asked.bounded('question', question,
                                                                              asked.QUESTION_CHARS),
                                                   'choices': asked.choices(choices)}, ('question', 'choices'))


def _insert(state_dir: Path, bottle: str, kind: str, payload: dict, same: tuple[str, ...]) -> Request:
    return insert(state_dir, bottle, kind, payload, same, asked.PENDING_PER_BOTTLE, asked.too_many)


def get(state_dir: Path, request_id: str, bottle: str | None = None) -> Request | None:
    """The request, or None when there is none by that id (of that bottle, when `bottle` is given)."""
    with connect(state_dir) as db:
        row = db.execute('SELECT * FROM requests WHERE id = ?', (request_id,)).fetchone()
    if row is None or (bottle is not None and row['bottle'] != bottle):
        return None
    return row_request(row)


def pending(state_dir: Path, bottle: str | None = None, offset: int = 0, limit: int = -1) -> list[Request]:
    """The requests waiting for the human, oldest first: `limit` of them from `offset` (all by default)."""
    with connect(state_dir) as db:
        rows = db.execute('SELECT * FROM requests WHERE state = ? AND (? IS NULL OR bottle = ?) ORDER BY created, id '
                          'LIMIT ? OFFSET ?', (PENDING, bottle, bottle, limit, offset)).fetchall()
    return [row_request(row) for row in rows]


def pending_count(state_dir: Path) -> dict[str, int]:
    """How many requests of each bottle wait for the human."""
    with connect(state_dir) as db:
        rows = db.execute('SELECT bottle, count(*) AS n FROM requests WHERE state = ? GROUP BY bottle',
                          (PENDING,)).fetchall()
    return {row['bottle']: row['n'] for row in rows}


def recent(state_dir: Path, bottle: str | None = None, limit: int = RECENT) -> list[Request]:
    """The `limit` last decided requests, newest first (abandoned ones are not decisions: left out)."""
    with connect(state_dir) as db:
        rows = db.execute("SELECT * FROM requests WHERE (? IS NULL OR bottle = ?) AND state NOT IN (?, 'abandoned') "
                          'ORDER BY created DESC, rowid DESC LIMIT ?', (bottle, bottle, PENDING, limit)).fetchall()
    return [row_request(row) for row in rows]


def approve(state_dir: Path, request_id: str, by: str) -> Request:
    """Grant a host or a push request, and make it take effect: the host is allowed for the bottle from
    its next request on, or the held commit goes upstream."""
    with _deciding(state_dir, request_id) as (db, request):
        if request.kind == 'egress':
            entry = bottle_entry(state_dir, request.bottle)
            approved.add(Path(entry['approved']), Path(entry['rules']), request.payload['host'])
            text = None
        elif request.kind == 'push':
            text = _forward_push(state_dir, request)
        else:
            raise SuperviseError(f'request {request_id} is a question: answer it instead')
        return _decide(db, request, 'approved', text, by)


def deny(state_dir: Path, request_id: str, by: str, reason: str = '') -> Request:
    """Refuse a request; the agent is told `reason`. A denied push is rejected at the gate: nothing goes
    upstream."""
    with _deciding(state_dir, request_id) as (db, request):
        if request.kind == 'push':
            gate = _gate(state_dir)
            try:
                review.reject(gate, request.payload['review_id'])
            except review.ReviewError:
                pass        # rejected or approved already by other means: nothing left to drop
        return _decide(db, request, 'denied', reason or 'no reason given', by)


def answer(state_dir: Path, request_id: str, by: str, text: str) -> Request:
    """Answer a question; with choices, `text` must be one of them."""
    with _deciding(state_dir, request_id) as (db, request):
        if request.kind != 'question':
            raise SuperviseError(f'request {request_id} asks for {request.kind}: approve or deny it')
        choices = request.payload.get('choices') or []
        if choices and text not in choices:
            raise SuperviseError(f'request {request_id} asks to choose one of {choices}, not {text!r}')
        if not text.strip():
            raise SuperviseError(f'the answer to request {request_id} is empty')
        return _decide(db, request, 'answered', text, by)


def deny_all(state_dir: Path, bottle: str, by: str, reason: str = '') -> list[Request]:
    """Deny every request of `bottle` that waits for the human; the denied ones."""
    bottle_entry(state_dir, bottle)
    denied = []
    for request in pending(state_dir, bottle):
        try:
            denied.append(deny(state_dir, request.id, by, reason))
        except SuperviseError:
            pass        # decided meanwhile by someone else
    return denied


def granted(request: Request) -> str:
    """What an approval granted, in words, from the stored request alone."""
    asked_for = request.payload
    if request.kind == 'egress':
        return (f'host {shown_host(asked_for["host"])} for bottle {request.bottle}, until revoked (doit revoke '
                f'--agent {request.bottle} --host {asked_for["host"]})')
    return (f'push of {shown_text(asked_for["ref"], 300)} at {asked_for["new"][:12]} to {asked_for["repo"]} for '
            f'bottle {request.bottle} (held push {asked_for["review_id"]})')


def abandon(state_dir: Path, request_id: str) -> None:
    """The call that asked went away (cancelled, disconnected): a still pending request is dropped, and of
    its bottle's abandoned requests only the ABANDONED_KEPT newest are kept."""
    with connect(state_dir) as db:
        db.execute("UPDATE requests SET state = 'abandoned', decided = ? WHERE id = ? AND state = ?",
                   (now(), request_id, PENDING))
        db.execute("DELETE FROM requests WHERE state = 'abandoned' AND bottle = (SELECT bottle FROM requests WHERE "
                   "id = ?) AND rowid NOT IN (SELECT rowid FROM requests WHERE state = 'abandoned' AND bottle = "
                   "(SELECT bottle FROM requests WHERE id = ?) ORDER BY rowid DESC LIMIT ?)",
                   (request_id, request_id, ABANDONED_KEPT))


def outcome(request: Request) -> str:
    """What the agent is told about its request."""
    by = f'request {request.id}, by {request.answered_by} at {request.decided}'
    if request.state == PENDING:
        return f'still pending as request {request.id}; call check_request later'
    if request.state == 'approved' and request.kind == 'egress':
        return f'approved: {request.payload["host"]} is allowed for this bottle from now on ({by})'
    if request.state == 'approved':
        return (f'approved: {request.payload["ref"]} at {request.payload["new"]} was pushed to '
                f'{request.payload["repo"]} ({by}). The upstream said:\n{request.answer}')
    if request.state == 'denied':
        return f'denied ({by}): {request.answer}'
    if request.state == 'answered':
        return f'answered ({by}): {request.answer}'
    return f'abandoned (request {request.id}): the call that asked went away before an answer; ask again if needed'


def report_status(state_dir: Path, bottle: str, text: str) -> None:
    bottle_entry(state_dir, bottle)
    text = asked.bounded('status', text, asked.STATUS_CHARS)
    with connect(state_dir) as db:
        db.execute('INSERT INTO statuses (bottle, time, text) VALUES (?, ?, ?)', (bottle, now(), text))
        db.execute('DELETE FROM statuses WHERE bottle = ? AND rowid NOT IN (SELECT rowid FROM statuses WHERE '
                   'bottle = ? ORDER BY rowid DESC LIMIT ?)', (bottle, bottle, asked.STATUSES_KEPT))


def statuses(state_dir: Path) -> dict[str, dict]:
    """Each bottle's latest status report: {"time", "text"}."""
    with connect(state_dir) as db:
        rows = db.execute('SELECT bottle, time, text FROM statuses WHERE rowid IN '
                          '(SELECT max(rowid) FROM statuses GROUP BY bottle)').fetchall()
    return {row['bottle']: {'time': row['time'], 'text': row['text']} for row in rows}


def revoke(state_dir: Path, bottle: str, host: str) -> None:
    """Withdraw an approved host: the proxy refuses it from the next request on (approved.remove)."""
    entry = bottle_entry(state_dir, bottle)
    approved.remove(Path(entry['approved']), Path(entry['rules']), host, bottle)


def _forward_push(state_dir: Path, request: Request) -> str:
    """The held push goes upstream, if it is still the very commit the request was made for."""
    review_id = request.payload['review_id']
    item = _held(state_dir, review_id)
    if item is None:
        raise SuperviseError(f'push {review_id} of request {request.id} is no longer held for review (approved '
                             'or rejected from the command line?); deny the request')
    if item.new != request.payload['new']:
        raise SuperviseError(f'held push {review_id} is now at {item.new}, not {request.payload["new"]} as in '
                             f'request {request.id}; deny it')
    try:
        return review.approve(_gate(state_dir), review_id)
    except review.ReviewError as err:
        raise SuperviseError(str(err)) from None


def _gate(state_dir: Path) -> Path:
    gate = load_bottles(state_dir)[0]
    if gate is None:
        raise SuperviseError('the supervisor knows no git gate, so it cannot review pushes; relaunch the bottles')
    return gate


def _held(state_dir: Path, review_id: str) -> review.Held | None:
    return review.find(_gate(state_dir), review_id)


@contextmanager
def _deciding(state_dir: Path, request_id: str) -> Iterator[tuple]:
    """The pending request, in a write transaction: of two decisions at once, the second finds it decided.
    An error inside rolls back and leaves the request pending."""
    with connect(state_dir) as db:
        db.execute('BEGIN IMMEDIATE')
        try:
            row = db.execute('SELECT * FROM requests WHERE id = ?', (request_id,)).fetchone()
            if row is None:
                raise SuperviseError(f'there is no request {request_id!r}; the page and `pending` list them')
            request = row_request(row)
            if request.state != PENDING:
                raise SuperviseError(f'request {request_id} is {request.state} already (by {request.answered_by} '
                                     f'at {request.decided}); a request is decided once')
            yield db, request
            db.execute('COMMIT')
        except BaseException:
            db.execute('ROLLBACK')
            raise


def _decide(db, request: Request, state: str, text: str | None, by: str) -> Request:
    decided = now()
    db.execute('UPDATE requests SET state = ?, answer = ?, answered_by = ?, decided = ? WHERE id = ?',
               (state, text, by, decided, request.id))
    return Request(request.id, request.bottle, request.kind, request.payload, state, text, by, request.created,
                   decided)
