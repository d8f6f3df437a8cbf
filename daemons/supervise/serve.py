"""The supervisor daemon: the MCP server the agents ask (the official `mcp` SDK, streamable HTTP) and the
page where the human answers, in one uvicorn process on two ports.

    python -P -m daemons.supervise.serve STATE_DIR

It binds 127.0.0.1 on two ports the kernel picks and records them in STATE_DIR/supervise.json. The MCP
port takes only requests with the key (STATE_DIR/key), which the egress proxy adds along with the
bottle's name: that header is the only source of which bottle asks. The page port takes only requests
with the user's token (STATE_DIR/page-token). Requests live in sqlite (store.py), so a restart loses none.
The daemon's environment is the host's: an approved push goes upstream with its credentials.

What an agent reads (a tool's answer or error) names no host path, pid or port: an error that names a host
file goes to the daemon's log whole and to the agent with the path left out (told_to_agent). The daemon's
stdout and stderr (supervise.log) are bounded (logbound.bound_output): an agent's calls can make it print.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import os
import re
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import uvicorn
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError

from daemons.atomic import write_atomic
from daemons.proxy import logbound
from daemons.proxy.rules import BOTTLE_HEADER, LISTEN_HOST, SUPERVISE_KEY_HEADER
from daemons.proxy.statedir import exit_when_gone
from daemons.supervise import requests
from daemons.supervise.page import page_app
from daemons.supervise.store import PENDING, Request, SuperviseError
from daemons.supervise.waiting import Waiters

PROGRESS_SECONDS = 10.0     # Claude Code cuts a call that sends nothing for 300 s; tell it we live well before
INSTRUCTIONS = """\
You run in a bottle: a sandbox whose network reaches only allowed hosts, and whose git pushes may be held
for review. A human on the host answers through these tools.
- request_egress: when a request fails because its host is not allowed (the proxy's 403 says so), ask
  for that host (one name; an international name in punycode) with the reason you need it. Once
  approved, retry: it passes at once.
- request_push_review: when `git push` says it is held for review as an id, ask for that review.
- ask_human: when only the human can decide (a choice, a credential you must not guess, a goal that
  is unclear). Give choices when the answer is one of a few.
- report_status: tell the human what you are doing at milestones; it returns at once.
- check_request: a call that waited long returns "still pending as request R"; keep working on
  something else if you can, and call check_request(R) later for the answer.
A bottle has at most a few requests waiting at once; asking the same thing again waits for the request
already made.
"""


def mcp_server(state_dir: Path, waiters: Waiters) -> MCPServer:
    server = MCPServer('supervise', instructions=INSTRUCTIONS, log_level='WARNING')
    # The answers are sentences for the model: as plain text, not wrapped in a {"result": ...} structure.
    tool = server.tool(structured_output=False)

    @tool
    async def request_egress(host: str, reason: str, ctx: Context) -> str:
        """Ask the human to allow this bottle to reach `host` (a name such as pypi.org; no scheme, port or
        path), saying why. Waits for the answer; "approved" means the host is reachable now."""
        with told_to_agent():
            request = await asyncio.to_thread(requests.ask_egress, state_dir, bottle_of(ctx), host, reason)
            return await wait(ctx, state_dir, waiters, request)

    @tool
    async def request_push_review(review_id: str, ctx: Context) -> str:
        """Ask the human to review a push the git gate holds (the id `git push` printed). Waits for the
        answer; "approved" means that exact commit was pushed upstream."""
        with told_to_agent():
            request = await asyncio.to_thread(requests.ask_push, state_dir, bottle_of(ctx), review_id)
            return await wait(ctx, state_dir, waiters, request)

    @tool
    async def ask_human(question: str, ctx: Context, choices: list[str] | None = None) -> str:
        """Ask the human a question; with `choices`, the answer is one of them. Waits for the answer."""
        with told_to_agent():
            request = await asyncio.to_thread(requests.ask_question, state_dir, bottle_of(ctx), question, choices)
            return await wait(ctx, state_dir, waiters, request)

    @tool
    async def report_status(text: str, ctx: Context) -> str:
        """Tell the human what you are doing; shown on their page. Returns at once."""
        with told_to_agent():
            await asyncio.to_thread(requests.report_status, state_dir, bottle_of(ctx), text)
            return 'recorded'

    @tool
    async def check_request(request_id: str, ctx: Context) -> str:
        """The state of one of your requests now (and its answer, once there is one). Returns at once."""
        with told_to_agent():
            request = await asyncio.to_thread(requests.get, state_dir, request_id, bottle_of(ctx))
            if request is None:
                raise SuperviseError(f'this bottle has no request {request_id!r}')
            return requests.outcome(request)

    return server


# An absolute path on the host as the supervisor's errors name one: a slash at the start or after a space, quote
# or parenthesis (so not the slashes of a URL the agent sent), then at least two parts.
HOST_PATH = re.compile(r'(?<![^\s\'"(])/[^\s\'"/]+(?:/[^\s\'"/]+)+/?')
HIDDEN_PATH = '(a file on the host)'


@contextmanager
def told_to_agent():
    """A SuperviseError reaches the agent as the tool's error text (the SDK hides other exceptions), without the
    host paths it names (the agent has no use for them: a person on the host fixes such a file); the whole
    error goes to the daemon's log."""
    try:
        yield
    except SuperviseError as err:
        told = HOST_PATH.sub(HIDDEN_PATH, str(err))
        if told != str(err):
            print(f'told an agent: {err}', file=sys.stderr, flush=True)
        raise ToolError(told) from None


def bottle_of(ctx: Context) -> str:
    bottle = (ctx.headers or {}).get(BOTTLE_HEADER, '')
    if not bottle:
        raise SuperviseError('no bottle named in the request: the supervisor is reached only through the bottle\'s '
                             'egress proxy')
    return bottle


async def wait(ctx: Context, state_dir: Path, waiters: Waiters, request: Request) -> str:
    """Wait for the human's decision up to the bottle's bound, with progress every PROGRESS_SECONDS;
    then the answer, or "still pending" (a normal answer: the agent checks later). The decision wakes the
    call (waiting.py); a call that goes away meanwhile leaves its request abandoned, unless another call
    waits on it too."""
    limit = float(requests.bottle_entry(state_dir, request.bottle)['wait_seconds'])
    started = time.monotonic()
    decided = waiters.join(request.id)
    cancelled = False
    try:
        current = await asyncio.to_thread(requests.get, state_dir, request.id)     # decided before the join?
        while current.state == PENDING:
            elapsed = time.monotonic() - started
            if elapsed >= limit:
                break
            await ctx.report_progress(round(elapsed), limit, f'waiting for the human to answer request '
                                                             f'{request.id} on the host')
            try:
                await asyncio.wait_for(decided.wait(), timeout=min(PROGRESS_SECONDS, limit - elapsed))
            except TimeoutError:
                continue
            current = await asyncio.to_thread(requests.get, state_dir, request.id)
        if current.state == PENDING:
            current = await asyncio.to_thread(requests.get, state_dir, request.id)
        return requests.outcome(current)
    except asyncio.CancelledError:
        cancelled = True
        raise
    finally:
        if waiters.leave(request.id) and cancelled:
            requests.abandon(state_dir, request.id)


class KeyRequired:
    """Only the egress proxy, which holds the key, speaks to the MCP app."""

    def __init__(self, app, key: str):
        self.app = app
        self.key = key.encode()

    async def __call__(self, scope, receive, send):
        if scope['type'] == 'http':
            headers = dict(scope['headers'])
            if not hmac.compare_digest(headers.get(SUPERVISE_KEY_HEADER.lower().encode(), b''), self.key):
                body = b'supervise: refused: only the egress proxy may speak to the supervisor\n'
                await send({'type': 'http.response.start', 'status': 403,
                            'headers': [(b'content-type', b'text/plain; charset=utf-8'),
                                        (b'content-length', str(len(body)).encode())]})
                return await send({'type': 'http.response.body', 'body': body})
        await self.app(scope, receive, send)


class ByPort:
    """One uvicorn server for both listeners: a request goes to the app of the port it came in on."""

    def __init__(self, mcp_app, page, page_port: int):
        self.mcp_app = mcp_app
        self.page = page
        self.page_port = page_port

    async def __call__(self, scope, receive, send):
        if scope['type'] != 'lifespan' and scope['server'][1] == self.page_port:
            return await self.page(scope, receive, send)
        await self.mcp_app(scope, receive, send)     # its lifespan runs the MCP session manager


def listen() -> socket.socket:
    listener = socket.socket()
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    listener.bind((LISTEN_HOST, 0))
    listener.listen(128)
    return listener


def main(argv: list[str]) -> int:
    logbound.bound_output()     # first: uvicorn's log handlers take the bounded sys.stderr
    state_dir = Path(argv[1]).resolve()
    exit_when_gone(state_dir)       # the checkout deleted: the supervisor goes too
    key = (state_dir / 'key').read_text().strip()
    token = (state_dir / 'page-token').read_text().strip()
    mcp_listener, page_listener = listen(), listen()
    page_port = page_listener.getsockname()[1]
    # Stateless: each call stands alone, so a restarted daemon serves clients of the old one.
    waiters = Waiters(state_dir)
    mcp_app = mcp_server(state_dir, waiters).streamable_http_app(stateless_http=True, host=LISTEN_HOST)
    app = ByPort(KeyRequired(mcp_app, key), page_app(state_dir, token, page_port, waiters), page_port)
    write_atomic(state_dir / 'supervise.json', json.dumps({'port': mcp_listener.getsockname()[1],
                                                           'page_port': page_port, 'pid': os.getpid()}) + '\n',
                 mode=0o600)
    config = uvicorn.Config(app, lifespan='on', access_log=False, log_level='warning', timeout_graceful_shutdown=3)
    uvicorn.Server(config).run(sockets=[mcp_listener, page_listener])
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv))
