"""What one connection may cost the proxy every bottle of a project shares: bounds mitmproxy 11.0.2 lacks.

Runs inside mitmproxy's own environment; serve.py calls `apply()` once before the proxy starts. Each bound
wraps one mitmproxy method (the version is pinned: control.MITMPROXY_VERSION), and each was found by an
attack from inside a bottle, where the guest controls every byte it sends:

- an HTTP/1 head (request or response) longer than HEAD_BYTES without its end: mitmproxy's read_headers
  buffers it for ever ("FIXME: protect against header size DoS"); answered 431 (a request) or 502;
- a chunk-size line or trailer of a chunked body longer than HEAD_BYTES without its end: h11's reader holds
  it whole; answered 400 or 502, the same way;
- a TLS ClientHello (inside a CONNECT) past CLIENT_HELLO_BYTES or CLIENT_HELLO_RECORDS records without being
  whole: mitmproxy holds up to 16 MiB of it and parses it again, from the start, on every read (quadratic
  CPU on the event loop every bottle shares); the handshake fails;
- the body of a request already refused (the addon set its 403): mitmproxy holds it, and past
  stream_large_bodies tries to stream it, which it cannot with a response set ("mitmproxy has crashed");
  here it is read and dropped.
"""
from __future__ import annotations

import logging

from mitmproxy.proxy import commands, events
from mitmproxy.proxy.layers import tls
from mitmproxy.proxy.layers.http import HttpStream, _http1

HEAD_BYTES = 64 * 1024           # a head (the line and its headers), a chunk-size line or the trailers, at most
CLIENT_HELLO_BYTES = 16 * 1024   # a real ClientHello is a few kB (post-quantum key shares included)
CLIENT_HELLO_RECORDS = 16        # and comes in one or two TLS records


def apply() -> None:
    """Put every bound in place; idempotent."""
    for connection, status, what in ((_http1.Http1Server, 431, 'request'), (_http1.Http1Client, 502, 'response')):
        _wrap(connection, 'read_headers', _bounded_buffer(connection.read_headers, status, f'{what} head'))
    for connection, status, what in ((_http1.Http1Server, 400, 'request'), (_http1.Http1Client, 502, 'response')):
        _wrap(connection, 'read_body', _bounded_buffer(connection.read_body, status,
                                                       f'chunk-size line or trailer of a {what} body'))
    _wrap(tls.ClientTLSLayer, 'receive_handshake_data',
          _bounded_client_hello(tls.ClientTLSLayer.receive_handshake_data))
    _wrap(HttpStream, 'check_body_size', _refused_body_dropped(HttpStream.check_body_size))


def _wrap(cls, name: str, wrapper) -> None:
    if not getattr(getattr(cls, name), 'bounded', False):
        wrapper.bounded = True
        setattr(cls, name, wrapper)


def _bounded_buffer(method, status: int, what: str):
    """The connection's state `method` (read_headers, read_body), closing the connection when, after an event
    is read, its buffer still holds more than HEAD_BYTES (the readers take what they can use at once, so
    only a line that never ends stays)."""
    def bounded(self, event):
        yield from method(self, event)
        if self.state == getattr(self, method.__name__) and isinstance(event, events.DataReceived) \
                and len(self.buf) > HEAD_BYTES:
            message = f'the {what} is longer than {HEAD_BYTES} bytes'
            if status < 500:            # a request: the client is told; a response: the stream fails with 502
                yield commands.SendData(self.conn, _http1.make_error_response(status, message))
            yield commands.Log(f'{self.conn.peername}: {message}; connection closed', logging.WARNING)
            yield commands.CloseConnection(self.conn)
            self.buf.maybe_extract_at_most(len(self.buf))
            self.state = self.done
    bounded.__name__ = method.__name__
    return bounded


def _bounded_client_hello(method):
    def bounded(self, data: bytes):
        if not self.client_hello_parsed and (len(self.recv_buffer) + len(data) > CLIENT_HELLO_BYTES
                                             or _records(self.recv_buffer + data) > CLIENT_HELLO_RECORDS):
            self.recv_buffer.clear()
            yield from ()
            return False, (f'the TLS ClientHello is longer than {CLIENT_HELLO_BYTES} bytes or '
                           f'{CLIENT_HELLO_RECORDS} records')
        return (yield from method(self, data))
    return bounded


def _records(data: bytes) -> int:
    """How many TLS records begin in `data` (5-byte headers, the length in bytes 3-4)."""
    count = offset = 0
    while offset + 5 <= len(data):
        count += 1
        offset += 5 + int.from_bytes(data[offset + 3:offset + 5], 'big')
    return count


def _refused_body_dropped(method):
    def bounded(self, request: bool):
        flow = getattr(self, 'flow', None)
        if request and flow is not None and flow.response is not None and not flow.request.stream:
            self.request_body_buf.clear()       # refused before its body came: read and dropped
            yield from ()
            return False
        return (yield from method(self, request))
    return bounded
