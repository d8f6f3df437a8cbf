"""The gate never forgets a push (issue 22): every mode, times every point where a push can be cut, times
SIGKILL of the gate's pid, SIGKILL of its process group, and a full disk under the gate's state (a tmpfs
of its own). After each: the push is held (review), landed upstream (forward) or kept (local) exactly when
the gate's refs and records say so, the agent was never told anything else, `git fsck` is clean,
receipts.jsonl parses line by line, and pushing again converges.

The points are the gate's checkpoints (daemons/gate/store.checkpoint: a push stops there only while this
test arms it, through BOTTLE_GATE_FAULT in the gate's environment) and, for `forward`, the upstream's own
pre-receive hook, which holds the upstream push half-way."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from daemons.gate.review import held
from daemons.gate.store import FAULT_VARIABLE, mirror_dir
from tests.gate_setup import Setup, commit, host_git

pytestmark = pytest.mark.extended

POINTS = {
    'forward': ['pre-receive', 'receipt', 'forward', 'ref-update'],
    'review': ['pre-receive', 'before-hold', 'after-hold', 'receipt', 'ref-update', 'post-receive'],
    'local': ['pre-receive', 'receipt', 'ref-update'],
}
FAULTS = ['kill-pid', 'kill-group', 'disk-full']
CASES = [(mode, point, fault) for mode, points in POINTS.items() for point in points for fault in FAULTS]
STATE_BYTES = 48 << 20
WAIT_SECONDS = 60

# The upstream's pre-receive hook: the forward push waits in the middle, the upstream's refs not yet moved.
UPSTREAM_HOOK = '''#!/bin/sh
cat >/dev/null
[ -e "{faults}/forward.armed" ] && [ ! -e "{faults}/forward.reached" ] || exit 0
echo $$ > "{faults}/forward.reached"
i=0
while [ ! -e "{faults}/forward.go" ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i + 1)); done
'''


class Faults:
    def __init__(self, root: Path):
        """The gate's state directory root/gate must be the tmpfs already (the fixture mounts it)."""
        self.setup = Setup(root)
        try:
            self.dir = root / 'faults'
            self.dir.mkdir()
            self.setup.gate.env[FAULT_VARIABLE] = str(self.dir)
            self.work = {}
            for mode in POINTS:
                name = f'{mode}-repo'
                self.setup.add_repo(name, mode=mode)
                hook = self.setup.git_root / f'{name}.git' / 'hooks' / 'pre-receive'
                hook.write_text(UPSTREAM_HOOK.format(faults=self.dir))
                hook.chmod(0o755)
            assert self.setup.gate.ensure_running()
            for mode in POINTS:
                (root / 'work').mkdir(exist_ok=True)
                self.work[mode] = self.setup.clone('a', f'{mode}-repo', root / 'work' / mode)
        except BaseException:
            self.close()      # the gate, and the upstream, started before what failed
            raise

    @property
    def state(self) -> Path:
        return self.setup.state

    def arm(self, point: str) -> None:
        for leftover in self.dir.iterdir():
            leftover.unlink()
        (self.dir / f'{point}.armed').touch()

    def reached(self, point: str, pushing) -> None:
        deadline = time.monotonic() + WAIT_SECONDS
        while not (self.dir / f'{point}.reached').exists():
            if pushing.done():
                pytest.fail(f'the push ended without reaching {point}: {pushing.result().stderr}')
            assert time.monotonic() < deadline, f'the push did not reach {point} within {WAIT_SECONDS} s'
            time.sleep(0.02)

    def go(self, point: str) -> None:
        (self.dir / f'{point}.go').touch()

    def fill(self) -> None:
        """Fill the gate's filesystem to its last byte."""
        with open(self.state / '.filler', 'wb', buffering=0) as filler:
            for size in (1 << 20, 4096, 1):
                try:
                    while True:
                        filler.write(b'\0' * size)
                except OSError:
                    pass

    def empty(self) -> None:
        (self.state / '.filler').unlink(missing_ok=True)

    def settle(self) -> None:
        """Wait until no process of a push into this gate is left (an orphan of a killed gate goes on)."""
        mark = f'BOTTLE_GATE_STATE={self.state}'.encode()
        deadline = time.monotonic() + WAIT_SECONDS
        while pids := [pid for pid in _pids() if mark in _environ(pid).split(b'\0')]:
            assert time.monotonic() < deadline, f'processes of a push still run after {WAIT_SECONDS} s: {pids}'
            time.sleep(0.05)

    def close(self) -> None:
        self.setup.gate.stop()
        self.setup.upstream.close()


