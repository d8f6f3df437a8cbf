"""The egress proxy and the daemon lifecycle, against real mitmproxy, socat, curl and a real TLS
upstream on a loopback address (port 443; the tests run as root, like the rest of the suite).

Two bottles share one proxy: alpha may reach the upstream and `localhost`; beta only GET on
/public/. Each is reached like from inside a bottle: a socat relay on 127.0.0.1 to its door.
The mitmproxy environment is made in the tests' download cache (conftest), where doit finds it too;
making it the first time needs PyPI."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from daemons.lifecycle import Daemon, DaemonError, connects
from daemons.proxy.control import EgressProxy, ProxyError, door_answers, ensure_venv, write_rules
from daemons.proxy.rules import HEALTH_HOST, RulesError
from tests.proxy_upstreams import (GuestRelay, Upstream, connect_through, make_upstream_ca,
                                   random_loopback_address, read_all)

pytestmark = pytest.mark.fast



# --- the lifecycle piece, with plain processes -------------------------------------------------

def python_daemon(tmp_path: Path, code: str, probe=lambda: True, **kw) -> Daemon:
    return Daemon('sleeper', tmp_path / 'state', [sys.executable, '-c', code], probe, **kw)


def test_daemon_is_detached_logs_to_its_file_and_stops(tmp_path):
    daemon = python_daemon(tmp_path, 'import sys, time; print("ready", flush=True); time.sleep(600)')
    pid = daemon.start()
    try:
        assert daemon.healthy() and daemon.pid() == pid
        assert os.getsid(pid) == pid                                  # its own session
        assert os.readlink(f'/proc/{pid}/fd/0') == '/dev/null'
        assert os.readlink(f'/proc/{pid}/fd/1') == str(daemon.log_file)
        record = json.loads(daemon.pid_file.read_text())
        assert record['pid'] == pid
        assert wait_for(lambda: 'ready' in daemon.log_file.read_text())
        assert daemon.ensure_running() is False and daemon.pid() == pid   # healthy: left alone
    finally:
        daemon.stop()
    assert not daemon.pid_file.exists() and daemon.pid() is None and not daemon.healthy()
    assert not Path(f'/proc/{pid}').exists() or proc_state(pid) == 'Z'


def test_a_daemon_ignoring_sigterm_is_killed_after_the_bound(tmp_path):
    daemon = python_daemon(tmp_path, 'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); '
                                     'print("ignoring", flush=True); time.sleep(600)', stop_timeout=1)
    pid = daemon.start()
    assert wait_for(lambda: 'ignoring' in daemon.log_file.read_text())
    daemon.stop()
    assert daemon.pid() is None and not daemon.pid_file.exists()
    assert not Path(f'/proc/{pid}').exists() or proc_state(pid) == 'Z'


def test_a_crashed_daemon_or_a_reused_pid_is_not_healthy_and_is_restarted(tmp_path):
    daemon = python_daemon(tmp_path, 'import time; time.sleep(600)')
    first = daemon.start()
    os.kill(first, signal.SIGKILL)
    assert wait_for(lambda: daemon.pid() is None)
    assert daemon.pid_file.exists() and not daemon.healthy()          # a stale pid file
    assert daemon.ensure_running() is True
    second = daemon.pid()
    assert second and second != first
    # The pid file names a live process that is not the daemon (pid 1, another start time).
    daemon.stop()
    daemon.pid_file.write_text(json.dumps({'pid': 1, 'start_time': 12345, 'argv': []}))
    assert daemon.pid() is None and not daemon.healthy()
    daemon.stop()                                                     # and nothing signals pid 1
    assert Path('/proc/1').exists()


def test_a_failing_probe_means_unhealthy_and_a_daemon_that_dies_at_start_is_reported(tmp_path):
    answers = {'ok': False}
    daemon = python_daemon(tmp_path, 'import time; time.sleep(600)', lambda: answers['ok'], start_timeout=1)
    with pytest.raises(DaemonError, match='did not pass its health check') as failed:
        daemon.start()
    assert str(daemon.log_file) in str(failed.value) and daemon.pid() is None
    dying = Daemon('dying', tmp_path / 'state', [sys.executable, '-c', 'import sys; sys.exit("out of luck")'],
                   lambda: False)
    with pytest.raises(DaemonError, match='exited while starting') as died:
        dying.start()
    assert 'out of luck' in str(died.value)
    raising = python_daemon(tmp_path, 'import time; time.sleep(600)', lambda: 1 / 0)
    assert raising.healthy() is False                                  # never raises


# A daemon that listens (its probe passes) and exits after the seconds it is given, saying why.
LISTENS_THEN_EXITS = '''
import socket, sys, time
server = socket.socket(socket.AF_UNIX)
server.bind("\\0" + sys.argv[1])
server.listen()
print("listening", flush=True)
time.sleep(float(sys.argv[2]))
print("giving up: out of luck", flush=True)
'''


def listening_daemon(tmp_path: Path, lifetime: float, **kw) -> Daemon:
    name = f'claude-bottle-test-{os.getpid()}-{time.monotonic_ns()}'     # an abstract socket: no file
    return Daemon('flaky', tmp_path / 'state', [sys.executable, '-c', LISTENS_THEN_EXITS, name, str(lifetime)],
                  lambda: connects('\0' + name), connect=lambda: connects('\0' + name), **kw)


def starts_in_log(daemon: Daemon) -> int:
    return daemon.log_file.read_text().count('starting flaky')


@pytest.mark.parametrize('lifetime, backoff', [(0.3, 0.1), pytest.param(1.0, None, marks=pytest.mark.extended)],
                         ids=['quick', 'default-backoff'])
def test_a_daemon_that_keeps_dying_is_backed_off_then_left_stopped_in_words(tmp_path, capfd, lifetime, backoff):
    daemon = listening_daemon(tmp_path, lifetime, **({'backoff': backoff} if backoff else {}))
    wait = backoff or 1.0
    assert daemon.ensure_running() is True                      # its probe passed: started
    for death in (1, 2):
        assert wait_for(lambda: daemon.pid() is None)           # ... and it died
        began = time.monotonic()
        assert daemon.ensure_running() is True                  # started again, after a wait
        assert time.monotonic() - began >= wait
        said = capfd.readouterr().err
        assert f'claude-bottle: flaky died ' in said and f'({death} of 3 deaths within 10 minutes' in said
        assert f'starting it again in {wait:g} s. Its log: {daemon.log_file}' in said
        wait *= 2                                               # the next wait is twice as long
    assert wait_for(lambda: daemon.pid() is None)
    with pytest.raises(DaemonError) as failed:                  # the third death: one error, not a start
        daemon.ensure_running()
    message = str(failed.value)
    assert message.startswith('flaky died 3 times within 10 minutes, each time ')
    assert 'or less after it had started and passed its health check; it is left stopped.\n' in message
    assert f'\nRead its log {daemon.log_file} for why it exits' in message and '`doit status`' in message
    assert f'or once you remove {daemon.starts_file}' in message
    assert message.endswith('giving up: out of luck')          # the log's end
    assert capfd.readouterr().err == '' and starts_in_log(daemon) == 3
    # Left stopped: the next run is refused at once, and `doit status` can say why.
    with pytest.raises(DaemonError, match='is left stopped'):
        daemon.ensure_running()
    assert starts_in_log(daemon) == 3 and daemon.pid() is None
    assert daemon.crash_loop() == f'left stopped after dying 3 times within 10 minutes; see {daemon.log_file}'
    # Removing the record, as the message says, lets it start again at once.
    daemon.starts_file.unlink()
    assert daemon.ensure_running() is True and daemon.crash_loop() is None
    daemon.stop()


def test_a_daemon_that_settles_is_forgiven_and_a_stop_is_no_death(tmp_path, capfd):
    daemon = listening_daemon(tmp_path, 600, settle=0.5, backoff=0.1)
    assert daemon.ensure_running() is True
    try:
        os.kill(daemon.pid(), signal.SIGKILL)                   # a crash
        assert wait_for(lambda: daemon.pid() is None)
        assert daemon.ensure_running() is True
        assert '(1 of 3 deaths' in capfd.readouterr().err
        time.sleep(0.6)                                         # it keeps running past its settle time
        assert daemon.ensure_running() is False                 # healthy: its death is forgotten
        os.kill(daemon.pid(), signal.SIGKILL)
        assert wait_for(lambda: daemon.pid() is None)
        assert daemon.ensure_running() is True
        assert '(1 of 3 deaths' in capfd.readouterr().err       # counted from one again
        # A stop, then a start, or a restart, is no death: nothing said, no wait.
        daemon.stop()
        assert daemon.ensure_running() is True
        daemon.start()
        assert daemon.ensure_running() is False
        assert capfd.readouterr().err == '' and daemon.crash_loop() is None
    finally:
        daemon.stop()
    assert not daemon.starts_file.exists()


# --- the proxy ----------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def venv(claude_cache):
    return ensure_venv(claude_cache / 'claude-bottle')     # where doit makes it for the bottles too


class Setup:
    """The module's proxy, upstream, bottles and their guest relays."""


