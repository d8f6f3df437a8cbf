"""Image bases that need no registry.

`image.base` in a manifest is one of:
  an OCI reference          debian:bookworm-slim      pulled by the backend
  a local root filesystem   ./rootfs/ or ./rootfs.tar  a directory or a tarball (.tar, .tar.gz, .tgz)
  a Debian suite            debootstrap:bookworm      built here by base:debootstrap-<suite>-<options>

base:debootstrap-<suite>-<options> runs `debootstrap --variant=minbase` with the packages
every agent image needs already included, so the image setup needs no network at all, and
keeps the result as a tarball in the user cache (built once per suite, options and host arch).
<options> is a short hash of the debootstrap options: a base built with other packages is
never reused, and the keys of the images built on it change with it.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from daemons.hostprograms import require
from daemons.lifecycle import locked
from tasks.cache import cache_dir
from tasks.checks import FileExists
from tasks.errors import BottleError
from tasks.manifest import DEBOOTSTRAP, Recipe, is_local_base
from tasks.progress import progress
from tasks.project import Project, action

BASE_PACKAGES = ('ca-certificates', 'curl', 'git', 'socat')     # socat: the guest's end of the egress door
DEBOOTSTRAP_OPTIONS = ('--variant=minbase', f'--include={",".join(BASE_PACKAGES)}')


@dataclass(frozen=True)
class Base:
    reference: str              # what the backend is given: an OCI reference or an absolute path
    identity: str               # what image keys hash: the manifest's base, or the name of a built one
    task: str | None = None     # the task that makes it, run only when the image is built
    file: Path | None = None    # a user's tarball: its content is an input of the image


def debootstrap_name(suite: str) -> str:
    """The name of its task and tarball: the suite and a hash of what goes in (debootstrap-bookworm-1a2b3c4d)."""
    options = hashlib.sha256(' '.join(DEBOOTSTRAP_OPTIONS).encode()).hexdigest()[:8]
    return f'debootstrap-{suite}-{options}'


def debootstrap_tarball(suite: str) -> Path:
    return cache_dir() / 'bases' / f'{debootstrap_name(suite)}-{os.uname().machine}.tar'


def resolve(recipe: Recipe) -> Base:
    if recipe.base.startswith(DEBOOTSTRAP):
        suite = recipe.base.removeprefix(DEBOOTSTRAP)
        name = debootstrap_name(suite)
        return Base(str(debootstrap_tarball(suite)), identity=name, task=f'base:{name}')
    if is_local_base(recipe.base):
        path = (recipe.source_dir / recipe.base).resolve()
        return Base(str(path), identity=recipe.base, file=path if path.is_file() else None)
    return Base(recipe.base, identity=recipe.base)


def tasks(project: Project):
    suites = sorted({a.recipe.base.removeprefix(DEBOOTSTRAP) for a in project.agents.values()
                     if a.recipe.base.startswith(DEBOOTSTRAP)})
    for suite in suites:
        tarball = debootstrap_tarball(suite)
        yield {
            'name': debootstrap_name(suite),
            'doc': f'Debian {suite} (minbase + {", ".join(BASE_PACKAGES)}) built with debootstrap',
            'actions': [(debootstrap, [suite, tarball])],
            'targets': [tarball],
            'uptodate': [FileExists(tarball, 'base tarball')],
        }


@action
def debootstrap(suite: str, tarball: Path):
    exe = require('debootstrap')        # it builds bases as root
    tar = require('tar')
    tarball.parent.mkdir(parents=True, exist_ok=True)
    with locked(tarball.parent / f'.{tarball.name}.lock'):      # another run (a checkout beside) may build it now
        if not tarball.is_file():
            _debootstrap(exe, tar, suite, tarball)


def _debootstrap(exe: str, tar: str, suite: str, tarball: Path):
    progress(f'building the base debootstrap:{suite} with debootstrap (minutes; once per user)')
    with tempfile.TemporaryDirectory(dir=tarball.parent, prefix='.debootstrap-') as tmp:
        root = Path(tmp) / 'root'
        proc = subprocess.run([exe, *DEBOOTSTRAP_OPTIONS, suite, str(root)],
                              capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            log = (root / 'debootstrap' / 'debootstrap.log')
            detail = log.read_text()[-3000:] if log.exists() else proc.stderr[-3000:]
            raise BottleError(f'debootstrap {suite} failed (exit {proc.returncode}); it needs root and '
                              f'a reachable Debian mirror:\n{detail}')
        partial = Path(tmp) / 'rootfs.tar'
        packed = subprocess.run([tar, '-C', str(root), '--numeric-owner', '-cf', str(partial), '.'],
                                capture_output=True, text=True)
        if packed.returncode != 0:
            raise BottleError(f'packing the debootstrap root into {tarball} failed:\n{packed.stderr}')
        partial.replace(tarball)
