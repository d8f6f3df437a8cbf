"""A bottle's disk is bounded (resources.disk): on docker and podman, what the guest writes goes to a
filesystem of that size on the host (tasks/backends/disk.py), the rest of its root is read-only, and
writing past the bound fails in the guest with ENOSPC, for the agent and for guest root alike. Where
the host cannot bound it, launch and `doit status` say so.

One project per engine serves the module: an agent with a 1 GiB disk and one whose disk cannot be
made (a `mount` on PATH that fails as one does without loop devices). The attacks are real writes from
inside the bottle; the host's side is measured from what the bottle holds on the host: its disk
file's allocated blocks and its container's writable layer.
"""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tasks.backends.disk import DISK_FILE, release_under
from tasks.project import Project
from tests.bottles import Bottles
from tests.conftest import BACKENDS

pytestmark = pytest.mark.extended        # attacks: what a bottle can do to the host's disk

ENGINES = ('podman', 'docker')
GIB = 1 << 30
AS_AGENT = 'setpriv --reuid agent --regid agent --init-groups env HOME=/home/agent'
# What a host without loop devices answers (util-linux's words); exit 32 is mount's "mount failure".
FAILING_MOUNT = '#!/bin/sh\necho "mount: $4: failed to setup loop device for $3." >&2\nexit 32\n'


@pytest.fixture(scope='module', params=ENGINES)
def bounded(request, tmp_path_factory, claude_cache):
    tmp = tmp_path_factory.mktemp(f'disk-{request.param}')
    backend = BACKENDS[request.param](request, tmp, claude_cache)
    bottles = Bottles(tmp / 'project', backend)
    bottles.agent('tight', prompt='Fill.', resources={'disk': 1})
    bottles.agent('loose', prompt='Fill.', resources={'disk': 1})
    shims = tmp / 'no-loop'
    shims.mkdir()
    (shims / 'mount').write_text(FAILING_MOUNT)
    (shims / 'mount').chmod(0o755)
    try:
        bottles.doit('provision:tight')
        env = bottles.env()
        env['PATH'] = f'{shims}{os.pathsep}{env["PATH"]}'
        loose = bottles.doit('provision:loose', env=env)
        yield bottles, loose
    finally:
        backend.close(Project(bottles.root).label)
        bottles.stop_daemons()
        release_under(tmp)


def footprint(bottles: Bottles, agent: str) -> int:
    """What the bottle holds of the host's disk: its disk file's allocated blocks and its writable layer."""
    image = bottles.root / '.bottle' / 'agents' / agent / DISK_FILE
    machine = bottles.machine(agent)
    upper = bottles.backend.engine('inspect', '--format', '{{.GraphDriver.Data.UpperDir}}', machine)
    layer = subprocess.run(['du', '-sb', upper.stdout.decode().strip()], capture_output=True, text=True, check=True)
    return image.stat().st_blocks * 512 + int(layer.stdout.split()[0])


def status_of(status: str, agent: str) -> str:
    """The lines `doit status` prints about one agent: its own and the indented ones after it."""
    lines = status.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f'{agent}: '))
    end = next((i for i in range(start + 1, len(lines)) if not lines[i].startswith(' ')), len(lines))
    return '\n'.join(lines[start:end])


