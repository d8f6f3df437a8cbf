"""A remote podman engine for the tests, reached over SSH as a worker host would be (issue 25's worker).

`Worker` starts, as root, Debian's sshd (a config and host key of its own, key auth only) on a random
127.x.y.z address and a free port, and beside it a podman API service (`podman system service`) with
storage of its own. Both run in one mount namespace (and one PID namespace, so that stopping its first
process ends everything the worker started: sshd sessions, the service, conmon, containers) in which
tmpfs mounts hide from the worker:

- the directory that holds the control host's test paths (`hide`, /tmp by default, where pytest's
  temporary directories are): a file the control host makes there is absent on the worker;
- /run, /dev/shm and /var/lib/containers: the host podman's run state (runc's too), its socket, its storage
  and its lock table (/dev/shm/libpod_lock, from which the worker's containers would otherwise take their
  locks).

The worker's own state (sshd's files, the service's --root, --runroot, --tmpdir, its socket) lives in a
directory under /var/tmp, outside those. Its podman reads a copy of the host's containers.conf.d, bound over
it, with a drop-in of its own: no network for a container that asks for none in particular (the worker shares
the host's network namespace). The control side gets a client key (0600), a known_hosts file
holding the worker's host key, an `ssh` argv that checks that key strictly, and a podman connection
written to a containers.conf of the test's own (CONTAINERS_CONF) with a HOME of the test's own, so the
host's /etc/containers/containers.conf and ~/.ssh are never touched.

`stop()` ends it all and removes every file it made; the worker's first process dies with the process
that started it (PR_SET_PDEATHSIG, and unshare's --kill-child), so sshd is never left running even when
pytest is killed. `worker` is a module-scoped fixture of it; `make_tiny_image` an image archive of a few
host programs for it to load (no registry is reachable here).
"""
from __future__ import annotations

import ctypes
import os
import shlex
import shutil
import signal
import socket
import subprocess
import tarfile
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from daemons.hostprograms import HostProgramMissing, require
from tests.proxy_upstreams import random_loopback_address

STATE_PARENT = Path('/var/tmp')         # the worker's own files: outside the hidden directory
STATE_PREFIX = 'claude-bottle-worker-'
CONNECTION = 'bottle-test-worker'
USER = 'root'
SBIN_PATH = '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'
# What the client's environment must not carry into a podman call: it would pick another engine or key.
PODMAN_CLIENT_VARIABLES = ('CONTAINER_HOST', 'CONTAINER_CONNECTION', 'CONTAINER_SSHKEY', 'CONTAINER_PASSPHRASE',
                           'CONTAINERS_CONF', 'DOCKER_HOST')

SSHD_CONFIG = '''\
ListenAddress {address}:{port}
AddressFamily inet
HostKey {state}/ssh_host_ed25519_key
PidFile {state}/sshd.pid
AuthorizedKeysFile {state}/authorized_keys
AuthenticationMethods publickey
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PermitRootLogin prohibit-password
# OpenSSH 9.2 checks Unix socket forwards against AllowTcpForwarding too: `no` denies the podman client's
# direct-streamlocal channel to the service's socket, `local` denies `ssh -R <path>:<path>`; so it stays
# `yes` and PermitListen keeps TCP listeners from being forwarded (PermitOpen none would deny the socket).
AllowTcpForwarding yes
PermitListen none
AllowStreamLocalForwarding yes
StreamLocalBindUnlink yes
StreamLocalBindMask 0077
AllowAgentForwarding no
X11Forwarding no
PermitTunnel no
PrintMotd no
LogLevel VERBOSE
'''

HOST_DROP_INS = Path('/etc/containers/containers.conf.d')
# The worker shares the control host's network namespace: a network of its own would be a bridge and firewall
# rules in the host's, so its containers get none unless they ask.
WORKER_DROP_IN = """\
# tests/remote_worker.py: the worker's own podman configuration
[containers]
netns = "none"
"""

