"""The tests' remote podman worker (tests/remote_worker.py), held to what issue 25 needs of it, with real parts:
podman's remote client over ssh answers from the worker's own service and storage, loads an image archive
and runs it, and exec and cp go through it; an `ssh -R` forward of a Unix socket is a door a container on the
worker reaches a control-side server through (and a second forward to the same path takes it over); host keys
are checked (podman's own client trusts a new one); the control host's test paths are absent on the worker; and
stop() leaves nothing running, so a second worker starts the same way.

The docker worker (issue 26) likewise: a docker context of the test's own reaches the worker's own dockerd (not the
suite's, nor the host's) through the docker CLI's ssh transport, with Debian's 20.10 CLI and the newer one this
machine has; `load -i`, `exec -i` and `cp` stream from the control host while `-v` paths are the worker's; a
container gets `lo` only; an `ssh -R` forward is a door a container reaches; docker's ssh refuses a host key it does
not know; and stop() leaves no dockerd, containerd, container, cgroup or mount behind."""
from __future__ import annotations

import json
import os
import pwd
import select
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests.bottles import Engine
from tests.conftest import podman_problem
from tests.remote_worker import docker_worker, worker  # noqa: F401 (the fixtures)
from tests.remote_worker import (CONNECTION, DOCKER_CONTEXT, DockerWorker, Worker, accepts, cgroup_hierarchies,
                                 make_key, make_tiny_image, started_at, sweep)

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.extended        # seconds per worker, a podman service or a dockerd, and images