@pytest.fixture(scope='module')
def setup(tmp_path_factory, venv):
    s = Setup()
    s.root = tmp_path_factory.mktemp('egress')
    s.address = random_loopback_address()
    s.upstream_ca, s.upstream_cert, s.upstream_key = make_upstream_ca(s.root, s.address)
    s.upstream = Upstream(s.address, s.upstream_cert, s.upstream_key)
    s.proxy = EgressProxy(s.root / 'proxy', venv, upstream_ca=s.upstream_ca)
    s.relays = []
    try:
        s.alpha = open_bottle(s, 'alpha', {'hosts': [{'host': s.address}, {'host': 'localhost'},
                                                     {'domain': 'example.test'}],
                                           'allow_private': [f'{s.address}/32']})
        s.beta = open_bottle(s, 'beta', {'hosts': [{'host': s.address, 'methods': ['GET'], 'paths': ['/public/']}],
                                         'allow_private': [f'{s.address}/32']})
        yield s
    finally:
        tear_down(s, s.upstream)


def tear_down(s: Setup, *upstreams: Upstream) -> None:
    """The guest relays closed, the proxy stopped, the upstreams closed."""
    for relay in s.relays:
        relay.close()
    s.proxy.stop()
    for upstream in upstreams:
        upstream.close()


def open_bottle(s: Setup, name: str, rules: dict) -> GuestRelay:
    door = s.proxy.open_door(name, s.root / 'bottles' / name, s.root / 'doors' / name)
    write_rules(door.rules, rules)
    relay = GuestRelay(door.socket)
    s.relays.append(relay)
    return relay


def curl(s: Setup, relay: GuestRelay, url: str, *args: str) -> subprocess.CompletedProcess:
    """curl as in a bottle: through the relay, trusting only the proxy's CA."""
    return subprocess.run(['curl', '-sS', '--max-time', '20', '--proxy', relay.url, '--cacert', str(s.proxy.ca_cert),
                           '-w', '\n%{http_code}', *args, url], capture_output=True, text=True, timeout=60)


def status_and_body(proc: subprocess.CompletedProcess) -> tuple[int, str]:
    body, _, code = proc.stdout.rpartition('\n')
    return int(code), body.rstrip('\n')


