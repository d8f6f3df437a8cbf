"""The supervisor's state directory, shared by the daemon, the page and the command line:

    <state_dir>/
        key                  the secret only the egress proxy sends along (0600)
        page-token           the user's token for the page and its API (0600)
        bottles.json         {"gate": <gate state dir> | null, "bottles": {<bottle>: {"rules", "approved",
                             "log", "wait_seconds"}}}: what the server serves, read on each use
        supervise.json       {"port", "page_port", "pid"} of the running daemon, written by it (0600)
        supervise.pid, .log  the daemon (daemons.lifecycle)
        requests.db          sqlite: every request and its answer, and the bottles' status reports

sqlite in WAL mode lets the daemon's waiting tools read while the page or the command line (another
process) decides; a decision is one write transaction, so two deciders never both win.
"""
from __future__ import annotations

import json
import secrets
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

BUSY_SECONDS = 120.0    # a decision holds the write lock while it forwards a push upstream
SCHEMA = '''
CREATE TABLE IF NOT EXISTS requests (
    id TEXT PRIMARY KEY, bottle TEXT NOT NULL, kind TEXT NOT NULL, payload TEXT NOT NULL,
    state TEXT NOT NULL, answer TEXT, answered_by TEXT, created TEXT NOT NULL, decided TEXT);
CREATE INDEX IF NOT EXISTS requests_by_bottle ON requests (bottle, created);
CREATE TABLE IF NOT EXISTS statuses (bottle TEXT NOT NULL, time TEXT NOT NULL, text TEXT NOT NULL);
'''
KINDS = ('egress', 'push', 'question')
TOOLS = ('request_egress', 'request_push_review', 'ask_human', 'report_status', 'check_request')
PENDING = 'pending'


class SuperviseError(Exception):
    """Something about the supervisor a person (or the agent) has to fix; the message says what and how."""


@dataclass(frozen=True)
class Request:
    id: str
    bottle: str
    kind: str               # one of KINDS
    payload: dict           # egress: {host, reason}; push: {review_id, repo, ref, new, commits};
                            # question: {question, choices}
    state: str              # pending, approved, denied, answered, abandoned
    answer: str | None      # the human's answer text, or the reason of a denial
    answered_by: str | None
    created: str
    decided: str | None

    def to_json(self) -> dict:
        return {'id': self.id, 'bottle': self.bottle, 'kind': self.kind, **self.payload, 'state': self.state,
                'answer': self.answer, 'answered_by': self.answered_by, 'created': self.created,
                'decided': self.decided}


def db_file(state_dir: Path) -> Path:
    return Path(state_dir) / 'requests.db'


def bottles_file(state_dir: Path) -> Path:
    return Path(state_dir) / 'bottles.json'


@contextmanager
def connect(state_dir: Path):
    """The request database, made if missing, closed at the end. Autocommit: each statement is its own
    transaction unless a `BEGIN IMMEDIATE` groups some."""
    Path(state_dir).mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(db_file(state_dir), timeout=BUSY_SECONDS, isolation_level=None)
    try:
        db.row_factory = sqlite3.Row
        db.execute('PRAGMA journal_mode=WAL')
        db.executescript(SCHEMA)
        yield db
    finally:
        db.close()


def load_bottles(state_dir: Path) -> tuple[Path | None, dict[str, dict]]:
    """(the gate's state directory or None, the bottles) from bottles.json; none served when it is missing."""
    path = bottles_file(state_dir)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None, {}
    except (OSError, ValueError) as err:
        raise SuperviseError(f'{path} is not the supervisor\'s bottles file ({err}); relaunch the bottles') from None
    return (Path(data['gate']) if data.get('gate') else None), data.get('bottles', {})


def row_request(row: sqlite3.Row) -> Request:
    return Request(row['id'], row['bottle'], row['kind'], json.loads(row['payload']), row['state'], row['answer'],
                   row['answered_by'], row['created'], row['decided'])


def insert(state_dir: Path, bottle: str, kind: str, payload: dict, same: tuple[str, ...], cap: int,
           too_many) -> Request:
    """A new pending request, or the bottle's pending request of that kind whose payload has the same values
    under the keys `same` (asked again: the caller waits for that one). Past `cap` pending requests of the
    bottle, the exception `too_many(pending)`. One write transaction: two calls at once cannot both pass the
    cap or both make the same request."""
    with connect(state_dir) as db:
        db.execute('BEGIN IMMEDIATE')
        try:
            rows = db.execute('SELECT * FROM requests WHERE bottle = ? AND state = ? ORDER BY created, id',
                              (bottle, PENDING)).fetchall()
            for row in rows:
                earlier = row_request(row)
                if earlier.kind == kind and all(earlier.payload.get(key) == payload.get(key) for key in same):
                    db.execute('COMMIT')
                    return earlier
            if len(rows) >= cap:
                raise too_many(len(rows))
            request = Request(secrets.token_hex(4), bottle, kind, payload, PENDING, None, None, now(), None)
            db.execute('INSERT INTO requests (id, bottle, kind, payload, state, created) VALUES (?, ?, ?, ?, ?, ?)',
                       (request.id, bottle, kind, json.dumps(payload), PENDING, request.created))
            db.execute('COMMIT')
            return request
        except BaseException:
            if db.in_transaction:
                db.execute('ROLLBACK')
            raise


def now() -> str:
    return time.strftime('%Y-%m-%dT%H:%M:%S%z')
