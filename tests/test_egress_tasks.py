"""The egress tasks through the real doit CLI in a stand-in project: the bottle's door opened on the
project's real mitmproxy, its rules written from the manifest, its skills and Claude Code's needs,
the proxy restarted when it died, the door closed by teardown. None of these tasks calls the
backend. Requests go through the door as a bottle's relay sends them, to a plain HTTP server on a
loopback address of the test's own. The mitmproxy environment is made once in the test cache
(the harness's XDG_CACHE_HOME; $BOTTLE_TEST_CACHE keeps it between sessions)."""
from __future__ import annotations

import http.client
import http.server
import json
import os
import signal
import socket
import stat
import threading
from pathlib import Path

import pytest

from daemons.proxy.control import EgressProxy, door_answers
from tasks.egress import door_socket
from tasks.project import Project
from tests.proxy_upstreams import random_loopback_address

pytestmark = pytest.mark.fast

CLAUDE_CODE_RULES = [{'host': 'api.anthropic.com'}, {'host': 'claude.ai'}, {'host': 'platform.claude.com'}]


class PlainUpstream:
    """An HTTP server on `address`:80 that counts the connections it accepts."""

    def __init__(self, address: str):
        upstream = self
        self.connections = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                body = f'upstream saw GET {self.path}'.encode()
                self.send_response(200)
                self.send_header('Content-Length', str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        class Server(http.server.ThreadingHTTPServer):
            def get_request(self):
                accepted = super().get_request()
                upstream.connections += 1
                return accepted

        self.server = Server((address, 80), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class DoorConnection(http.client.HTTPConnection):
    """HTTP to the proxy through a bottle's door, as the relay in the bottle sends it."""

    def __init__(self, door: Path, host: str):
        super().__init__(host, timeout=20)
        self.door = door

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(str(self.door))


def get_through(door: Path, host: str, path: str = '/') -> tuple[int, str]:
    connection = DoorConnection(door, host)
    try:
        connection.request('GET', f'http://{host}{path}')
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


@pytest.fixture
def project(standin):
    """The stand-in project; its proxy and door relays are stopped afterwards."""
    try:
        yield standin
    finally:
        EgressProxy(standin.root / '.bottle' / 'egress', standin.root / 'no-venv-needed').stop()


@pytest.fixture
def upstream():
    server = PlainUpstream(random_loopback_address())
    try:
        yield server
    finally:
        server.close()


def door(project, agent: str) -> Path:
    """Where the machine of `agent` would find its door on the host."""
    return door_socket(Project(project.root), agent)


def proxy_pid(project) -> int:
    return json.loads((project.root / '.bottle' / 'egress' / 'proxy.pid').read_text())['pid']


def rules(project, agent: str) -> dict:
    return json.loads((project.root / '.bottle' / 'agents' / agent / 'egress-rules.json').read_text())


def alive(pid: int) -> bool:
    try:
        with open(f'/proc/{pid}/stat') as stat:
            return stat.read().rsplit(')', 1)[1].split()[0] not in ('Z', 'X')
    except OSError:
        return False


def test_egress_opens_the_door_without_a_backend_call_and_then_is_up_to_date(project):
    project.agent('a', prompt='hi')
    first = project.doit('egress:a')
    assert first.calls == []
    assert {'egress_ca', 'allowlist:a', 'egress:a'} <= first.executed, first.output
    assert door_answers(door(project, 'a'), 'a')
    pid = proxy_pid(project)
    assert rules(project, 'a') == {'hosts': CLAUDE_CODE_RULES, 'allow_private': []}

    again = project.doit('egress:a')
    assert again.calls == [] and again.executed == set(), again.output
    assert proxy_pid(project) == pid and door_answers(door(project, 'a'), 'a')
    # The environment is only a setup task: with an open door, an empty cache stays empty.
    empty_cache = project.root.parent / 'empty-cache'
    empty_cache.mkdir()
    third = project.doit('egress:a', env=project.env(XDG_CACHE_HOME=str(empty_cache)))
    assert third.executed == set() and list(empty_cache.iterdir()) == [], third.output


def test_a_new_host_reruns_only_the_allowlist_and_the_running_proxy_applies_it(project, upstream):
    address = upstream.server.server_address[0]
    project.agent('a', network={'allow_private': [f'{address}/32']})
    project.doit('egress:a')
    pid = proxy_pid(project)
    status, body = get_through(door(project, 'a'), address, '/before')
    assert status == 403 and address in body and 'network.allow_hosts' in body, body
    assert upstream.connections == 0

    project.agent('a', network={'allow_hosts': [address], 'allow_private': [f'{address}/32']})
    info = project.doit('info', 'allowlist:a', check=False)
    assert info.returncode == 1 and 'config_changed' in info.stdout and f"'host': '{address}'" in info.stdout, info.stdout
    run = project.doit('egress:a')
    assert run.executed == {'allowlist:a'} and run.calls == [], run.output
    assert get_through(door(project, 'a'), address, '/after') == (200, 'upstream saw GET /after')
    assert proxy_pid(project) == pid and upstream.connections == 1


def test_a_skill_declaring_hosts_puts_them_into_the_rules(project):
    project.skill('fetch', {'SKILL.md': '---\nname: fetch\ndescription: fetches\nallow_hosts:\n'
                                        '  - "*.skill.example"\n'
                                        '  - {host: api.skill.example, methods: [GET], paths: [/v1/]}\n'
                                        '---\nFetch things.\n'})
    project.agent('a', skills=['fetch'], network={'allow_hosts': ['own.example'], 'claude_code_hosts': []})
    project.doit('allowlist:a')
    assert rules(project, 'a')['hosts'] == [
        {'host': 'own.example'}, {'domain': 'skill.example'},
        {'host': 'api.skill.example', 'methods': ['GET'], 'paths': ['/v1/']}]
    skill_md = project.root / 'agents/skills/fetch/SKILL.md'
    skill_md.write_text(skill_md.read_text().replace('*.skill.example', 'other.example'))
    run = project.doit('allowlist:a')
    assert run.executed == {'allowlist:a'}
    assert {'host': 'other.example'} in rules(project, 'a')['hosts']


def test_a_proxy_killed_behind_doits_back_is_started_again(project):
    project.agent('a', prompt='hi')
    project.doit('egress:a')
    pid = proxy_pid(project)
    os.kill(pid, signal.SIGKILL)
    assert not door_answers(door(project, 'a'), 'a')
    run = project.doit('egress:a')
    assert run.executed == {'egress:a'} and run.calls == [], run.output
    assert proxy_pid(project) != pid and door_answers(door(project, 'a'), 'a')
    # It had passed its health check: a death, said with its count and the wait before the start.
    assert 'claude-bottle: proxy died ' in run.output and '(1 of 3 deaths within 10 minutes' in run.output
    assert 'starting it again in 1 s' in run.output


def test_a_ca_key_left_readable_by_others_is_private_again_when_the_proxy_starts_and_doit_says_so(project):
    project.agent('a', prompt='hi')
    project.doit('egress:a')
    ca_dir = project.root / '.bottle' / 'egress' / 'ca'
    os.chmod(ca_dir / 'mitmproxy-ca.pem', 0o644)
    os.chmod(ca_dir, 0o755)
    project.doit('teardown:a')                               # the proxy stops with its last door
    run = project.doit('egress:a')
    assert (f'claude-bottle: the egress CA key must be readable by you alone: {ca_dir} was mode 0755, now 0700; '
            f'{ca_dir / "mitmproxy-ca.pem"} was mode 0644, now 0600') in run.output, run.output
    assert [stat.S_IMODE(path.stat().st_mode) for path in (ca_dir / 'mitmproxy-ca.pem', ca_dir)] == [0o600, 0o700]
    assert stat.S_IMODE((ca_dir / 'mitmproxy-ca-cert.pem').stat().st_mode) == 0o644
    assert door_answers(door(project, 'a'), 'a')


def test_teardown_closes_the_door_and_the_last_door_stops_the_proxy(project):
    project.agent('a', prompt='hi')
    project.agent('b', prompt='hi')
    project.doit('egress:a', 'egress:b')
    pid = proxy_pid(project)
    project.doit('teardown:a')
    assert not door(project, 'a').exists() and not door_answers(door(project, 'a'), 'a')
    assert proxy_pid(project) == pid and door_answers(door(project, 'b'), 'b')
    project.doit('teardown:b')
    assert not alive(pid) and not (project.root / '.bottle' / 'egress' / 'proxy.pid').exists()


def test_a_new_ca_after_clean_restarts_the_proxy_and_the_key_is_only_in_its_0600_file(project):
    project.agent('a', prompt='hi')
    project.doit('egress:a')
    ca_dir = project.root / '.bottle' / 'egress' / 'ca'
    key_file, cert = ca_dir / 'mitmproxy-ca.pem', ca_dir / 'mitmproxy-ca-cert.pem'
    assert key_file.stat().st_mode & 0o777 == 0o600
    old_cert, pid = cert.read_text(), proxy_pid(project)

    project.doit('clean', 'egress_ca')
    assert not key_file.exists()
    run = project.doit('egress:a')
    assert 'egress_ca' in run.executed and run.calls == [], run.output
    assert cert.read_text() != old_cert and proxy_pid(project) != pid
    assert door_answers(door(project, 'a'), 'a')

    key_lines = [line for line in key_file.read_text().split('-----BEGIN PRIVATE KEY-----')[1]
                 .split('-----END')[0].split() if len(line) >= 40]
    assert key_lines
    holders = [path for path in (project.root / '.bottle').rglob('*')
               if path.is_file() and not path.is_socket()
               and any(line.encode() in path.read_bytes() for line in key_lines)]
    assert holders == [key_file]            # doit's database (.bottle/doit.sqlite) included


SKILL_WITH = {
    'bad host': '---\nname: s\ndescription: s\nallow_hosts: [not a host]\n---\n',
    'yaml error': '---\nname: s\ndescription: [s\nallow_hosts: []\n---\n',
    'unclosed': '---\nname: s\nallow_hosts: []\n',
}
BAD = {
    'bad network': ('network:\n  allow_private: [10.0.0.1/8]\n', None,
                    ['agents/a.yaml:2', "'network.allow_private[0]'", 'has host bits set', '10.20.0.0/16']),
    'bad method': ('network:\n  allow_hosts:\n    - host: api.github.com\n      methods: [GET, FETCH]\n', None,
                   ['agents/a.yaml:4', "'network.allow_hosts[0].methods[1]'", 'one of GET, HEAD']),
    'bad host pattern': ('network:\n  allow_hosts: ["api.*.com"]\n', None,
                         ['agents/a.yaml:2', "'network.allow_hosts[0]'", '*.github.com for that domain']),
    'decimal address': ('network:\n  allow_hosts: ["2130706433"]\n', None,
                        ['agents/a.yaml:2', "'network.allow_hosts[0]'", 'write it as a.b.c.d']),
    'bad path': ('network:\n  allow_hosts:\n    - {host: a.example, paths: [v1/]}\n', None,
                 ['agents/a.yaml:3', "'network.allow_hosts[0].paths[0]'", 'starting with "/"']),
    'misspelt entry key': ('network:\n  allow_hosts:\n    - host: a.example\n      method: [GET]\n', None,
                           ['agents/a.yaml:4', "'network.allow_hosts[0].method'", "did you mean 'methods'"]),
    'bad Claude Code hosts': ('network:\n  claude_code_hosts: api.anthropic.com\n', None,
                              ['agents/a.yaml:2', "'network.claude_code_hosts'", 'expected a list']),
    'skill: bad host': ('skills: [s]\n', 'bad host',
                        ['agents/skills/s/SKILL.md:4', "'allow_hosts[0]'", 'host name such as']),
    'skill: YAML error': ('skills: [s]\n', 'yaml error', ['agents/skills/s/SKILL.md:', 'YAML syntax error']),
    'skill: unclosed front matter': ('skills: [s]\n', 'unclosed',
                                     ['agents/skills/s/SKILL.md:1', 'never closed', 'end it with a line "---"']),
}


@pytest.mark.parametrize('case', list(BAD))
def test_a_bad_network_value_is_an_error_with_file_line_key_and_fix(project, case):
    manifest, skill, expected = BAD[case]
    if skill:
        project.skill('s', {'SKILL.md': SKILL_WITH[skill]})
    project.agent_text('a', manifest)
    run = project.doit('egress:a', check=False)
    assert run.returncode == 3, run.output
    for part in expected:
        assert part in run.stderr, f'{part!r} missing from:\n{run.stderr}'
    assert 'Traceback' not in run.output and run.calls == []
