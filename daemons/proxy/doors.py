"""The bottles' doors, served by the proxy itself: a bottle is known only by the Unix socket it came through.

Runs inside mitmproxy's own environment (standard library and mitmproxy), beside addon.py, which opens and
closes a Door for each bottle in the doors file.

Each door is a Unix socket the proxy process listens on, in a 0700 directory of the project's user, made
0600 (serve.py's umask): only that user (and root) can connect, and a guest reaches it only as its
backend mounts it (docker and podman: the directory, read-only; smolvm: --mount-socket, which dials it
anew per guest connection). There is no TCP listener and no relay process: a connection accepted here
goes straight into mitmproxy's regular-mode proxy (the handler a `regular` listener would make), and the
addon learns its bottle from `clients` (mitmproxy's client id -> bottle name), set before mitmproxy sees a
byte. So no other local user can speak as a bottle, and no connection makes a host process.

A bottle's load stays in its bottle: at most `limit` connections through one door at a time (a connection
beyond it is answered 503 with the reason and closed at once), a connection with no traffic either
way for `idle` seconds is closed (mitmproxy's own watchdog, shortened), half-open ones included; what one
connection may cost the proxy besides is bounded in bounds.py.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
from pathlib import Path

from mitmproxy import ctx
from mitmproxy.proxy import layers, mode_specs
from mitmproxy.proxy.mode_servers import ProxyConnectionHandler

from bounds import HEAD_BYTES

CONNECTIONS = 64            # open at once through one door: npm opens up to 15 per registry, Claude Code a few
IDLE_SECONDS = 300.0        # no byte either way for this long closes a connection
REFUSAL_SECONDS = 2.0      # a refused connection is answered and closed within this
FIRST_BYTES_SECONDS = 0.5  # how long a refusal waits for the client's request before it answers
IN_USE_SECONDS = 1.0
# On the 503 past the bound, naming the bottle: the host's health check through a door counts a full door as
# one the proxy answers (a bottle holding its connections must not get the proxy every bottle shares restarted).
FULL_HEADER = 'X-Claude-Bottle-Door-Full'

log = logging.getLogger(__name__)
REGULAR = mode_specs.ProxyMode.parse('regular')


class _DoorStream:
    """The accepted connection's writer as mitmproxy reads it: a Unix socket has no peer address, so the
    connection is named by its bottle and number (in mitmproxy's logs and events)."""

    def __init__(self, writer: asyncio.StreamWriter, name: tuple[str, int]):
        self._writer, self._name = writer, name

    def get_extra_info(self, key: str, default=None):
        if key in ('peername', 'sockname'):
            return self._name
        return self._writer.get_extra_info(key, default)

    def __getattr__(self, attribute: str):
        return getattr(self._writer, attribute)


class Door:
    def __init__(self, bottle: str, path: Path, clients: dict[str, str], on_refused,
                 limit: int = CONNECTIONS, idle: float = IDLE_SECONDS):
        """`clients`: shared with the addon, client id -> bottle; `on_refused(reason)`: called for a connection
        refused over the limit."""
        self.bottle, self.path, self.clients, self.on_refused = bottle, Path(path), clients, on_refused
        self.limit, self.idle = limit, idle
        self.connections = 0
        self.refusing = 0
        self.accepted = 0
        self._server: asyncio.Server | None = None
        self._socket_id: tuple[int, int] | None = None

    def intact(self) -> bool:
        """The socket at the door's path is still the one this door listens on (not removed, not replaced)."""
        try:
            st = os.stat(self.path)
        except OSError:
            return False
        return self._server is not None and (st.st_dev, st.st_ino) == self._socket_id

    async def open(self) -> None:
        """Listen on the door's path (a stale socket there is replaced); OSError when it cannot, or when another
        process listens there (a copy of another project's doors file names that project's doors)."""
        if self.path.exists():
            try:
                _, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(self.path)), IN_USE_SECONDS)
            except (OSError, asyncio.TimeoutError) as err:
                if isinstance(err, asyncio.TimeoutError):
                    raise OSError(errno.EADDRINUSE, 'something holds the door and does not let go') from None
            else:
                writer.close()
                raise OSError(errno.EADDRINUSE, 'another process listens on this door')
        self._server = await asyncio.start_unix_server(self._accept, path=str(self.path))
        os.chmod(self.path, 0o600)      # made 0700 by the umask already: no other user, ever
        st = os.stat(self.path)
        self._socket_id = (st.st_dev, st.st_ino)

    def close(self) -> None:
        """Stop listening and remove the socket, if the file at the path is still this door's."""
        if self._server is not None:
            self._server.close()
            self._server = None
        try:
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._socket_id:
                os.unlink(self.path)
        except OSError:
            pass

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.connections >= self.limit:
            if self.refusing >= self.limit:     # refusals are bounded too: past that, closed unanswered
                writer.close()
                return
            self.refusing += 1
            try:
                await self._refuse(reader, writer)
            finally:
                self.refusing -= 1
            return
        self.connections += 1
        self.accepted += 1
        client_id = None
        try:
            handler = ProxyConnectionHandler(ctx.master, reader, _DoorStream(writer, (self.bottle, self.accepted)),
                                             ctx.options, REGULAR)
            handler.layer = layers.modes.HttpProxy(handler.layer.context)
            handler.timeout_watchdog.timeout = self.idle
            client_id = handler.layer.context.client.id
            self.clients[client_id] = self.bottle
            with ctx.master.addons.get('proxyserver').register_connection(client_id, handler):
                await handler.handle_client()
        except Exception:       # one connection's failure is logged, never the door's end
            log.exception('a connection through the door of bottle %s failed', self.bottle)
            writer.close()
        finally:
            self.connections -= 1
            self.clients.pop(client_id, None)

    async def _refuse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A 503 with the reason, after the client's first bytes if they come soon (a client still writing its
        request to a socket closed under it would lose the answer), all within REFUSAL_SECONDS."""
        reason = (f'bottle {self.bottle} has {self.connections} connections open through its door, the most one '
                  f'bottle may hold; close some (one idle for {self.idle:g} s is closed)')
        body = (f'Blocked by the egress proxy of bottle {self.bottle}: {reason}.\n').encode()
        self.on_refused(reason)     # logged before anyone is told
        try:
            async with asyncio.timeout(REFUSAL_SECONDS):
                try:
                    await asyncio.wait_for(reader.read(HEAD_BYTES), FIRST_BYTES_SECONDS)
                except asyncio.TimeoutError:
                    pass            # a silent client is answered all the same
                writer.write(b'HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n'
                             b'%s: %s\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s'
                             % (FULL_HEADER.encode(), self.bottle.encode(), len(body), body))
                writer.write_eof()
                await writer.drain()
        except (OSError, asyncio.TimeoutError):
            pass
        writer.close()


class RateLimited:
    """Calls `write` at most once per `seconds` (a refusal line in the bottle's log: a guest looping on
    connections beyond its limit must not fill the disk)."""

    def __init__(self, write, seconds: float = 1.0):
        self.write, self.seconds, self._last = write, seconds, 0.0

    def __call__(self, *args) -> None:
        now = time.monotonic()
        if now - self._last >= self.seconds:
            self._last = now
            self.write(*args)

