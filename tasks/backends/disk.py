"""A bottle's disk on docker and podman: what the guest can write is bounded (`resources.disk`).

Neither engine can bound a container's writable layer on the storage most hosts have (overlay on ext4;
`--storage-opt size` wants xfs with project quotas, which the kernel may not even have), so the layer
is taken away instead: the container's root is read-only (`--read-only`), and every path the guest
may write (the user's home, /tmp, /var/tmp, /etc, /root, the CA's directory: guest.writable_paths)
is a directory of the bottle's own filesystem, an ext4 file of `resources.disk` GiB loop-mounted on
the host (nosuid, nodev, 0700). The file is sparse: the host's free space drops by what the guest
writes, never by more than the bound, and writing past it fails in the guest with ENOSPC. Guest root
cannot remount the root read-write (no CAP_SYS_ADMIN: confine.py). Images stay shared: the disk is
seeded at create with what the image has at those paths, by the image's own `cp -a`.

Where the disk cannot be made (claude-bottle runs without root, so nothing can be mounted; a program
is missing; the kernel refuses a loop device), the machine is made as before, its root writable and
its disk not bounded, and that is said once when the machine is made and in `doit status` (the
machine's DISK_LABEL says which) — never silently.

The smolvm backend is a virtual machine whose disks are files of their own (the smolvm issue).
"""
from __future__ import annotations

import os
import posixpath
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from daemons.hostprograms import HostProgramMissing, require
from tasks.backends.protocol import BackendError

DISK_LABEL = 'claude-bottle.disk'     # "<GiB> GiB" when bounded, else "not bounded: <why>"
FILE_LABEL = 'claude-bottle.disk-file'    # the host file of a bounded one
DISK_FILE = 'disk.img'                # its name: nothing else is ever released through a label
NOT_BOUNDED = 'not bounded'
GIB = 1 << 30
TOOL_TIMEOUT = 120                    # mkfs, mount, umount: seconds

# In a throwaway container of the bottle's image, as root: each writable path (an argument
# PATH=UID:GID) copied onto the new disk with owner, mode and links (cp -a), or made empty with that
# owner when the image lacks it. A path that is a symbolic link is refused: a mount source must be a
# directory of the disk, never a link out of it.
SEED = r'''set -eu
for arg in "$@"; do
  p=${arg%=*} owner=${arg##*=}
  if [ -L "$p" ]; then echo "claude-bottle: $p is a symbolic link in the image; it cannot be a writable path" >&2; exit 1; fi
  mkdir -p "/seed$(dirname "$p")"
  if [ -d "$p" ]; then cp -a "$p" "/seed$p"; else mkdir -m 755 "/seed$p"; chown "$owner" "/seed$p"; fi
done
'''


@dataclass(frozen=True)
class Disk:
    image: Path                      # the file that holds the filesystem (sparse, 0600)

    @property
    def mount(self) -> Path:
        """Where the host mounts it: beside the file, without its suffix."""
        return self.image.with_suffix('')

    def source(self, guest_path: str) -> Path:
        """The host directory mounted at guest_path."""
        return self.mount / guest_path.lstrip('/')


def outermost(paths: Mapping[str, str]) -> dict[str, str]:
    """The paths that are not inside another one of them, in order, with their owners: a mount source is
    then never a directory the guest can reach (and replace) through another mount."""
    normal = {posixpath.normpath(p): owner for p, owner in paths.items()}
    return {p: owner for p, owner in normal.items()
            if not any(o != p and p.startswith(o.rstrip('/') + '/') for o in normal)}


def why_not_bounded() -> str | None:
    """Why no disk can be made on this host, or None when one can."""
    if os.geteuid() != 0:
        return (f'bounding it takes a loop-mounted filesystem, which needs root, and claude-bottle runs as uid '
                f'{os.geteuid()} here')
    try:
        for program in ('mkfs.ext4', 'mount', 'umount'):
            require(program)
    except HostProgramMissing as err:
        return str(err)
    return None


