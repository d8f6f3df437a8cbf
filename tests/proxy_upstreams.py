"""Real things for the egress proxy tests: a test CA and a TLS upstream server on a loopback
address, a guest-side relay standing in for the one in a bottle, and raw proxy clients."""
from __future__ import annotations

import base64
import http.client
import http.server
import io
import json
import os
import random
import re
import socket
import ssl
import subprocess
import threading
import time
import urllib.parse
from pathlib import Path


def random_loopback_address() -> str:
    """A 127.x.y.z other than 127.0.0.1, so port 443 is ours alone."""
    return f'127.{random.randint(1, 254)}.{random.randint(1, 254)}.{random.randint(1, 254)}'


def make_upstream_ca(directory: Path, address: str, *more_addresses: str,
                     names: tuple[str, ...] = ()) -> tuple[Path, Path, Path]:
    """A test CA (the proxy is told to trust it) and a server certificate for `address`, any
    `more_addresses`, localhost and `names`, made with the openssl CLI; returns (ca cert, server cert, server key)."""
    ca_key, ca_cert = directory / 'upstream-ca.key', directory / 'upstream-ca.pem'
    key, csr, cert = directory / 'upstream.key', directory / 'upstream.csr', directory / 'upstream.pem'
    ext = directory / 'upstream.ext'
    ext.write_text(f'subjectAltName={"".join(f"IP:{a}," for a in (address, *more_addresses))}'
                   f'{"".join(f"DNS:{n}," for n in names)}DNS:localhost\n')
    for argv in (
        ['openssl', 'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes',
         '-keyout', ca_key, '-out', ca_cert, '-days', '2', '-subj', '/CN=egress test upstream CA'],
        ['openssl', 'req', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes',
         '-keyout', key, '-out', csr, '-subj', f'/CN={address}'],
        ['openssl', 'x509', '-req', '-in', csr, '-CA', ca_cert, '-CAkey', ca_key, '-CAcreateserial',
         '-days', '2', '-extfile', ext, '-out', cert],
    ):
        subprocess.run([str(a) for a in argv], check=True, capture_output=True)
    return ca_cert, cert, key