def last_log_line(s: Setup, bottle: str, path: str) -> dict:
    """The bottle's last log line about `path`: an allowed request is logged when its response has
    been passed on, which the client may see complete a moment earlier."""
    log = s.root / 'bottles' / bottle / 'egress.log'

    def lines():
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    assert wait_for(lambda: any(line['path'] == path for line in lines())), f'no line about {path} in {log}'
    return [line for line in lines() if line['path'] == path][-1]


def test_an_allowed_host_is_reached_trusting_only_the_bottle_ca(setup):
    s = setup
    status, body = status_and_body(curl(s, s.alpha, f'https://{s.address}/hello?token=secret'))
    assert (status, body) == (200, 'upstream saw GET /hello?token=secret')
    line = last_log_line(s, 'alpha', '/hello')
    assert line['allowed'] is True and line['host'] == s.address and line['path'] == '/hello'
    assert line['status'] == 200 and line['bytes'] == len(body) + 1 and line['address'] == s.address
    assert 'secret' not in (s.root / 'bottles' / 'alpha' / 'egress.log').read_text()
    # Without the bottle's CA, curl does not trust the answer: the proxy's certificate is its own.
    plain = subprocess.run(['curl', '-sS', '--max-time', '20', '--proxy', s.alpha.url, f'https://{s.address}/'],
                           capture_output=True, text=True, timeout=60)
    assert plain.returncode == 60, plain.stderr


def test_requests_on_one_client_connection_share_one_upstream_connection(setup):
    # The upstream connection goes to the checked address, and is still reused for the host.
    # (HTTP/1.1: mitmproxy never reuses one for an HTTP/2 client and an HTTP/1.1 server.)
    s = setup
    before = s.upstream.connections, len(s.upstream.requests)
    proc = subprocess.run(['curl', '-sS', '--http1.1', '--max-time', '20', '--proxy', s.alpha.url,
                           '--cacert', str(s.proxy.ca_cert),
                           f'https://{s.address}/one', f'https://{s.address}/two', f'https://{s.address}/three'],
                          capture_output=True, text=True, timeout=60)
    assert proc.stdout.splitlines() == ['upstream saw GET /one', 'upstream saw GET /two', 'upstream saw GET /three']
    assert (s.upstream.connections, len(s.upstream.requests)) == (before[0] + 1, before[1] + 3)


def test_a_host_name_is_connected_to_its_checked_address_and_the_connection_reused(setup):
    # `localhost` is the one name every machine resolves: an upstream on its addresses, which
    # this bottle allows as private networks. The log names the address connected to.
    s = setup
    upstreams = []
    try:
        for address in ('127.0.0.1', '::1'):
            try:
                upstreams.append(Upstream(address, s.upstream_cert, s.upstream_key))
            except OSError as err:
                if address == '127.0.0.1':
                    pytest.skip(f'port 443 on 127.0.0.1 is not free here: {err}')
        delta = open_bottle(s, 'delta', {'hosts': [{'host': 'localhost'}],
                                         'allow_private': ['127.0.0.0/8', '::1/128']})
        proc = subprocess.run(['curl', '-sS', '--http1.1', '--max-time', '20', '--proxy', delta.url,
                               '--cacert', str(s.proxy.ca_cert), 'https://localhost/one', 'https://localhost/two'],
                              capture_output=True, text=True, timeout=60)
        assert proc.stdout.splitlines() == ['upstream saw GET /one', 'upstream saw GET /two'], proc.stderr
        assert sum(u.connections for u in upstreams) == 1
        assert last_log_line(s, 'delta', '/two')['address'] in ('127.0.0.1', '::1')
    finally:
        s.proxy.close_door('delta')
        for upstream in upstreams:
            upstream.close()


def test_an_upstream_certificate_the_proxy_cannot_verify_is_refused(setup, tmp_path):
    s = setup
    address = random_loopback_address()
    _, cert, key = make_upstream_ca(tmp_path, address)          # a CA the proxy was not told about
    untrusted = Upstream(address, cert, key)
    try:
        epsilon = open_bottle(s, 'epsilon', {'hosts': [{'host': address}], 'allow_private': [f'{address}/32']})
        status, body = status_and_body(curl(s, epsilon, f'https://{address}/secret'))
        assert status == 502 and 'certificate verify failed' in body.lower()
        assert untrusted.requests == []
        line = last_log_line(s, 'epsilon', '/secret')
        assert line['allowed'] is True and 'certificate verify failed' in line['reason'].lower()
    finally:
        s.proxy.close_door('epsilon')
        untrusted.close()


def test_a_denied_host_gets_a_readable_403_and_no_connection_upstream(setup):
    s = setup
    before = s.upstream.connections
    status, body = status_and_body(curl(s, s.beta, f'https://{s.address}/private/x', '-X', 'POST', '-d', 'x=1'))
    assert status == 403
    assert s.address in body and 'network.allow_hosts' in body and 'beta' in body
    status, body = status_and_body(curl(s, s.alpha, 'https://denied.test/'))
    assert status == 403 and 'denied.test is not an allowed host' in body
    assert s.upstream.connections == before
    line = last_log_line(s, 'alpha', '/')
    assert (line['host'], line['allowed'], line['status']) == ('denied.test', False, 403)
    assert 'not an allowed host' in line['reason']
    # IP literals of denied addresses, v4 and v6, are no way around the rules.
    for literal in ('127.0.0.1', '[::1]'):
        status, body = status_and_body(curl(s, s.alpha, f'https://{literal}/'))
        assert status == 403 and 'is not an allowed host' in body, literal


