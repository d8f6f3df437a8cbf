"""Bottles on an engine elsewhere (issues 25 and 26), on the tests' worker (tests/remote_worker.py: Debian's sshd and
a podman API service or a dockerd of its own, in namespaces where this host's /tmp and /run are absent). The
manifest names the worker's podman system connection or docker context; the image is built here and loaded there
once; the bottle's door, a socket of this host, is forwarded over SSH (daemons/forward) and the fence stays here.
One project per engine serves the module; the tests run in file order, those that break something last."""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from daemons.forward.control import project_key
from daemons.lifecycle import Daemon
from tasks.project import Project
from tests.bottles import Bottles, Docker, Engine, LoggedCli, Podman
from tests.proxy_upstreams import Upstream, make_upstream_ca, random_loopback_address
from tests.remote_worker import docker_worker, worker  # noqa: F401  (the workers, module fixtures)
from tests.scenario import TEST_SECRET, TEST_SECRET_NETWORK, placeholder_of, setup_agent
from tests.test_engines import _host_settings
from tests.test_git_gate import PASSWORD, host_git_config, make_repository

pytestmark = pytest.mark.extended
ENGINE = 'w1'
SECRET = 'remote-secret-value-never-on-the-worker'
DOWN = 'w-down'          # the worker's address, a port where nothing listens


class RemoteEngine(Engine):
    """The worker's engine through its connection (podman) or context (docker), as the tests call it behind the
    backend's back."""

    def __init__(self, cli: str, env: dict):
        super().__init__(cli, env)
        self.prefix = [cli, '--connection' if cli == 'podman' else '--context', ENGINE]

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([*self.prefix, *args], capture_output=True, check=check, env={**os.environ, **self.env},
                              timeout=300)


def on_the_worker(harness: type, cli: str, tmp: Path, cache: Path, env: dict, dockerd=None):
    """The backend's harness with its machines on the worker's engine."""
    class OnTheWorker(harness):
        name = f'{cli}-remote'

        def __init__(self):
            super().__init__(tmp, cache, *([dockerd] if dockerd else []))
            self.remote = RemoteEngine(cli, env)
            self.local = self.engine                    # this host's engine: where images are built
            self.engine = self.remote

        def env(self) -> dict:
            return {**LoggedCli.env(self), **self.local.env}   # the logging shims; this host's engine for builds

        def manifest_defaults(self) -> dict:
            return {**super().manifest_defaults(), 'backend': cli}

        def guest_argv(self, machine: str, script: str) -> list[str]:
            return [*self.remote.prefix, 'exec', machine, 'sh', '-c', script]
    return OnTheWorker()


@dataclass
class Remote:
    bottles: Bottles
    worker: object
    address: str
    git_root: Path
    cli: str
    known_hosts: Path           # what an ssh to the worker checks, for this CLI

    @property
    def prefix(self) -> list[str]:
        return self.bottles.backend.remote.prefix[1:]

    def there(self, *args: str) -> str:
        return self.bottles.backend.remote(*args).stdout.decode()

    def here(self, *args: str) -> str:
        return self.bottles.backend.local(*args, check=False).stdout.decode()

    @property
    def listing(self) -> str:
        """The kind of the one call that lists the CLI's engines (`system connection list`, `context ls`)."""
        return 'system' if self.cli == 'podman' else 'context'


