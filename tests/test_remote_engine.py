"""Bottles on a podman engine elsewhere (issue 25), on the tests' worker (tests/remote_worker.py: Debian's sshd and
a podman API service of its own, in namespaces where this host's /tmp and /run are absent). The manifest names the
worker's podman system connection; the image is built here and loaded there once; the bottle's door, a socket of
this host, is forwarded over SSH (daemons/forward) and the fence stays here. One project serves the module; the
tests run in file order, those that break something last."""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from daemons.forward.control import project_key
from daemons.lifecycle import Daemon
from tasks.project import Project
from tests.bottles import Bottles, Engine, Podman
from tests.proxy_upstreams import Upstream, make_upstream_ca, random_loopback_address
from tests.remote_worker import worker  # noqa: F401  (the module's worker fixture)
from tests.scenario import TEST_SECRET, TEST_SECRET_NETWORK, placeholder_of, setup_agent
from tests.test_engines import _host_settings
from tests.test_git_gate import PASSWORD, host_git_config, make_repository

pytestmark = pytest.mark.extended
ENGINE = 'w1'
SECRET = 'remote-secret-value-never-on-the-worker'
DOWN = 'w-down'          # the worker's address, a port where nothing listens


class RemoteEngine(Engine):
    """The worker's podman, through its connection, as the tests call it behind the backend's back."""

    def __init__(self, connection: str, env: dict):
        super().__init__('podman', env)
        self.connection = connection

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(['podman', '--connection', self.connection, *args], capture_output=True, check=check,
                              env={**os.environ, **self.env}, timeout=300)


class RemotePodman(Podman):
    """The podman backend with its machines on the worker's engine."""
    name = 'podman-remote'

    def __init__(self, tmp: Path, cache: Path, env: dict):
        super().__init__(tmp, cache)
        self.engine = RemoteEngine(ENGINE, env)

    def manifest_defaults(self) -> dict:
        return {**super().manifest_defaults(), 'backend': 'podman'}

    def guest_argv(self, machine: str, script: str) -> list[str]:
        return ['podman', '--connection', ENGINE, 'exec', machine, 'sh', '-c', script]


@pytest.fixture(scope='module')
def remote(worker, tmp_path_factory, claude_cache):  # noqa: F811
    tmp = tmp_path_factory.mktemp('remote-engine')
    home = tmp / 'home'
    (home / '.ssh').mkdir(parents=True, mode=0o700)
    (home / '.ssh' / 'known_hosts').write_text(worker.known_hosts.read_text())
    conf = tmp / 'containers.conf'
    down = socket.socket()
    down.bind((worker.address, 0))           # a port of the worker's address that no one listens on
    down_port = down.getsockname()[1]
    down.close()
    conf.write_text(_host_settings() + ''.join(
        f'\n[engine.service_destinations.{name}]\nuri = "ssh://{worker.destination}:{port}{worker.socket}"\n'
        f'identity = "{worker.key}"\n' for name, port in ((ENGINE, worker.port), (DOWN, down_port))))
    (home / '.ssh' / 'known_hosts').open('a').write(
        worker.known_hosts.read_text().replace(f':{worker.port}]', f':{down_port}]'))
    env = {'CONTAINERS_CONF': str(conf), 'HOME': str(home)}
    address = random_loopback_address()
    ca, cert, key = make_upstream_ca(tmp, address)
    git_root = tmp / 'git'
    git_root.mkdir()
    make_repository(git_root, 'app')
    upstream = Upstream(address, cert, key, git_root=git_root, git_credentials=('gate-user', PASSWORD))
    bottles = Bottles(tmp / 'project', RemotePodman(tmp, claude_cache, env))
    bottles.supervise()
    bottles.extra_env.update(env, BOTTLE_UPSTREAM_CA=str(ca), GIT_SSL_CAINFO=str(ca),
                             GIT_CONFIG_GLOBAL=str(host_git_config(tmp, address, ca)))
    setup_agent(bottles, 'a', engine=ENGINE, secrets=[TEST_SECRET], supervise_wait=1,
                git=[{'url': f'https://{address}/git/app.git', 'mode': 'forward'}],
                network={'allow_hosts': [address, *TEST_SECRET_NETWORK['allow_hosts']],
                         'allow_private': [f'{address}/32']})
    try:
        yield bottles, worker, address, upstream, git_root
    finally:
        bottles.backend.close(Project(bottles.root).label)
        bottles.stop_daemons()
        worker.ssh('rm', '-rf', f'/root/.claude-bottle/{project_key(bottles.root)}', check=False)
        upstream.close()


