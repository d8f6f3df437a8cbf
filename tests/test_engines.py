"""Engines elsewhere (issues 25 and 26): the manifest key `engine` names a podman system connection or a docker
context, and the agent's machine lives there. Here the engine is this host's own, on a socket of the test's
(`unix://`: podman's API service, the suite's dockerd): what placement means (every engine call through the
connection, one probe per engine, the engine in what launch and status say, a move between engines taking the old
machine down) without a worker. The worker over SSH, with the door forwarded, is tests/test_remote_engine.py."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.scenario import setup_agent

SERVICE_SECONDS = 30
pytestmark = pytest.mark.extended       # an engine's own service, and a launch on each CLI: with the remote engines


@pytest.fixture(scope='module')
def here(tmp_path_factory):
    """A podman API service of this host on a socket of its own, known to podman as the system connection
    `here` through a containers.conf of the test's (CONTAINERS_CONF): the host's own is never changed."""
    directory = tmp_path_factory.mktemp('engine-here')
    sock = directory / 'podman.sock'
    log = open(directory / 'service.log', 'wb')
    service = subprocess.Popen(['podman', 'system', 'service', '--time=0', f'unix://{sock}'], stdout=log,
                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + SERVICE_SECONDS
    while not _answers(sock):
        if service.poll() is not None or time.monotonic() > deadline:
            service.kill()
            pytest.skip(f'podman system service did not start: {(directory / "service.log").read_text()[-300:]}')
        time.sleep(0.1)
    conf = directory / 'containers.conf'
    conf.write_text(_host_settings() + f'\n[engine.service_destinations.here]\nuri = "unix://{sock}"\n')
    try:
        yield conf
    finally:
        os.killpg(service.pid, signal.SIGTERM)
        try:
            service.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(service.pid, signal.SIGKILL)
            service.wait()
        log.close()


def _host_settings() -> str:
    """What this host's podman reads besides (CONTAINERS_CONF replaces it all: `./demo.sh setup`'s ulimits)."""
    files = [Path('/etc/containers/containers.conf'), *sorted(Path('/etc/containers/containers.conf.d').glob('*.conf'))]
    return ''.join(f.read_text() + '\n' for f in files if f.is_file())


def _answers(sock: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(1)
            s.connect(str(sock))
        return True
    except OSError:
        return False


@pytest.fixture
def elsewhere(engine, request, tmp_path):
    """The project on `engine` (podman, docker) with an engine `here` of that CLI: podman's connection to its API
    service above, or a docker context (in a DOCKER_CONFIG of the test's) on the suite's dockerd."""
    cli = engine.backend.name
    if cli == 'podman':
        engine.extra_env['CONTAINERS_CONF'] = str(request.getfixturevalue('here'))
    else:
        config = tmp_path / 'docker-config'
        config.mkdir()
        made = subprocess.run(['docker', 'context', 'create', 'here', '--docker',
                               f'host={engine.backend.engine.env["DOCKER_HOST"]}'], capture_output=True, text=True,
                              env={**os.environ, 'DOCKER_CONFIG': str(config)})
        assert made.returncode == 0, made.stderr
        engine.extra_env['DOCKER_CONFIG'] = str(config)
    return engine, cli, ['--connection' if cli == 'podman' else '--context', 'here']


def test_an_agent_on_an_engine_is_placed_there_said_so_and_moved_back_whole(elsewhere):
    bottles, cli, prefix = elsewhere
    setup_agent(bottles, 'a', engine='here')
    setup_agent(bottles, 'b')
    listed = bottles.doit('list', '--all')
    assert f'create machine {bottles.machine("a")} on {cli} engine here' in listed.stdout, listed.stdout

    launched = bottles.doit('launch:a')
    machine_calls = [call for call in launched.calls if bottles.machine('a') in call]
    assert {bottles.backend.kind(call) for call in machine_calls} >= {'create', 'start', 'exec'}, launched.calls
    assert all(call[:2] == prefix for call in machine_calls), launched.calls   # built here, run there
    assert f'in {bottles.machine("a")} on {cli} engine here.' in launched.stdout, launched.stdout
    status = bottles.doit('status')
    assert f'a: {bottles.machine("a")} on {cli} engine here, running' in status.stdout, status.stdout

    both = bottles.doit('launch:a', 'launch:b')
    probes = [call for call in both.calls if bottles.backend.kind(call) == 'probe']
    assert sorted(call[:2] == prefix for call in probes) == [False, True], both.calls     # one each

    setup_agent(bottles, 'a')                    # back to this host's engine: the machine on `here` goes
    moved = bottles.doit('launch:a')
    deleted = [call for call in moved.calls if bottles.backend.kind(call) == 'delete']
    assert deleted and deleted[0][:2] == prefix, moved.calls
    assert f'in {bottles.machine("a")} on {cli}.' in moved.stdout, moved.stdout
    assert bottles.guest('a', 'echo up') == 'up\n'