@pytest.fixture(scope='module', params=['podman', 'docker'])
def remote(request, tmp_path_factory, claude_cache):
    cli = request.param
    worker = request.getfixturevalue('worker' if cli == 'podman' else 'docker_worker')
    tmp = tmp_path_factory.mktemp(f'remote-engine-{cli}')
    down = socket.socket()
    down.bind((worker.address, 0))           # a port of the worker's address that no one listens on
    down_port = down.getsockname()[1]
    down.close()
    down_key = worker.known_hosts.read_text().replace(f':{worker.port}]', f':{down_port}]')
    if cli == 'podman':     # podman: connections in a containers.conf of the test's, host keys under $HOME
        home = tmp / 'home'
        (home / '.ssh').mkdir(parents=True, mode=0o700)
        known_hosts = home / '.ssh' / 'known_hosts'
        known_hosts.write_text(worker.known_hosts.read_text() + down_key)
        conf = tmp / 'containers.conf'
        conf.write_text(_host_settings() + ''.join(
            f'\n[engine.service_destinations.{name}]\nuri = "ssh://{worker.destination}:{port}{worker.socket}"\n'
            f'identity = "{worker.key}"\n' for name, port in ((ENGINE, worker.port), (DOWN, down_port))))
        env = {'CONTAINERS_CONF': str(conf), 'HOME': str(home)}
        backend = on_the_worker(Podman, cli, tmp, claude_cache, env)
    else:                   # docker: contexts in a DOCKER_CONFIG of the test's, ssh as the worker's wrapper runs it
        known_hosts = worker.known_hosts
        known_hosts.write_text(known_hosts.read_text() + down_key)
        worker.add_context(ENGINE)
        worker.add_context(DOWN, host=f'ssh://{worker.destination}:{down_port}')
        env = {'DOCKER_CONFIG': str(worker.docker_config)}
        backend = on_the_worker(Docker, cli, tmp, claude_cache, {**env, 'PATH': worker.docker_env()['PATH']},
                                request.getfixturevalue('dockerd'))
        env['PATH'] = f'{worker.ssh_wrapper.parent}{os.pathsep}{backend.env()["PATH"]}'
    address = random_loopback_address()
    ca, cert, key = make_upstream_ca(tmp, address)
    git_root = tmp / 'git'
    git_root.mkdir()
    make_repository(git_root, 'app')
    upstream = Upstream(address, cert, key, git_root=git_root, git_credentials=('gate-user', PASSWORD))
    bottles = Bottles(tmp / 'project', backend)
    bottles.supervise()
    bottles.extra_env.update(env, BOTTLE_UPSTREAM_CA=str(ca), GIT_SSL_CAINFO=str(ca),
                             GIT_CONFIG_GLOBAL=str(host_git_config(tmp, address, ca)))
    setup_agent(bottles, 'a', engine=ENGINE, secrets=[TEST_SECRET], supervise_wait=1,
                git=[{'url': f'https://{address}/git/app.git', 'mode': 'forward'}],
                network={'allow_hosts': [address, *TEST_SECRET_NETWORK['allow_hosts']],
                         'allow_private': [f'{address}/32']})
    try:
        yield Remote(bottles, worker, address, git_root, cli, known_hosts)
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
    bottles, worker, address, git_root = remote.bottles, remote.worker, remote.address, remote.git_root
    run = bottles.doit('launch:a', env=bottles.env(BOTTLE_TEST_SECRET=SECRET))
    assert run.count('load') == 1, run.calls                       # loaded into the worker's engine once
    machine_calls = [call for call in run.calls if bottles.machine('a') in call]
    assert machine_calls and all(call[:2] == remote.prefix for call in machine_calls), run.calls
    assert bottles.machine('a') in remote.there('ps', '--format', '{{.Names}}').split()
    assert bottles.machine('a') not in remote.here('ps', '-a', '--format', '{{.Names}}').split()   # none here
    assert f'on {remote.cli} engine {ENGINE}' in run.stdout and forward_pid(bottles), run.output
    status = bottles.doit('status').stdout
    assert f'a: {bottles.machine("a")} on {remote.cli} engine {ENGINE}, running' in status, status
    assert 'door forwarded to the worker up' in status, status
    door = bottles.guest('a', 'ls -ln /run/bottle/ && touch /run/bottle/x 2>&1; true')
    assert 'egress.sock' in door and 'Read-only file system' in door, door      # the door's directory, read-only
    assert bottles.guest('a', 'tail -n +3 /proc/net/dev | cut -d: -f1').split() == ['lo']
    # Nothing secret on the worker: the attach command carries the placeholder, no file of the worker the value.
    assert placeholder_of(bottles, 'a', TEST_SECRET['name']) in run.stdout and SECRET not in run.output
    assert SECRET not in remote.there('inspect', bottles.machine('a'))
    found = worker.ssh('grep', '-rlF', '--exclude-dir=netns', SECRET, '/root/.claude-bottle', str(worker.state),
                       check=False)                               # (a network namespace's file cannot be read)
    assert found.returncode == 1 and found.stdout == b'', found     # 1: grep read it all and found nothing


def test_egress_is_allowed_and_denied_by_this_hosts_proxy_through_the_forwarded_door(remote):
    bottles, worker, address, git_root = remote.bottles, remote.worker, remote.address, remote.git_root
    assert curl(bottles, address, '/hello') == (200, 'upstream saw GET /hello')
    status, body = curl(bottles, 'denied.bottle-test.example', '/x')
    assert status == 403, body
    log = (bottles.root / '.bottle' / 'agents' / 'a' / 'egress.log').read_text()
    assert '/hello' in log and 'denied.bottle-test.example' in log     # the fence on this host saw both


def test_a_push_through_the_gate_lands_upstream(remote):
    bottles, worker, address, git_root = remote.bottles, remote.worker, remote.address, remote.git_root
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
    bottles, worker, address, git_root = remote.bottles, remote.worker, remote.address, remote.git_root
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
    bottles, worker, address, git_root = remote.bottles, remote.worker, remote.address, remote.git_root
    doors = worker.ssh('sh', '-c', 'ls $HOME/.claude-bottle/*/*/egress.sock').stdout.decode().split()
    assert doors
    for door in doors:
        tried = worker.ssh('setpriv', '--reuid', 'nobody', '--regid', 'nogroup', '--clear-groups', 'python3', '-c',
                           f'import socket; socket.socket(socket.AF_UNIX).connect({door!r})', check=False)
        assert tried.returncode != 0 and b'PermissionError' in tried.stderr, tried.stderr


