"""Bound secrets in the egress proxy: the guest holds a placeholder, the proxy puts the real value in.

A bottle's rules bind each secret (rules.SecretBinding) to a header of HTTPS requests to some hosts. The real
values reach the running proxy only through its hand-over socket (HandOver: a Unix socket in a 0700 directory,
0600, whose peer must run as the proxy's own user; one JSON message {"bottle": NAME, "values": {SECRET: VALUE}}
of at most HAND_OVER_BYTES, answered {"ok": true} or {"error": WHY}) and live in the proxy's memory only: never
in its argv, environment, files or log. A restarted proxy has none until the host hands them over again.

What the addon (addon.py) does with them, and what this module gives it:

- a request's URL and headers are searched for each placeholder when it is judged; the body as it comes
  (BodyScanner): whole when mitmproxy holds it, else chunk by chunk in the stream, where the end of a chunk that
  could begin a placeholder is held back until the next one shows whether it does, so a placeholder split across
  chunks is found and no byte of it leaves. mitmproxy 11.0.2 cannot kill a flow whose request body is being
  streamed (flow.kill() is only read between hooks, mitmproxy issue 4711), so `apply()` wraps its
  HttpStream.state_stream_request_body: a chunk carrying a placeholder is not sent, the upstream connection is
  closed (the upstream never gets a whole request), and the guest gets the addon's 403 at once;
- a response's headers, and its body, get the placeholder back where the upstream sent a real value (an error
  message quoting the key): a body of at most 1 MiB with a length is held whole and masked decoded (addon.py,
  mask_body); a longer or unframed one passes through a Masker as it streams, with the same held-back end
  across chunks; only an end that could begin a value waits, so server-sent events arrive as they are sent.

Standard library only at import (control.py imports it on the host side for peer_credentials and
value_refusal); `apply()` imports mitmproxy.
"""
from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import socket
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

HAND_OVER_BYTES = 64 * 1024      # one hand-over message at most: the values of one bottle
HAND_OVER_SECONDS = 5.0          # the whole exchange, on either side
VALUE_MIN = 8                    # shorter values could not be told apart from the rest of a response
VALUE_MAX = 8192
SCAN = 'bottle_scan'             # flow.metadata: the BodyScanner of a request of a bottle with bound secrets

log = logging.getLogger(__name__)


def value_refusal(name, value) -> str | None:
    """Why `value` cannot be the value of secret `name` (never quoting it), or None. It goes into a header."""
    if not isinstance(name, str) or not name:
        return f'{name!r} is not the name of a secret'
    if not isinstance(value, str) or not VALUE_MIN <= len(value) <= VALUE_MAX:
        return f'the value of secret {name} must be a text of {VALUE_MIN} to {VALUE_MAX} characters'
    if not all(' ' <= c <= '~' for c in value) or value != value.strip():
        return (f'the value of secret {name} must be printable ASCII without blanks around it (it goes into an '
                'HTTP header)')
    return None


def held_back(data: bytes, needles: Iterable[bytes]) -> int:
    """Where the end of `data` that could begin one of `needles` (a proper prefix of it) starts; len(data)
    when no end could."""
    cut = len(data)
    for needle in needles:
        first = needle[:1]
        index = data.find(first, max(0, len(data) - len(needle) + 1))
        while index != -1 and index < cut:
            if needle.startswith(data[index:]):
                cut = index
                break
            index = data.find(first, index + 1)
    return cut


class BodyScanner:
    """The placeholders of a bottle's bindings, looked for in a request body that comes whole or in chunks.
    `refuse(flow, binding)`: the addon's 403 for a body carrying that binding's placeholder (logged)."""

    def __init__(self, bindings, refuse: Callable):
        self.bindings = [(binding, binding.placeholder.encode()) for binding in bindings]
        self.refuse = refuse
        self.tail = b''

    def find(self, data: bytes):
        """The binding whose placeholder `data` carries, or None."""
        return next((binding for binding, needle in self.bindings if needle in data), None)

    def feed(self, chunk: bytes):
        """(what may be sent now, None), or (b'', the binding) when the body carries its placeholder."""
        data = self.tail + chunk if self.tail else chunk
        binding = self.find(data)
        if binding is not None:
            self.tail = b''
            return b'', binding
        cut = held_back(data, (needle for _, needle in self.bindings))
        self.tail = data[cut:]
        return data[:cut], None

    def end(self) -> bytes:
        """What was held back, at the end of the body."""
        tail, self.tail = self.tail, b''
        return tail


class Masker:
    """Real values back to placeholders in a stream: `pairs` of (value, placeholder) bytes. Called with each
    chunk, and with b'' at the end (as mitmproxy calls a `stream` callable)."""

    def __init__(self, pairs: list[tuple[bytes, bytes]]):
        self.pairs = pairs
        self.tail = b''
        self.masked = 0

    def __call__(self, chunk: bytes) -> bytes:
        data = self.tail + chunk if self.tail else chunk
        for value, placeholder in self.pairs:
            if value in data:
                self.masked += data.count(value)
                data = data.replace(value, placeholder)
        if not chunk:
            self.tail = b''
            return data
        cut = held_back(data, (value for value, _ in self.pairs))
        self.tail = data[cut:]
        return data[:cut]