# Run by `unshare` as the first process of the worker's PID namespace, in its mount namespace.
NAMESPACE_SCRIPT = r'''
set -eu
hide=$1 state=$2
mount -t tmpfs -o mode=1777 claude-bottle-worker-hidden "$hide"
mount -t tmpfs -o mode=0755 claude-bottle-worker-run /run
mkdir -m 0755 /run/sshd
mount -t tmpfs -o mode=1777 claude-bottle-worker-shm /dev/shm
if [ -d /var/lib/containers ]; then
    mount -t tmpfs -o mode=0700 claude-bottle-worker-containers /var/lib/containers
fi
if [ -d /etc/containers/containers.conf.d ]; then
    mount --bind "$state/containers.conf.d" /etc/containers/containers.conf.d
fi
trap 'kill -TERM $sshd $service 2>/dev/null; wait' TERM
/usr/sbin/sshd -D -e -f "$state/sshd_config" 2>>"$state/sshd.log" &
sshd=$!
TMPDIR=$state/tmp podman --root "$state/storage" --runroot "$state/runroot" --tmpdir "$state/libpod" \
    --network-config-dir "$state/networks" system service --time=0 "unix://$state/podman.sock" \
    2>>"$state/podman.log" &
service=$!
wait
'''


_PRCTL = ctypes.CDLL(None, use_errno=True).prctl       # looked up before any fork
PR_SET_PDEATHSIG = 1


def _die_with_parent():
    """In the child before exec: SIGKILL when the process that started it ends."""
    _PRCTL(PR_SET_PDEATHSIG, signal.SIGKILL)


def _namespace(pid: int, kind: str) -> str | None:
    try:
        return os.readlink(f'/proc/{pid}/ns/{kind}')
    except OSError:
        return None


def started_at(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of its stat): a pid and this name one process;
    None once it has ended (also while it waits, a zombie, for its parent to reap it)."""
    try:
        fields = Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ('Z', 'X') else fields[19]


def accepts(address: str, port: int) -> bool:
    """Whether something accepts TCP connections there."""
    try:
        socket.create_connection((address, port), timeout=5).close()
    except OSError:
        return False
    return True


def make_key(path: Path, comment: str) -> Path:
    """A new ed25519 key pair without a passphrase at `path` (0600) and `path`.pub; returns the public key's path."""
    public = path.with_name(f'{path.name}.pub')
    for stale in (path, public):
        stale.unlink(missing_ok=True)
    subprocess.run(['ssh-keygen', '-q', '-t', 'ed25519', '-N', '', '-C', comment, '-f', str(path)],
                   check=True, capture_output=True, timeout=60)
    path.chmod(0o600)
    return public


def sweep(parent: Path = STATE_PARENT):
    """Remove the state directories of workers whose test process is gone (killed before its stop())."""
    for state in parent.glob(f'{STATE_PREFIX}*'):
        try:
            pid, started = (state / 'owner').read_text().split()
        except (OSError, ValueError):
            continue            # a worker being made this moment has no owner file yet
        if started_at(int(pid)) != started:
            shutil.rmtree(state, ignore_errors=True)


class WorkerFailed(Exception):
    """The worker did not start; the message has its logs."""