def forward_pid(bottles) -> int | None:
    return Daemon(f'forward-{ENGINE}', bottles.root / '.bottle' / 'forward', []).pid()


def curl(bottles, address: str, path: str) -> tuple[int, str]:
    out = bottles.guest('a', f'curl -sS --max-time 20 -w "\\n%{{http_code}}" https://{address}{path} 2>&1; true')
    body, _, status = out.rpartition('\n')
    return int(status or 0), body.removesuffix('\n')


def test_a_cold_launch_runs_the_bottle_on_the_worker_with_its_door_forwarded(remote):
    bottles, worker, address, upstream, git_root = remote
    run = bottles.doit('launch:a', env=bottles.env(BOTTLE_TEST_SECRET=SECRET))
    assert run.count('load') == 1, run.calls                       # loaded into the worker's engine once
    machine_calls = [call for call in run.calls if bottles.machine('a') in call]
    assert machine_calls and all(call[:2] == ['--connection', ENGINE] for call in machine_calls), run.calls
    there = worker.podman('ps', '--format', '{{.Names}}').stdout.decode().split()
    assert bottles.machine('a') in there
    here = subprocess.run(['podman', 'ps', '-a', '--format', '{{.Names}}'], capture_output=True, text=True).stdout
    assert bottles.machine('a') not in here.split()                 # nothing of it on this host's engine
    assert f'on podman engine {ENGINE}' in run.stdout and forward_pid(bottles), run.output
    status = bottles.doit('status').stdout
    assert f'a: {bottles.machine("a")} on podman engine {ENGINE}, running' in status, status
    assert 'door forwarded to the worker up' in status, status
    door = bottles.guest('a', 'ls -ln /run/bottle/ && touch /run/bottle/x 2>&1; true')
    assert 'egress.sock' in door and 'Read-only file system' in door, door      # the door's directory, read-only
    assert bottles.guest('a', 'tail -n +3 /proc/net/dev | cut -d: -f1').split() == ['lo']
    # Nothing secret on the worker: the attach command carries the placeholder, no file of the worker the value.
    assert placeholder_of(bottles, 'a', TEST_SECRET['name']) in run.stdout and SECRET not in run.output
    assert SECRET not in worker.podman('inspect', bottles.machine('a')).stdout.decode()
    found = worker.ssh('grep', '-rlF', SECRET, '/root/.claude-bottle', str(worker.state), check=False)
    assert found.returncode == 1 and found.stdout == b'', found     # 1: grep read it all and found nothing


def test_egress_is_allowed_and_denied_by_this_hosts_proxy_through_the_forwarded_door(remote):
    bottles, worker, address, upstream, git_root = remote
    assert curl(bottles, address, '/hello') == (200, 'upstream saw GET /hello')
    status, body = curl(bottles, 'denied.bottle-test.example', '/x')
    assert status == 403, body
    log = (bottles.root / '.bottle' / 'agents' / 'a' / 'egress.log').read_text()
    assert '/hello' in log and 'denied.bottle-test.example' in log     # the fence on this host saw both