def test_writing_past_the_disk_fails_in_the_guest_and_the_host_loses_at_most_the_bound(bounded):
    bottles, _ = bounded
    before = footprint(bottles, 'tight')
    # 1.5 GiB as the agent, into its home: ENOSPC before the end
    out = bottles.guest('tight', f'{AS_AGENT} dd if=/dev/zero of=/home/agent/fill bs=1M count=1536 2>&1; echo rc=$?')
    assert 'No space left on device' in out and 'rc=0' not in out, out
    # guest root: what is left of the disk, then the rest of the root, then remounting it
    out = bottles.guest('tight', 'dd if=/dev/zero of=/etc/fill bs=1M count=512 2>&1; echo rc=$?; '
                                 'dd if=/dev/zero of=/tmp/fill bs=1M count=512 2>&1; echo rc=$?')
    assert out.count('No space left on device') == 2 and 'rc=0' not in out, out
    for path in ('/usr/fill', '/var/lib/fill', '/opt/fill', '/fill'):
        out = bottles.guest('tight', f'dd if=/dev/zero of={path} bs=1M count=8 2>&1; echo rc=$?')
        assert 'Read-only file system' in out and 'rc=0' not in out, (path, out)
    out = bottles.guest('tight', 'mount -o remount,rw / 2>&1; echo rc=$?')
    assert 'rc=0' not in out, out
    grown = footprint(bottles, 'tight') - before
    assert grown <= GIB, f'the bottle took {grown / GIB:.2f} GiB of the host with a 1 GiB disk'
    assert grown > GIB // 2, f'the guest wrote only {grown} bytes: the test did not fill its disk'
    bottles.guest('tight', 'rm -f /home/agent/fill /etc/fill /tmp/fill')


def test_provisioning_works_on_the_bounded_disk_and_what_the_guest_wrote_survives_a_host_restart(bounded):
    bottles, _ = bounded
    home = bottles.guest('tight', f'{AS_AGENT} sh -c "echo kept > /home/agent/work; ls -A /home/agent"')
    assert {'.claude', '.claude-bottle', 'work'} <= set(home.split()), home
    assert 'claude-bottle-egress' in bottles.guest('tight', 'ls /usr/local/share/ca-certificates')
    # the host restarts: the machine is stopped and its disk no longer mounted
    machine = bottles.machine('tight')
    bottles.backend.engine('stop', machine)
    mount = bottles.root / '.bottle' / 'agents' / 'tight' / 'disk'
    subprocess.run(['umount', str(mount)], check=True)
    assert not os.path.ismount(mount)
    bottles.doit('provision:tight')
    assert os.path.ismount(mount)
    assert bottles.guest('tight', 'cat /home/agent/work') == 'kept\n'
    status = bottles.doit('status').stdout
    assert 'not bounded' not in status_of(status, 'tight'), status


def test_where_the_disk_cannot_be_bounded_launch_and_status_say_so(bounded):
    bottles, loose = bounded
    machine = bottles.machine('loose')
    said = [line for line in loose.output.splitlines() if 'not bounded' in line]
    assert said == [f'note: the disk of {machine} is not bounded: `mount -o loop,nosuid,nodev '
                    f'{bottles.root.resolve()}/.bottle/agents/loose/{DISK_FILE} {bottles.root.resolve()}'
                    f'/.bottle/agents/loose/disk` failed with exit code 32: mount: '
                    f'{bottles.root.resolve()}/.bottle/agents/loose/disk: failed to setup loop device for '
                    f'{bottles.root.resolve()}/.bottle/agents/loose/{DISK_FILE}.'], loose.output
    assert not (bottles.root / '.bottle' / 'agents' / 'loose' / DISK_FILE).exists()
    status = status_of(bottles.doit('status').stdout, 'loose')
    assert '\n  disk not bounded: `mount -o loop' in status, status
    # the bottle runs as before, its root writable
    assert bottles.guest('loose', f'{AS_AGENT} sh -c "echo ok > /home/agent/x; cat /home/agent/x"') == 'ok\n'


def test_removing_the_machine_releases_its_disk(bounded):
    bottles, _ = bounded
    bottles.agent('brief', prompt='Go.', resources={'disk': 1})
    bottles.doit('provision:brief')
    image = bottles.root / '.bottle' / 'agents' / 'brief' / DISK_FILE
    assert image.is_file() and os.path.ismount(image.with_suffix(''))
    bottles.doit('clean', 'machine:brief')
    assert not image.exists() and not os.path.ismount(image.with_suffix(''))
    assert shutil.which('losetup') is None or str(image) not in subprocess.run(
        ['losetup', '-a'], capture_output=True, text=True).stdout