class Worker:
    """One worker: start() it, use its attributes and methods, stop() it (or use it as a context manager).

    After start(): `address`, `port`, `user`, `destination` (user@address), `key` (the client's private key,
    0600), `known_hosts` (the worker's host key, for `ssh -o UserKnownHostsFile`), `socket` (the podman
    service's socket path on the worker), `uri` (ssh://user@address:port/socket), `ssh_argv` (ssh with strict
    host key checking, up to the destination), `containers_conf` and `client_env()` (for podman clients),
    `state` (the worker's own directory, visible to both sides)."""

    def __init__(self, control: Path, hide: Path = Path(tempfile.gettempdir()), parent: Path = STATE_PARENT):
        """`control`: a directory of the test's for the client's files (best under `hide`, where the worker cannot
        see them); `hide`: the directory the worker gets an empty tmpfs over; `parent`: where its state goes."""
        self.control = Path(control)
        self.hide = Path(hide).resolve()
        self.parent = Path(parent).resolve()
        if self.parent.is_relative_to(self.hide) or self.hide.is_relative_to(self.parent):
            raise ValueError(f'the worker\'s state ({self.parent}) must lie outside the hidden directory {self.hide}')
        self.user = USER
        self.key = self.control / 'id_ed25519'
        self.known_hosts = self.control / 'known_hosts'
        self.containers_conf = self.control / 'containers.conf'
        self.home = self.control / 'home'           # the podman client's HOME: its ~/.ssh/known_hosts
        self.connections: dict[str, str] = {}       # name: uri, in containers_conf
        self.proc: subprocess.Popen | None = None
        self.state: Path | None = None
        self.init_pid: int | None = None
        self.namespaces: dict[str, str] = {}

    # --- what the control side uses -------------------------------------------------------------------

    @property
    def destination(self) -> str:
        return f'{self.user}@{self.address}'

    @property
    def socket(self) -> Path:
        return self.state / 'podman.sock'

    @property
    def uri(self) -> str:
        return f'ssh://{self.destination}:{self.port}{self.socket}'

    @property
    def ssh_argv(self) -> list[str]:
        """ssh to the worker with its host key checked strictly, no config file (which would also make ssh
        create ~/.ssh), no agent and no other key; the destination and a command or forward follow."""
        return ['ssh', '-F', 'none', '-o', 'StrictHostKeyChecking=yes', '-o', f'UserKnownHostsFile={self.known_hosts}',
                '-o', 'GlobalKnownHostsFile=/dev/null', '-o', 'IdentitiesOnly=yes', '-o', 'BatchMode=yes',
                '-o', 'ConnectTimeout=10', '-i', str(self.key), '-p', str(self.port)]

    def ssh(self, *command: str, check: bool = True, timeout: float = 60,
            input: bytes | None = None) -> subprocess.CompletedProcess:
        """A command run on the worker (in its namespaces, as `user`), its argv quoted for the remote shell."""
        return subprocess.run([*self.ssh_argv, self.destination, '--', shlex.join(command)], capture_output=True,
                              check=check, timeout=timeout, input=input,
                              stdin=None if input is not None else subprocess.DEVNULL)

    def known_hosts_entry(self, public_key: Path) -> str:
        """The known_hosts line that names `public_key` (a .pub file) the worker's host key."""
        key_type, key_text = public_key.read_text().split()[:2]
        return f'[{self.address}]:{self.port} {key_type} {key_text}\n'

    def client_env(self) -> dict[str, str]:
        """The environment of a podman client using the worker's connections. podman 4.3.1 reads and writes
        connections in the file CONTAINERS_CONF names (instead of /etc/containers/containers.conf, as root) and
        then reads no other containers.conf, containers.conf.d included: never an environment for the local
        engine. CONTAINER_HOST would win over --connection. Host keys are checked against $HOME/.ssh/known_hosts
        (an unknown host's key is added to an existing file; with none, no key is checked)."""
        env = {k: v for k, v in os.environ.items() if k not in PODMAN_CLIENT_VARIABLES}
        return {**env, 'CONTAINERS_CONF': str(self.containers_conf), 'HOME': str(self.home)}

    def podman(self, *args: str, check: bool = True, timeout: float = 300, connection: str = CONNECTION,
               input: bytes | None = None) -> subprocess.CompletedProcess:
        """`podman --connection <connection> <args>` from the control side."""
        return subprocess.run(['podman', '--connection', connection, *args], capture_output=True, check=check,
                              timeout=timeout, env=self.client_env(), input=input,
                              stdin=None if input is not None else subprocess.DEVNULL)

    def register(self, name: str = CONNECTION):
        """Make `name` a podman system connection to the worker, in containers_conf.

        Written here rather than by `podman system connection add`: podman 4.3.1 records an ssh destination
        without its socket path (with --socket-path too), and the connection then fails with "ssh: rejected:
        connect failed (open failed)"; the full uri in the entry works. None is the default (active_service):
        podman would lend a default's identity to a bare --url."""
        self.connections[name] = self.uri
        lines = ['# podman system connections to the tests\' worker (tests/remote_worker.py)', '[engine]', '']
        for each, uri in self.connections.items():
            lines += [f'[engine.service_destinations.{each}]', f'uri = "{uri}"', f'identity = "{self.key}"', '']
        self.containers_conf.write_text('\n'.join(lines))

    # --- what a test checks ---------------------------------------------------------------------------

    def pids(self) -> set[int]:
        """Every process of the worker: in its mount namespace or its PID namespace."""
        found = set()
        for entry in Path('/proc').iterdir():
            if entry.name.isdigit():
                pid = int(entry.name)
                if any(_namespace(pid, kind) == ns for kind, ns in self.namespaces.items()):
                    found.add(pid)
        return found

    def listening(self) -> bool:
        """Whether something accepts connections at the worker's ssh address and port."""
        return accepts(self.address, self.port)

    # --- start and stop -------------------------------------------------------------------------------

    @staticmethod
    def problem() -> str | None:
        """Why a worker cannot start here, or None."""
        if os.geteuid() != 0:
            return 'the remote worker runs as root (sshd, mounts and namespaces)'
        try:
            for program in ('sshd', 'ssh', 'podman'):      # ssh-keygen comes with ssh; unshare is essential
                require(program)
        except HostProgramMissing as missing:
            return str(missing)
        return None

    def start(self, timeout: float = 90) -> Worker:
        deadline = time.monotonic() + timeout
        self.control.mkdir(parents=True, exist_ok=True)
        self.state = Path(tempfile.mkdtemp(prefix=STATE_PREFIX, dir=self.parent))
        (self.state / 'owner').write_text(f'{os.getpid()} {started_at(os.getpid())}\n')
        try:
            self._prepare()
            self._launch(deadline)
            self._wait_until_it_answers(deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def _prepare(self):
        self.address = random_loopback_address()
        with socket.socket() as probe:           # a free port there; sshd binds it a moment later
            probe.bind((self.address, 0))
            self.port = probe.getsockname()[1]
        for directory in ('storage', 'runroot', 'libpod', 'networks', 'tmp'):
            (self.state / directory).mkdir(mode=0o700)
        host_key = make_key(self.state / 'ssh_host_ed25519_key', 'claude-bottle test worker')
        shutil.copy(make_key(self.key, 'claude-bottle test control'), self.state / 'authorized_keys')
        entry = self.known_hosts_entry(host_key)
        self.known_hosts.write_text(entry)
        (self.home / '.ssh').mkdir(mode=0o700, parents=True, exist_ok=True)
        (self.home / '.ssh' / 'known_hosts').write_text(entry)
        # the host's podman configuration, and the worker's own beside it (bound over the host's drop-in directory)
        drop_ins = self.state / 'containers.conf.d'
        shutil.copytree(HOST_DROP_INS, drop_ins) if HOST_DROP_INS.is_dir() else drop_ins.mkdir()
        (drop_ins / '99-claude-bottle-worker.conf').write_text(WORKER_DROP_IN)
        (self.state / 'sshd_config').write_text(SSHD_CONFIG.format(address=self.address, port=self.port,
                                                                    state=self.state))
        self.register(CONNECTION)

    def _launch(self, deadline: float):
        env = {'PATH': SBIN_PATH, 'HOME': '/root', 'LANG': 'C.UTF-8'}
        with open(self.state / 'unshare.log', 'wb') as log:
            self.proc = subprocess.Popen(
                ['unshare', '--mount', '--propagation', 'private', '--pid', '--fork', '--kill-child', '--mount-proc',
                 'sh', '-c', NAMESPACE_SCRIPT, 'worker', str(self.hide), str(self.state)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, start_new_session=True,
                preexec_fn=_die_with_parent)
        # unshare forks the namespace's first process once it has made the namespaces
        children = Path(f'/proc/{self.proc.pid}/task/{self.proc.pid}/children')
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                pid = int(children.read_text().split()[0])
            except (OSError, IndexError, ValueError):
                time.sleep(0.05)
                continue
            self.init_pid = pid
            self.namespaces = {'mnt': _namespace(self.proc.pid, 'mnt'), 'pid': _namespace(pid, 'pid')}
            return
        raise WorkerFailed(f'the worker\'s namespaces were not made:\n{self._logs()}')

    def _wait_until_it_answers(self, deadline: float):
        """Until sshd lets the client key in and the service answers through the connection."""
        for what, probe in (('sshd', lambda: self.ssh('true', check=False, timeout=30)),
                            ('the podman service', lambda: self.podman('version', check=False, timeout=60))):
            while True:
                if self.proc.poll() is not None:
                    raise WorkerFailed(f'the worker exited with code {self.proc.returncode}:\n{self._logs()}')
                answer = probe()
                if answer.returncode == 0:
                    break
                if time.monotonic() > deadline or 'Cannot bind any address' in self._logs():
                    raise WorkerFailed(f'{what} did not answer in time: {answer.stderr.decode(errors="replace")}'
                                       f'\n{self._logs()}')
                time.sleep(0.2)

    def _logs(self) -> str:
        return ''.join(f'--- {name}\n{(self.state / name).read_text(errors="replace")[-3000:]}\n'
                       for name in ('unshare.log', 'sshd.log', 'podman.log') if (self.state / name).exists())

    def stop(self, timeout: float = 60):
        """End every process of the worker (its namespaces go with them) and remove every file it made."""
        deadline = time.monotonic() + timeout
        if self.proc is not None:
            if self.proc.poll() is None and self.init_pid is not None \
                    and _namespace(self.init_pid, 'pid') == self.namespaces.get('pid'):
                os.kill(self.init_pid, signal.SIGTERM)     # its trap stops sshd and the service, then it exits
            try:
                self.proc.wait(timeout=max(1.0, (deadline - time.monotonic()) / 2))
            except subprocess.TimeoutExpired:
                self.proc.kill()          # unshare's --kill-child: its child, and so its PID namespace, killed
                self.proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            while self.pids() and time.monotonic() < deadline:
                for pid in self.pids():
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                time.sleep(0.1)
            self.proc = None
        if self.state is not None:
            shutil.rmtree(self.state, ignore_errors=True)
        for made in (self.key, self.key.with_name(f'{self.key.name}.pub'), self.known_hosts, self.containers_conf):
            made.unlink(missing_ok=True)
        shutil.rmtree(self.home, ignore_errors=True)
        self.connections = {}

    def __enter__(self) -> Worker:
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def make_tiny_image(directory: Path, programs: tuple[str, ...] = ('sh', 'cat', 'socat')) -> tuple[Path, str]:
    """An image archive (`podman save`) of a root holding the host's `programs` in /bin and the libraries they
    load, made with the host podman and removed from it again; returns (archive, reference)."""
    root = directory / 'rootfs'
    (root / 'bin').mkdir(parents=True)
    for program in programs:
        path = Path(shutil.which(program)).resolve()
        shutil.copy2(path, root / 'bin' / program)
        ldd = subprocess.run(['ldd', str(path)], capture_output=True, text=True, check=True, timeout=60).stdout
        for library in (word for line in ldd.splitlines() for word in line.split() if word.startswith('/')):
            target = root / library.lstrip('/')
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(Path(library).resolve(), target)
    rootfs = directory / 'rootfs.tar'
    with tarfile.open(rootfs, 'w') as tar:
        tar.add(root, arcname='.')
    reference = f'localhost/claude-bottle-worker-test:{uuid.uuid4().hex[:12]}'
    archive = directory / 'image.tar'
    try:
        for argv in (['import', '-q', str(rootfs), reference], ['save', '-q', '-o', str(archive), reference]):
            subprocess.run(['podman', *argv], check=True, capture_output=True, timeout=300)
    finally:
        subprocess.run(['podman', 'rmi', '-f', reference], capture_output=True, timeout=120)
    return archive, reference


@pytest.fixture(scope='module')
def worker(tmp_path_factory):
    """A started worker, its connection registered as CONNECTION; stopped after the module's tests."""
    problem = Worker.problem()
    if problem:
        pytest.skip(f'no remote worker: {problem}')
    sweep()
    control = tmp_path_factory.mktemp('worker-control')
    hide = Path(tempfile.gettempdir())
    if not control.resolve().is_relative_to(hide.resolve()):
        hide = tmp_path_factory.getbasetemp()
    with Worker(control, hide) as started:
        yield started