def test_a_push_through_the_gate_lands_upstream(remote):
    bottles, worker, address, upstream, git_root = remote
    out = bottles.guest('a', f'cd /tmp && rm -rf app && git clone -q https://{address}/git/app.git app && cd app && '
                             'git -c user.name=A -c user.email=a@example.invalid commit -q --allow-empty -m remote && '
                             'git rev-parse HEAD && git push origin HEAD:agent/a/remote 2>&1')
    sha = out.split()[0]
    assert 'landed upstream in' in out, out
    landed = subprocess.run(['git', '--git-dir', str(git_root / 'app.git'), 'rev-parse', 'refs/heads/agent/a/remote'],
                            capture_output=True, text=True).stdout.strip()
    assert landed == sha


# The agent's MCP client, as curl: initialize, then one call of a supervisor tool, through the door.
ASK = r'''set -eu
mcp=http://supervise.bottle.invalid/mcp
post() { curl -sS --max-time 60 -H 'content-type: application/json' -H 'accept: application/json, text/event-stream' "$@" $mcp; }
sid=$(post -D - -o /dev/null -d '{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-03-26","capabilities":{},"clientInfo":{"name":"curl","version":"1"}}}' | tr -d '\r' | sed -n 's/^[Mm]cp-[Ss]ession-[Ii]d: //p')
post -H "mcp-session-id: $sid" -d '{"jsonrpc":"2.0","method":"notifications/initialized"}' > /dev/null
post -H "mcp-session-id: $sid" -d "$1"
'''


def test_a_request_to_the_supervisor_from_the_worker_is_approved_here(remote):
    bottles, worker, address, upstream, git_root = remote
    call = json.dumps({'jsonrpc': '2.0', 'id': 2, 'method': 'tools/call', 'params': {
        'name': 'request_egress', 'arguments': {'host': 'docs.example.org', 'reason': 'the manual'}}})
    answer = bottles.guest('a', f'sh -c {shlex.quote(ASK)} sh {shlex.quote(call)}')
    found = re.search(r'still pending as request (\S+?);', answer)
    assert found, answer
    approved = bottles.doit('approve', '--id', found.group(1))
    assert 'granted: host docs.example.org for bottle a' in approved.stdout, approved.stdout
    rules = json.loads((bottles.root / '.bottle' / 'agents' / 'a' / 'egress-rules.json').read_text())
    assert 'docs.example.org' in [entry['host'] for entry in rules['hosts']]


def test_another_user_of_the_worker_cannot_speak_through_a_bottles_door(remote):
    bottles, worker, address, upstream, git_root = remote
    doors = worker.ssh('sh', '-c', 'ls $HOME/.claude-bottle/*/*/egress.sock').stdout.decode().split()
    assert doors
    for door in doors:
        tried = worker.ssh('setpriv', '--reuid', 'nobody', '--regid', 'nogroup', '--clear-groups', 'python3', '-c',
                           f'import socket; socket.socket(socket.AF_UNIX).connect({door!r})', check=False)
        assert tried.returncode != 0 and b'PermissionError' in tried.stderr, tried.stderr


def test_a_relaunch_makes_one_probe_of_the_engine_and_an_edited_skill_one_transfer(remote):
    bottles, worker, address, upstream, git_root = remote
    again = bottles.doit('launch:a')
    probes = [call for call in again.calls if call[:2] == ['--connection', ENGINE]]
    assert again.kinds == {'probe': 1, 'system': 1} and len(probes) == 1, again.calls    # and podman's connections
    (bottles.root / 'agents/skills/review/examples/two.md').write_text('two, edited on the worker\n')
    edited = bottles.doit('launch:a')
    assert edited.transferred_skills() == ['review'] and edited.count('create') == 0, edited.calls
    assert 'edited on the worker' in bottles.guest('a', 'cat /home/agent/.claude/skills/review/examples/two.md')


