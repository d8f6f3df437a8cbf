"""Bound secrets in the egress proxy (issue 23, the proxy's side): the guest holds a placeholder, the proxy puts
the real value into the bound header of HTTPS requests to the bound hosts, and refuses the placeholder anywhere
else. Against real mitmproxy and real TLS upstreams on loopback addresses, as test_proxy.py: what a guest sees
through its door, and what the upstream received."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from daemons.proxy.bound_secrets import BodyScanner, Masker
from daemons.proxy.control import EgressProxy, ProxyError, write_rules
from daemons.proxy.rules import Rules, RulesError, settable_header
from tests.proxy_upstreams import GuestRelay, Upstream, connect_through, make_upstream_ca, random_loopback_address
from tests.test_proxy import (curl, open_bottle, read_response, status_and_body, tear_down, venv,  # noqa: F401
                              wait_for)

pytestmark = pytest.mark.fast

NAME = 'API_TOKEN'
PLACEHOLDER = 'cbp-API_TOKEN-' + 'q' * 8 + '0123456789ab'


class Setup:
    """The module's proxy, two upstreams, and the bottles: `keeper` binds API_TOKEN to the first upstream's
    Authorization header and may reach both; `unattached` binds it too and is never handed a value."""


def binding(address: str) -> dict:
    return {'name': NAME, 'hosts': [address], 'header': 'Authorization', 'format': 'Bearer {}',
            'placeholder': PLACEHOLDER}


@pytest.fixture(scope='module')
def setup(tmp_path_factory, venv):     # noqa: F811 (test_proxy's fixture)
    s = Setup()
    s.root = tmp_path_factory.mktemp('secrets')
    s.address, s.other = random_loopback_address(), random_loopback_address()
    s.upstream_ca, cert, key = make_upstream_ca(s.root, s.address, s.other)
    s.upstream = Upstream(s.address, cert, key, plain=True)
    s.other_upstream = Upstream(s.other, cert, key)
    s.proxy = EgressProxy(s.root / 'proxy', venv, upstream_ca=s.upstream_ca)
    s.relays = []
    s.value = 'real-' + secrets.token_hex(20)
    rules = {'hosts': [{'host': s.address}, {'host': s.other}],
             'allow_private': [f'{s.address}/32', f'{s.other}/32'], 'secrets': [binding(s.address)]}
    try:
        s.keeper = open_bottle(s, 'keeper', rules)
        s.unattached = open_bottle(s, 'unattached', rules)
        s.proxy.hand_over('keeper', {NAME: s.value})
        yield s
    finally:
        tear_down(s, s.upstream, s.other_upstream)


def received(s: Setup) -> int:
    return len(s.upstream.received) + len(s.other_upstream.received)


def log_lines(s: Setup, bottle: str) -> list[dict]:
    log = s.root / 'bottles' / bottle / 'egress.log'
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def last_line(s: Setup, bottle: str, path: str) -> dict:
    assert wait_for(lambda: any(line['path'] == path for line in log_lines(s, bottle))), path
    return [line for line in log_lines(s, bottle) if line['path'] == path][-1]


def authorization(request: dict) -> str | None:
    return next((value for name, value in request['headers'] if name.lower() == 'authorization'), None)


def test_the_placeholder_in_its_header_to_its_host_reaches_the_upstream_as_the_value(setup):
    s = setup
    s.proxy.hand_over('keeper', {NAME: s.value})
    status, body = status_and_body(curl(s, s.keeper, f'https://{s.address}/api/me',
                                        '-H', f'Authorization: Bearer {PLACEHOLDER}'))
    assert (status, body) == (200, 'upstream saw GET /api/me')
    assert authorization(s.upstream.received[-1]) == f'Bearer {s.value}'
    line = last_line(s, 'keeper', '/api/me')
    assert line['allowed'] is True and line['secret'] == NAME
    # A request without the placeholder carries no secret and says none.
    assert status_and_body(curl(s, s.keeper, f'https://{s.address}/plain'))[0] == 200
    assert authorization(s.upstream.received[-1]) is None and 'secret' not in last_line(s, 'keeper', '/plain')


# Where the placeholder may not go: (curl's arguments, the URL's host: 'address' or 'other', where the 403 says).
ELSEWHERE = {
    'another allowed host': (['-H', f'Authorization: Bearer {PLACEHOLDER}'], 'https://{other}/api', 'Authorization'),
    'another header': (['-H', f'X-Api-Key: {PLACEHOLDER}'], 'https://{address}/api', 'X-Api-Key header'),
    'a header name': (['-H', f'X-{PLACEHOLDER}: 1'], 'https://{address}/api', 'name of a header'),
    'the path': ([], 'https://{address}/keys/' + PLACEHOLDER, 'in its URL'),
    'the query': ([], 'https://{address}/api?key=' + PLACEHOLDER, 'in its URL'),
    'a small body': (['-d', f'token={PLACEHOLDER}'], 'https://{address}/api', 'in its body'),
    'plain HTTP to its host': (['-H', f'Authorization: Bearer {PLACEHOLDER}'], 'http://{address}/api',
                               'http://'),
}


@pytest.mark.parametrize('case', ELSEWHERE)
def test_the_placeholder_anywhere_else_is_refused_naming_the_secret_and_nothing_goes_up(setup, case):
    s = setup
    args, url, where = ELSEWHERE[case]
    url = url.format(address=s.address, other=s.other)
    before = received(s)
    status, body = status_and_body(curl(s, s.keeper, url, *args))
    assert status == 403, body
    assert f'the placeholder of secret {NAME}' in body and where in body, body
    assert f'goes only in the Authorization header of HTTPS requests to {s.address}' in body
    assert received(s) == before
    path = url.split('/', 3)[3].split('?')[0]
    line = last_line(s, 'keeper', '/' + path)
    assert (line['allowed'], line['status'], line['secret']) == (False, 403, NAME)


def tls_through(s: Setup, relay: GuestRelay, address: str) -> ssl.SSLSocket:
    sock, answer = connect_through(relay, f'{address}:443')
    assert answer.startswith(b'HTTP/1.1 200'), answer
    return ssl.create_default_context(cafile=str(s.proxy.ca_cert)).wrap_socket(sock, server_hostname=address)


def post_in_two_parts(s: Setup, first: bytes, second: bytes, path: str) -> bytes:
    """A POST streamed through the proxy (over 1 MiB: mitmproxy streams it), its body in two sends a moment
    apart, so the proxy most likely reads the first before the second comes; the answer."""
    with tls_through(s, s.keeper, s.address) as tls:
        tls.sendall(f'POST {path} HTTP/1.1\r\nHost: {s.address}\r\nContent-Type: application/octet-stream\r\n'
                    f'Content-Length: {len(first) + len(second)}\r\n\r\n'.encode() + first)
        time.sleep(0.3)
        tls.sendall(second)
        return read_response(tls)


def test_a_large_streamed_body_with_the_placeholder_across_chunks_is_refused_before_it_leaves(setup):
    s = setup
    half = len(PLACEHOLDER) // 2
    before = len(s.upstream.received)
    answer = post_in_two_parts(s, b'a' * (3 << 19) + PLACEHOLDER[:half].encode(),
                               PLACEHOLDER[half:].encode() + b'b' * (1 << 19), '/upload')
    assert answer.startswith(b'HTTP/1.1 403'), answer[:300]
    assert f'the placeholder of secret {NAME} in its body'.encode() in answer
    # Streamed: the upstream got the head and the body up to the placeholder at most, then the connection closed,
    # the request never whole.
    assert wait_for(lambda: len(s.upstream.received) > before)
    [cut] = s.upstream.received[before:]
    assert (cut['path'], cut['complete']) == ('/upload', False)
    assert cut['body'] == b'a' * len(cut['body']), cut['body'][-100:]
    line = last_line(s, 'keeper', '/upload')
    assert (line['allowed'], line['secret']) == (False, NAME)
    # The same body with only the placeholder's beginning (held back a moment, then sent) goes up whole.
    first, second = b'a' * (3 << 19) + PLACEHOLDER[:half].encode(), b'not the rest' + b'b' * (1 << 19)
    answer = post_in_two_parts(s, first, second, '/upload-clean')
    assert answer.startswith(b'HTTP/1.1 200'), answer[:300]
    assert s.upstream.received[-1]['complete'] and s.upstream.received[-1]['body'] == first + second


def test_a_new_value_handed_over_applies_to_the_next_request_without_a_restart(setup):
    s = setup
    pid = s.proxy.daemon().pid()
    rotated = 'rotated-' + secrets.token_hex(20)
    s.proxy.hand_over('keeper', {NAME: rotated})
    try:
        assert status_and_body(curl(s, s.keeper, f'https://{s.address}/rotated',
                                    '-H', f'Authorization: Bearer {PLACEHOLDER}'))[0] == 200
        assert authorization(s.upstream.received[-1]) == f'Bearer {rotated}'
        assert s.proxy.daemon().pid() == pid
    finally:
        s.proxy.hand_over('keeper', {NAME: s.value})


def test_a_placeholder_without_a_value_asks_to_attach_again_also_after_a_restart(setup):
    s = setup
    before = received(s)
    status, body = status_and_body(curl(s, s.unattached, f'https://{s.address}/api',
                                        '-H', f'Authorization: Bearer {PLACEHOLDER}'))
    assert status == 403 and f'secret {NAME}, which has no value in the egress proxy yet' in body, body
    assert 'doit launch:unattached' in body
    # A restarted proxy has lost every value: the keeper is asked to attach again, until it is handed over.
    pid = s.proxy.daemon().pid()
    os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: s.proxy.daemon().pid() is None)
    assert s.proxy.ensure_running() is True
    status, body = status_and_body(curl(s, s.keeper, f'https://{s.address}/api',
                                        '-H', f'Authorization: Bearer {PLACEHOLDER}'))
    assert status == 403 and 'doit launch:keeper' in body
    assert received(s) == before
    s.proxy.hand_over('keeper', {NAME: s.value})
    assert status_and_body(curl(s, s.keeper, f'https://{s.address}/again',
                                '-H', f'Authorization: Bearer {PLACEHOLDER}'))[0] == 200
    assert authorization(s.upstream.received[-1]) == f'Bearer {s.value}'


def test_an_upstream_echoing_the_value_back_gives_the_guest_the_placeholder(setup):
    s = setup
    s.proxy.hand_over('keeper', {NAME: s.value})
    proc = curl(s, s.keeper, f'https://{s.address}/echo-auth', '-D', '-', '-H', f'Authorization: Bearer {PLACEHOLDER}')
    assert s.value not in proc.stdout and s.value[:12] not in proc.stdout
    assert f'X-Seen-Authorization: Bearer {PLACEHOLDER}' in proc.stdout
    assert f'the key Bearer {PLACEHOLDER} is not valid here\n' in proc.stdout
    assert proc.stdout.endswith('\n401')
    assert authorization(s.upstream.received[-1]) == f'Bearer {s.value}'      # it did go up
    # Over 1 MiB, the response is streamed: the value split across two reads is put back all the same.
    big = curl(s, s.keeper, f'https://{s.address}/echo-auth?big', '-H', f'Authorization: Bearer {PLACEHOLDER}')
    assert s.value[:12] not in big.stdout and big.stdout.endswith(f'the key Bearer {PLACEHOLDER} is not valid here\n\n401')
    assert big.stdout.startswith('.' * (2 << 20))


def test_the_value_is_nowhere_but_in_the_proxys_memory(setup):
    s = setup
    s.proxy.hand_over('keeper', {NAME: s.value})
    assert status_and_body(curl(s, s.keeper, f'https://{s.address}/nowhere',
                                '-H', f'Authorization: Bearer {PLACEHOLDER}'))[0] == 200
    value = s.value.encode()
    places = [p for p in (*s.root.rglob('*'), *s.proxy.secrets_socket.parent.rglob('*'))
              if p.is_file() and not p.is_socket()]
    assert s.proxy.daemon().log_file in places and s.root / 'bottles' / 'keeper' / 'egress-rules.json' in places
    assert [p for p in places if value in p.read_bytes()] == []
    pid = s.proxy.daemon().pid()
    for part in ('cmdline', 'environ'):
        assert value not in Path(f'/proc/{pid}/{part}').read_bytes()
    assert value not in json.dumps(s.proxy.daemon().argv).encode() and value not in s.proxy._config().encode()


def test_the_hand_over_socket_is_the_proxy_users_alone(setup):
    s = setup
    path = s.proxy.secrets_socket
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    message = json.dumps({'bottle': 'keeper', 'values': {NAME: 'stolen-' + secrets.token_hex(8)}})
    script = ('import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n'
              'try:\n    s.sendall(sys.argv[2].encode()); s.shutdown(socket.SHUT_WR)\n'
              'except BrokenPipeError:\n    pass   # answered and closed before it read the message\n'
              'print(s.recv(4096).decode())')
    as_nobody = ['setpriv', '--reuid', 'nobody', '--regid', 'nogroup', '--clear-groups', '/usr/bin/python3', '-c',
                 script, str(path), message]
    refused = subprocess.run(as_nobody, capture_output=True, text=True, timeout=30)
    assert refused.returncode != 0 and 'PermissionError' in refused.stderr
    # Reached all the same (a hard link in an open directory, the socket writable by all), the proxy itself
    # refuses a peer of another uid (SO_PEERCRED).
    opened = Path(tempfile.mkdtemp(dir=path.parent.parent.parent))
    try:
        os.chmod(opened, 0o755)
        os.link(path, opened / 'link.sock')
        os.chmod(path, 0o666)
        answered = subprocess.run(as_nobody[:-2] + [str(opened / 'link.sock'), message], capture_output=True,
                                  text=True, timeout=30)
    finally:
        os.chmod(path, 0o600)
        shutil.rmtree(opened)
    assert answered.returncode == 0, answered.stderr
    assert 'only uid 0' in json.loads(answered.stdout)['error']
    assert status_and_body(curl(s, s.keeper, f'https://{s.address}/still',
                                '-H', f'Authorization: Bearer {PLACEHOLDER}'))[0] == 200
    assert authorization(s.upstream.received[-1]) == f'Bearer {s.value}'


def test_a_hand_over_the_proxy_cannot_take_is_a_proxy_error_quoting_no_value(setup, tmp_path, venv):  # noqa: F811
    s = setup
    with pytest.raises(ProxyError, match='has no secret OTHER_TOKEN bound') as unbound:
        s.proxy.hand_over('keeper', {'OTHER_TOKEN': 'x' * 30})
    assert 'x' * 30 not in str(unbound.value)
    with pytest.raises(ProxyError, match='has no door'):
        s.proxy.hand_over('nobody-here', {NAME: s.value})
    with pytest.raises(ProxyError, match='printable ASCII') as bad:
        s.proxy.hand_over('keeper', {NAME: 'line\r\nX-Injected: 1'})
    assert 'Injected' not in str(bad.value)
    with pytest.raises(ProxyError, match='is not running'):
        EgressProxy(tmp_path / 'idle', venv).hand_over('keeper', {NAME: s.value})


# --- the format and the pieces, without a proxy -----------------------------------------------------

def test_rules_with_a_bad_secret_binding_name_the_key():
    good = binding('api.example.com')
    assert Rules.from_json(Rules.from_json({'secrets': [good]}).to_json()).secrets[0].placeholder == PLACEHOLDER
    for change, key in (({'format': 'Bearer'}, '"format"'), ({'format': '{} {}'}, '"format"'),
                        ({'header': 'Host'}, '"header"'), ({'header': 'Proxy-Authorization'}, '"header"'),
                        ({'header': 'X-Claude-Bottle-Gate-Key'}, '"header"'), ({'header': 'Bad Header'}, '"header"'),
                        ({'placeholder': 'short'}, '"placeholder"'), ({'placeholder': 'x' * 30 + '!'}, '"placeholder"'),
                        ({'hosts': ['API.example.com']}, '"hosts"'), ({'hosts': []}, '"hosts"'),
                        ({'name': 'not a name'}, '"name"')):
        with pytest.raises(RulesError, match=key) as err:
            Rules.from_json({'secrets': [{**good, **change}]})
        assert '"secrets"[0]' in str(err.value)
    with pytest.raises(RulesError, match='overlaps'):
        Rules.from_json({'secrets': [good, {**good, 'name': 'B', 'placeholder': PLACEHOLDER + 'x'}]})
    assert settable_header('Authorization') is None and settable_header('x-api-key') is None
    assert all(settable_header(h) for h in ('content-length', 'Transfer-Encoding', 'Connection', 'Upgrade', 'TE',
                                            'Trailer', 'Keep-Alive', 'Proxy-Authorization', 'X-Claude-Bottle'))


def test_a_body_scanner_finds_a_placeholder_across_chunks_and_never_passes_a_byte_of_it():
    rules = Rules.from_json({'secrets': [binding('api.example.com')]})
    data = b'x' * 50 + PLACEHOLDER.encode() + b'y' * 50
    for cut in range(1, len(data)):
        scanner = BodyScanner(rules.secrets, None)
        passed, found = scanner.feed(data[:cut])
        if found is None:
            more, found = scanner.feed(data[cut:])
            passed += more
        assert found is rules.secrets[0] and data[:50].startswith(passed)     # nothing of the placeholder
    scanner = BodyScanner(rules.secrets, None)
    clean = b'x' * 10 + PLACEHOLDER[:10].encode()
    passed, found = scanner.feed(clean)
    assert (passed, found) == (b'x' * 10, None)       # the possible beginning waits
    assert scanner.feed(b'z')[0] + scanner.end() == PLACEHOLDER[:10].encode() + b'z'


def test_a_masker_puts_placeholders_back_across_chunks_holding_back_only_a_possible_beginning():
    value = b'real-value-0123456789'
    stream = b'error: key ' + value + b' is wrong\n\ndata: next\n\n'
    for cut in range(1, len(stream)):
        masker = Masker([(value, PLACEHOLDER.encode())])
        out = masker(stream[:cut]) + masker(stream[cut:]) + masker(b'')
        assert out == stream.replace(value, PLACEHOLDER.encode())
    masker = Masker([(value, PLACEHOLDER.encode())])
    assert masker(b'data: event 1\n\n') == b'data: event 1\n\n'   # server-sent events are not held
