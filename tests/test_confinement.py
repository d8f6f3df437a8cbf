"""The kernel surface of a bottle on docker and podman (tasks/backends/confine.py), attacked for real from
inside a provisioned bottle, as the agent and as guest root: no user namespace (nor a mount in one), no
AF_VSOCK socket, no new privileges, only the capabilities kept, and nothing of the host's /etc/hosts or
resolver.

One project with one agent per engine serves the module (making and provisioning the bottle is the slow
part; provisioning itself is the check that the restrictions leave it working). The smolvm backends are not
here: a smolvm bottle is a VM with a kernel of its own, not a container sharing the host's, and the
stand-in runs its guests as host processes, where there is no container to confine.
"""
from __future__ import annotations

import platform
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from tasks.backends import confine
from tasks.project import Project
from tests.bottles import Bottles
from tests.conftest import BACKENDS

pytestmark = pytest.mark.extended       # attacks on the bottle's kernel surface

AGENT = 'a'
AS_AGENT = 'setpriv --reuid agent --regid agent --init-groups env HOME=/home/agent'
WHO = {'guest root': '', 'the agent': AS_AGENT}
# Capability names by number (linux/capability.h), for reading the masks of /proc/<pid>/status.
CAPABILITIES = ('CHOWN', 'DAC_OVERRIDE', 'DAC_READ_SEARCH', 'FOWNER', 'FSETID', 'KILL', 'SETGID', 'SETUID', 'SETPCAP',
                'LINUX_IMMUTABLE', 'NET_BIND_SERVICE', 'NET_BROADCAST', 'NET_ADMIN', 'NET_RAW', 'IPC_LOCK',
                'IPC_OWNER', 'SYS_MODULE', 'SYS_RAWIO', 'SYS_CHROOT', 'SYS_PTRACE', 'SYS_PACCT', 'SYS_ADMIN',
                'SYS_BOOT', 'SYS_NICE', 'SYS_RESOURCE', 'SYS_TIME', 'SYS_TTY_CONFIG', 'MKNOD', 'LEASE',
                'AUDIT_WRITE', 'AUDIT_CONTROL', 'SETFCAP', 'MAC_OVERRIDE', 'MAC_ADMIN', 'SYSLOG', 'WAKE_ALARM',
                'BLOCK_SUSPEND', 'AUDIT_READ', 'PERFMON', 'BPF', 'CHECKPOINT_RESTORE')
AF_VSOCK = 40
SOCK_STREAM = 1
# clone(2)'s number and its user-namespace flag, for the raw call glibc's unshare does not make: the
# seccomp filter must refuse the flag on clone too (clone3 is "not implemented", so glibc never uses it).
CLONE = {'x86_64': 56, 'aarch64': 220}
CLONE_NEWUSER = 0x10000000
SIGCHLD = 17


@dataclass
class Bottle:
    bottles: Bottles
    backend: str

    def run(self, who: str, script: str) -> tuple[int, str]:
        """`script` in the bottle as `who` (a key of WHO); its exit status and its output, stderr included."""
        command = f'{WHO[who]} sh -c {shlex.quote(script)}'.strip()
        out = self.bottles.guest(AGENT, f'{command} 2>&1; echo "exit=$?"')
        body, _, status = out.rstrip('\n').rpartition('exit=')
        return int(status), body

    def status(self, who: str) -> dict[str, str]:
        """/proc/self/status of a process running as `who`."""
        code, out = self.run(who, 'cat /proc/self/status')
        assert code == 0, out
        return dict(line.split(':\t', 1) for line in out.splitlines() if ':\t' in line)


@pytest.fixture(scope='module', params=['podman', 'docker'])
def bottle(request, tmp_path_factory, claude_cache):
    tmp = tmp_path_factory.mktemp(f'confinement-{request.param}')
    backend = BACKENDS[request.param](request, tmp, claude_cache)
    bottles = Bottles(tmp / 'project', backend)
    bottles.agent(AGENT, prompt='Work.')
    try:
        bottles.doit(f'provision:{AGENT}')     # provisioning works under the restrictions, or nothing here runs
        yield Bottle(bottles, request.param)
    finally:
        backend.close(Project(bottles.root).label)
        bottles.stop_daemons()


def capabilities(mask: str) -> set[str]:
    bits = int(mask, 16)
    return {name for number, name in enumerate(CAPABILITIES) if bits >> number & 1}