def test_a_forward_killed_behind_doits_back_is_restored_by_the_next_launch_without_a_new_machine(remote):
    bottles, worker, address, upstream, git_root = remote
    before = forward_pid(bottles)
    os.kill(before, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while curl(bottles, address, '/gone')[0] == 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert curl(bottles, address, '/gone')[0] != 200                     # its SSH connection went with it
    run = bottles.doit('launch:a')
    assert forward_pid(bottles) not in (None, before) and run.count('create') == 0, run.calls
    assert curl(bottles, address, '/back') == (200, 'upstream saw GET /back')


def test_a_stale_socket_on_the_worker_is_replaced(remote):
    bottles, worker, address, upstream, git_root = remote
    Daemon(f'forward-{ENGINE}', bottles.root / '.bottle' / 'forward', []).stop()
    leftovers = worker.ssh('sh', '-c', 'ls -d $HOME/.claude-bottle/*/*/').stdout.decode().split()
    for directory in leftovers:           # a socket nobody listens on, as a crashed sshd would leave
        worker.ssh('python3', '-c', f'import socket; socket.socket(socket.AF_UNIX).bind({directory + "egress.sock"!r})',
                   check=False)
    run = bottles.doit('launch:a')
    assert run.count('create') == 0, run.calls
    assert curl(bottles, address, '/fresh') == (200, 'upstream saw GET /fresh')


def test_an_unknown_host_key_is_refused_in_one_line_before_any_call(remote):
    bottles, worker, address, upstream, git_root = remote
    known = Path(bottles.extra_env['HOME']) / '.ssh' / 'known_hosts'
    kept = known.read_text()
    known.write_text('')
    try:
        run = bottles.doit('status', check=False)
        said = [line for line in run.output.splitlines() if 'in no known_hosts file' in line]
        assert run.returncode != 0 and len(said) == 1 and 'ssh-keyscan -p' in said[0], run.output
        assert 'Traceback' not in run.output, run.output
        assert [call for call in run.calls if call[:2] != ['system', 'connection']] == [], run.calls   # none to it
        assert known.read_text() == ''                  # nothing learnt behind the person's back
    finally:
        known.write_text(kept)


def test_a_worker_that_does_not_answer_fails_its_agent_in_one_line_and_the_others_go_on(remote):
    bottles, worker, address, upstream, git_root = remote
    setup_agent(bottles, 'down', engine=DOWN)
    setup_agent(bottles, 'here')
    try:
        run = bottles.doit('--continue', 'launch:down', 'launch:here', check=False)
        said = [line for line in run.output.splitlines() if f'on podman engine {DOWN}' in line]
        assert run.returncode != 0 and said and 'agent down' in said[0], run.output
        assert 'Connection refused' in said[0] or 'is the worker' in said[0], said
        assert 'Traceback' not in run.output
        here = subprocess.run(['podman', 'exec', bottles.machine('here'), 'echo', 'up'], capture_output=True, text=True)
        assert here.stdout == 'up\n', here.stderr               # on this host's engine, launched all the same
    finally:
        for name in ('down', 'here'):
            bottles.doit(f'teardown:{name}', check=False)
            (bottles.root / 'agents' / f'{name}.yaml').unlink()


def test_teardown_and_prune_leave_nothing_on_the_worker(remote):
    bottles, worker, address, upstream, git_root = remote
    bottles.doit('teardown:a')
    assert forward_pid(bottles) is None
    assert bottles.machine('a') not in worker.podman('ps', '-a', '--format', '{{.Names}}').stdout.decode().split()
    left = worker.ssh('sh', '-c', 'ls -A $HOME/.claude-bottle 2>/dev/null; true').stdout.decode().split()
    assert project_key(bottles.root) not in left, left          # this checkout's directory there is gone
    (bottles.root / 'agents' / 'a.yaml').unlink()
    bottles.agent('b', prompt='Other work.', image={'packages': ['jq']}, engine=ENGINE)   # another recipe
    pruned = bottles.doit('prune')
    images = worker.podman('images', '--format', '{{.Repository}}:{{.Tag}}').stdout.decode()
    assert 'claude-bottle-image' not in images, (images, pruned.output)
    assert f'from podman engine {ENGINE}' in pruned.stdout, pruned.output