def host_podman(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(['podman', *args], capture_output=True, check=check, timeout=300)


@pytest.fixture(scope='module')
def image(tmp_path_factory):
    """An image archive made on the control host (under its hidden test paths) and its reference."""
    if podman_problem():
        pytest.skip(podman_problem())
    return make_tiny_image(tmp_path_factory.mktemp('image'))


@pytest.fixture(scope='module')
def loaded(worker, image):
    """The image loaded on the worker through the connection: `load -i` reads the archive on the control
    side (the worker cannot see its path) and sends it."""
    archive, reference = image
    assert f'Loaded image: {reference}' in worker.podman('load', '-i', str(archive)).stdout.decode()
    return reference


def wait_for(what: str, check, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f'{what}: not within {timeout} s'
        time.sleep(0.1)


class EchoServer:
    """A server on a Unix socket of the control host: each connection gets back what it sends."""

    def __init__(self, path: Path, prefix: bytes = b''):
        self.path = path
        self.prefix = prefix          # sent first on each connection
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(str(path))
        self.listener.listen()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return              # closed
            with conn:
                conn.settimeout(60)
                try:
                    conn.sendall(self.prefix)
                    while data := conn.recv(65536):
                        conn.sendall(data)
                except OSError:
                    pass

    def close(self):
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.thread.join(timeout=60)


def interfaces(proc_net_dev: bytes) -> list[str]:
    """The network interfaces in a /proc/net/dev."""
    return [line.split(':')[0].strip() for line in proc_net_dev.decode().splitlines()[2:]]


def forward(worker: Worker, remote: Path, local: Path) -> subprocess.Popen:
    """`ssh -N -R remote:local` to the worker, once the socket is there (or the forward failed)."""
    proc = subprocess.Popen([*worker.ssh_argv, '-N', '-o', 'ExitOnForwardFailure=yes', '-R', f'{remote}:{local}',
                             worker.destination], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    wait_for('the forwarded socket on the worker', lambda: proc.poll() is not None or
             worker.ssh('test', '-S', str(remote), check=False).returncode == 0)
    return proc


def end(proc: subprocess.Popen):
    proc.terminate()
    proc.wait(timeout=60)
    proc.stderr.close()


def test_the_connection_answers_from_the_workers_own_service_and_storage(worker, image):
    info = json.loads(worker.podman('info', '--format', 'json').stdout)
    assert info['store']['graphRoot'] == str(worker.state / 'storage')
    assert info['store']['runRoot'] == str(worker.state / 'runroot')
    assert info['host']['remoteSocket']['path'] == f'unix://{worker.socket}'
    host = json.loads(host_podman('info', '--format', 'json').stdout)
    assert host['store']['graphRoot'] != info['store']['graphRoot']
    version = json.loads(worker.podman('version', '--format', 'json').stdout)
    assert version['Server']['Version'] and version['Client']['Version']
    # the connection is in the test's containers.conf, as written, and in no file of the host's
    listed = subprocess.run(['podman', 'system', 'connection', 'list', '--format', '{{.Name}} {{.URI}}'],
                            env=worker.client_env(), capture_output=True, text=True, check=True).stdout
    assert f'{CONNECTION} {worker.uri}' in listed.splitlines()
    assert not Path('/etc/containers/containers.conf').exists() or \
        worker.uri not in Path('/etc/containers/containers.conf').read_text()
    # an image only the host has is absent on the worker
    archive, reference = image
    host_only = f'{reference}-host-only'
    host_podman('load', '-i', str(archive))
    try:
        host_podman('tag', reference, host_only)
        assert worker.podman('image', 'exists', host_only, check=False).returncode == 1
    finally:
        host_podman('rmi', '-f', reference, host_only, check=False)


def test_an_image_archive_loaded_over_ssh_runs_on_the_worker_with_no_network(worker, loaded):
    assert worker.podman('image', 'exists', loaded, check=False).returncode == 0
    assert host_podman('image', 'exists', loaded, check=False).returncode == 1     # only the worker has it
    # no network asked for, and none by the worker's default (it shares the host's network namespace)
    for network in (['--network', 'none'], []):
        assert interfaces(worker.podman('run', '--rm', *network, loaded, 'cat', '/proc/net/dev').stdout) == ['lo']


def door_is_reached(worker: Worker, engine, reference: str, tmp_path: Path):
    """A server on the control host, forwarded with `ssh -R` to a socket in a directory of the worker's, is reached
    from a container `engine` (the worker's podman or docker) runs with no network and that directory mounted
    read-only: what it sends is echoed, it cannot write there, and it has `lo` only."""
    server = EchoServer(tmp_path / 'echo.sock')            # on the control host, under its hidden paths
    door_dir = worker.state / 'doors' / 'a'
    door = door_dir / 'door.sock'
    worker.ssh('mkdir', '-p', '-m', '0700', str(door_dir))
    forwarding = forward(worker, door, server.path)
    try:
        assert forwarding.poll() is None, forwarding.stderr.read().decode()
        owner, mode = worker.ssh('stat', '-c', '%U %a', str(door)).stdout.decode().split()
        # StreamLocalBindMask 0077: a socket made 0777 is left 0700, no one but its owner may connect
        assert (owner, stat.S_IMODE(int(mode, 8))) == ('root', 0o700)
        script = ('socat - UNIX-CONNECT:/run/bottle/door.sock; '
                  'if (echo x > /run/bottle/written) 2>/dev/null; then echo WRITABLE; fi; cat /proc/net/dev')
        through = engine('run', '--rm', '-i', '--network', 'none', '-v', f'{door_dir}:/run/bottle:ro',
                         reference, 'sh', '-c', script, input=b'through the door\n').stdout
        echoed, _, net = through.partition(b'Inter-|')
        assert echoed == b'through the door\n'           # and no WRITABLE: the door is read-only
        assert interfaces(b'Inter-|' + net) == ['lo']
    finally:
        end(forwarding)
        server.close()


def test_a_socket_forwarded_with_ssh_r_is_a_door_a_container_on_the_worker_reaches(worker, loaded, tmp_path):
    door_is_reached(worker, worker.podman, loaded, tmp_path)


def test_a_second_forward_to_the_same_path_takes_the_socket_over(worker, tmp_path):
    """StreamLocalBindUnlink: the second `ssh -R` to a path unlinks the first one's socket, which stays
    connected and forwards nothing; so each door on a worker needs a path of its own."""
    first, second = EchoServer(tmp_path / 'first.sock'), EchoServer(tmp_path / 'second.sock', prefix=b'second ')
    door_dir = worker.state / 'doors' / 'shared'
    worker.ssh('mkdir', '-p', '-m', '0700', str(door_dir))
    door = door_dir / 'door.sock'
    forwards = []
    try:
        forwards.append(forward(worker, door, first.path))
        assert worker.ssh('socat', '-', f'UNIX-CONNECT:{door}', input=b'hello\n').stdout == b'hello\n'
        forwards.append(forward(worker, door, second.path))
        wait_for('the second forward\'s socket', lambda: worker.ssh(
            'socat', '-', f'UNIX-CONNECT:{door}', input=b'hello\n', check=False).stdout == b'second hello\n')
        assert all(proc.poll() is None for proc in forwards)
    finally:
        for proc in forwards:
            end(proc)
        first.close()
        second.close()


def exec_and_cp_go_through(engine, reference: str, tmp_path: Path, *rm_options: str):
    """What provisioning does to a bottle, through `engine` (the worker's podman or docker): `exec -i` with a
    stream on stdin, `cp` in and out, `cp -` of a tar stream; the paths given to cp are the control host's."""
    name = 'exec-and-cp'
    engine('run', '-d', '--name', name, '--network', 'none', reference, 'socat', 'UNIX-LISTEN:/never.sock',
           'EXEC:cat')
    try:
        assert engine('exec', '-i', name, 'cat', input=b'through exec\n').stdout == b'through exec\n'
        sent = tmp_path / 'sent.txt'
        sent.write_text('from the control host\n')
        engine('cp', str(sent), f'{name}:/sent.txt')
        engine('cp', f'{name}:/sent.txt', str(tmp_path / 'back.txt'))
        assert (tmp_path / 'back.txt').read_text() == 'from the control host\n'
        (tmp_path / 'streamed.txt').write_text('in a tar stream\n')
        stream = subprocess.run(['tar', '-C', str(tmp_path), '-cf', '-', 'streamed.txt'], capture_output=True,
                                check=True).stdout
        engine('cp', '-', f'{name}:/', input=stream)
        assert engine('exec', name, 'cat', '/streamed.txt').stdout == b'in a tar stream\n'
    finally:
        engine('rm', '-f', *rm_options, name, check=False)


def test_exec_and_cp_go_through_the_connection(worker, loaded, tmp_path):
    exec_and_cp_go_through(worker.podman, loaded, tmp_path, '-t', '0')


def test_a_host_key_not_in_known_hosts_is_refused(worker, tmp_path):
    empty = tmp_path / 'known_hosts_empty'
    empty.touch()
    wrong = tmp_path / 'known_hosts_wrong'
    wrong.write_text(worker.known_hosts_entry(make_key(tmp_path / 'other_key', 'not the worker')))
    for known_hosts in (empty, wrong):
        argv = [a if not a.startswith('UserKnownHostsFile=') else f'UserKnownHostsFile={known_hosts}'
                for a in worker.ssh_argv]
        refused = subprocess.run([*argv, worker.destination, 'true'], capture_output=True, text=True, timeout=60,
                                 stdin=subprocess.DEVNULL)
        assert refused.returncode == 255 and 'Host key verification failed.' in refused.stderr
    assert worker.ssh('true').returncode == 0         # with the worker's key


def test_podman_refuses_a_changed_host_key_but_trusts_an_unknown_one_on_first_use(worker, tmp_path):
    """What podman 4.3.1's own ssh client does (the product must check host keys itself before it hands podman
    a connection): a key other than the one its $HOME/.ssh/known_hosts has for the host is refused; a host that
    file lacks is let in and its key appended; with no such file it goes on with a warning."""
    home = tmp_path / 'home'
    (home / '.ssh').mkdir(parents=True)
    known_hosts = home / '.ssh' / 'known_hosts'
    env = {**worker.client_env(), 'HOME': str(home)}

    def version():
        return subprocess.run(['podman', '--connection', CONNECTION, 'version'], env=env, capture_output=True,
                              text=True, timeout=120)
    known_hosts.write_text(worker.known_hosts_entry(make_key(tmp_path / 'other_key', 'not the worker')))
    changed = version()
    assert changed.returncode != 0 and 'knownhosts: key mismatch' in changed.stderr
    known_hosts.write_text('')
    assert version().returncode == 0
    assert worker.known_hosts.read_text().split() == known_hosts.read_text().split()     # added, unasked
    known_hosts.unlink()
    missing = version()
    assert missing.returncode == 0 and 'please create a known_hosts file' in missing.stderr
    assert not known_hosts.exists()


def test_the_control_hosts_test_paths_are_absent_on_the_worker(worker, loaded, tmp_path):
    made = tmp_path / 'made-on-the-control-host'
    made.write_text('control\n')
    assert made.resolve().is_relative_to(worker.hide)
    seen = worker.ssh('cat', str(made), check=False)
    assert seen.returncode != 0 and b'No such file or directory' in seen.stderr
    assert worker.ssh('ls', '-A', str(worker.hide)).stdout == b''      # the worker's own, empty
    mounted = worker.podman('run', '--rm', '--network', 'none', '-v', f'{tmp_path}:/control:ro', loaded,
                            'cat', f'/control/{made.name}', check=False)
    assert mounted.returncode != 0 and b'no such file or directory' in mounted.stderr
    # what the worker has of its own is where both sides see it
    assert worker.ssh('test', '-S', str(worker.socket), check=False).returncode == 0


def read_proc(pid: int, name: str) -> str:
    try:
        return Path(f'/proc/{pid}/{name}').read_text(errors='replace')
    except OSError:
        return ''           # ended meanwhile


def process_name(pid: int) -> str:
    return read_proc(pid, 'cmdline').replace('\0', ' ')


def test_stop_leaves_nothing_of_the_worker_and_a_second_one_starts(tmp_path, image):
    if Worker.problem():
        pytest.skip(Worker.problem())
    archive, reference = image
    control = tmp_path / 'control'
    with Worker(control) as first:
        first.podman('load', '-i', str(archive))
        first.podman('run', '-d', '--name', 'left-running', '--network', 'none', reference,
                     'socat', 'UNIX-LISTEN:/never.sock', 'EXEC:cat')
        container = first.podman('inspect', '--format', '{{.Id}}', 'left-running').stdout.decode().strip()
        # its processes, found on the host by the container's cgroup
        in_container = {int(p.name) for p in Path('/proc').iterdir()
                        if p.name.isdigit() and f'libpod-{container}' in read_proc(int(p.name), 'cgroup')}
        pids = first.pids()
        sshd = {pid for pid in pids if process_name(pid).startswith('sshd: ')}
        service = {pid for pid in pids if ' system service ' in process_name(pid)}
        assert sshd and service and in_container and first.listening()
        started = {pid: at for pid in pids | in_container if (at := started_at(pid))}     # those still running
        state = first.state
    assert [pid for pid, at in started.items() if started_at(pid) == at] == []       # each ended
    assert first.pids() == set()
    assert not first.listening()                # nothing accepts at its address and port
    assert not state.exists()
    assert sorted(p.name for p in control.iterdir()) == []
    with Worker(control) as second:
        assert second.ssh('true').returncode == 0
        assert second.podman('images', '--format', '{{.Repository}}').stdout == b''       # storage of its own
    assert second.pids() == set() and not second.listening()


KEEP_A_WORKER = """
import json, sys, time
from pathlib import Path
from tests.remote_worker import Worker, started_at
worker = Worker(Path(sys.argv[1]), engines=(sys.argv[2],)).start()
made = {'address': worker.address, 'port': worker.port, 'state': str(worker.state)}
if len(sys.argv) > 3:           # an image archive and its reference: a container of it left running (docker)
    worker.docker('load', '-i', sys.argv[3])
    container = worker.docker('run', '-d', '--network', 'none', sys.argv[4], 'socat', 'UNIX-LISTEN:/never.sock',
                              'EXEC:cat').stdout.decode().strip()
    made['container'] = f'{worker.cgroup_parent}/{container}'
made['started'] = {pid: at for pid in worker.pids() if (at := started_at(pid))}
print(json.dumps(made), flush=True)
time.sleep(3600)
"""


def kill_a_kept_worker(tmp_path: Path, *argv: str, check=lambda made: None) -> dict:
    """Start a worker (KEEP_A_WORKER's `argv`: engine, and an archive and reference) in a process of its own,
    `check` what it says of itself, kill that process: the worker's processes end, its port closes, its files stay
    until sweep(). Returns what it said."""
    keeper = subprocess.Popen([sys.executable, '-c', KEEP_A_WORKER, str(tmp_path / 'control'), *argv], cwd=REPO,
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        ready, _, _ = select.select([keeper.stdout], [], [], 180)
        assert ready, 'the worker did not start within 180 s'
        line = keeper.stdout.readline()
        assert line, keeper.stderr.read().decode()
        made = json.loads(line)
        assert made['started'] and accepts(made['address'], made['port'])
        check(made)
    finally:
        keeper.kill()
        keeper.wait(timeout=60)
        keeper.stdout.close()
        keeper.stderr.close()
    wait_for('the killed worker\'s processes to end', lambda: all(
        started_at(int(pid)) != at for pid, at in made['started'].items()))
    assert not accepts(made['address'], made['port'])
    assert Path(made['state']).exists()
    sweep()
    assert not Path(made['state']).exists()
    return made


def test_a_worker_ends_with_the_process_that_started_it(tmp_path):
    """A test process killed before its stop() leaves no sshd or service running; the next sweep() removes the
    worker's files."""
    if Worker.problem():
        pytest.skip(Worker.problem())
    kill_a_kept_worker(tmp_path, 'podman')


# --- the docker worker (issue 26): a dockerd of its own, reached through a docker context over ssh ---------------

def docker_clis() -> list[str]:
    """The docker CLIs here: Debian's (docker.io, 20.10) and the first on PATH when it is another one (this kind of
    machine ships docker 28's CLI in /usr/local/bin)."""
    found: list[str] = []
    for cli in ('/usr/bin/docker', shutil.which('docker')):
        if cli and Path(cli).exists() and all(Path(cli).resolve() != Path(each).resolve() for each in found):
            found.append(cli)
    return found or ['docker']


def major(cli: str) -> int:
    """The CLI's major version, from `docker --version` ("Docker version 20.10.24+dfsg1, build 297e128")."""
    words = subprocess.run([cli, '--version'], capture_output=True, text=True, check=True, timeout=60).stdout.split()
    return int(words[2].split('.')[0])


@pytest.fixture(scope='module')
def docker_loaded(docker_worker, image):
    """The image loaded on the docker worker through its context: `load -i` reads the archive (a `podman save`, in
    docker-archive format) on the control side and sends it."""
    archive, reference = image
    assert f'Loaded image: {reference}' in docker_worker.docker('load', '-i', str(archive)).stdout.decode()
    return reference


def logging_ssh(worker: Worker, directory: Path) -> tuple[dict[str, str], Path]:
    """An `ssh` ahead of the worker's wrapper on PATH that logs the arguments docker gives it: (env, log)."""
    log = directory / 'ssh-argv.log'
    wrapper = directory / 'bin' / 'ssh'
    wrapper.parent.mkdir(parents=True)
    wrapper.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> {log}\nexec {worker.ssh_wrapper} "$@"\n')
    wrapper.chmod(0o700)
    return {'PATH': f'{wrapper.parent}{os.pathsep}{worker.docker_env()["PATH"]}'}, log


def test_a_docker_context_answers_from_the_workers_own_dockerd(docker_worker, dockerd, image):
    """The context is in the test's DOCKER_CONFIG; the engine behind it is the worker's dockerd, with a containerd,
    /etc/docker and /var/run/docker.sock of its own, sharing no image, container or engine ID with the suite's
    own dockerd."""
    worker = docker_worker
    metas = list((worker.docker_config / 'contexts' / 'meta').glob('*/meta.json'))
    assert [json.loads(meta.read_text())['Endpoints']['docker']['Host'] for meta in metas] == [worker.docker_uri]
    info = json.loads(worker.docker('info', '--format', '{{json .}}').stdout)
    assert info['DockerRootDir'] == str(worker.state / 'docker-data')
    assert info['ServerVersion'] and info['CgroupDriver'] == 'cgroupfs'
    suite = json.loads(Engine('docker', {'DOCKER_HOST': dockerd.host})('info', '--format', '{{json .}}').stdout)
    assert suite['DockerRootDir'] != info['DockerRootDir'] and suite['ID'] != info['ID']
    # its processes: dockerd with the worker's paths, and the containerd it started (none answered in its /run)
    names = {pid: process_name(pid) for pid in worker.pids()}
    daemon = [name for name in names.values() if name.startswith('dockerd ')]
    containerd = [name for name in names.values() if name.startswith('containerd ')]
    assert len(daemon) == 1 and f'--data-root {worker.state}/docker-data' in daemon[0]
    assert f'--exec-root {worker.state}/docker-exec' in daemon[0] and '--bridge=none' in daemon[0]
    assert len(containerd) == 1 and f'{worker.state}/docker-exec/containerd/containerd.toml' in containerd[0]
    assert 'libcontainerd: started new containerd process' in (worker.state / 'dockerd.log').read_text()
    # an ssh session on the worker: no DOCKER_HOST (dial-stdio finds /var/run/docker.sock), a client
    # configuration of the worker's own, its own /var/run/docker.sock and /etc/docker (key.json: its engine ID)
    session = worker.ssh('sh', '-c', 'echo "${DOCKER_HOST-unset} $DOCKER_CONFIG"; stat -L -c "%F %d:%i" '
                         '/var/run/docker.sock; cat /etc/docker/key.json').stdout.decode().splitlines()
    assert session[0] == f'unset {worker.state}/docker-client'
    kind, inode = session[1].rsplit(' ', 1)
    assert kind == 'socket'
    host_socket = Path('/var/run/docker.sock')
    if host_socket.exists():
        assert inode != f'{host_socket.stat().st_dev}:{host_socket.stat().st_ino}'
    assert '\n'.join(session[2:]) == (worker.state / 'etc-docker' / 'key.json').read_text().rstrip('\n')
    if Path('/etc/docker/key.json').exists():
        assert Path('/etc/docker/key.json').read_text() != (worker.state / 'etc-docker' / 'key.json').read_text()
    # an image and a container of the suite's engine are not the worker's
    archive, reference = image
    suite_engine = Engine('docker', {'DOCKER_HOST': dockerd.host})
    host_only = f'{reference}-suite-only'
    suite_engine('load', '-i', str(archive))
    try:
        suite_engine('tag', reference, host_only)
        suite_engine('run', '-d', '--name', 'suite-only', '--network', 'none', host_only,
                     'socat', 'UNIX-LISTEN:/never.sock', 'EXEC:cat')
        assert worker.docker('image', 'inspect', host_only, check=False).returncode == 1
        assert 'suite-only' not in worker.docker('ps', '-a', '--format', '{{.Names}}').stdout.decode().split()
    finally:
        suite_engine('rm', '-f', 'suite-only', check=False)
        suite_engine('rmi', '-f', reference, host_only, check=False)


@pytest.mark.parametrize('cli', docker_clis())
def test_each_docker_cli_reaches_the_worker_through_the_ssh_first_on_its_path(docker_worker, cli, tmp_path):
    """docker's ssh transport runs the `ssh` it finds on PATH as `[-o ConnectTimeout=30 -T] -l user -p port -- host
    docker system dial-stdio`, one ssh per API connection (docker 20.10 adds no option; 28 those two), so
    the worker's wrapper gives it the key and host key checking. --context wins over DOCKER_HOST, DOCKER_HOST over
    DOCKER_CONTEXT, and --host with --context is an error. A path after the host (the socket on the worker) is
    refused by 20.10 and passed by newer CLIs as `docker --host unix://<path>`."""
    worker = docker_worker
    env, log = logging_ssh(worker, tmp_path)
    version = json.loads(worker.docker('version', '--format', '{{json .}}', cli=cli, env=env).stdout)
    assert version['Client']['Version'].split('.')[0] == str(major(cli))
    assert version['Server']['Version']
    dial = f'-l {worker.user} -p {worker.port} -- {worker.address} docker system dial-stdio'
    argv = log.read_text().splitlines()
    assert argv and set(argv) == {dial if major(cli) < 23 else f'-o ConnectTimeout=30 -T {dial}'}
    root = str(worker.state / 'docker-data')

    def root_dir(*, context=None, **variables):
        return worker.docker('info', '--format', '{{.DockerRootDir}}', context=context, cli=cli, check=False,
                             env={**env, **variables})
    nowhere = f'unix://{tmp_path}/no-engine.sock'
    assert root_dir(context=DOCKER_CONTEXT, DOCKER_HOST=nowhere).stdout.decode().strip() == root
    assert root_dir(DOCKER_CONTEXT=DOCKER_CONTEXT).stdout.decode().strip() == root
    assert root_dir(DOCKER_HOST=worker.docker_uri).stdout.decode().strip() == root
    shadowed = worker.docker('version', context=None, cli=cli, check=False,
                             env={**env, 'DOCKER_CONTEXT': DOCKER_CONTEXT, 'DOCKER_HOST': nowhere})
    assert shadowed.returncode != 0 and f'Cannot connect to the Docker daemon at {nowhere}' in shadowed.stderr.decode()
    both = worker.docker('--host', nowhere, 'info', cli=cli, check=False, env=env)
    assert both.returncode != 0 and 'conflicting options' in both.stderr.decode().lower()
    # the socket's path in the host's URL
    with_path = f'{worker.docker_uri}{worker.docker_socket}'
    made = subprocess.run([cli, 'context', 'create', 'with-path', '--docker', f'host={with_path}'],
                          capture_output=True, text=True, timeout=60, env={**worker.docker_env(), **env})
    try:
        if major(cli) < 23:
            assert made.returncode != 0 and 'extra path after the host' in made.stderr
        else:
            assert made.returncode == 0, made.stderr
            assert root_dir(context='with-path').stdout.decode().strip() == root
            assert f'docker --host unix://{worker.docker_socket} system dial-stdio' in log.read_text().splitlines()[-1]
    finally:
        subprocess.run([cli, 'context', 'rm', '-f', 'with-path'], capture_output=True, timeout=60,
                       env=worker.docker_env())


def test_an_image_archive_loaded_through_the_context_runs_on_the_docker_worker_with_no_network(
        docker_worker, docker_loaded, dockerd):
    """`load -i` sent the archive; the image is the worker's alone; a container asked for `--network none`, or for
    no network at all (dockerd runs with --bridge=none), has `lo` only."""
    worker = docker_worker
    assert worker.docker('image', 'inspect', docker_loaded, check=False).returncode == 0
    suite_engine = Engine('docker', {'DOCKER_HOST': dockerd.host})
    assert suite_engine('image', 'inspect', docker_loaded, check=False).returncode == 1
    for network in (['--network', 'none'], []):
        listed = worker.docker('run', '--rm', *network, docker_loaded, 'cat', '/proc/net/dev').stdout
        assert interfaces(listed) == ['lo']
    name = 'network-default'
    worker.docker('run', '-d', '--name', name, docker_loaded, 'socat', 'UNIX-LISTEN:/never.sock', 'EXEC:cat')
    try:
        mode = worker.docker('inspect', '--format', '{{.HostConfig.NetworkMode}}', name).stdout.decode().strip()
        assert mode == 'default'        # which names a bridge that dockerd does not have
        networks = worker.docker('network', 'ls', '--format', '{{.Name}}').stdout.decode().split()
        assert sorted(networks) == ['host', 'none']
    finally:
        worker.docker('rm', '-f', name, check=False)


def test_a_socket_forwarded_with_ssh_r_is_a_door_a_docker_container_on_the_worker_reaches(
        docker_worker, docker_loaded, tmp_path):
    door_is_reached(docker_worker, docker_worker.docker, docker_loaded, tmp_path)


def test_docker_exec_cp_and_load_stream_from_the_control_host(docker_worker, docker_loaded, image, tmp_path):
    """As with podman; so was the archive `load -i` read, which the worker cannot see."""
    archive, _ = image
    assert docker_worker.ssh('test', '-e', str(archive), check=False).returncode == 1
    exec_and_cp_go_through(docker_worker.docker, docker_loaded, tmp_path)


@pytest.mark.parametrize('cli', docker_clis())
def test_docker_exec_gets_a_terminal_through_the_context(docker_worker, docker_loaded, cli):
    """`exec -it` from a terminal (script(1) gives docker one) gets a terminal in the container on the worker,
    what attaching Claude Code needs; what is typed goes in, the exit code comes back."""
    worker = docker_worker
    name = f'terminal-{major(cli)}'
    worker.docker('run', '-d', '--name', name, '--network', 'none', docker_loaded,
                  'socat', 'UNIX-LISTEN:/never.sock', 'EXEC:cat')
    try:
        command = shlex.join([cli, '--context', DOCKER_CONTEXT, 'exec', '-it', name, 'sh', '-c',
                              'test -t 0 && test -t 1 && echo "a terminal"; read line; echo "read $line"; exit 3'])
        typed = subprocess.run(['script', '-qec', command, '/dev/null'], input=b'typed in\n', capture_output=True,
                               timeout=120, env=worker.docker_env())
        assert typed.returncode == 3, typed
        assert b'a terminal' in typed.stdout and b'read typed in' in typed.stdout
    finally:
        worker.docker('rm', '-f', name, check=False)


def test_a_docker_volumes_path_is_the_workers(docker_worker, docker_loaded, tmp_path):
    """`-v <path>:...` names the worker's path: a file the control host made there is absent (dockerd, in the
    worker's namespace, makes the missing directory in the worker's own hidden tmpfs), one the worker made is
    there."""
    worker = docker_worker
    made = tmp_path / 'made-on-the-control-host'
    made.write_text('control\n')
    assert made.resolve().is_relative_to(worker.hide)
    seen = worker.docker('run', '--rm', '--network', 'none', '-v', f'{tmp_path}:/control:ro', docker_loaded,
                         'sh', '-c', 'cat /control/*', check=False)
    assert seen.returncode != 0 and b'No such file or directory' in seen.stderr
    worker.ssh('sh', '-c', f'echo worker > {shlex.quote(str(tmp_path))}/made-on-the-worker')
    assert not (tmp_path / 'made-on-the-worker').exists()
    assert worker.docker('run', '--rm', '--network', 'none', '-v', f'{tmp_path}:/control:ro', docker_loaded,
                         'cat', '/control/made-on-the-worker').stdout == b'worker\n'


@pytest.mark.parametrize('cli', docker_clis())
def test_dockers_ssh_refuses_a_host_key_it_does_not_know(docker_worker, cli, tmp_path):
    """docker starts ssh without a terminal (in a session of its own), so OpenSSH's default `ask` for an unknown
    host cannot ask and refuses, as strict checking does for an unknown or a changed key; nothing is written to the
    known_hosts file. The product must still check host keys itself (a user's ssh config may say accept-new), in
    the file the `ssh` docker runs would read (`ssh -G` says which)."""
    worker = docker_worker
    empty = tmp_path / 'known_hosts_empty'
    empty.touch()
    wrong = tmp_path / 'known_hosts_wrong'
    wrong.write_text(worker.known_hosts_entry(make_key(tmp_path / 'other_key', 'not the worker')))
    for known_hosts, strict in ((empty, True), (wrong, True), (empty, False)):
        options = ['-F', 'none', '-o', f'UserKnownHostsFile={known_hosts}', '-o', 'GlobalKnownHostsFile=/dev/null',
                   '-o', 'IdentitiesOnly=yes', '-i', str(worker.key)]
        options += ['-o', 'StrictHostKeyChecking=yes', '-o', 'BatchMode=yes'] if strict else []
        wrapper = tmp_path / ('strict' if strict else 'ask') / known_hosts.name / 'ssh'
        wrapper.parent.mkdir(parents=True)
        wrapper.write_text(f'#!/bin/sh\nexec {shlex.join([shutil.which("ssh"), *options])} "$@"\n')
        wrapper.chmod(0o700)
        before = known_hosts.read_bytes()
        refused = worker.docker('version', cli=cli, check=False, timeout=120,
                                env={'PATH': f'{wrapper.parent}{os.pathsep}{os.environ["PATH"]}'})
        assert refused.returncode != 0 and 'Host key verification failed.' in refused.stderr.decode()
        assert known_hosts.read_bytes() == before
    assert worker.docker('version', cli=cli).returncode == 0         # with the worker's wrapper
    # which known_hosts file docker's ssh checks, as `ssh -G` resolves it on the docker client's PATH
    resolved = subprocess.run(['ssh', '-G', '-l', worker.user, '-p', str(worker.port), worker.address],
                              capture_output=True, text=True, check=True, timeout=60, env=worker.docker_env())
    assert f'userknownhostsfile {worker.known_hosts}' in resolved.stdout.splitlines()


def test_dockers_ssh_connections_can_ride_a_control_master(docker_worker, docker_loaded):
    """Each of docker's API connections is an ssh of its own (a `run --rm` makes several); an `ssh` ahead on PATH
    that adds the ControlPath of an OpenSSH control master to the worker (as the forward daemon runs) makes each a
    session of that one connection: the worker's sshd accepts no new one."""
    worker = docker_worker
    where = Path(tempfile.mkdtemp(prefix='cb-master-'))       # short: ssh binds <path>.<random> first
    control_path = where / 'm'
    master = subprocess.Popen([*worker.ssh_argv, '-N', '-M', '-S', str(control_path), '-o', 'ControlPersist=no',
                               worker.destination], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    try:
        wait_for('the control master', lambda: master.poll() is not None or control_path.is_socket())
        assert master.poll() is None, master.stderr.read().decode()
        wrapper, log = where / 'bin' / 'ssh', where / 'ssh-calls'
        wrapper.parent.mkdir()
        wrapper.write_text(f'#!/bin/sh\necho "$*" >> {log}\n'
                           f'exec {worker.ssh_wrapper} -o ControlMaster=no -o ControlPath={control_path} "$@"\n')
        wrapper.chmod(0o700)
        env = {'PATH': f'{wrapper.parent}{os.pathsep}{worker.docker_env()["PATH"]}'}
        sshd_log = worker.state / 'sshd.log'

        def count(what: str) -> int:
            return sshd_log.read_text().count(what)
        accepted, sessions = count('Accepted publickey'), count('Starting session: command')
        ran = worker.docker('run', '--rm', '--network', 'none', docker_loaded, 'cat', '/proc/net/dev', env=env)
        assert interfaces(ran.stdout) == ['lo']
        assert len(log.read_text().splitlines()) > 1            # an ssh per API connection
        assert count('Accepted publickey') == accepted
        assert count('Starting session: command') > sessions
    finally:
        master.terminate()
        master.wait(timeout=60)
        master.stderr.close()
        shutil.rmtree(where, ignore_errors=True)


def host_docker_paths() -> dict[str, object]:
    """What of the host's docker a worker's dockerd could touch: /etc/docker's files, the default socket and pid
    file, the default data roots and containerd's directories, root's ~/.docker and ~/.ssh."""
    home = Path(pwd.getpwuid(0).pw_dir)
    seen: dict[str, object] = {}
    for path in (Path('/etc/docker'), Path('/opt/containerd')):
        seen[str(path)] = sorted((str(p), p.read_bytes() if p.is_file() else None)
                                 for p in path.rglob('*')) if path.is_dir() else None
    for path in (Path('/var/run/docker.sock'), Path('/var/run/docker.pid'), Path('/var/lib/docker'),
                 Path('/var/lib/containerd'), Path('/run/containerd/containerd.sock'), home / '.docker', home / '.ssh'):
        try:
            info = path.lstat()
            seen[str(path)] = (info.st_dev, info.st_ino, info.st_mtime_ns)
        except FileNotFoundError:
            seen[str(path)] = None
    return seen


def in_cgroup(name: str) -> set[int]:
    """The processes whose cgroup path names `name`."""
    return {int(p.name) for p in Path('/proc').iterdir()
            if p.name.isdigit() and name in read_proc(int(p.name), 'cgroup')}


def test_stop_leaves_nothing_of_the_docker_worker_and_a_second_one_starts(tmp_path, image):
    """dockerd's mounts stay in the worker's mount namespace; stop() ends sshd, dockerd, containerd and a container
    left running, removes their cgroups and every file, and touches nothing of the host's docker; then a worker
    with both engines starts, each with storage of its own."""
    if DockerWorker.problem():
        pytest.skip(DockerWorker.problem())
    archive, reference = image
    control = tmp_path / 'control'
    host = host_docker_paths()
    with DockerWorker(control) as first:
        first.docker('load', '-i', str(archive))
        container = first.docker('run', '-d', '--name', 'left-running', reference,
                                 'socat', 'UNIX-LISTEN:/never.sock', 'EXEC:cat').stdout.decode().strip()
        in_container = in_cgroup(f'{first.cgroup_parent}/{container}')
        pids = first.pids()
        names = {pid: process_name(pid) for pid in pids}
        daemons = {kind: {pid for pid, name in names.items() if name.startswith(kind)}
                   for kind in ('sshd: ', 'dockerd ', 'containerd ')}
        assert all(daemons.values()) and in_container and first.listening(), (daemons, in_container)
        cgroups = first.cgroups()
        assert cgroups and all((cgroup / container).is_dir() for cgroup in cgroups)
        # the container's root is mounted in the worker's mount namespace, and not in the control host's
        assert str(first.state) in read_proc(first.init_pid, 'mountinfo')
        assert str(first.state) not in read_proc(os.getpid(), 'mountinfo')
        started = {pid: at for pid in pids | in_container if (at := started_at(pid))}     # those still running
        state = first.state
    assert [pid for pid, at in started.items() if started_at(pid) == at] == []       # each ended
    assert first.pids() == set() and not first.listening()
    assert not state.exists()
    assert [cgroup for cgroup in cgroups if cgroup.exists()] == []
    assert all(not (hierarchy / state.name).exists() for hierarchy in cgroup_hierarchies())
    assert 'claude-bottle-worker' not in read_proc(os.getpid(), 'mountinfo')
    assert sorted(p.name for p in control.iterdir()) == []
    assert host_docker_paths() == host
    with Worker(control, engines=('podman', 'docker')) as second:
        assert second.ssh('true').returncode == 0
        assert second.docker('images', '--format', '{{.Repository}}').stdout == b''      # storage of its own
        assert second.podman('images', '--format', '{{.Repository}}').stdout == b''
        assert json.loads(second.podman('info', '--format', 'json').stdout)['store']['graphRoot'] == \
            str(second.state / 'storage')
        assert second.docker('info', '--format', '{{.DockerRootDir}}').stdout.decode().strip() == \
            str(second.state / 'docker-data')
    assert second.pids() == set() and not second.listening()
    assert host_docker_paths() == host


def test_a_docker_worker_ends_with_the_process_that_started_it(tmp_path, image):
    """A test process killed before its stop() leaves no sshd, dockerd, containerd or container running; the next
    sweep() removes the worker's files and the cgroups its killed container left."""
    if DockerWorker.problem():
        pytest.skip(DockerWorker.problem())
    archive, reference = image

    def check(made: dict):
        in_container = in_cgroup(made['container'])
        names = [process_name(int(pid)) for pid in made['started']]
        assert in_container and any(name.startswith('dockerd ') for name in names) \
            and any(name.startswith('containerd ') for name in names)
        made['started'].update({str(pid): at for pid in in_container if (at := started_at(pid))})
    made = kill_a_kept_worker(tmp_path, 'docker', str(archive), reference, check=check)
    assert all(not (hierarchy / Path(made['state']).name).exists() for hierarchy in cgroup_hierarchies())