@pytest.mark.parametrize('who', list(WHO))
def test_no_user_namespace_can_be_made(bottle, who):
    """In a user namespace of its own a process has every capability over what it then makes (mounts,
    network stacks): the kernel code behind them is reachable by any uid. Neither unshare nor a raw clone
    with CLONE_NEWUSER may make one."""
    code, out = bottle.run(who, 'unshare -U true')
    assert code != 0, f'{who} made a user namespace on {bottle.backend}: {out}'
    machine = platform.machine()
    clone = (f'$r = syscall({CLONE[machine]}, {CLONE_NEWUSER | SIGCHLD}, 0, 0, 0, 0); exit 0 if $r == 0; '
             'if ($r < 0) { print "refused: $!\\n"; exit 1 } waitpid($r, 0); print "made one\\n"; exit 0')
    code, out = bottle.run(who, f'perl -e {shlex.quote(clone)}')
    assert code != 0 and 'refused' in out, f'{who} cloned into a new user namespace on {bottle.backend}: {out}'


@pytest.mark.parametrize('who', list(WHO))
def test_nothing_is_mounted_in_a_new_user_namespace(bottle, who):
    code, out = bottle.run(who, 'unshare -Urm sh -c "mount -t tmpfs none /mnt && grep \\" /mnt \\" /proc/self/mounts"')
    assert code != 0, f'{who} mounted a tmpfs in a user namespace of its own on {bottle.backend}: {out}'


@pytest.mark.parametrize('who', list(WHO))
def test_no_vsock_socket(bottle, who):
    """`--network none` takes the network card away, not vsock: on a host that is a VM, the hypervisor's vsock
    services would be a connect() away."""
    code, out = bottle.run(who, f'perl -e \'socket(S, {AF_VSOCK}, {SOCK_STREAM}, 0) or die "refused: $!\\n"; '
                                'print "made one\\n"\'')
    assert code != 0 and 'refused' in out, f'{who} made an AF_VSOCK socket on {bottle.backend}: {out}'
    code, out = bottle.run(who, f'perl -e \'socket(S, 1, {SOCK_STREAM}, 0) or die "refused: $!\\n"\'')
    assert code == 0, f'{who} could not make a Unix socket on {bottle.backend}, which the door needs: {out}'


@pytest.mark.parametrize('who', list(WHO))
def test_no_new_privileges(bottle, who):
    assert bottle.status(who)['NoNewPrivs'] == '1', f'{who} may gain privileges through set-uid programs'


def test_only_the_kept_capabilities(bottle):
    """Guest root holds only what provisioning needs; the agent holds none, and nothing it runs can get
    more than the bounding set."""
    root, agent = bottle.status('guest root'), bottle.status('the agent')
    kept = set(confine.KEPT)
    assert capabilities(root['CapEff']) == kept, f'guest root on {bottle.backend}: {root["CapEff"]}'
    assert capabilities(root['CapBnd']) == kept, f'guest root on {bottle.backend}: {root["CapBnd"]}'
    assert capabilities(agent['CapEff']) == set(), f'the agent on {bottle.backend}: {agent["CapEff"]}'
    assert capabilities(agent['CapBnd']) == kept, f'the agent on {bottle.backend}: {agent["CapBnd"]}'
    assert capabilities(agent['CapAmb']) == set(), f'the agent on {bottle.backend}: {agent["CapAmb"]}'


def host_names_and_resolvers() -> tuple[set[str], set[str]]:
    """The host's own: the names of its /etc/hosts beyond localhost's, and its name servers."""
    names, servers = set(), set()
    for line in Path('/etc/hosts').read_text().splitlines():
        fields = line.split('#', 1)[0].split()
        names.update(name for name in fields[1:] if name != 'localhost' and not name.startswith('ip6-'))
    for line in Path('/etc/resolv.conf').read_text().splitlines():
        fields = line.split()
        if fields[:1] == ['nameserver'] and len(fields) > 1:
            servers.add(fields[1])
    return names, servers


def test_the_guest_holds_nothing_of_the_hosts_names_or_resolver(bottle):
    """The guest has no network card: it needs neither the host's names nor its resolver, and they tell it
    about the host's network."""
    names, servers = host_names_and_resolvers()
    code, hosts = bottle.run('the agent', 'cat /etc/hosts')
    assert code == 0, hosts
    code, resolv = bottle.run('the agent', 'cat /etc/resolv.conf')
    assert code == 0, resolv
    assert hosts == confine.HOSTS, f'/etc/hosts on {bottle.backend}:\n{hosts}'
    assert resolv == confine.RESOLV_CONF, f'/etc/resolv.conf on {bottle.backend}:\n{resolv}'
    leaked = sorted(word for word in (names | servers) if word in hosts.split() + resolv.split())
    assert not leaked, f'the guest on {bottle.backend} reads the host\'s {leaked}'
    code, out = bottle.run('guest root', 'echo "nameserver 192.0.2.53" >> /etc/resolv.conf')
    assert code != 0, f'guest root rewrote /etc/resolv.conf on {bottle.backend}: {out}'
