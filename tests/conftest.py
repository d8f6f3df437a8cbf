"""Fixtures: a fresh claude-bottle project per test, on each backend that can run here."""
from __future__ import annotations

import functools
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tasks.project import Project
from tests.bottles import (Bottles, Podman, RealSmolvm, StandinSmolvm, make_fake_claude_archive,
                           make_standin_images)

# Downloads and debootstrap bases are cached here when set (CI points it at a
# directory the machine keeps); otherwise per test session.
CACHE_ENV = 'BOTTLE_TEST_CACHE'


@pytest.fixture(scope='session')
def claude_cache(tmp_path_factory):
    cache = Path(os.environ[CACHE_ENV]) if os.environ.get(CACHE_ENV) else tmp_path_factory.mktemp('cache')
    make_fake_claude_archive(cache)
    return cache


@functools.cache
def podman_problem() -> str | None:
    """Why the podman suite cannot run here, or None."""
    try:
        proc = subprocess.run(['podman', 'info'], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f'podman is not usable: {err}'
    return None if proc.returncode == 0 else f'podman info failed: {proc.stderr.strip()[:300]}'


@pytest.fixture(scope='session')
def standin_images(tmp_path_factory):
    return make_standin_images(tmp_path_factory.mktemp('images'))


def _standin(tmp_path, standin_images, claude_cache):
    return StandinSmolvm(tmp_path, standin_images, claude_cache)


def _podman(tmp_path, standin_images, claude_cache):
    if podman_problem():
        pytest.skip(podman_problem())
    return Podman(tmp_path, claude_cache)


def _smolvm(tmp_path, standin_images, claude_cache):
    if not shutil.which('smolvm'):
        pytest.skip('the real smolvm is not on PATH; the same scenarios ran against the stand-in')
    return RealSmolvm(tmp_path, claude_cache)


BACKENDS = {'standin': _standin, 'smolvm': _smolvm, 'podman': _podman}


@pytest.fixture(params=list(BACKENDS))
def bottles(request, tmp_path, standin_images, claude_cache):
    backend = BACKENDS[request.param](tmp_path, standin_images, claude_cache)
    project = Bottles(tmp_path / 'project', backend)
    try:
        yield project
    finally:
        backend.close(Project(project.root).label)
        shutil.rmtree(project.root / '.bottle' / 'images', ignore_errors=True)   # large artifacts


@pytest.fixture
def podman(tmp_path, standin_images, claude_cache):
    """The podman engine only: for what is about the docker backend itself."""
    backend = _podman(tmp_path, standin_images, claude_cache)
    project = Bottles(tmp_path / 'project', backend)
    try:
        yield project
    finally:
        backend.close(Project(project.root).label)
        shutil.rmtree(project.root / '.bottle' / 'images', ignore_errors=True)


@pytest.fixture
def standin(tmp_path, standin_images, claude_cache):
    """The stand-in only: for what is about smolvm itself."""
    backend = _standin(tmp_path, standin_images, claude_cache)
    try:
        yield Bottles(tmp_path / 'project', backend)
    finally:
        backend.close(None)