def test_a_relaunch_makes_one_probe_of_the_engine_and_an_edited_skill_one_transfer(remote):
    bottles, worker, address, git_root = remote.bottles, remote.worker, remote.address, remote.git_root
    again = bottles.doit('launch:a')
    probes = [call for call in again.calls if call[:2] == remote.prefix]
    assert again.kinds == {'probe': 1, remote.listing: 1} and len(probes) == 1, again.calls   # and the engines' list
    (bottles.root / 'agents/skills/review/examples/two.md').write_text('two, edited on the worker\n')
    edited = bottles.doit('launch:a')
    assert edited.transferred_skills() == ['review'] and edited.count('create') == 0, edited.calls
    assert 'edited on the worker' in bottles.guest('a', 'cat /home/agent/.claude/skills/review/examples/two.md')


def test_a_forward_killed_behind_doits_back_is_restored_by_the_next_launch_without_a_new_machine(remote):
    bottles, worker, address, git_root = remote.bottles, remote.worker, remote.address, remote.git_root
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
    bottles, worker, address, git_root = remote.bottles, remote.worker, remote.address, remote.git_root
    Daemon(f'forward-{ENGINE}', bottles.root / '.bottle' / 'forward', []).stop()
    leftovers = worker.ssh('sh', '-c', 'ls -d $HOME/.claude-bottle/*/*/').stdout.decode().split()
    for directory in leftovers:           # a socket nobody listens on, as a crashed sshd would leave
        worker.ssh('python3', '-c', f'import socket; socket.socket(socket.AF_UNIX).bind({directory + "egress.sock"!r})',
                   check=False)
    run = bottles.doit('launch:a')
    assert run.count('create') == 0, run.calls
    assert curl(bottles, address, '/fresh') == (200, 'upstream saw GET /fresh')


def test_an_unknown_host_key_is_refused_in_one_line_before_any_call(remote):
    bottles, worker, address, git_root = remote.bottles, remote.worker, remote.address, remote.git_root
    known = remote.known_hosts
    kept = known.read_text()
    known.write_text('')
    try:
        run = bottles.doit('status', check=False)
        said = [line for line in run.output.splitlines() if 'in no known_hosts file' in line]
        assert run.returncode != 0 and len(said) == 1 and 'ssh-keyscan -p' in said[0], run.output
        assert 'Traceback' not in run.output, run.output
        assert [call for call in run.calls if bottles.backend.kind(call) != remote.listing] == [], run.calls
        assert known.read_text() == ''                  # nothing learnt behind the person's back
    finally:
        known.write_text(kept)


def test_a_worker_that_does_not_answer_fails_its_agent_in_one_line_and_the_others_go_on(remote):
    bottles, worker, address, git_root = remote.bottles, remote.worker, remote.address, remote.git_root
    setup_agent(bottles, 'down', engine=DOWN)
    setup_agent(bottles, 'here')
    try:
        run = bottles.doit('--continue', 'launch:down', 'launch:here', check=False)
        said = [line for line in run.output.splitlines() if f'on {remote.cli} engine {DOWN}' in line]
        assert run.returncode != 0 and said and 'agent down' in said[0], run.output
        assert 'Connection refused' in said[0] or 'is the worker' in said[0], said
        assert 'Traceback' not in run.output
        here = remote.here('exec', bottles.machine('here'), 'echo', 'up')
        assert here == 'up\n', here                                # on this host's engine, launched all the same
    finally:
        for name in ('down', 'here'):
            bottles.doit(f'teardown:{name}', check=False)
            (bottles.root / 'agents' / f'{name}.yaml').unlink()


def test_teardown_and_prune_leave_nothing_on_the_worker(remote):
    bottles, worker, address, git_root = remote.bottles, remote.worker, remote.address, remote.git_root
    bottles.doit('teardown:a')
    assert forward_pid(bottles) is None
    assert bottles.machine('a') not in remote.there('ps', '-a', '--format', '{{.Names}}').split()
    left = worker.ssh('sh', '-c', 'ls -A $HOME/.claude-bottle 2>/dev/null; true').stdout.decode().split()
    assert project_key(bottles.root) not in left, left          # this checkout's directory there is gone
    (bottles.root / 'agents' / 'a.yaml').unlink()
    bottles.agent('b', prompt='Other work.', image={'packages': ['jq']}, engine=ENGINE)   # another recipe
    pruned = bottles.doit('prune')
    images = remote.there('images', '--format', '{{.Repository}}:{{.Tag}}')
    assert 'claude-bottle-image' not in images, (images, pruned.output)
    assert f'from {remote.cli} engine {ENGINE}' in pruned.stdout, pruned.output
