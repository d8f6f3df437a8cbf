"""Whether smolvm can boot a machine on this host, known from the first start that could not.

smolvm needs hardware virtualization (KVM on Linux); where it has none (a VM without nested vmx/svm, a
/dev/kvm its VM process may not open, libkrun missing) every `machine start` fails, after up to 30 s of
smolvm's own waiting. The first start that fails that way is remembered, with smolvm's reason, in the
user cache (`smolvm-boot/cannot-boot-<key>.json`), keyed by the smolvm version (known by its binary's file,
which costs no process) and by what decides whether this host can boot (its kernel and boot, /dev/kvm's
owner and mode, the user): from then on a start on this host fails at once, in one line, before any machine
is made, until one of those changes or the file is deleted. Nothing here switches backends: the line says
how to.

`probe()` boots a throwaway bare machine, for the test suite (its
real-smolvm scenarios run only where it boots) and for `python -m tasks.backends.smolvm_boot`.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from daemons.atomic import write_atomic
from tasks.cache import cache_dir
from tasks.errors import BottleError

KVM = '/dev/kvm'
PROBE_SECONDS = 90          # smolvm gives up on a boot without progress after 30 s itself
START_SECONDS_ENV = 'BOTTLE_SMOLVM_START_SECONDS'
START_SECONDS = 900         # a first start also pulls the image: never hang for ever, but leave it time
RECORD_BYTES = 16 << 10
REASON_CHARS = 300
# What smolvm says when the machine never booted (the VMM could not run), as opposed to a machine that booted
# and then failed (an image that cannot be pulled, a workload that exits).
BOOT_SIGNS = ('before the agent was ready', 'no boot progress', 'VMM exited', 'KvmContext', KVM,
              'find libraries', 'libkrun')
SWITCH = 'set BOTTLE_BACKEND=podman or docker to use a container engine'


class CannotBoot(BottleError):
    """smolvm cannot boot a machine on this host."""


def start_seconds() -> float:
    try:
        return max(1.0, float(os.environ.get(START_SECONDS_ENV, START_SECONDS)))
    except ValueError:
        return START_SECONDS


def boot_problem(stderr: str) -> str | None:
    """smolvm's reason, in one line, when what it printed says the machine never booted; else None."""
    if not any(sign in stderr for sign in BOOT_SIGNS):
        return None
    errors = [line for line in stderr.splitlines() if line.startswith('Error:')]
    said = errors[-1].removeprefix('Error:') if errors else stderr.strip().splitlines()[-1]
    said = _one_line(said.split('libkrun detail:', 1)[-1])
    kvm = re.search(r'KvmOpen\(Error\((\d+)\)\)', said)
    if kvm:
        said += f' ({KVM}: {os.strerror(int(kvm.group(1)))} for smolvm\'s VM process)'
    return said or 'smolvm did not say why'


def _one_line(text: str) -> str:
    """What smolvm (or a record) said, as one line of printable text, bounded."""
    text = re.sub(r'\x1b\[[0-9;]*[A-Za-z]', '', text)
    return ' '.join(''.join(c if c.isprintable() else ' ' for c in text).split())[:REASON_CHARS]


