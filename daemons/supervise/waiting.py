"""The tool calls that wait for the human, and what wakes them: the decision.

A decision made in the daemon (the page) wakes the calls waiting on that request at once (`woken`). A
decision made in another process (the command line) is one committed write to requests.db: one watcher
thread for the whole daemon asks sqlite whether anything was committed (`PRAGMA data_version`, one cheap
statement, and only while some call waits), and only then reads the states of the requests waited on. No
waiting call reads the database on its own, however many wait.

A request two calls wait on (the same question asked twice) is abandoned only when the last of them goes.
"""
from __future__ import annotations

import asyncio
import sys
import threading
from pathlib import Path

from daemons.supervise.store import PENDING, connect

WATCH_SECONDS = 0.25        # how soon a decision taken in another process wakes its calls


class Waiters:
    def __init__(self, state_dir: Path):
        self.state_dir = Path(state_dir)
        self._lock = threading.Lock()
        self._waiting: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Event, int]] = {}
        self._someone = threading.Event()
        self._watcher: threading.Thread | None = None

    def join(self, request_id: str) -> asyncio.Event:
        """A call starts waiting on the request: the event is set when it is decided. Join before reading the
        request's state, so that a decision after that read is never missed."""
        loop = asyncio.get_running_loop()
        with self._lock:
            _, event, count = self._waiting.get(request_id, (loop, asyncio.Event(), 0))
            self._waiting[request_id] = (loop, event, count + 1)
            self._someone.set()
            if self._watcher is None:
                self._watcher = threading.Thread(target=self._watch, name='supervise-waiters', daemon=True)
                self._watcher.start()
        return event

    def leave(self, request_id: str) -> bool:
        """A call stops waiting on the request; True when it was the last one."""
        with self._lock:
            loop, event, count = self._waiting.get(request_id, (None, None, 1))
            if count <= 1:
                self._waiting.pop(request_id, None)
                if not self._waiting:
                    self._someone.clear()
                return True
            self._waiting[request_id] = (loop, event, count - 1)
            return False

    def woken(self, request_id: str) -> None:
        """The request was decided: wake every call waiting on it."""
        with self._lock:
            found = self._waiting.get(request_id)
        if found:
            loop, event, _ = found
            loop.call_soon_threadsafe(event.set)

    def _watch(self) -> None:
        """Forever: a database it cannot read (for a while) is said in the daemon's log and tried again; the
        calls meanwhile still end at their bound."""
        while True:
            try:
                self._watch_once()
            except Exception as err:        # noqa: BLE001: the watcher must outlive any one failure
                print(f'supervise: the watcher of waiting calls failed ({err}); again in 1 s', file=sys.stderr,
                      flush=True)
                threading.Event().wait(1.0)

    def _watch_once(self) -> None:
        with connect(self.state_dir) as db:
            seen = None
            while True:
                self._someone.wait()
                version = db.execute('PRAGMA data_version').fetchone()[0]
                if version != seen:
                    seen = version
                    with self._lock:
                        ids = list(self._waiting)
                    for start in range(0, len(ids), 500):       # sqlite's bound on a statement's variables
                        chunk = ids[start:start + 500]
                        marks = ','.join('?' * len(chunk))
                        for (request_id,) in db.execute(f'SELECT id FROM requests WHERE id IN ({marks}) AND state != ?',
                                                        (*chunk, PENDING)).fetchall():
                            self.woken(request_id)
                threading.Event().wait(WATCH_SECONDS)