def _pids() -> list[int]:
    return [int(entry) for entry in os.listdir('/proc') if entry.isdigit()]


def _environ(pid: int) -> bytes:
    try:
        return Path(f'/proc/{pid}/environ').read_bytes()
    except OSError:
        return b''


@pytest.fixture(scope='module')
def f(tmp_path_factory):
    root = tmp_path_factory.mktemp('gate-faults')
    state = root / 'gate'
    state.mkdir()
    subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={STATE_BYTES},mode=0700', 'gate-faults', str(state)],
                   check=True)
    faults = None
    try:
        faults = Faults(root)
        yield faults
    finally:
        if faults:
            faults.close()
        subprocess.run(['umount', '--lazy', str(state)], check=True)


def outcome(f: Faults, mode: str, ref: str, sha: str) -> bool:
    """Whether the push is where its mode puts it: held for review (its ref in the gate at `sha` and one hold
    listed for it, never one without the other), upstream (forward), or in the gate (local)."""
    name = f'{mode}-repo'
    in_gate = f.setup.gate_ref('a', name, ref) == sha
    if mode == 'forward':
        return f.setup.upstream_ref(name, ref) == sha
    if mode == 'review':
        holds = [item for item in held(f.state) if (item.ref, item.new) == (ref, sha)]
        assert len(holds) == (1 if in_gate else 0), f'{ref} in the gate: {in_gate}; holds listed: {holds}'
    return in_gate


TOLD = {'forward': 'landed upstream in', 'review': 'is held for review as', 'local': 'is kept in the gate only'}


@pytest.mark.parametrize('mode,point,fault', CASES, ids=['-'.join(case) for case in CASES])
def test_a_cut_push_is_held_or_refused_the_agent_is_told_which_and_a_retry_converges(f, mode, point, fault):
    work = f.work[mode]
    branch = f'agent/a/{point}-{fault}'
    ref = f'refs/heads/{branch}'
    host_git(work, 'checkout', '-q', '-b', branch, 'origin/main')
    sha = commit(work, f'{point}-{fault}.txt')
    pid = f.setup.gate.daemon().pid()
    f.arm(point)
    with ThreadPoolExecutor(1) as pool:
        pushing = pool.submit(f.setup.guest, 'a', work, 'push', 'origin', branch)
        f.reached(point, pushing)
        if fault == 'kill-pid':
            os.kill(pid, signal.SIGKILL)
        elif fault == 'kill-group':
            os.killpg(pid, signal.SIGKILL)
        else:
            f.fill()
        f.go(point)
        first = pushing.result(timeout=WAIT_SECONDS * 2)
    f.settle()
    f.empty()
    f.arm('none')
    if fault != 'disk-full':
        f.setup.gate.stop()         # killed on purpose: not a death for the crash-loop count (lifecycle.py)
    f.setup.gate.ensure_running()

    # The agent was told the truth: success only when it is so, the gate's word for it only when it is so.
    there = outcome(f, mode, ref, sha)
    assert 'Traceback' not in first.stderr, first.stderr        # the gate fails in words
    if first.returncode == 0:
        assert there, first.stderr
    if TOLD[mode] in first.stderr:
        assert there, first.stderr
    if not there:
        assert first.returncode != 0, first.stderr
    if mode == 'forward' and there:
        assert 'refused the push' not in first.stderr and 'gate: refused' not in first.stderr, first.stderr

    # Nothing half: every receipt a whole line, every repository whole.
    text = f.setup.gate.receipts_file.read_text()
    assert text == '' or text.endswith('\n')
    for line in text.splitlines():
        json.loads(line)
    for git_dir in (mirror_dir(f.state, 'a', f'{f.setup.address}/git/{mode}-repo'),
                    f.setup.git_root / f'{mode}-repo.git'):
        fsck = subprocess.run(['git', '--git-dir', str(git_dir), 'fsck', '--no-dangling', '--no-progress'],
                              capture_output=True, text=True)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr

    # Pushing again converges: the push ends where its mode puts it, and the agent is told so.
    again = f.setup.guest('a', work, 'push', 'origin', branch)
    assert again.returncode == 0, again.stderr
    assert outcome(f, mode, ref, sha), again.stderr
    assert TOLD[mode] in again.stderr or 'Everything up-to-date' in again.stderr, again.stderr