def test_a_host_narrowed_to_get_on_a_path_prefix(setup):
    s = setup
    assert status_and_body(curl(s, s.beta, f'https://{s.address}/public/readme')) == \
        (200, 'upstream saw GET /public/readme')
    before = s.upstream.connections, len(s.upstream.requests)
    for args in (['-X', 'POST', '-d', 'x'], ['-X', 'DELETE']):
        status, body = status_and_body(curl(s, s.beta, f'https://{s.address}/public/readme', *args))
        assert status == 403 and 'GET on /public/' in body
    for path in ('/private/readme', '/public/../private/readme', '/public/%2e%2e/private'):
        status, _ = status_and_body(curl(s, s.beta, f'https://{s.address}{path}', '--path-as-is'))
        assert status == 403, path
    assert (s.upstream.connections, len(s.upstream.requests)) == before


def test_the_same_host_is_allowed_for_one_bottle_and_not_for_the_other(setup):
    s = setup
    assert status_and_body(curl(s, s.alpha, f'https://{s.address}/private/x'))[0] == 200
    assert status_and_body(curl(s, s.beta, f'https://{s.address}/private/x'))[0] == 403


def test_a_service_that_does_not_answer_is_named_to_the_guest_not_its_address(setup, tmp_path):
    """mitmproxy's own answer to a failed connect names the address and port it tried: for a project's service,
    a loopback port of the host. The guest is told the service's name instead."""
    s = setup
    with socket.socket() as unused:
        unused.bind(('127.0.0.1', 0))
        port = unused.getsockname()[1]      # free once closed: nothing listens there
    (tmp_path / 'key').write_text('key')
    s.proxy.route_service('gate', port, tmp_path / 'key')
    try:
        status, body = status_and_body(curl(s, s.alpha, 'http://git.bottle.invalid/some/repo.git/info/refs'))
        # the guest asks the proxy's health answer, as the host does, through its own door
        health = json.loads(status_and_body(curl(s, s.alpha, f'http://{HEALTH_HOST}/'))[1])
    finally:
        s.proxy.route_service('gate', None, None)
    assert status == 502 and 'the project&#x27;s gate service does not answer' in body, body
    assert str(port) not in body and '127.0.0.1' not in body
    assert set(health['services']) == {'gate'} and str(port) not in json.dumps(health), health


