"""The git gate daemon: git's smart HTTP, by `git http-backend`, behind a plain ASGI app under uvicorn.

    python -P -m daemons.gate.serve STATE_DIR

It binds 127.0.0.1 on a port the kernel picks and records it in STATE_DIR/gate.json (0600), with its pid and
a random number drawn at this start, its `instance`. Only the egress proxy speaks to it: every request carries
the key (STATE_DIR/key) and the bottle's name, which the proxy sets. A bottle reaches only its own mirrors
(store.py), and only for clone, fetch and push.

A guest reaches every answer, /health included (through the proxy, which adds the key): so /health tells the
instance, which proves to the host's probe that the recorded process answers and tells the guest nothing, and
no answer carries a host path (the state directory is named `the gate` in git's errors); the whole error
goes to the daemon's log. The daemon's own environment is the host's: host-side git commands run with it
(upstream.py). Its stdout and stderr (gate.log) are bounded (logbound.bound_output): a guest makes it print.

A slow upstream holds up only requests for its own mirrors. Commands against upstreams run in threads of
the gate's own (UPSTREAM_THREADS, not asyncio's default executor, which has cpus + 4), each ended within
upstream.Bounds. A mirror serves one push or refresh at a time: the others wait for their turn in the
event loop, not in a thread, and at most Bounds.busy seconds; then they are told the repository is busy.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import math
import os
import re
import secrets
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

import uvicorn

from daemons.atomic import write_atomic
from daemons.gate.config import BottlesError, Repo, load_bottles
from daemons.gate.store import LockTimeout, mirror_dir, mirror_lock
from daemons.gate.upstream import (Bounds, UpstreamError, UpstreamTimeout, end_all, end_on_sigterm, host_env,
                                   update_mirror)
from daemons.proxy import logbound
from daemons.proxy.rules import BOTTLE_HEADER, GATE_KEY_HEADER, LISTEN_HOST
from daemons.proxy.statedir import exit_when_gone

HOOKS = Path(__file__).resolve().parent / 'hooks'
READ_BYTES = 65536
# Threads for what blocks: commands against upstreams and waits for another process's lock of a mirror, at
# most one per mirror at a time (Gate.turn). More mirrors than this at work at once wait for a thread.
UPSTREAM_THREADS = 64
# (method, what follows the repository in the path, query): what a request is for. Nothing else is
# served: no dumb HTTP, no other files of the mirror.
GIT_ROUTES = {
    ('GET', '/info/refs', 'service=git-upload-pack'): 'fetch-refs',
    ('POST', '/git-upload-pack', ''): 'fetch',
    ('GET', '/info/refs', 'service=git-receive-pack'): 'push-refs',
    ('POST', '/git-receive-pack', ''): 'push',
}


INSTANCE_BITS = 63     # the instance is a whole number, as every value of the record (service.KeyedService)


class Gate:
    def __init__(self, state_dir: Path, key: str, environ: dict[str, str], instance: int):
        self.state_dir = state_dir
        self.key = key.encode()
        self.instance = instance
        self.host_env = host_env(environ)
        self.bounds = Bounds.from_env(self.host_env)
        self.refreshed: dict[Path, float] = {}    # mirror -> when its last good refresh started (monotonic)
        self.turns: dict[Path, asyncio.Lock] = {}     # mirror -> its turn among this daemon's requests
        self.threads = ThreadPoolExecutor(UPSTREAM_THREADS, thread_name_prefix='upstream')

    async def __call__(self, scope, receive, send):
        if scope['type'] != 'http':
            return
        headers = {name.decode('latin-1').lower(): value.decode('latin-1') for name, value in scope['headers']}
        if not hmac.compare_digest(headers.get(GATE_KEY_HEADER.lower(), '').encode(), self.key):
            return await answer(send, 403, 'gate: refused: only the egress proxy may speak to the git gate')
        if scope['path'] == '/health':
            return await answer(send, 200, json.dumps({'instance': self.instance}), 'application/json')
        bottle = headers.get(BOTTLE_HEADER.lower(), '')
        try:
            repos = load_bottles(self.state_dir / 'bottles.json').get(bottle)
        except BottlesError as err:
            print(f'bottle {bottle}: {err}', file=sys.stderr, flush=True)
            return await answer(send, 500, 'gate: the git gate cannot read what it serves (see its log on the '
                                           'host); launching the agent again writes it anew')
        if repos is None:
            return await answer(send, 404, f'gate: bottle {bottle!r} has no repositories at the gate: its '
                                           'manifest has no git: list')
        found = route(repos, scope['path'])
        if not found:
            asked = re.sub(r'(\.git)?/(info/refs|git-upload-pack|git-receive-pack)$', '', scope['path'].strip('/'))
            return await answer(send, 404, f'gate: {asked} is not a repository of bottle {bottle}: it is not in '
                                           'the git: list of its manifest')
        repo, rest = found
        service = GIT_ROUTES.get((scope['method'], rest, scope['query_string'].decode('latin-1')))
        if not service:
            return await answer(send, 404, 'gate: the git gate serves git clone, fetch and push only')
        mirror = mirror_dir(self.state_dir, bottle, repo.path)
        try:
            if service == 'fetch-refs' or not mirror.is_dir():
                asked = time.monotonic()
                async with self.turn(mirror, repo):
                    await asyncio.get_running_loop().run_in_executor(self.threads, self._refresh, mirror, repo,
                                                                     asked)
            elif service == 'push-refs':
                async with self.turn(mirror, repo):     # told here, where git shows the agent the answer
                    pass
            env = self._cgi_env(scope, headers, bottle, repo, rest)
            if service == 'push':
                async with self.turn(mirror, repo):
                    await self._cgi(env, receive, send)
            else:
                await self._cgi(env, receive, send)
        except UpstreamTimeout as err:
            print(f'bottle {bottle}: {err}', file=sys.stderr, flush=True)
            await answer(send, 504, f'gate: {self.for_guest(str(err))}')
        except UpstreamError as err:
            print(f'bottle {bottle}, {repo.upstream}: {err}', file=sys.stderr, flush=True)
            await answer(send, 502, f'gate: cannot fetch {repo.upstream} with the host\'s credentials, and serves '
                                    f'nothing stale. git said:\n{self.for_guest(str(err))}\ngate: a person on the '
                                    f'host can try `git ls-remote {repo.upstream}` there')
        except LockTimeout as err:
            print(f'bottle {bottle}: {err}', file=sys.stderr, flush=True)
            await answer(send, 503, f'gate: {repo.upstream} is busy: another push or fetch of it through the gate '
                                    f'held it for all the {self.bounds.busy:g} s this request waited, most likely '
                                    'waiting on that upstream, which then is slow or not answering (the gate ends '
                                    f'a command against it after {self.bounds.stall:g} s without an answer, and '
                                    f'any after {self.bounds.command:g} s). Try again in a minute; a person on the '
                                    f'host can try `git ls-remote {repo.upstream}` there.')

    def for_guest(self, text: str) -> str:
        """`text` (git's words) without the gate's state directory, a host path the guest has no use for."""
        return text.replace(str(self.state_dir), 'the gate')

    @asynccontextmanager
    async def turn(self, mirror: Path, repo: Repo):
        """The mirror to this request alone: its turn among this daemon's requests (waited for in the event
        loop), then the lock against other processes (store.mirror_lock: doit approve, the mirrors provision_git
        makes), waited for in a thread; both together at most Bounds.busy seconds, else LockTimeout."""
        deadline = time.monotonic() + self.bounds.busy
        turn = self.turns.setdefault(mirror, asyncio.Lock())
        try:
            async with asyncio.timeout(self.bounds.busy):
                await turn.acquire()
        except TimeoutError:
            raise LockTimeout(f'{repo.upstream} ({mirror}): another request of this gate held it for '
                              f'{self.bounds.busy:g} s') from None
        try:
            lock = mirror_lock(mirror, max(0.0, deadline - time.monotonic()))
            await asyncio.get_running_loop().run_in_executor(self.threads, lock.__enter__)
            try:
                yield
            finally:
                lock.__exit__(None, None, None)
        finally:
            turn.release()

    def _refresh(self, mirror: Path, repo: Repo, asked: float) -> None:
        """Bring the mirror up to date with the upstream, unless a refresh that started after `asked`
        has done so meanwhile: simultaneous fetches share one, and none is served older refs than
        the upstream had when it asked. The caller has the mirror's turn."""
        if self.refreshed.get(mirror, -math.inf) >= asked:
            return
        started = time.monotonic()
        update_mirror(mirror, repo, self.host_env)
        self.refreshed[mirror] = started

    def _cgi_env(self, scope, headers: dict[str, str], bottle: str, repo: Repo, rest: str) -> dict[str, str]:
        """The CGI environment of `git http-backend`: the CGI variables, a few request headers (never
        `Proxy`: httpoxy), the gate's settings for this repository, and the host's environment, which
        the hooks need to forward pushes. BOTTLE_GATE_HOST_ENV names the host's variables, so the hooks
        can tell them from the request's."""
        cgi = {
            'GATEWAY_INTERFACE': 'CGI/1.1', 'SERVER_PROTOCOL': f'HTTP/{scope["http_version"]}',
            'REQUEST_METHOD': scope['method'], 'QUERY_STRING': scope['query_string'].decode('latin-1'),
            'GIT_PROJECT_ROOT': str(self.state_dir / 'mirrors' / bottle), 'PATH_INFO': f'/{repo.path}.git{rest}',
            'GIT_HTTP_EXPORT_ALL': '1', 'REMOTE_USER': bottle, 'REMOTE_ADDR': (scope.get('client') or ('',))[0],
            'CONTENT_TYPE': headers.get('content-type', ''),
            'BOTTLE_GATE_STATE': str(self.state_dir), 'BOTTLE_GATE_BOTTLE': bottle,
            'BOTTLE_GATE_REPO': json.dumps(repo.to_json()), 'BOTTLE_GATE_MODE': repo.mode,
            'BOTTLE_GATE_PYTHON': sys.executable,
        }
        for header, variable in (('content-length', 'CONTENT_LENGTH'), ('content-encoding', 'HTTP_CONTENT_ENCODING'),
                                 ('git-protocol', 'HTTP_GIT_PROTOCOL')):
            if header in headers:
                cgi[variable] = headers[header]
        settings = {'http.uploadpack': 'true', 'http.receivepack': 'true', 'http.getanyfile': 'false',
                    'receive.denyNonFastForwards': 'true', 'receive.denyDeletes': 'true',
                    'receive.maxInputSize': str(repo.max_push_bytes), 'core.hooksPath': str(HOOKS)}
        cgi['GIT_CONFIG_COUNT'] = str(len(settings))
        for number, (key, value) in enumerate(settings.items()):
            cgi[f'GIT_CONFIG_KEY_{number}'], cgi[f'GIT_CONFIG_VALUE_{number}'] = key, value
        host = {name: value for name, value in self.host_env.items() if name not in cgi}
        return {**host, **cgi, 'BOTTLE_GATE_HOST_ENV': json.dumps(sorted(host))}

    async def _cgi(self, env: dict[str, str], receive, send) -> None:
        """One run of `git http-backend`: the request body streams into it, its answer streams back."""
        backend = await asyncio.create_subprocess_exec(
            'git', 'http-backend', env=env, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        feeding = asyncio.create_task(feed(receive, backend.stdin))
        errors = asyncio.create_task(backend.stderr.read())
        try:
            output = b''
            while not (end := header_end(output)):
                chunk = await backend.stdout.read(READ_BYTES)
                if not chunk:
                    break
                output += chunk
            if not end:
                await backend.wait()
                return await answer(send, 500, 'gate: git http-backend failed: '
                                               + self.for_guest((await errors).decode(errors='replace').strip()))
            status, headers = parse_cgi_head(output[:end[0]])
            await send({'type': 'http.response.start', 'status': status, 'headers': headers})
            body = output[end[1]:]
            while body or not backend.stdout.at_eof():
                if body:
                    await send({'type': 'http.response.body', 'body': body, 'more_body': True})
                body = await backend.stdout.read(READ_BYTES)
            await send({'type': 'http.response.body', 'body': b''})
        finally:
            await feeding
            await backend.wait()
            stderr = (await errors).decode(errors='replace').strip()
            if stderr:
                print(f'git http-backend {env["PATH_INFO"]} (bottle {env["REMOTE_USER"]}): {stderr}',
                      file=sys.stderr, flush=True)


def route(repos: list[Repo], path: str) -> tuple[Repo, str] | None:
    """The bottle's repository that `path` (/<path>[.git]/<rest>) names, and /<rest>; the longest
    path first, so a repository inside another's path is reached."""
    for repo in sorted(repos, key=lambda r: len(r.path), reverse=True):
        for served in (f'/{repo.path}.git/', f'/{repo.path}/'):
            if path.startswith(served):
                return repo, path[len(served) - 1:]
    return None


async def feed(receive, stdin: asyncio.StreamWriter) -> None:
    """The request body into the backend's stdin; an early exit of the backend ends it quietly."""
    try:
        while True:
            message = await receive()
            if message['type'] != 'http.request':
                break
            stdin.write(message.get('body', b''))
            await stdin.drain()
            if not message.get('more_body'):
                break
    except (BrokenPipeError, ConnectionResetError):
        pass
    finally:
        stdin.close()


def header_end(output: bytes) -> tuple[int, int] | None:
    """Where the CGI header ends and the body begins, once the blank line has been read."""
    ends = [(at, at + len(mark)) for mark in (b'\r\n\r\n', b'\n\n') if (at := output.find(mark)) >= 0]
    return min(ends) if ends else None


def parse_cgi_head(head: bytes) -> tuple[int, list[tuple[bytes, bytes]]]:
    status, headers = 200, []
    for line in head.splitlines():
        name, _, value = line.partition(b':')
        if name.strip().lower() == b'status':
            status = int(value.split()[0])
        elif name.strip():
            headers.append((name.strip(), value.strip()))
    return status, headers


async def answer(send, status: int, text: str, content_type: str = 'text/plain; charset=utf-8') -> None:
    """A whole short answer. Errors are text/plain: git shows such a body to the agent as `remote:` lines."""
    body = (text.rstrip('\n') + '\n').encode()
    await send({'type': 'http.response.start', 'status': status,
                'headers': [(b'content-type', content_type.encode()), (b'content-length', str(len(body)).encode())]})
    await send({'type': 'http.response.body', 'body': body})


def main(argv: list[str]) -> int:
    logbound.bound_output()     # first: uvicorn's log handlers take the bounded sys.stderr
    state_dir = Path(argv[1]).resolve()
    exit_when_gone(state_dir)       # the checkout deleted: the gate goes too
    key = (state_dir / 'key').read_text().strip()
    instance = secrets.randbits(INSTANCE_BITS)
    listener = socket.socket()
    # Inherited by each connection: without it, a response's last small write waits about 40 ms.
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    listener.bind((LISTEN_HOST, 0))
    listener.listen(128)
    write_atomic(state_dir / 'gate.json', json.dumps({'port': listener.getsockname()[1], 'pid': os.getpid(),
                                                      'instance': instance}) + '\n', mode=0o600)
    config = uvicorn.Config(Gate(state_dir, key, dict(os.environ), instance), lifespan='off', access_log=False,
                            log_level='warning', timeout_graceful_shutdown=3)
    # uvicorn raises the signal that stopped it again once it has shut down, so this handler runs then.
    end_on_sigterm()
    try:
        uvicorn.Server(config).run(sockets=[listener])
    finally:
        end_all()
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv))