# --- the hand-over socket ------------------------------------------------------------------------

def peer_credentials(sock: socket.socket) -> tuple[int | None, int]:
    """(pid or None, uid) of the process at the other end of a connected Unix socket."""
    if hasattr(socket, 'SO_PEERCRED'):                                          # Linux
        pid, uid, _ = struct.unpack('3i', sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        return pid, uid
    local_peercred = 0x001                                                      # macOS, BSD: struct xucred
    data = sock.getsockopt(0, local_peercred, struct.calcsize('IIh16I'))
    return None, struct.unpack_from('II', data)[1]


class HandOver:
    """The proxy's hand-over socket at `path`: `take(bottle, values)` applies a message (None, or why not)."""

    def __init__(self, path: Path, take: Callable[[str, dict], str | None]):
        self.path, self.take = Path(path), take
        self._server: asyncio.Server | None = None

    async def open(self) -> None:
        """Listen at the path (a stale socket there is replaced); OSError when another process listens there."""
        if self.path.exists():
            try:
                _, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(self.path)), 1.0)
            except (OSError, asyncio.TimeoutError):
                self.path.unlink(missing_ok=True)
            else:
                writer.close()
                raise OSError(errno.EADDRINUSE, 'another process listens on the hand-over socket')
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        os.chmod(self.path, 0o600)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
            self.path.unlink(missing_ok=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            answer = await self._answer(reader, writer)
        except Exception as err:     # never the message itself: it holds values
            answer = {'error': f'the egress proxy could not read the hand-over ({type(err).__name__})'}
        try:
            writer.write(json.dumps(answer).encode())
            await asyncio.wait_for(writer.drain(), HAND_OVER_SECONDS)
        except (OSError, asyncio.TimeoutError):
            pass
        writer.close()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> dict:
        _, uid = peer_credentials(writer.get_extra_info('socket'))
        if uid != os.getuid():
            log.warning(f'a process of uid {uid} tried to hand secrets to the egress proxy; refused')
            return {'error': f'only uid {os.getuid()}, which the egress proxy runs as, may hand it secrets'}
        data = b''
        async with asyncio.timeout(HAND_OVER_SECONDS):
            while len(data) <= HAND_OVER_BYTES and (chunk := await reader.read(65536)):
                data += chunk
        if len(data) > HAND_OVER_BYTES:
            return {'error': f'a hand-over is at most {HAND_OVER_BYTES} bytes'}
        message = json.loads(data)
        if not (isinstance(message, dict) and set(message) == {'bottle', 'values'}
                and isinstance(message['bottle'], str) and isinstance(message['values'], dict)):
            return {'error': 'a hand-over is {"bottle": NAME, "values": {SECRET: VALUE}}'}
        for name, value in message['values'].items():
            if why := value_refusal(name, value):
                return {'error': why}
        error = self.take(message['bottle'], message['values'])
        return {'error': error} if error else {'ok': True}


# --- the stream of a request body: refused before a chunk carrying a placeholder leaves -----------

def apply() -> None:
    """Wrap mitmproxy's streaming of request bodies with the flow's BodyScanner, if it has one; idempotent."""
    from mitmproxy.proxy.layers.http import DropStream, HttpStream, SendHttp
    from mitmproxy.proxy.layers.http._events import (RequestData, RequestEndOfMessage, RequestProtocolError,
                                                     ResponseData, ResponseEndOfMessage, ResponseHeaders)
    original = HttpStream.state_stream_request_body
    if getattr(original, 'scanned', False):
        return

    def scanned(self, event):
        scanner = self.flow.metadata.get(SCAN)
        if scanner is None:
            return (yield from original(self, event))
        if isinstance(event, RequestData):
            passed, binding = scanner.feed(event.data)
            if binding is not None:
                yield from refused(self, scanner.refuse(self.flow, binding))
            elif passed:
                yield from original(self, RequestData(self.stream_id, passed))
            return
        if isinstance(event, RequestEndOfMessage) and (tail := scanner.end()):
            yield from original(self, RequestData(self.stream_id, tail))
        yield from original(self, event)

    def refused(self, response):
        """Nothing more goes up (the upstream connection is closed, its request never whole); the guest gets
        `response` now, and the rest of its body is read and dropped."""
        self.flow.live = False
        self.client_state = self.server_state = self.state_errored
        response.headers['Connection'] = 'close'
        yield SendHttp(RequestProtocolError(self.stream_id, 'refused by the egress proxy'), self.context.server)
        yield SendHttp(ResponseHeaders(self.stream_id, response, False), self.context.client)
        yield SendHttp(ResponseData(self.stream_id, response.raw_content), self.context.client)
        yield SendHttp(ResponseEndOfMessage(self.stream_id), self.context.client)
        yield DropStream(self.stream_id)

    scanned.scanned = True
    scanned.__name__ = original.__name__
    HttpStream.state_stream_request_body = scanned