def test_a_request_the_addon_fails_to_judge_is_refused_not_passed(venv, tmp_path):
    """Fail closed: whatever goes wrong while a request is judged (here the check itself raises), the request
    gets a 403 and is not marked allowed, so it never goes up, not even on an upstream connection an
    earlier request opened. In-process, in mitmproxy's environment, with mitmproxy's test flows."""
    script = f"""
import asyncio, json, sys
sys.path.insert(0, {str(Path(__file__).resolve().parent.parent / 'daemons' / 'proxy')!r})
from mitmproxy.test import tflow
import addon
fence = addon.EgressFence()
fence.bottles['b'] = addon.Bottle('b', {str(tmp_path)!r}, {str(tmp_path / 'rules.json')!r},
                                  {str(tmp_path / 'egress.log')!r})
async def broken(flow, bottle):
    raise RuntimeError('a bug')
fence.refusal = broken
flow = tflow.tflow()
flow.request.content = b''      # a GET with a body would be refused before the broken check
fence.clients[flow.client_conn.id] = 'b'        # as its door says
asyncio.run(fence.requestheaders(flow))
print(json.dumps([flow.response.status_code, flow.response.get_text(), 'bottle_allowed' in flow.metadata]))
"""
    proc = subprocess.run([str(venv / 'bin' / 'python'), '-c', script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    status, body, allowed = json.loads(proc.stdout.splitlines()[-1])
    assert (status, allowed) == (403, False)
    assert 'could not check this request (RuntimeError)' in body
    assert json.loads((tmp_path / 'egress.log').read_text())['allowed'] is False


def test_connect_to_other_ports_and_non_canonical_addresses_is_refused_at_connect(setup):
    s = setup
    for target in (f'{s.address}:22', 'localhost:22', '2130706433:443', '0x7f000001:443', '127.1:443',
                   '0177.0.0.1:443'):
        sock, answer = connect_through(s.alpha, target)
        sock.close()
        assert answer.startswith(b'HTTP/1.1 403'), (target, answer)
    sock, answer = connect_through(s.alpha, f'{s.address}:22')
    sock.close()
    assert b'only 443 and 80' in answer and b'This cannot be allowed' in answer


def test_an_allowed_name_that_resolves_to_loopback_is_denied(setup):
    s = setup
    status, body = status_and_body(curl(s, s.alpha, 'https://localhost/'))
    assert status == 403 and 'resolves to' in body and 'network.allow_private' in body


def tcp_listeners(pid: int) -> list[str]:
    """The TCP sockets in LISTEN state the process holds (its fds matched against /proc/net/tcp and tcp6)."""
    inodes = set()
    for fd in Path(f'/proc/{pid}/fd').iterdir():
        target = os.readlink(fd) if fd.is_symlink() else ''
        if target.startswith('socket:['):
            inodes.add(target[8:-1])
    listening = []
    for table in ('tcp', 'tcp6'):
        for line in Path(f'/proc/{pid}/net/{table}').read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == '0A' and fields[9] in inodes:       # 0A: LISTEN
                listening.append(fields[1])
    return listening


def test_no_tcp_port_speaks_for_a_bottle_and_only_the_projects_user_reaches_a_door(setup):
    """A bottle is known only by its door: the proxy holds no TCP listener another local user could reach,
    and the door (a 0600 socket in a 0700 directory) refuses every other user."""
    s = setup
    pid = s.proxy.daemon().pid()
    assert tcp_listeners(pid) == []
    door = s.root / 'doors' / 'alpha' / 'egress.sock'
    assert stat.S_IMODE(door.stat().st_mode) == 0o600 and stat.S_IMODE(door.parent.stat().st_mode) == 0o700
    connect = f'import socket; socket.socket(socket.AF_UNIX).connect({str(door)!r})'
    as_nobody = subprocess.run(['setpriv', '--reuid', 'nobody', '--regid', 'nogroup', '--clear-groups',
                                '/usr/bin/python3', '-c', connect],
                               capture_output=True, text=True, timeout=30)
    assert as_nobody.returncode != 0 and 'PermissionError' in as_nobody.stderr
    assert not [p for p in Path('/proc').iterdir() if p.name.isdigit() and _parent(p) == pid]    # no relay, no child


def test_sni_or_host_header_naming_another_host_is_refused(setup):
    s = setup
    before = s.upstream.connections
    context = ssl.create_default_context(cafile=str(s.proxy.ca_cert))
    # CONNECT to the allowed upstream, but TLS names a denied host.
    assert b' 403 ' in https_through(s.alpha, f'{s.address}:443', context, 'denied.test', s.address)
    # CONNECT to the allowed upstream, TLS fine, the Host header names a denied host.
    assert b' 403 ' in https_through(s.alpha, f'{s.address}:443', context, s.address, 'denied.test')
    # CONNECT to a denied host, TLS and Host naming an allowed one.
    assert b' 403 ' in https_through(s.alpha, 'denied.test:443', context, 'localhost', 'localhost')
    assert s.upstream.connections == before


# Request heads a server could read otherwise than the proxy: (the head, with {a} for the allowed address;
# what the refusal says). Each reaches the allowed upstream through an allowed tunnel.
HEADS = {
    # mitmproxy reads any HTTP/d.d, and kept the absolute form (and the guest's Host) of an `HTTP/2.0` one
    'an HTTP/2.0 request line': ('GET https://{a}/h2 HTTP/2.0\r\nHost: evil.test\r\n\r\n',
                                 'HTTP/1.1 and HTTP/1.0 only'),
    'a bare CR hiding a Host': ('GET /cr HTTP/1.1\r\nX-Note: a\rHost: evil.test\r\n\r\n', 'control character'),
    'a bare CR hiding an override': ('GET /cr HTTP/1.1\r\nHost: {a}\r\nX-Note: a\rX-HTTP-Method-Override: DELETE'
                                     '\r\n\r\n', 'control character'),
    'a NUL': ('GET /nul HTTP/1.1\r\nHost: {a}\r\nX-Note: a\x00b\r\n\r\n', 'control character'),
    'two Hosts': ('GET /two HTTP/1.1\r\nHost: {a}\r\nHost: evil.test\r\n\r\n', 'more than one Host'),
    'a Host with another port': ('GET /port HTTP/1.1\r\nHost: {a}:8443\r\n\r\n', 'does not name the target'),
    'a Host with userinfo': ('GET /at HTTP/1.1\r\nHost: {a}:443@evil.test\r\n\r\n', 'does not name the target'),
    'a Host with a signed port': ('GET /sign HTTP/1.1\r\nHost: {a}:+443\r\n\r\n', 'does not name the target'),
    'a Host with a second name': ('GET /colon HTTP/1.1\r\nHost: {a}:evil.test\r\n\r\n', 'does not name the target'),
    'a routing header': ('GET /route HTTP/1.1\r\nHost: {a}\r\nX-Original-URL: /private\r\n\r\n', 'route the request'),
    'a GET with a body (CL.0)': ('GET /cl0 HTTP/1.1\r\nHost: {a}\r\nContent-Length: {n}\r\n\r\n'
                                 'GET /smuggled HTTP/1.1\r\nHost: {a}\r\n\r\n', 'a GET with a body'),
    # mitmproxy itself refuses this one (400), before the fence sees it
    'a header name that is no token': ('GET /name HTTP/1.1\r\nHost: {a}\r\nX Note: a\r\n\r\n', 'smuggling'),
}


@pytest.mark.parametrize('case', HEADS)
def test_a_request_head_a_server_could_read_otherwise_is_refused(setup, case):
    s = setup
    head, says = HEADS[case]
    head = head.replace('{a}', s.address)
    head = head.replace('{n}', str(len(head.split('\r\n\r\n', 1)[1])))
    before = s.upstream.connections, len(s.upstream.requests)
    answer = exchange_through(s, s.alpha, head.encode())
    assert answer.startswith((b'HTTP/1.1 403', b'HTTP/1.1 400')) and says.encode() in answer, answer
    assert (s.upstream.connections, len(s.upstream.requests)) == before


def test_a_request_head_that_never_ends_is_cut_off_and_the_proxy_serves_on(setup):
    """A head that never ends would grow the one proxy every bottle shares: past 64 KiB it is answered 431."""
    s = setup
    before = s.upstream.connections, len(s.upstream.requests)
    answer = exchange_through(s, s.alpha, f'GET /pad HTTP/1.1\r\nHost: {s.address}\r\nX-Pad: '.encode() + b'a' * 80_000)
    assert answer.startswith(b'HTTP/1.1 431') and b'head is longer than 65536 bytes' in answer, answer[:300]
    assert (s.upstream.connections, len(s.upstream.requests)) == before
    assert status_and_body(curl(s, s.alpha, f'https://{s.address}/after-pad')) == (200, 'upstream saw GET /after-pad')


def test_a_chunk_line_that_never_ends_is_cut_off_too(setup):
    """h11 holds a chunk-size line or a trailer until it ends: past 64 KiB the request is answered 400."""
    s = setup
    head = f'POST /chunks HTTP/1.1\r\nHost: {s.address}\r\nTransfer-Encoding: chunked\r\n\r\n'.encode()
    for endless in (b'1;' + b'x' * 80_000, b'0\r\nX-Trailer: ' + b'x' * 80_000):
        answer = exchange_through(s, s.alpha, head + endless)
        assert answer.startswith(b'HTTP/1.1 400') and b'longer than 65536 bytes' in answer, answer[:300]
    assert status_and_body(curl(s, s.alpha, f'https://{s.address}/after-chunks'))[0] == 200


def test_a_client_hello_that_never_ends_fails_the_handshake_and_stays_out_of_the_log(setup):
    """mitmproxy holds up to 16 MiB of a ClientHello, parses it again on every read and logs what it cannot parse
    in hex: past 16 KiB (or 16 records) the handshake fails, and the log line is cut."""
    s = setup
    log = s.proxy.daemon().log_file
    before = log.stat().st_size
    for record, count in ((16_000, 3), (1, 40)):              # a few large records; many one-byte ones
        sock, answer = connect_through(s.alpha, f'{s.address}:443')
        body = b'\x01' + (1 << 20).to_bytes(3, 'big')          # the head of a ClientHello of 1 MiB
        records = b''.join(b'\x16\x03\x01' + len(part).to_bytes(2, 'big') + part
                           for part in [body] + [b'\x00' * record] * count)
        with sock:
            try:
                sock.sendall(records)
            except OSError:
                pass            # closed on us already: what should happen
            assert closed_by_peer(sock, 10), (record, count)        # not held until the idle bound
    assert log.stat().st_size - before < 16 * 1024, log.read_text()[-2000:]
    assert status_and_body(curl(s, s.alpha, f'https://{s.address}/after-hello'))[0] == 200


def test_a_refused_request_with_a_large_body_is_answered_without_a_crash(setup):
    s = setup
    log = s.proxy.daemon().log_file
    before = log.stat().st_size
    proc = subprocess.run(['curl', '-sS', '--max-time', '60', '--proxy', s.beta.url, '--cacert', str(s.proxy.ca_cert),
                           '-w', '\n%{http_code}', '-H', 'Transfer-Encoding: chunked', '--data-binary', '@-',
                           f'https://{s.address}/private/upload'], input=b'x' * (5 << 20), capture_output=True,
                          timeout=90)
    assert proc.stdout.endswith(b'\n403'), proc.stdout[-300:]
    assert 'has crashed' not in log.read_text()[before:]


def test_what_goes_up_carries_the_proxys_own_host_for_the_checked_target(setup):
    """HTTP/1.0 without a Host, and a Host naming the target with its default port: the upstream reads the
    target's own Host either way."""
    s = setup
    before = len(s.upstream.requests)
    for head in ('GET /ten HTTP/1.0\r\n\r\n', f'GET /port HTTP/1.1\r\nHost: {s.address.upper()}:443\r\n\r\n'):
        assert exchange_through(s, s.alpha, head.encode()).startswith((b'HTTP/1.0 200', b'HTTP/1.1 200'))
    assert s.upstream.requests[before:] == [('GET', '/ten', s.address), ('GET', '/port', s.address)]


def exchange_through(s: Setup, relay: GuestRelay, data: bytes) -> bytes:
    """`data` sent raw inside a TLS tunnel to the allowed upstream; the one response that comes back."""
    sock, answer = connect_through(relay, f'{s.address}:443')
    assert answer.startswith(b'HTTP/1.1 200'), answer
    context = ssl.create_default_context(cafile=str(s.proxy.ca_cert))
    with context.wrap_socket(sock, server_hostname=s.address) as tls:
        tls.sendall(data)
        return read_response(tls)


def read_response(sock) -> bytes:
    """One HTTP response with a Content-Length (or until the peer closes), at most 1 MiB."""
    data = b''
    while b'\r\n\r\n' not in data and len(data) < 1 << 20:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    length = re.search(rb'(?im)^content-length:\s*(\d+)', data.split(b'\r\n\r\n', 1)[0])
    while length and len(data.split(b'\r\n\r\n', 1)[1]) < int(length[1]):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def test_where_methods_are_narrowed_a_body_asking_for_another_method_is_refused(setup):
    """Rails reads `_method` from a form body, Laravel from a JSON one, PHP mangles names; the body is read
    whole first, and one the proxy cannot hold whole is refused rather than passed unread."""
    s = setup
    poster = open_bottle(s, 'poster', {'hosts': [{'host': s.address, 'methods': ['GET', 'POST']}],
                                       'allow_private': [f'{s.address}/32']})
    url = f'https://{s.address}/items'
    before = len(s.upstream.requests)
    for args in (['-d', 'a=1&_method=DELETE'], ['-d', 'a=1&+_method=DELETE'], ['-d', '.method=PUT'],
                 ['-d', '_method%00x=DELETE'], ['-F', '_method=DELETE'], ['-H', 'Content-Type:', '-d', '_method=PUT'],
                 ['-H', 'Content-Type: application/json', '-d', '{"_method": "DELETE"}'],
                 ['-H', 'X_HTTP_Method_Override: DELETE', '-d', 'a=1']):
        status, body = status_and_body(curl(s, poster, url, *args))
        assert status == 403 and 'by an override' in body, (args, body)
    status, body = status_and_body(curl(s, poster, url, '-H', 'Transfer-Encoding: chunked', '-d', 'a=1'))
    assert status == 403 and 'Content-Length of at most' in body
    deep = '{"_method": "DELETE", "x": ' + '[' * 5000 + ']' * 5000 + '}'     # Python's json gives up; Node's does not
    status, body = status_and_body(curl(s, poster, url, '-H', 'Content-Type: application/json', '-d', deep))
    assert status == 403 and 'JSON body cannot be read' in body, body
    assert s.upstream.requests[before:] == []
    for args in (['-d', 'a=1&payment_method=card'], ['-H', 'Content-Type: application/json', '-d', '{"a": 1}'],
                 ['-H', 'Content-Type: application/octet-stream', '--data-binary', '@-']):
        proc = subprocess.run(['curl', '-sS', '--max-time', '20', '--proxy', poster.url, '--cacert',
                               str(s.proxy.ca_cert), '-w', '\n%{http_code}', *args, url], input=b'x' * (2 << 20),
                              capture_output=True, timeout=60)
        assert proc.stdout.decode().endswith('\n200'), (args, proc.stdout[-200:], proc.stderr)
    s.proxy.close_door('poster')


def https_through(relay: GuestRelay, target: str, context: ssl.SSLContext, server_name: str, host: str) -> bytes:
    sock, answer = connect_through(relay, target)
    assert answer.startswith(b'HTTP/1.1 200'), answer
    with context.wrap_socket(sock, server_hostname=server_name) as tls:
        tls.sendall(f'GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n'.encode())
        return read_all(tls)


def test_raw_tcp_through_an_accepted_connect_reaches_nothing(setup):
    s = setup
    before = s.upstream.connections
    sock, answer = connect_through(s.alpha, f'{s.address}:443')
    assert answer.startswith(b'HTTP/1.1 200')
    sock.sendall(b'SSH-2.0-OpenSSH_9.2\r\n\x00\x01\x02 not tls, not http\r\n\r\n')
    reply = read_all(sock)
    sock.close()
    assert b'upstream saw' not in reply and not reply.startswith(b'SSH')
    assert s.upstream.connections == before


def test_a_rules_change_applies_to_the_next_request_without_restart(setup):
    s = setup
    pid = s.proxy.daemon().pid()
    rules = s.root / 'bottles' / 'beta' / 'egress-rules.json'
    assert status_and_body(curl(s, s.beta, f'https://{s.address}/docs/a'))[0] == 403
    write_rules(rules, {'hosts': [{'host': s.address, 'methods': ['GET'], 'paths': ['/public/', '/docs/']}],
                        'allow_private': [f'{s.address}/32']})
    assert status_and_body(curl(s, s.beta, f'https://{s.address}/docs/a')) == (200, 'upstream saw GET /docs/a')
    write_rules(rules, {'hosts': [{'host': s.address, 'methods': ['GET'], 'paths': ['/public/']}],
                        'allow_private': [f'{s.address}/32']})
    assert status_and_body(curl(s, s.beta, f'https://{s.address}/docs/a'))[0] == 403
    assert s.proxy.daemon().pid() == pid
    with pytest.raises(RulesError, match='paths'):
        write_rules(rules, {'hosts': [{'host': 'x.test', 'paths': ['no-slash']}]})


def test_server_sent_events_arrive_as_they_are_sent(setup):
    s = setup
    s.upstream.last_event_sent.clear()
    curl_events = subprocess.Popen(
        ['curl', '-sSN', '--max-time', '30', '--proxy', s.alpha.url, '--cacert', str(s.proxy.ca_cert),
         f'https://{s.address}/events'], stdout=subprocess.PIPE, text=True)
    try:
        first = curl_events.stdout.readline()
        last_sent_before_first_arrived = s.upstream.last_event_sent.is_set()
        rest = curl_events.stdout.read()
    finally:
        curl_events.wait(timeout=60)
    assert first == 'data: event 1\n'
    assert not last_sent_before_first_arrived
    assert 'data: event 3' in rest


def test_a_third_bottle_is_added_without_restarting_the_proxy(setup):
    s = setup
    pid = s.proxy.daemon().pid()
    gamma = open_bottle(s, 'gamma', {'hosts': [{'host': s.address}], 'allow_private': [f'{s.address}/32']})
    assert s.proxy.daemon().pid() == pid
    assert s.proxy.door_healthy('gamma') and s.proxy.healthy()
    assert status_and_body(curl(s, gamma, f'https://{s.address}/from-gamma')) == (200, 'upstream saw GET /from-gamma')
    assert last_log_line(s, 'gamma', '/from-gamma')['bottle'] == 'gamma'
    s.proxy.close_door('gamma')
    assert not s.proxy.door_healthy('gamma') and s.proxy.healthy() and s.proxy.daemon().pid() == pid
    assert not (s.root / 'bottles' / 'gamma' / 'door' / 'egress.sock').exists()


def test_a_killed_proxy_is_unhealthy_and_restarted_by_ensure_running(setup):
    s = setup
    pid = s.proxy.daemon().pid()
    os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: s.proxy.daemon().pid() is None)
    assert not s.proxy.healthy() and not s.proxy.door_healthy('alpha')
    assert s.proxy.ensure_running() is True
    assert s.proxy.daemon().pid() not in (None, pid)
    assert s.proxy.door_healthy('alpha') and s.proxy.door_healthy('beta')
    assert status_and_body(curl(s, s.alpha, f'https://{s.address}/again'))[0] == 200
    assert s.proxy.ensure_running() is False


def test_a_removed_door_is_opened_again_without_restarting_the_proxy(setup):
    """A cleaner of /tmp may remove a door's socket: the proxy notices and listens there again."""
    s = setup
    proxy_pid = s.proxy.daemon().pid()
    (s.root / 'doors' / 'beta' / 'egress.sock').unlink()
    assert wait_for(lambda: s.proxy.door_healthy('beta'))
    assert s.proxy.door_healthy('alpha') and s.proxy.daemon().pid() == proxy_pid
    assert status_and_body(curl(s, s.beta, f'https://{s.address}/public/back'))[0] == 200


def test_a_bottles_connections_are_bounded_in_number_and_idle_time_and_make_no_process(venv, tmp_path):
    """Through one door at most N connections at a time (the next is refused with a reason and logged), one with
    no traffic is closed after the idle bound, half-open or not; another bottle is served all along, and no
    connection makes a host process. A proxy with small bounds (the defaults: doors.py)."""
    proxy = EgressProxy(tmp_path / 'proxy', venv, door_connections=5, door_idle=2)
    try:
        for name in ('busy', 'calm'):
            door = proxy.open_door(name, tmp_path / 'bottles' / name, tmp_path / 'doors' / name)
            write_rules(door.rules, {'hosts': []})
        busy, calm = (str(tmp_path / 'doors' / name / 'egress.sock') for name in ('busy', 'calm'))
        pid = proxy.daemon().pid()
        held = [socket.socket(socket.AF_UNIX) for _ in range(5)]
        for sock in held:
            sock.connect(busy)
        held[0].sendall(b'CONNECT example.com:443 HTTP/1.1\r\n\r\n')   # one in a tunnel, the rest half-open
        assert wait_for(lambda: _open_fds(pid) >= 5)
        with socket.socket(socket.AF_UNIX) as extra:
            extra.settimeout(10)
            extra.connect(busy)
            refused = read_all(extra)
        assert refused.startswith(b'HTTP/1.1 503') and b'5 connections open through its door' in refused
        log = [json.loads(line) for line in (tmp_path / 'bottles' / 'busy' / 'egress.log').read_text().splitlines()]
        assert log[-1]['status'] == 503 and 'the most one bottle may hold' in log[-1]['reason']
        assert door_answers(Path(calm), 'calm')                          # the other bottle is served meanwhile
        assert not [p for p in Path('/proc').iterdir() if p.name.isdigit() and _parent(p) == pid]
        # A full door is one the proxy answers: the shared proxy is not restarted for a busy bottle.
        assert door_answers(Path(busy), 'busy') and proxy.ensure_running() is False and proxy.daemon().pid() == pid
        assert all(closed_by_peer(sock, 20) for sock in held)           # the idle bound closes every one
        assert door_answers(Path(busy), 'busy')                          # and the door takes new ones
    finally:
        for sock in locals().get('held', []):
            sock.close()
        proxy.stop()


def closed_by_peer(sock: socket.socket, seconds: float) -> bool:
    """The other end closes the connection within `seconds` (whatever it sent before)."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            if not sock.recv(65536):
                return True
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
    return False


def _open_fds(pid: int) -> int:
    return len(list(Path(f'/proc/{pid}/fd').iterdir()))


def _parent(proc: Path) -> int | None:
    try:
        return int((proc / 'stat').read_text().rsplit(')', 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def test_the_ca_is_right_and_its_key_is_in_its_0600_file_only(setup):
    s = setup
    key_file = s.proxy.ca_dir / 'mitmproxy-ca.pem'
    assert key_file.stat().st_mode & 0o777 == 0o600
    text = subprocess.run(['openssl', 'x509', '-in', str(s.proxy.ca_cert), '-noout', '-text'],
                          capture_output=True, text=True, check=True).stdout
    assert 'prime256v1' in text
    assert re.search(r'Basic Constraints: critical\s+CA:TRUE', text)
    assert re.search(r'Key Usage: critical\s+Certificate Sign, CRL Sign', text)
    assert 'PRIVATE KEY' not in s.proxy.ca_cert.read_text()
    key_text = subprocess.run(['openssl', 'pkey', '-in', str(key_file), '-noout', '-text'],
                              capture_output=True, text=True, check=True).stdout
    scalar = int(re.sub(r'[:\s]', '', re.search(r'priv:(.*?)pub:', key_text, re.S).group(1)), 16).to_bytes(32, 'big')
    pem_lines = [line for line in key_file.read_text().split('-----BEGIN PRIVATE KEY-----')[1]
                 .split('-----END')[0].split() if len(line) >= 40]
    assert pem_lines
    holders = [path for path in s.root.rglob('*') if path.is_file() and not path.is_socket()
               and (scalar in path.read_bytes() or any(line.encode() in path.read_bytes() for line in pem_lines))]
    assert holders == [key_file]


def test_a_renewed_ca_is_used_after_the_proxy_restarts(setup):
    s = setup
    old = s.proxy.ca_cert.read_text()
    s.proxy.renew_ca()
    assert s.proxy.ca_cert.read_text() != old
    assert s.proxy.door_healthy('alpha')
    assert status_and_body(curl(s, s.alpha, f'https://{s.address}/renewed'))[0] == 200


def test_a_ca_key_made_readable_by_others_is_private_again_after_a_restart_and_it_is_said(setup, capfd):
    s = setup
    key_file = s.proxy.ca_dir / 'mitmproxy-ca.pem'
    os.chmod(key_file, 0o644)
    os.chmod(s.proxy.ca_dir, 0o755)
    s.proxy.stop()
    capfd.readouterr()
    assert s.proxy.ensure_running() is True
    said = capfd.readouterr().err
    assert said == (f'claude-bottle: the egress CA key must be readable by you alone: {s.proxy.ca_dir} was mode '
                    f'0755, now 0700; {key_file} was mode 0644, now 0600\n')
    assert [stat.S_IMODE(path.stat().st_mode) for path in (key_file, s.proxy.ca_dir, s.proxy.ca_cert)] == \
        [0o600, 0o700, 0o644]
    assert s.proxy.door_healthy('alpha')
    s.proxy.ensure_ca()                                          # nothing to repair: nothing said
    assert capfd.readouterr().err == ''


def test_a_door_path_too_long_for_a_unix_socket_is_refused_with_a_reason(setup, tmp_path):
    with pytest.raises(ProxyError, match='move the project to a shorter path'):
        setup.proxy.open_door('long', tmp_path / 'long', tmp_path / ('x' * 120))


def wait_for(condition, seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def proc_state(pid: int) -> str:
    return Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[0]
