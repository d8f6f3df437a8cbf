"""The kernel surface of a bottle on docker and podman: as little as provisioning and the agent's work need.

A container shares the host's kernel, so every system call, capability and socket family the guest keeps
is a way to reach the host's kernel (or, on a host that is itself a VM, the hypervisor behind it). The
engines' defaults leave the agent more than it needs: on podman it creates user namespaces and mounts in
them, `--network none` does not cover vsock sockets, no-new-privileges is off, and the guest reads the
host's /etc/hosts entries and resolver address. A bottle is created with (create_flags):

- no new privileges: no set-uid program or file capability raises any process of the guest;
- only the capabilities KEPT: what root's provisioning does (write root's files, give files to the
  agent) and what becoming the agent takes (setpriv, `exec -u`); everything else is dropped from the
  bounding set, so no process of the guest ever has it;
- a seccomp allowlist (seccomp_profile(), from the declaration below): the calls of ordinary programs
  (the real Claude Code, node, git, curl, a shell), without namespaces (unshare, setns, clone with a
  namespace flag), mounts, kernel keyrings, BPF, perf, userfaultfd and io_uring, and with sockets of
  the SOCKET_FAMILIES only (no AF_VSOCK: `--network none` does not cover it);
- /etc/hosts and /etc/resolv.conf of claude-bottle's own (HOSTS, RESOLV_CONF), read-only: the guest has
  no network card, so it needs no resolver and no names but localhost.

A custom seccomp profile replaces the engine's own, so the profile is a whole allowlist: what the
engines' default profiles (podman's /usr/share/containers/seccomp.json, docker's built-in one) allow a
container without extra capabilities, less what is refused here. Build machines (image builds) get none
of this: apt and useradd need root's powers there, and a build machine runs only the recipe.
"""
from __future__ import annotations

import errno
import hashlib
import json
import platform
from pathlib import Path

from daemons.atomic import write_atomic
from tasks.cache import cache_dir
from tasks.errors import BottleError

# Bumped when what a bottle is allowed changes in a way the declaration below does not show (the flags'
# shape); the declaration's own changes reach LEVEL through its digest.
VERSION = 1

# Root's provisioning in a running bottle writes files in root's directories (trust store, gitconfig,
# /etc/environment) and gives files and the skills dir to the agent (CHOWN); guest root keeps its say
# over the guest's own files, the agent's included (DAC_OVERRIDE, FOWNER: provisioning and inspection read
# and replace them); becoming the agent as root (`setpriv --reuid`, `su`-like tools) sets ids and groups
# (SETUID, SETGID). None of these reaches past the bottle's own filesystem and processes.
KEPT = ('CHOWN', 'DAC_OVERRIDE', 'FOWNER', 'SETGID', 'SETUID')

# What the guest reads for names and resolvers: localhost only, and no name server (it has no network;
# the egress proxy resolves every name the agent asks for, on the host).
HOSTS = ('# claude-bottle: this bottle has no network card; the egress proxy resolves names on the host\n'
         '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n')
RESOLV_CONF = ('# claude-bottle: this bottle has no network card and no name server; the egress proxy\n'
               '# resolves names on the host\n')
GUEST_HOSTS = '/etc/hosts'
GUEST_RESOLV_CONF = '/etc/resolv.conf'

