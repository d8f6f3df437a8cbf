"""The real smolvm CLI, for the contract tests (tests/test_smolvm_contract.py): smolvm 1.32.2, from PyPI's
`smolmachines` wheel, which carries it as smol/smol-vmm beside libkrun. Copied (not linked) under the name
`smolvm` next to its libraries, it runs; it cannot boot a VM on a host without hardware virtualization,
but it parses every command and answers those that need no running machine.

    python -m tests.real_smolvm          install it into $BOTTLE_TEST_CACHE/smolvm-1.32.2 (test.sh does)

Never on PATH by itself: the contract tests run it with a HOME of their own, and the real-smolvm scenarios
(tests/conftest.py) run it through a logging shim where a probe boots a machine with it (runnable()).
"""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

VERSION = '1.32.2'
WHEEL = f'smolmachines=={VERSION}'
MEMBERS = ('smol/smol-vmm', 'smol/libkrun.so', 'smol/libkrunfw.so.5', 'smol/agent-rootfs.tar.zst',
           'smol/overlay-template.ext4.zst', 'smol/storage-template.ext4.zst')
CACHE_ENV = 'BOTTLE_TEST_CACHE'


def directory(cache: Path) -> Path:
    return Path(cache) / f'smolvm-{VERSION}'


def binary(cache: Path) -> Path | None:
    """The installed real smolvm, or None."""
    path = directory(cache) / 'smolvm'
    return path if os.access(path, os.X_OK) else None


def runnable(cache: Path) -> Path | None:
    """The installed smolvm as it must be to boot (or to reach the reason it cannot), in a directory every user
    may enter: as root, smolvm runs a machine's VM process as another uid, which must reach the libraries beside
    the binary, and the test cache, under root's private home, is closed to it (smolvm then says "libkrun/libkrunfw
    not found"). Made once, whole (renamed into place), and kept: the same binary file each session, so what was
    learnt of booting it here (tasks/backends/smolvm_boot.py's record, keyed by that file) holds across sessions.
    Its files are hard links where they can be; the disk templates smolvm unpacks are left to it."""
    installed = binary(cache)
    if installed is None:
        return None
    where = Path(tempfile.gettempdir()) / f'claude-bottle-smolvm-{VERSION}-{os.getuid()}'
    if not where.exists():
        build = Path(tempfile.mkdtemp(prefix=f'.{where.name}.', dir=where.parent))
        try:
            for name in ('smolvm', *(Path(member).name for member in MEMBERS)):
                try:
                    os.link(installed.parent / name, build / name)
                except OSError:
                    shutil.copy2(installed.parent / name, build / name)
            build.chmod(0o755)
            os.rename(build, where)
        except OSError:
            if not where.exists():          # not just another worker of the session, first
                raise
        finally:
            shutil.rmtree(build, ignore_errors=True)
    info = os.lstat(where)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o022:
        raise SystemExit(f'{where} is not a directory of yours that only you may change: remove it')
    return where / 'smolvm'


def install(cache: Path) -> Path:
    """Download the pinned wheel (PyPI) and unpack the CLI and its libraries; whole or not at all."""
    found = binary(cache)
    if found:
        return found
    target = directory(cache)
    target.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(dir=target.parent, prefix=f'.{target.name}.'))
    try:
        subprocess.run([sys.executable, '-m', 'pip', 'download', '--quiet', '--disable-pip-version-check',
                        '--no-deps', '--only-binary=:all:', WHEEL, '-d', str(build)], check=True, timeout=600)
        wheel = next(build.glob('smolmachines-*.whl'))
        with zipfile.ZipFile(wheel) as archive:
            for member in MEMBERS:
                with archive.open(member) as source, open(build / Path(member).name, 'wb') as out:
                    shutil.copyfileobj(source, out)
                os.chmod(build / Path(member).name, 0o755)
        wheel.unlink()
        shutil.copy2(build / 'smol-vmm', build / 'smolvm')
        version = subprocess.run([str(build / 'smolvm'), '--version'], capture_output=True, text=True, timeout=60,
                                 env={'PATH': os.environ['PATH'], 'HOME': str(build)})
        if version.stdout.strip() != f'smolvm {VERSION}':
            raise SystemExit(f'the smolvm of {WHEEL} answered {version.stdout!r} {version.stderr!r}, not smolvm {VERSION}')
        for made in ('.cache', '.local', '.config'):
            shutil.rmtree(build / made, ignore_errors=True)
        os.rename(build, target)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return target / 'smolvm'


if __name__ == '__main__':
    cache = os.environ.get(CACHE_ENV)
    if not cache:
        sys.exit(f'{CACHE_ENV} is not set: run ./test.sh, which sets it')
    print(f'the real smolvm {VERSION} for the contract tests: {install(Path(cache))}')