class Upstream:
    """An HTTPS server on `address`:443 (and with `plain`, the same in plain HTTP on `address`:80) that counts
    the TCP connections it accepts and records each request's target as it arrives (`requests`: the path
    in origin form, the whole URL in absolute form).

    GET or POST any path: 200 and "upstream saw METHOD PATH". GET /events: three server-sent
    events one second apart; `last_event_sent` is set (and `last_event_at`, the time.time() of it)
    just before the third is written.
    POST /v1/messages: a mock Anthropic Messages API (streamed when the request asks for it); each
    request's JSON body is appended to `messages`. It answers `reply_text`; or, when `tool_call` is
    set to (tool name, input) and the request offers that tool, a call of it (stop reason tool_use);
    a request whose last message carries tool results is answered "the tool returned: <their text>",
    that text also appended to `tool_results`.
    /git/<path>, when `git_root` is given: git smart HTTP by the real `git http-backend` over
    the repositories under `git_root` (clone and fetch). With `git_credentials` (user, password),
    /git/ asks for them by Basic auth (401 without them, 403 with wrong ones) and takes pushes too;
    a repository's own hooks (its hooks/ directory) run as on any git server.
    `received`: every request as it arrived: method, path, headers (name, value pairs), body, and whether the
    body came whole (a request whose connection closed before its body ended is recorded, then dropped).
    GET /echo-auth: answers 401 quoting the Authorization header it got, in an X-Seen-Authorization header
    and in the body, which is written in two parts a moment apart, the first ending inside the quoted value;
    GET /echo-auth?big: the same after 2 MiB of dots."""

    def __init__(self, address: str, cert: Path, key: Path, *, git_root: Path | None = None,
                 git_credentials: tuple[str, str] | None = None, plain: bool = False):
        upstream = self
        expected = 'Basic ' + base64.b64encode(':'.join(git_credentials).encode()).decode() \
            if git_credentials else None
        self.address = address
        self.connections = 0
        self.requests: list[tuple[str, str, str]] = []   # (method, path, Host header)
        self.received: list[dict] = []
        self.messages: list[dict] = []                   # bodies of POST /v1/messages
        self.reply_text = 'pong from the mock API'
        self.tool_call: tuple[str, dict] | None = None
        self.tool_results: list[str] = []
        self.git_root = git_root
        self.last_event_sent = threading.Event()
        self.last_event_at = 0.0
        self.lock = threading.Lock()

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = 'HTTP/1.1'
            disable_nagle_algorithm = True

            def log_message(self, *args):
                pass

            def do_GET(self):
                self._record()
                self._received(b'', True)
                if self._route() == '/events':
                    self._events()
                elif self._route() == '/echo-auth':
                    self._echo_auth()
                elif self._route().startswith('/git/') and upstream.git_root:
                    self._git(b'')
                else:
                    self._answer()

            def do_POST(self):
                try:
                    body = self._body()
                except (ValueError, OSError) as err:      # the body ended early: no request
                    self._received(getattr(err, 'partial', b''), False)
                    self.close_connection = True
                    return
                self._received(body, True)
                self._record()
                if self._route() == '/v1/messages':
                    self._messages(json.loads(body))
                elif self._route().startswith('/git/') and upstream.git_root:
                    self._git(body)
                else:
                    self._answer()

            def _route(self) -> str:
                return urllib.parse.urlsplit(self.path).path

            def _body(self) -> bytes:
                """The request body, by Content-Length or chunked (git sends large POSTs chunked)."""
                if self.headers.get('Transfer-Encoding', '').lower() != 'chunked':
                    body = self.rfile.read(int(self.headers.get('Content-Length', 0)))
                    if len(body) < int(self.headers.get('Content-Length', 0)):
                        raise _cut(body)
                    return body
                body = b''
                while True:
                    try:
                        size = int(self.rfile.readline().split(b';')[0], 16)
                    except ValueError:
                        raise _cut(body) from None
                    if not size:
                        break
                    body += self.rfile.read(size)
                    self.rfile.readline()
                while self.rfile.readline() not in (b'\r\n', b'\n', b''):   # trailers
                    pass
                return body

            def _received(self, body: bytes, complete: bool):
                with upstream.lock:
                    upstream.received.append({'method': self.command, 'path': self.path,
                                              'headers': list(self.headers.items()), 'body': body,
                                              'complete': complete})

            def _echo_auth(self):
                seen = self.headers.get('Authorization', '')
                pad = b'.' * (2 << 20) if self.path.endswith('?big') else b''    # over 1 MiB: streamed
                body = pad + f'the key {seen} is not valid here\n'.encode()
                self.send_response(401)
                self.send_header('Content-Type', 'text/plain')
                self.send_header('X-Seen-Authorization', seen)
                self.send_header('Content-Length', str(len(body)))
                self.end_headers()
                middle = len(pad) + len('the key ') + len(seen) // 2
                self.wfile.write(body[:middle])
                self.wfile.flush()
                time.sleep(0.2)         # the rest comes in another read of the proxy, most likely
                self.wfile.write(body[middle:])

            def _record(self):
                with upstream.lock:
                    upstream.requests.append((self.command, self.path, self.headers.get('Host', '')))

            def _answer(self):
                body = f'upstream saw {self.command} {self.path}\n'.encode()
                self.send_response(200)
                self.send_header('Content-Type', 'text/plain')
                self.send_header('Content-Length', str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _events(self):
                self.send_response(200)
                self.send_header('Content-Type', 'text/event-stream')
                self.send_header('Cache-Control', 'no-cache')
                self.send_header('Connection', 'close')
                self.end_headers()
                for number in (1, 2, 3):
                    if number == 3:
                        upstream.last_event_at = time.time()
                        upstream.last_event_sent.set()
                    self.wfile.write(f'data: event {number}\n\n'.encode())
                    self.wfile.flush()
                    if number < 3:
                        time.sleep(1)
                self.close_connection = True

            def _git(self, body: bytes):
                """One CGI run of `git http-backend`; its whole output is small enough to hold."""
                if expected and self.headers.get('Authorization') != expected:
                    self._refuse(403 if self.headers.get('Authorization') else 401)
                    return
                path, _, query = self.path.partition('?')
                env = {
                    'PATH': os.environ['PATH'], 'GIT_PROJECT_ROOT': str(upstream.git_root),
                    'GIT_HTTP_EXPORT_ALL': '1', 'GATEWAY_INTERFACE': 'CGI/1.1',
                    'SERVER_PROTOCOL': self.request_version, 'REQUEST_METHOD': self.command,
                    'PATH_INFO': urllib.parse.unquote(path.removeprefix('/git')), 'QUERY_STRING': query,
                    'CONTENT_TYPE': self.headers.get('Content-Type', ''), 'CONTENT_LENGTH': str(len(body)),
                    'REMOTE_ADDR': self.client_address[0],
                    'HTTP_CONTENT_ENCODING': self.headers.get('Content-Encoding', ''),
                    'HTTP_GIT_PROTOCOL': self.headers.get('Git-Protocol', ''),
                }
                if expected:
                    env['REMOTE_USER'] = git_credentials[0]     # http-backend then takes pushes
                cgi = subprocess.run(['git', 'http-backend'], input=body, env=env, capture_output=True)
                if cgi.returncode != 0 and not cgi.stdout:   # it died saying why on stderr only
                    cgi.stdout = b'Status: 500\r\nContent-Type: text/plain\r\n\r\n' + cgi.stderr
                out = io.BytesIO(cgi.stdout)
                headers = http.client.parse_headers(out)
                content = out.read()
                status = headers.get('Status', '200')
                del headers['Status']
                self.send_response(int(status.split()[0]))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header('Content-Length', str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            def _refuse(self, status: int):
                body = b'credentials needed\n' if status == 401 else b'wrong credentials\n'
                self.send_response(status)
                if status == 401:
                    self.send_header('WWW-Authenticate', 'Basic realm="git"')
                self.send_header('Content-Type', 'text/plain')
                self.send_header('Content-Length', str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _messages(self, request: dict):
                with upstream.lock:
                    upstream.messages.append(request)
                content, stop_reason = upstream.reply(request)
                usage = {'input_tokens': 10, 'output_tokens': 10}
                message = {'id': 'msg_mock', 'type': 'message', 'role': 'assistant',
                           'model': request.get('model', 'mock-model'), 'content': [], 'stop_reason': None,
                           'stop_sequence': None, 'usage': usage}
                if not request.get('stream'):
                    body = json.dumps({**message, 'content': content, 'stop_reason': stop_reason}).encode()
                    self.send_response(200)
                    self.send_header('Content-Type', 'application/json')
                    self.send_header('Content-Length', str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                self.send_response(200)
                self.send_header('Content-Type', 'text/event-stream')
                self.send_header('Cache-Control', 'no-cache')
                self.send_header('Connection', 'close')
                self.end_headers()
                events = [('message_start', {'message': message})]
                for index, block in enumerate(content):
                    if block['type'] == 'text':
                        start, delta = {**block, 'text': ''}, {'type': 'text_delta', 'text': block['text']}
                    else:
                        start = {**block, 'input': {}}
                        delta = {'type': 'input_json_delta', 'partial_json': json.dumps(block['input'])}
                    events += [('content_block_start', {'index': index, 'content_block': start}),
                               ('content_block_delta', {'index': index, 'delta': delta}),
                               ('content_block_stop', {'index': index})]
                events += [('message_delta', {'delta': {'stop_reason': stop_reason, 'stop_sequence': None},
                                              'usage': {'output_tokens': usage['output_tokens']}}),
                           ('message_stop', {})]
                for name, data in events:
                    self.wfile.write(f'event: {name}\ndata: {json.dumps({"type": name, **data})}\n\n'.encode())
                    self.wfile.flush()
                self.close_connection = True

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True
            address_family = socket.AF_INET6 if ':' in address else socket.AF_INET

            def get_request(self):
                sock, peer = super().get_request()
                with upstream.lock:
                    upstream.connections += 1
                return context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), peer

        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        self.server = Server((address, 443), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.plain_server = None
        if plain:
            class PlainServer(Server):
                def get_request(self):
                    sock, peer = http.server.ThreadingHTTPServer.get_request(self)
                    with upstream.lock:
                        upstream.connections += 1
                    return sock, peer
            self.plain_server = PlainServer((address, 80), Handler)
            threading.Thread(target=self.plain_server.serve_forever, daemon=True).start()

    def reply(self, request: dict) -> tuple[list[dict], str]:
        """The mock API's answer to a Messages request: its content blocks and stop reason."""
        last = request['messages'][-1]['content'] if request.get('messages') else ''
        results = [block for block in last if block.get('type') == 'tool_result'] if isinstance(last, list) else []
        if results:
            said = '\n'.join(tool_result_text(block) for block in results)
            with self.lock:
                self.tool_results.append(said)
            return [{'type': 'text', 'text': f'the tool returned: {said}'}], 'end_turn'
        offered = {tool.get('name') for tool in request.get('tools', [])}
        if self.tool_call and self.tool_call[0] in offered:
            name, arguments = self.tool_call
            return [{'type': 'tool_use', 'id': f'toolu_mock{len(self.messages)}', 'name': name,
                     'input': arguments}], 'tool_use'
        return [{'type': 'text', 'text': self.reply_text}], 'end_turn'

    def close(self):
        for server in filter(None, (self.server, self.plain_server)):
            server.shutdown()
            server.server_close()


def _cut(body: bytes) -> ValueError:
    error = ValueError('the request body ended early')
    error.partial = body
    return error


def tool_result_text(block: dict) -> str:
    """A tool_result block's text: its content is a string or a list of content blocks."""
    content = block.get('content', '')
    if isinstance(content, str):
        return content
    return '\n'.join(part.get('text', '') for part in content if part.get('type') == 'text')


class GuestRelay:
    """What runs inside a bottle: TCP on 127.0.0.1:<port> relayed to the bottle's door."""

    def __init__(self, door: Path):
        with socket.socket() as probe:
            probe.bind(('127.0.0.1', 0))
            self.port = probe.getsockname()[1]
        self.process = subprocess.Popen(
            ['socat', f'TCP-LISTEN:{self.port},bind=127.0.0.1,reuseaddr,fork,nodelay', f'UNIX-CONNECT:{door}'],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(('127.0.0.1', self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    @property
    def url(self) -> str:
        return f'http://127.0.0.1:{self.port}'

    def close(self):
        self.process.terminate()
        self.process.wait(timeout=10)


def connect_through(relay: GuestRelay, target: str) -> tuple[socket.socket, bytes]:
    """Send `CONNECT target` through the relay; returns the socket and the proxy's answer
    (head and body)."""
    sock = socket.create_connection(('127.0.0.1', relay.port), timeout=10)
    sock.sendall(f'CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n'.encode())
    answer = b''
    while b'\r\n\r\n' not in answer:
        chunk = sock.recv(4096)
        if not chunk:
            break
        answer += chunk
    length = re.search(rb'(?im)^content-length:\s*(\d+)', answer.split(b'\r\n\r\n', 1)[0])
    while length and len(answer.split(b'\r\n\r\n', 1)[1]) < int(length.group(1)):
        chunk = sock.recv(4096)
        if not chunk:
            break
        answer += chunk
    return sock, answer


def read_all(sock: socket.socket, limit: int = 1 << 20) -> bytes:
    """Everything until the peer closes (or the socket's timeout passes), at most `limit` bytes."""
    data = b''
    try:
        while len(data) < limit:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return data