# The calls every program of the guest may make, by what they are for. The engines' default allowlists,
# for the 64-bit x86 and ARM system call tables, less SECCOMP_REFUSED (and the calls that need a
# capability no bottle keeps).
ALLOWED = {
    'files': (
        'access', 'chdir', 'chmod', 'chown', 'close', 'close_range', 'copy_file_range', 'creat', 'dup', 'dup2',
        'dup3', 'faccessat', 'faccessat2', 'fadvise64', 'fallocate', 'fchdir', 'fchmod', 'fchmodat', 'fchown',
        'fchownat', 'fcntl', 'fdatasync', 'flock', 'fstat', 'fstatfs', 'fsync', 'ftruncate', 'futimesat', 'getcwd',
        'getdents', 'getdents64', 'lchown', 'link', 'linkat', 'lseek', 'lstat', 'mkdir', 'mkdirat', 'mknod',
        'mknodat', 'name_to_handle_at', 'newfstatat', 'open', 'openat', 'openat2', 'pread64', 'preadv', 'preadv2',
        'pwrite64', 'pwritev', 'pwritev2', 'read', 'readahead', 'readlink', 'readlinkat', 'readv', 'rename',
        'renameat', 'renameat2', 'rmdir', 'sendfile', 'splice', 'stat', 'statfs', 'statx', 'symlink', 'symlinkat',
        'sync', 'sync_file_range', 'syncfs', 'tee', 'truncate', 'umask', 'unlink', 'unlinkat', 'utime',
        'utimensat', 'utimes', 'write', 'writev'),
    'extended attributes': (
        'fgetxattr', 'flistxattr', 'fremovexattr', 'fsetxattr', 'getxattr', 'lgetxattr', 'listxattr', 'llistxattr',
        'lremovexattr', 'lsetxattr', 'removexattr', 'setxattr'),
    'waiting for files and events': (
        'epoll_create', 'epoll_create1', 'epoll_ctl', 'epoll_pwait', 'epoll_pwait2', 'epoll_wait', 'eventfd',
        'eventfd2', 'fanotify_mark', 'inotify_add_watch', 'inotify_init', 'inotify_init1', 'inotify_rm_watch',
        'io_cancel', 'io_destroy', 'io_getevents', 'io_setup', 'io_submit', 'ioctl', 'pipe', 'pipe2', 'poll',
        'ppoll', 'pselect6', 'select', 'signalfd', 'signalfd4', 'timerfd_create', 'timerfd_gettime',
        'timerfd_settime'),
    'memory': (
        'brk', 'get_mempolicy', 'madvise', 'mbind', 'membarrier', 'memfd_create', 'memfd_secret', 'mincore',
        'mlock', 'mlock2', 'mlockall', 'mmap', 'mprotect', 'mremap', 'msync', 'munlock', 'munlockall', 'munmap',
        'pkey_alloc', 'pkey_free', 'pkey_mprotect', 'remap_file_pages', 'set_mempolicy'),
    'processes and threads': (
        'arch_prctl', 'capget', 'capset', 'execve', 'execveat', 'exit', 'exit_group', 'fork', 'futex', 'getcpu',
        'getpgid', 'getpgrp', 'getpid', 'getppid', 'getpriority', 'getrandom', 'get_robust_list', 'getrlimit',
        'getrusage', 'getsid', 'gettid', 'ioprio_get', 'ioprio_set', 'landlock_add_rule', 'landlock_create_ruleset',
        'landlock_restrict_self', 'pidfd_getfd', 'pidfd_open', 'pidfd_send_signal', 'prctl', 'prlimit64',
        'process_mrelease', 'process_vm_readv', 'process_vm_writev', 'ptrace', 'restart_syscall', 'rseq',
        'sched_getaffinity', 'sched_getattr', 'sched_getparam', 'sched_get_priority_max',
        'sched_get_priority_min', 'sched_getscheduler', 'sched_rr_get_interval', 'sched_setaffinity',
        'sched_setattr', 'sched_setparam', 'sched_setscheduler', 'sched_yield', 'seccomp', 'set_robust_list',
        'set_tid_address', 'setpgid', 'setpriority', 'setrlimit', 'setsid', 'sysinfo', 'times', 'uname', 'vfork',
        'wait4', 'waitid'),
    'user and group ids': (
        'getegid', 'geteuid', 'getgid', 'getgroups', 'getresgid', 'getresuid', 'getuid', 'setfsgid', 'setfsuid',
        'setgid', 'setgroups', 'setregid', 'setresgid', 'setresuid', 'setreuid', 'setuid'),
    'signals': (
        'alarm', 'kill', 'pause', 'rt_sigaction', 'rt_sigpending', 'rt_sigprocmask', 'rt_sigqueueinfo',
        'rt_sigreturn', 'rt_sigsuspend', 'rt_sigtimedwait', 'rt_tgsigqueueinfo', 'sigaltstack', 'tgkill', 'tkill'),
    'time': (
        'adjtimex', 'clock_adjtime', 'clock_getres', 'clock_gettime', 'clock_nanosleep', 'getitimer',
        'gettimeofday', 'nanosleep', 'setitimer', 'time', 'timer_create', 'timer_delete', 'timer_getoverrun',
        'timer_gettime', 'timer_settime'),
    'sockets (socket() itself: SOCKET_FAMILIES)': (
        'accept', 'accept4', 'bind', 'connect', 'getpeername', 'getsockname', 'getsockopt', 'listen', 'recvfrom',
        'recvmmsg', 'recvmsg', 'sendmmsg', 'sendmsg', 'sendto', 'setsockopt', 'shutdown', 'socketpair'),
    'System V and POSIX message queues, semaphores, shared memory': (
        'mq_getsetattr', 'mq_notify', 'mq_open', 'mq_timedreceive', 'mq_timedsend', 'mq_unlink', 'msgctl', 'msgget',
        'msgrcv', 'msgsnd', 'semctl', 'semget', 'semop', 'semtimedop', 'shmat', 'shmctl', 'shmdt', 'shmget'),
}

