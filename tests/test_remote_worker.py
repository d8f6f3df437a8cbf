"""The tests' remote podman worker (tests/remote_worker.py), held to what issue 25 needs of it, with real parts:
podman's remote client over ssh answers from the worker's own service and storage, loads an image archive
and runs it, and exec and cp go through it; an `ssh -R` forward of a Unix socket is a door a container on the
worker reaches a control-side server through (and a second forward to the same path takes it over); host keys
are checked (podman's own client trusts a new one); the control host's test paths are absent on the worker; and
stop() leaves nothing running, so a second worker starts the same way."""
from __future__ import annotations

import json
import select
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import podman_problem
from tests.remote_worker import worker  # noqa: F401 (the fixture)
from tests.remote_worker import CONNECTION, Worker, accepts, make_key, make_tiny_image, started_at, sweep

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.extended        # seconds per worker, a podman service and images


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
        interfaces = worker.podman('run', '--rm', *network, loaded, 'cat', '/proc/net/dev').stdout.decode()
        assert [line.split(':')[0].strip() for line in interfaces.splitlines()[2:]] == ['lo']


def test_a_socket_forwarded_with_ssh_r_is_a_door_a_container_on_the_worker_reaches(worker, loaded, tmp_path):
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
                  'if (echo x > /run/bottle/written) 2>/dev/null; then echo WRITABLE; fi')
        through = worker.podman('run', '--rm', '-i', '--network', 'none', '-v', f'{door_dir}:/run/bottle:ro',
                                loaded, 'sh', '-c', script, input=b'through the door\n')
        assert through.stdout == b'through the door\n'           # echoed, and no WRITABLE: the door is read-only
    finally:
        end(forwarding)
        server.close()


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


def test_exec_and_cp_go_through_the_connection(worker, loaded, tmp_path):
    """What provisioning does to a bottle: `exec -i` with a stream on stdin, `cp` in and out, `cp -` of a tar
    stream; the paths given to cp are the control host's."""
    name = 'exec-and-cp'
    worker.podman('run', '-d', '--name', name, loaded, 'socat', 'UNIX-LISTEN:/never.sock', 'EXEC:cat')
    try:
        assert worker.podman('exec', '-i', name, 'cat', input=b'through exec\n').stdout == b'through exec\n'
        sent = tmp_path / 'sent.txt'
        sent.write_text('from the control host\n')
        worker.podman('cp', str(sent), f'{name}:/sent.txt')
        worker.podman('cp', f'{name}:/sent.txt', str(tmp_path / 'back.txt'))
        assert (tmp_path / 'back.txt').read_text() == 'from the control host\n'
        (tmp_path / 'streamed.txt').write_text('in a tar stream\n')
        stream = subprocess.run(['tar', '-C', str(tmp_path), '-cf', '-', 'streamed.txt'], capture_output=True,
                                check=True).stdout
        worker.podman('cp', '-', f'{name}:/', input=stream)
        assert worker.podman('exec', name, 'cat', '/streamed.txt').stdout == b'in a tar stream\n'
    finally:
        worker.podman('rm', '-f', '-t', '0', name, check=False)


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
        started = {pid: started_at(pid) for pid in pids | in_container}
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
worker = Worker(Path(sys.argv[1])).start()
print(json.dumps({'address': worker.address, 'port': worker.port, 'state': str(worker.state),
                  'started': {pid: started_at(pid) for pid in worker.pids()}}), flush=True)
time.sleep(3600)
"""


def test_a_worker_ends_with_the_process_that_started_it(tmp_path):
    """A test process killed before its stop() leaves no sshd or service running; the next sweep() removes the
    worker's files."""
    if Worker.problem():
        pytest.skip(Worker.problem())
    keeper = subprocess.Popen([sys.executable, '-c', KEEP_A_WORKER, str(tmp_path / 'control')], cwd=REPO,
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        ready, _, _ = select.select([keeper.stdout], [], [], 120)
        assert ready, 'the worker did not start within 120 s'
        line = keeper.stdout.readline()
        assert line, keeper.stderr.read().decode()
        made = json.loads(line)
        assert made['started'] and accepts(made['address'], made['port'])
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