def version(exe: str) -> str:
    """`smolvm --version`'s answer."""
    try:
        proc = subprocess.run([exe, '--version'], capture_output=True, text=True, timeout=30,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f'unknown ({err})'
    words = proc.stdout.split()
    return words[1] if len(words) >= 2 and proc.returncode == 0 else 'unknown'


def _key(exe: str) -> str:
    """This smolvm (its file: a new version is a new file, and no process is run to know it) on this host as
    far as booting goes: this kernel since this boot, /dev/kvm as it is now, and who asks."""
    binary = os.stat(os.path.realpath(exe))
    try:
        boot = Path('/proc/sys/kernel/random/boot_id').read_text().strip()
    except OSError:
        boot = ''
    try:
        st = os.stat(KVM)
        kvm = f'{st.st_mode:o}:{st.st_uid}:{st.st_gid}:{st.st_rdev}'
    except OSError as err:
        kvm = f'absent:{err.errno}'
    uname = os.uname()
    return hashlib.sha256(
        f'{os.path.realpath(exe)}\0{binary.st_size}\0{binary.st_mtime_ns}\0{binary.st_ino}\0{uname.nodename}\0'
        f'{uname.release}\0{uname.machine}\0{boot}\0{kvm}\0{os.getuid()}\0{sorted(os.getgroups())}'.encode()
    ).hexdigest()[:24]


def record_path(exe: str) -> Path:
    return cache_dir() / 'smolvm-boot' / f'cannot-boot-{_key(exe)}.json'


def recorded(exe: str) -> tuple[str, str] | None:
    """(smolvm's version, its reason) when a start of this smolvm on this host failed to boot before; costs a
    few stat calls, no process."""
    try:
        with open(record_path(exe), 'rb') as f:
            record = json.loads(f.read(RECORD_BYTES))
        return _one_line(str(record['smolvm'])), _one_line(str(record['reason']))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, LookupError, TypeError, AttributeError):
        return None          # a record cut short or not ours: try the start again, which writes it anew


def known_problem(exe: str) -> CannotBoot | None:
    """The error a start on this host would end in, when a start of this smolvm here failed to boot before."""
    found = recorded(exe)
    return _cannot_boot(*found, record_path(exe)) if found else None


def remember(exe: str, reason: str) -> CannotBoot:
    """Keep what the failed start said, for every later start here, and return the error to raise."""
    path = record_path(exe)
    path.parent.mkdir(parents=True, exist_ok=True)
    said_version = version(exe)
    write_atomic(path, json.dumps({'smolvm': said_version, 'binary': os.path.realpath(exe),
                                   'host': os.uname().nodename, 'reason': reason,
                                   'since': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}) + '\n')
    return _cannot_boot(said_version, reason, path)


def _cannot_boot(said_version: str, reason: str, path: Path) -> CannotBoot:
    return CannotBoot(f'smolvm cannot boot a machine here: {reason}; {SWITCH} (remembered for smolvm '
                      f'{said_version} on this host in {path}: delete it to try smolvm again)')


def probe(exe: str, deadline: float = PROBE_SECONDS) -> str | None:
    """Boot a bare machine (no image) within `deadline` seconds: None when it booted and ran a command, else
    why not. Its state is smolvm's own, where the bottles' machines go; the machine is removed afterwards."""
    name = f'claude-bottle-boot-probe-{os.getpid()}'

    def smolvm(*args: str, timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run([exe, 'machine', *args, '--name', name], capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=timeout, start_new_session=True)
    try:
        made = smolvm('create', timeout=60)
        if made.returncode != 0:
            return f'`smolvm machine create` failed: {_one_line(made.stderr)}'
        try:
            started = smolvm('start', timeout=deadline)
        except subprocess.TimeoutExpired:
            return f'no machine booted within {deadline:g} s'
        if started.returncode != 0:
            return boot_problem(started.stderr) or f'`smolvm machine start` failed: {_one_line(started.stderr)}'
        ran = subprocess.run([exe, 'machine', 'exec', '--name', name, '--', 'true'], capture_output=True,
                             text=True, stdin=subprocess.DEVNULL, timeout=60)
        return None if ran.returncode == 0 else f'a booted machine could not run `true`: {_one_line(ran.stderr)}'
    except (OSError, subprocess.TimeoutExpired) as err:
        return f'smolvm did not answer: {err}'
    finally:
        for step in ('stop', 'delete'):
            try:
                smolvm(step, *(['-f'] if step == 'delete' else []), timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                pass


def main() -> int:
    exe = shutil.which('smolvm')
    if exe is None:
        print('there is no smolvm on PATH', file=sys.stderr)
        return 2
    problem = probe(exe)
    if problem:
        print(f'smolvm {version(exe)} cannot boot a machine here: {problem}', file=sys.stderr)
        return 1
    print(f'smolvm {version(exe)} boots a machine here')
    return 0


if __name__ == '__main__':
    sys.exit(main())