def _tool(*argv: str):
    try:
        proc = subprocess.run([require(argv[0]), *argv[1:]], capture_output=True, stdin=subprocess.DEVNULL,
                              timeout=TOOL_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise BackendError(f'`{" ".join(argv)}` did not finish within {TOOL_TIMEOUT} s') from None
    if proc.returncode != 0:
        err = (proc.stderr or proc.stdout).decode(errors='replace').strip()
        raise BackendError(f'`{" ".join(argv)}` failed with exit code {proc.returncode}:\n{err}')


def make(disk: Disk, gib: int):
    """A new empty disk of `gib` GiB, mounted; whatever was at its place before is released first."""
    release(disk)
    disk.image.parent.mkdir(parents=True, exist_ok=True)
    partial = disk.image.with_name(disk.image.name + '.partial')
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.ftruncate(fd, gib * GIB)
    finally:
        os.close(fd)
    try:
        # no reserved blocks (the bound is the guest's, root's included); the inode tables are
        # written lazily by the kernel, so a large disk costs no time here
        _tool('mkfs.ext4', '-q', '-F', '-m', '0', '-L', 'claude-bottle',
              '-E', 'root_owner=0:0,lazy_itable_init=1,lazy_journal_init=1,nodiscard', str(partial))
        os.replace(partial, disk.image)
    finally:
        partial.unlink(missing_ok=True)
    mount(disk)


def mount(disk: Disk):
    """Mount the disk where it belongs, unless it is (a machine start after the host restarted)."""
    if os.path.ismount(disk.mount):
        return
    if not disk.image.is_file():
        raise BackendError(f'the disk of this machine, {disk.image}, is gone; run `doit clean machine` for the '
                           'agent and launch it again to make a new one (what the guest had written is lost)')
    disk.mount.mkdir(mode=0o700, exist_ok=True)
    _tool('mount', '-o', 'loop,nosuid,nodev', str(disk.image), str(disk.mount))
    os.chmod(disk.mount, 0o700)           # the guest's files are no other host user's business


def release(disk: Disk):
    """Unmount the disk and remove it: what the guest wrote goes with its machine."""
    if disk.image.name != DISK_FILE:
        raise BackendError(f'{disk.image} is not a disk of claude-bottle (those are named {DISK_FILE}); left alone')
    if os.path.ismount(disk.mount):
        try:
            _tool('umount', str(disk.mount))
        except BackendError:
            _tool('umount', '--lazy', str(disk.mount))    # still held (a container being removed): detach
    if disk.mount.is_dir() and not os.path.ismount(disk.mount):
        try:
            disk.mount.rmdir()
        except OSError:
            pass      # not empty: a directory of ours before the disk was mounted on it; left alone
    disk.image.unlink(missing_ok=True)


def release_under(root: Path):
    """Release every disk mounted below `root` (a removed project's, the tests')."""
    prefix = str(root.resolve()).rstrip('/') + '/'
    with open('/proc/self/mountinfo') as f:
        points = [line.split()[4] for line in f]
    for point in sorted(points, reverse=True):
        point = point.replace('\\040', ' ')
        if point.startswith(prefix) and point.endswith('/disk'):
            release(Disk(Path(point + '.img')))


def mount_flags(disk: Disk, writable: Mapping[str, str]) -> list[str]:
    """The engine flags of a bounded bottle: a read-only root, each writable path from the disk."""
    flags = ['--read-only']
    for path in writable:
        flags += ['-v', f'{disk.source(path)}:{path}']
    return flags


def seed_argv(disk: Disk, image_ref: str, writable: Mapping[str, str]) -> list[str]:
    """The engine arguments that copy the image's writable paths onto the new disk."""
    return ['run', '--rm', '--network', 'none', '--user', '0', '-v', f'{disk.mount}:/seed', image_ref,
            'sh', '-c', SEED, 'sh', *(f'{path}={owner}' for path, owner in writable.items())]
