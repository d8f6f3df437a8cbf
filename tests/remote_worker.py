"""A remote podman or docker engine for the tests, reached over SSH as a worker host would be (issues 25 and 26).

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

A DockerWorker (`Worker(..., engines=('docker',))`, or both engines) runs a `dockerd` of its own instead of (or
beside) the podman service, in the same namespaces: --data-root, --exec-root (its containerd's socket and state:
no containerd answers in the worker's /run, so dockerd starts one of its own), pid file and a second socket in the
state directory, its first socket /var/run/docker.sock in the worker's own /run (where `docker system dial-stdio`,
which the docker CLI's ssh transport runs on the worker, finds it), /etc/docker (key.json, so its own engine ID;
daemon.json) bound over from the state directory, /var/lib/docker, /var/lib/containerd and /opt/containerd hidden,
no iptables rules and no bridge (a container gets `lo` only, asked for no network or `--network none`), and its
containers' cgroups under a parent named after the state directory. The worker's sshd gives its sessions a
DOCKER_CONFIG of the worker's own. The control side gets a docker context (DOCKER_CONTEXT, host
ssh://root@address:port) in a DOCKER_CONFIG of the test's own, and an `ssh` wrapper first on the docker client's
PATH that adds the key and strict host key checking (docker gives ssh no options of its own: 20.10 none at all).

`stop()` ends it all and removes every file it made; the worker's first process dies with the process
that started it (PR_SET_PDEATHSIG, and unshare's --kill-child), so sshd is never left running even when
pytest is killed (`sweep()` then removes its files, and a docker worker's cgroups). `worker` and `docker_worker` are
module-scoped fixtures; `make_tiny_image` an image archive of a few host programs for either to load (no registry
is reachable here).
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
DOCKER_CONTEXT = 'bottle-test-worker'
# What the client's environment must not carry into a docker call: DOCKER_HOST and DOCKER_CONTEXT pick another
# engine (DOCKER_HOST wins over DOCKER_CONTEXT, --context over both), DOCKER_CONFIG another store of contexts.
DOCKER_CLIENT_VARIABLES = ('DOCKER_HOST', 'DOCKER_CONTEXT', 'DOCKER_CONFIG', 'DOCKER_TLS_VERIFY', 'DOCKER_CERT_PATH',
                           'DOCKER_API_VERSION', 'DOCKER_DEFAULT_PLATFORM')
KNOWN_ENGINES = ('podman', 'docker')

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

# A docker engine's worker: its sshd's sessions read a docker client configuration of the worker's own, so that the
# `docker system dial-stdio` the docker CLI runs there over ssh reaches the worker's dockerd at the default socket
# (/var/run/docker.sock, in the worker's own /run) whatever the control host's root has in ~/.docker.
SSHD_DOCKER_CONFIG = '''\
SetEnv DOCKER_CONFIG={state}/docker-client
'''

# Run by `unshare` as the first process of the worker's PID namespace, in its mount namespace. $3 names the engines
# it runs: podman (an API service on a socket in its state directory), docker (a dockerd of its own), or both.
NAMESPACE_SCRIPT = r'''
set -eu
hide=$1 state=$2 engines=$3
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
service= dockerd=
case " $engines " in *" docker "*)
    # the host's engine data, containerd's and its opt directory, and /etc/docker (daemon.json, key.json: the
    # engine's ID) of the worker's own
    for hidden in /var/lib/docker /var/lib/containerd /opt/containerd; do
        if [ -d "$hidden" ]; then
            mount -t tmpfs -o mode=0711 claude-bottle-worker-docker "$hidden"
        fi
    done
    if [ -d /etc/docker ]; then
        mount --bind "$state/etc-docker" /etc/docker
    fi
esac
trap 'kill -TERM $sshd $service $dockerd 2>/dev/null; wait' TERM
/usr/sbin/sshd -D -e -f "$state/sshd_config" 2>>"$state/sshd.log" &
sshd=$!
case " $engines " in *" podman "*)
    TMPDIR=$state/tmp podman --root "$state/storage" --runroot "$state/runroot" --tmpdir "$state/libpod" \
        --network-config-dir "$state/networks" system service --time=0 "unix://$state/podman.sock" \
        2>>"$state/podman.log" &
    service=$!
esac
case " $engines " in *" docker "*)
    # no containerd answers in the worker's /run: dockerd starts its own, its socket and state under --exec-root;
    # its containers' cgroups under a parent named after the state directory, in each hierarchy
    dockerd --data-root "$state/docker-data" --exec-root "$state/docker-exec" \
        --pidfile "$state/docker-exec/dockerd.pid" --config-file "$state/docker-daemon.json" \
        -H unix:///var/run/docker.sock -H "unix://$state/docker.sock" \
        --iptables=false --ip6tables=false --bridge=none --cgroup-parent "/${state##*/}" --shutdown-timeout 2 \
        >>"$state/dockerd.log" 2>&1 &
    dockerd=$!
esac
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


def cgroup_hierarchies() -> list[Path]:
    """Where each cgroup hierarchy (v1's, one a controller, or v2's) is mounted."""
    found = []
    for line in Path('/proc/self/mountinfo').read_text().splitlines():
        mount, _, source = line.partition(' - ')
        if source.split()[:1] in (['cgroup'], ['cgroup2']):
            found.append(Path(mount.split()[4]))
    return found


def remove_cgroups(name: str):
    """Remove the cgroup `name` (a docker worker's --cgroup-parent, without its slash) and those under it from each
    hierarchy: what a container killed with its worker's namespaces, not stopped by dockerd, leaves behind (empty)."""
    for hierarchy in cgroup_hierarchies():
        for directory, _, _ in os.walk(hierarchy / name, topdown=False):
            try:
                os.rmdir(directory)
            except OSError:
                pass            # still has a process: not a dead worker's


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
    """Remove the state directories (and a docker worker's cgroups) of workers whose test process is gone (killed
    before its stop())."""
    for state in parent.glob(f'{STATE_PREFIX}*'):
        try:
            pid, started = (state / 'owner').read_text().split()
        except (OSError, ValueError):
            continue            # a worker being made this moment has no owner file yet
        if started_at(int(pid)) != started:
            remove_cgroups(state.name)
            shutil.rmtree(state, ignore_errors=True)
    for hierarchy in cgroup_hierarchies():      # and those of workers whose directory went first
        for cgroup in hierarchy.glob(f'{STATE_PREFIX}*'):
            if not (parent / cgroup.name).exists():
                remove_cgroups(cgroup.name)


class WorkerFailed(Exception):
    """The worker did not start; the message has its logs."""


class Worker:
    """One worker: start() it, use its attributes and methods, stop() it (or use it as a context manager).

    After start(): `address`, `port`, `user`, `destination` (user@address), `key` (the client's private key,
    0600), `known_hosts` (the worker's host key, for `ssh -o UserKnownHostsFile`), `socket` (the podman
    service's socket path on the worker), `uri` (ssh://user@address:port/socket), `ssh_argv` (ssh with strict
    host key checking, up to the destination), `containers_conf` and `client_env()` (for podman clients),
    `state` (the worker's own directory, visible to both sides).

    A worker whose `engines` include 'docker' (DockerWorker) runs a dockerd of its own instead of (or beside) the
    podman service, and has `docker_uri` (ssh://user@address:port, what a docker context's host is),
    `docker_socket` (a second socket of its dockerd, in its state directory; its first is /var/run/docker.sock in
    the worker's own /run, where `docker system dial-stdio` finds it), `docker_config` (the client's
    DOCKER_CONFIG, which holds the DOCKER_CONTEXT context), `ssh_wrapper` (an `ssh` the docker CLI finds first on
    PATH, adding the options of `ssh_argv`), `docker_env()` and `docker()`."""

    ENGINES: tuple[str, ...] = ('podman',)

    def __init__(self, control: Path, hide: Path = Path(tempfile.gettempdir()), parent: Path = STATE_PARENT,
                 engines: tuple[str, ...] | None = None):
        """`control`: a directory of the test's for the client's files (best under `hide`, where the worker cannot
        see them); `hide`: the directory the worker gets an empty tmpfs over; `parent`: where its state goes;
        `engines`: 'podman', 'docker' or both (the class's ENGINES unless given)."""
        self.engines = tuple(engines or self.ENGINES)
        if not self.engines or any(engine not in KNOWN_ENGINES for engine in self.engines):
            raise ValueError(f'a worker\'s engines are one or more of {", ".join(KNOWN_ENGINES)}, not {self.engines}')
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
        self.docker_config = self.control / 'docker-config'     # the docker client's DOCKER_CONFIG: its contexts
        self.ssh_wrapper = self.control / 'bin' / 'ssh'
        self.contexts: dict[str, str] = {}          # name: host, in docker_config
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
    def docker_socket(self) -> Path:
        return self.state / 'docker.sock'

    @property
    def docker_uri(self) -> str:
        """A docker context's host: docker 20.10's CLI takes no path after the host (`extra path after the host`);
        newer ones (28 here) run `docker --host unix://<path> system dial-stdio` there."""
        return f'ssh://{self.destination}:{self.port}'

    @property
    def ssh_options(self) -> list[str]:
        """ssh's options for the worker with its host key checked strictly, no config file (which would also make
        ssh create ~/.ssh), no agent and no other key; no port."""
        return ['-F', 'none', '-o', 'StrictHostKeyChecking=yes', '-o', f'UserKnownHostsFile={self.known_hosts}',
                '-o', 'GlobalKnownHostsFile=/dev/null', '-o', 'IdentitiesOnly=yes', '-o', 'BatchMode=yes',
                '-o', 'ConnectTimeout=10', '-i', str(self.key)]

    @property
    def ssh_argv(self) -> list[str]:
        """ssh to the worker (ssh_options and its port); the destination and a command or forward follow."""
        return ['ssh', *self.ssh_options, '-p', str(self.port)]

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

    def docker_env(self) -> dict[str, str]:
        """The environment of a docker client using the worker's contexts: DOCKER_CONFIG the test's own (where
        contexts are stored; ~/.docker is never read or written), none of DOCKER_CLIENT_VARIABLES, and
        ssh_wrapper's directory first on PATH. docker's ssh transport (20.10 and 28 alike) runs `ssh [-l user]
        [-p port] -- host docker system dial-stdio` (28 adds `-o ConnectTimeout=30 -T` first) found on PATH,
        with no way to give it options: the system ssh would read the password database home's ~/.ssh (and make
        it), so the wrapper adds ssh_options."""
        env = {k: v for k, v in os.environ.items() if k not in DOCKER_CLIENT_VARIABLES}
        return {**env, 'DOCKER_CONFIG': str(self.docker_config),
                'PATH': f'{self.ssh_wrapper.parent}{os.pathsep}{env.get("PATH", SBIN_PATH)}'}

    def docker(self, *args: str, check: bool = True, timeout: float = 300, context: str | None = DOCKER_CONTEXT,
               input: bytes | None = None, cli: str = 'docker', env: dict[str, str] | None = None
               ) -> subprocess.CompletedProcess:
        """`docker --context <context> <args>` from the control side (no --context if None; `cli`: which docker
        CLI; `env`: more of its environment)."""
        return subprocess.run([cli, *(['--context', context] if context else []), *args], capture_output=True,
                              check=check, timeout=timeout, env={**self.docker_env(), **(env or {})}, input=input,
                              stdin=None if input is not None else subprocess.DEVNULL)

    def add_context(self, name: str = DOCKER_CONTEXT, host: str | None = None, cli: str = 'docker'):
        """Make `name` a docker context for the worker (`host`: docker_uri unless given), with the docker CLI, in
        docker_config. None is made current (`docker context use` would write docker_config's config.json)."""
        host = host or self.docker_uri
        subprocess.run([cli, 'context', 'create', name, '--docker', f'host={host}'], capture_output=True,
                       check=True, timeout=60, env=self.docker_env(), stdin=subprocess.DEVNULL)
        self.contexts[name] = host

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

    @property
    def cgroup_parent(self) -> str:
        """The cgroup its dockerd puts its containers' cgroups under (`--cgroup-parent`), in each hierarchy."""
        return f'/{self.state.name}'

    def cgroups(self) -> list[Path]:
        """The directories of cgroup_parent, in the hierarchies that have one."""
        if self.state is None or 'docker' not in self.engines:
            return []
        return [found for hierarchy in cgroup_hierarchies()
                if (found := hierarchy / self.cgroup_parent.lstrip('/')).is_dir()]

    def listening(self) -> bool:
        """Whether something accepts connections at the worker's ssh address and port."""
        return accepts(self.address, self.port)

    # --- start and stop -------------------------------------------------------------------------------

    @classmethod
    def problem(cls, engines: tuple[str, ...] | None = None) -> str | None:
        """Why a worker (of `engines`, the class's ENGINES unless given) cannot start here, or None."""
        engines = tuple(engines or cls.ENGINES)
        if os.geteuid() != 0:
            return 'the remote worker runs as root (sshd, mounts and namespaces)'
        programs = ['sshd', 'ssh']          # ssh-keygen comes with ssh; unshare is essential
        programs += ['podman'] if 'podman' in engines else []
        programs += ['docker', 'dockerd'] if 'docker' in engines else []
        try:
            for program in programs:
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
        if 'docker' in self.engines:
            for directory in ('docker-data', 'docker-exec', 'docker-client', 'etc-docker'):
                (self.state / directory).mkdir(mode=0o700)
            (self.state / 'docker-daemon.json').write_text('{}\n')
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
        sshd_config = SSHD_CONFIG.format(address=self.address, port=self.port, state=self.state)
        if 'docker' in self.engines:
            sshd_config += SSHD_DOCKER_CONFIG.format(state=self.state)
        (self.state / 'sshd_config').write_text(sshd_config)
        if 'podman' in self.engines:
            self.register(CONNECTION)
        if 'docker' in self.engines:
            self._write_ssh_wrapper()
            self.docker_config.mkdir(mode=0o700, exist_ok=True)
            self.add_context(DOCKER_CONTEXT)

    def _write_ssh_wrapper(self):
        real = shutil.which('ssh', path=os.environ.get('PATH', SBIN_PATH))        # not the wrapper: not on this PATH
        self.ssh_wrapper.parent.mkdir(mode=0o700, exist_ok=True)
        self.ssh_wrapper.write_text(
            '#!/bin/sh\n# tests/remote_worker.py: ssh as the docker CLI runs it for the worker\'s contexts\n'
            f'exec {shlex.join([str(Path(real).resolve()), *self.ssh_options])} "$@"\n')
        self.ssh_wrapper.chmod(0o700)

    def _launch(self, deadline: float):
        env = {'PATH': SBIN_PATH, 'HOME': '/root', 'LANG': 'C.UTF-8'}
        with open(self.state / 'unshare.log', 'wb') as log:
            self.proc = subprocess.Popen(
                ['unshare', '--mount', '--propagation', 'private', '--pid', '--fork', '--kill-child', '--mount-proc',
                 'sh', '-c', NAMESPACE_SCRIPT, 'worker', str(self.hide), str(self.state), ' '.join(self.engines)],
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
        """Until sshd lets the client key in and each engine answers through its connection or context."""
        probes = [('sshd', lambda: self.ssh('true', check=False, timeout=30))]
        if 'podman' in self.engines:
            probes.append(('the podman service', lambda: self.podman('version', check=False, timeout=60)))
        if 'docker' in self.engines:
            probes.append(('dockerd', lambda: self.docker('version', check=False, timeout=60)))
        for what, probe in probes:
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
                       for name in ('unshare.log', 'sshd.log', 'podman.log', 'dockerd.log')
                       if (self.state / name).exists())

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
            if 'docker' in self.engines:
                remove_cgroups(self.state.name)
            shutil.rmtree(self.state, ignore_errors=True)
        for made in (self.key, self.key.with_name(f'{self.key.name}.pub'), self.known_hosts, self.containers_conf):
            made.unlink(missing_ok=True)
        shutil.rmtree(self.home, ignore_errors=True)
        for made in (self.docker_config, self.ssh_wrapper.parent):
            shutil.rmtree(made, ignore_errors=True)
        self.connections = {}
        self.contexts = {}

    def __enter__(self) -> Worker:
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class DockerWorker(Worker):
    """A worker whose engine is a dockerd of its own, reached through the docker context DOCKER_CONTEXT."""
    ENGINES = ('docker',)


def make_tiny_image(directory: Path, programs: tuple[str, ...] = ('sh', 'cat', 'socat')) -> tuple[Path, str]:
    """An image archive (`podman save`, whose default format is docker-archive: `docker load` takes it too) of a
    root holding the host's `programs` in /bin and the libraries they load, made with the host podman and removed
    from it again; returns (archive, reference)."""
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


def _started(kind: type[Worker], tmp_path_factory):
    problem = kind.problem()
    if problem:
        pytest.skip(f'no remote worker: {problem}')
    sweep()
    control = tmp_path_factory.mktemp('worker-control')
    hide = Path(tempfile.gettempdir())
    if not control.resolve().is_relative_to(hide.resolve()):
        hide = tmp_path_factory.getbasetemp()
    with kind(control, hide) as started:
        yield started


@pytest.fixture(scope='module')
def worker(tmp_path_factory):
    """A started worker, its connection registered as CONNECTION; stopped after the module's tests."""
    yield from _started(Worker, tmp_path_factory)


@pytest.fixture(scope='module')
def docker_worker(tmp_path_factory):
    """A started DockerWorker, its context DOCKER_CONTEXT; stopped after the module's tests."""
    yield from _started(DockerWorker, tmp_path_factory)