# Refused with EPERM, though the engines' profiles let some through (podman's allows unshare, mount and
# keyctl, which user namespaces make reachable without any capability), each a large part of the kernel
# no agent's work needs.
SECCOMP_REFUSED = {
    'namespaces (a user namespace gives its creator every capability inside it)': ('unshare', 'setns'),
    'mounts': ('mount', 'umount', 'umount2', 'pivot_root', 'chroot', 'open_tree', 'move_mount', 'mount_setattr',
               'fsopen', 'fsconfig', 'fsmount', 'fspick'),
    'kernel keyrings': ('keyctl', 'add_key', 'request_key'),
    'BPF programs and performance counters': ('bpf', 'perf_event_open'),
    'userfaultfd and io_uring (the source of many kernel exploits)': (
        'userfaultfd', 'io_uring_setup', 'io_uring_enter', 'io_uring_register'),
    'the kernel log, rebooting, loading kernels and modules': (
        'syslog', 'reboot', 'kexec_load', 'kexec_file_load', 'init_module', 'finit_module', 'delete_module'),
}

# clone() is allowed only without a namespace flag; these are CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER,
# NEWPID and NEWNET (CLONE_NEWTIME only exists for clone3 and unshare: in clone's flags its bit is the
# exit signal's). The flags are clone's first argument on x86-64 and ARM64.
CLONE_NAMESPACE_FLAGS = 0x7E020000
# clone3 passes its flags in memory, where seccomp cannot read them: it answers "not implemented", so
# glibc falls back to clone, whose flags are checked (as the engines' profiles do).
CLONE3_ERRNO = errno.ENOSYS
# personality() with the values the engines allow: Linux, and Linux with randomization off (for gdb and
# the like), and reading the current one.
PERSONALITIES = (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF)
# socket() for the families the guest uses: local sockets, loopback TCP to its egress door, netlink for
# getaddrinfo's look at the interfaces. No AF_VSOCK (40): on a host that is a VM, vsock reaches the
# hypervisor's services past `--network none`; nor any other family's code in the kernel.
SOCKET_FAMILIES = {'AF_UNIX': 1, 'AF_INET': 2, 'AF_INET6': 10, 'AF_NETLINK': 16}
# Any other call (one of the list's 32-bit twins, a call newer than this list) is "not implemented", so
# that a program falls back to an older call as on an older kernel (docker 20.10 ignores this and says EPERM).
DEFAULT_ERRNO = errno.ENOSYS
REFUSED_ERRNO = errno.EPERM

# The profile covers the host's native system call table only: 32-bit calls (another table, where socket()
# hides behind socketcall()) are refused whole.
ARCHITECTURES = {'x86_64': 'SCMP_ARCH_X86_64', 'amd64': 'SCMP_ARCH_X86_64', 'aarch64': 'SCMP_ARCH_AARCH64',
                 'arm64': 'SCMP_ARCH_AARCH64'}


def _rule(names, action: str, *, errno_ret: int | None = None, args: list[dict] | None = None) -> dict:
    rule = {'names': sorted(names), 'action': action}
    if errno_ret is not None:
        rule['errnoRet'] = errno_ret
    if args:
        rule['args'] = args
    return rule


def _arg(index: int, value: int, op: str, value_two: int = 0) -> dict:
    return {'index': index, 'value': value, 'valueTwo': value_two, 'op': op}


def seccomp_rules() -> list[dict]:
    """The declaration above as the engines' rules (the same on every architecture this supports)."""
    refused = {name for names in SECCOMP_REFUSED.values() for name in names}
    allowed = {name for names in ALLOWED.values() for name in names}
    overlap = allowed & (refused | {'clone', 'clone3', 'socket', 'personality'})
    if overlap:     # a declaration that contradicts itself: a bug of ours, caught by any import of this module
        raise AssertionError(f'allowed and refused or conditional at once: {sorted(overlap)}')
    rules = [_rule(allowed, 'SCMP_ACT_ALLOW')]
    rules += [_rule(['personality'], 'SCMP_ACT_ALLOW', args=[_arg(0, value, 'SCMP_CMP_EQ')])
              for value in PERSONALITIES]
    rules.append(_rule(['clone'], 'SCMP_ACT_ALLOW', args=[_arg(0, CLONE_NAMESPACE_FLAGS, 'SCMP_CMP_MASKED_EQ', 0)]))
    rules.append(_rule(['clone3'], 'SCMP_ACT_ERRNO', errno_ret=CLONE3_ERRNO))
    # One rule a family: the engines join the conditions of one rule on the same argument with "or" or "and"
    # depending on their version; separate rules are always "or".
    rules += [_rule(['socket'], 'SCMP_ACT_ALLOW', args=[_arg(0, family, 'SCMP_CMP_EQ')])
              for family in SOCKET_FAMILIES.values()]
    rules.append(_rule(refused, 'SCMP_ACT_ERRNO', errno_ret=REFUSED_ERRNO))
    return rules


RULES = seccomp_rules()
# Names what a bottle is allowed: in the machine's config (tasks/machine.py), so a change of it recreates
# every bottle made before.
DECLARATION = json.dumps([RULES, DEFAULT_ERRNO, KEPT, HOSTS, RESOLV_CONF])
LEVEL = f'{VERSION}:{hashlib.sha256(DECLARATION.encode()).hexdigest()[:16]}'


def seccomp_profile(machine: str | None = None) -> str:
    """The profile in the engines' JSON format (docker and podman read the same), for the host's architecture."""
    machine = machine or platform.machine()
    if machine.lower() not in ARCHITECTURES:
        raise BottleError(f'claude-bottle\'s seccomp profile covers x86-64 and ARM64 hosts; this one is {machine}. '
                          'Use the smolvm backend here (BOTTLE_BACKEND=smolvm or the manifest key backend).')
    profile = {'defaultAction': 'SCMP_ACT_ERRNO', 'defaultErrnoRet': DEFAULT_ERRNO,
               'architectures': [ARCHITECTURES[machine.lower()]], 'syscalls': RULES}
    return json.dumps(profile, indent=1, sort_keys=True) + '\n'


def confinement_dir() -> Path:
    """Where the files the engines read live: the user's cache, which outlives every bottle (an engine reads
    the mounted files again at each start)."""
    return cache_dir() / 'confinement'


def _write_if_changed(path: Path, text: str):
    """Idempotent and atomic: concurrent creates (doit's parallel tasks, several checkouts) write the same
    text, and a bottle starting meanwhile mounts a whole file."""
    try:
        if path.read_text() == text:
            return
    except OSError:
        pass
    write_atomic(path, text, mode=0o644)


def write_files(directory: Path | None = None) -> Path:
    """The files the engines read (the seccomp profile, hosts, resolv.conf) in `directory` (default:
    confinement_dir()); returns it."""
    directory = directory or confinement_dir()
    files = {'seccomp.json': seccomp_profile(), 'hosts': HOSTS, 'resolv.conf': RESOLV_CONF}
    for name, text in files.items():
        _write_if_changed(directory / name, text)
    return directory


def create_flags(engine: str, directory: Path | None = None, at: str | None = None) -> list[str]:
    """The `create` flags of a bottle on docker or podman (`engine`), the files they name written to
    `directory` (default: confinement_dir()) and named where the engine's host has them: `at`, a directory on
    an engine elsewhere that holds copies (daemons/forward), else `directory` itself (and the seccomp profile for
    docker always, which its CLI reads and sends)."""
    if engine not in ('docker', 'podman'):
        raise ValueError(f'confinement is for the docker and podman engines, not {engine!r}')
    here = str(write_files(directory)) if engine == 'docker' or not at else None
    where = at or here
    # docker's CLI reads the profile itself and sends it along; podman's service reads it where it runs
    flags = ['--security-opt', 'no-new-privileges',
             '--security-opt', f'seccomp={here if engine == "docker" else where}/seccomp.json',
             '--cap-drop', 'ALL']
    for capability in KEPT:
        flags += ['--cap-add', capability]
    flags += ['-v', f'{where}/hosts:{GUEST_HOSTS}:ro', '-v', f'{where}/resolv.conf:{GUEST_RESOLV_CONF}:ro']
    return flags
