"""Fixtures: a fresh claude-bottle project per test, on each backend that can run here."""
from __future__ import annotations

import fcntl
import functools
import os
import shutil
import subprocess
from pathlib import Path

import pytest

# The support modules' asserts say what they compared, as a test module's do.
pytest.register_assert_rewrite('tests.scenario', 'tests.gate_setup', 'tests.audit_log', 'tests.bottles')

from tasks.backends import smolvm_boot  # noqa: E402
from tasks.backends.disk import release_under  # noqa: E402
from tasks.cache import cache_dir  # noqa: E402
from tasks.project import Project
from tests.bottles import (Bottles, Docker, Dockerd, ImageStash, Podman, RealSmolvm, StandinSmolvm,
                           make_fake_claude_archive, make_standin_images)
from tests import real_smolvm as real_smolvm_install  # noqa: E402

# Downloads and debootstrap bases are cached here when set (CI points it at a
# directory the machine keeps); otherwise per test session.
CACHE_ENV = 'BOTTLE_TEST_CACHE'
REAL_SMOLVM_ENV = 'BOTTLE_REAL_SMOLVM'     # `require`: a real smolvm that cannot boot fails the run


def pytest_itemcollected(item):
    """The tests of a module that share a fixture of its own beyond one test (its bottles, its daemons) run on
    one worker, in file order (pytest orders them by that fixture's parameter, a backend, so each is made
    once, and its tests that change it come last). The rest go out one by one to whichever worker is free
    (`--dist loadgroup`). Marked as each test is collected: xdist reads the groups when the collection is
    modified, and which of two such hooks runs first differs between pytest releases."""
    module = item.nodeid.split('::')[0]
    fixtures = item._fixtureinfo.name2fixturedefs.values() if hasattr(item, '_fixtureinfo') else ()
    if any(defs[-1].scope in ('module', 'session') and defs[-1].baseid == module for defs in fixtures):
        item.add_marker(pytest.mark.xdist_group(module))


def pytest_collection_finish(session):
    """A worker whose tests would not be grouped stops the run: the groups' tests would be split between workers
    and each worker would make the module's bottles again (pytest-xdist 3.8 names a group in the test's node id,
    which pytest 9.2 no longer reads: pyproject.toml keeps pytest below it)."""
    if getattr(session.config.option, 'loadgroup', False):
        lost = [item.nodeid for item in session.items
                if item.get_closest_marker('xdist_group') and '@' not in item.nodeid]
        if lost:
            raise pytest.UsageError(f'pytest-xdist did not group {len(lost)} tests (such as {lost[0]}) with this '
                                    'pytest; install the versions pyproject.toml names: ./test.sh does')


@pytest.fixture(scope='session', autouse=True)
def no_daemon_outlives_the_session(tmp_path_factory):
    """Every project's daemons (supervisor, git gate, egress proxy, door relays) stopped at the end, also
    of a project no fixture made (a test's own clone) or one whose test was interrupted."""
    yield
    for state in tmp_path_factory.getbasetemp().glob('*/*/.bottle'):
        Bottles.stop_daemons_of(state.parent)


def shared_dir(tmp_path_factory, name: str) -> Path:
    """A directory every worker of this run shares (the run's base temporary directory, whose per-worker
    directories are its children), for what the workers make once between them."""
    base = tmp_path_factory.getbasetemp()
    directory = (base.parent if os.environ.get('PYTEST_XDIST_WORKER') else base) / name
    directory.mkdir(exist_ok=True)
    return directory


def pytest_sessionfinish(session):
    """The controller (or the only process) stops the Docker engine the workers shared."""
    if not os.environ.get('PYTEST_XDIST_WORKER'):
        engine = session.config._tmp_path_factory.getbasetemp() / 'dockerd'
        if engine.is_dir():
            Dockerd(engine).stop()


@pytest.fixture(scope='session', autouse=True)
def image_stash(tmp_path_factory):
    """Images are built and packed once per run and lent to every project that needs one (tests/bottles.py
    ImageStash)."""
    ImageStash.current = ImageStash(shared_dir(tmp_path_factory, 'image-stash'))
    yield ImageStash.current
    ImageStash.current = None


# What the tests' cache takes from the user's own (the demo's): entries named by their content (a Claude Code
# version, a debootstrap base's options and architecture, mitmproxy's version), so each is what the tests would
# fetch or build. mitmproxy's environment is run as `bin/python`, which works from wherever it is.
SEEDS = ('claude-code/anthropic-ai-claude-code-*.tgz', 'bases/debootstrap-*.tar', 'mitmproxy-*')


def seed(cache: Path, user_cache: Path):
    """Link (or copy) into the tests' cache what the user's cache has of SEEDS and the tests' has not."""
    def link(source, target):
        try:
            os.link(source, target)
        except OSError:
            shutil.copy2(source, target)

    for pattern in SEEDS:
        for source in sorted(user_cache.glob(pattern)):
            target = cache / 'claude-bottle' / source.relative_to(user_cache)
            if target.exists():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(f'.{target.name}.{os.getpid()}')
            if source.is_dir():
                shutil.copytree(source, partial, symlinks=True, copy_function=link)
            else:
                link(source, partial)
            try:
                os.replace(partial, target)
            except OSError:             # another worker seeded it first
                shutil.rmtree(partial, ignore_errors=True)


@pytest.fixture(scope='session')
def claude_cache(tmp_path_factory):
    cache = Path(os.environ[CACHE_ENV]) if os.environ.get(CACHE_ENV) else shared_dir(tmp_path_factory, 'cache')
    if cache.resolve() != cache_dir().parent.resolve():
        seed(cache, cache_dir())
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
def dockerd(tmp_path_factory):
    """A Docker engine the run's workers share, started by the first that needs it and stopped when the run
    ends (pytest_sessionfinish); the docker tests are skipped, with the reason, where it cannot start."""
    engine = Dockerd(shared_dir(tmp_path_factory, 'dockerd'))
    problem = engine.start_or_join()
    if problem:
        pytest.skip(f'no Docker engine for the docker backend: {problem}')
    return engine


@pytest.fixture(scope='session')
def standin_images(tmp_path_factory):
    return make_standin_images(tmp_path_factory.mktemp('images'))


# Each makes one backend harness; session fixtures (an engine, the stand-in's images) are
# asked for only by the backends that need them.

def _standin(request, tmp_path, claude_cache):
    return StandinSmolvm(tmp_path, request.getfixturevalue('standin_images'), claude_cache)


def no_engine_for_fast(request):
    """The fast subset (`-m fast`) needs no engine: a test marked fast that asks for one is mismarked."""
    if request.node.get_closest_marker('fast'):
        pytest.fail(f'{request.node.name} is marked fast but asks for an engine; unmark it')


def _podman(request, tmp_path, claude_cache):
    no_engine_for_fast(request)
    if podman_problem():
        pytest.skip(podman_problem())
    return Podman(tmp_path, claude_cache)


def _docker(request, tmp_path, claude_cache):
    no_engine_for_fast(request)
    return Docker(tmp_path, claude_cache, request.getfixturevalue('dockerd'))


def smolvm_boot_problem(exe: Path) -> str | None:
    """Why the real smolvm cannot boot a machine here, or None. Learnt once for this binary and host, as doit
    learns it (tasks/backends/smolvm_boot.py's record): the first worker boots a bare machine (up to 30 s where
    smolvm waits for a boot that makes no progress), the others, and later sessions, read what it found."""
    lock_file = smolvm_boot.record_path(str(exe)).with_suffix('.lock')
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, 'a') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        found = smolvm_boot.recorded(str(exe))
        if found:
            return found[1]
        problem = smolvm_boot.probe(str(exe))
        if problem:
            smolvm_boot.remember(str(exe), problem)
        return problem


@pytest.fixture(scope='session')
def real_smolvm() -> Path:
    """The real smolvm where it boots a machine: the one on PATH, else the suite's own (test.sh installs it).
    Where none boots (smolvm_boot_problem), the real-smolvm scenarios are skipped with smolvm's reason, unless
    BOTTLE_REAL_SMOLVM=require (tests/real-smolvm.sh)."""
    cache = os.environ.get(CACHE_ENV)
    found = shutil.which('smolvm')
    exe = Path(found) if found else (real_smolvm_install.runnable(Path(cache)) if cache else None)
    problem = (smolvm_boot_problem(exe) if exe else
               f'the real smolvm is not installed ({CACHE_ENV} unset: ./test.sh installs it)')
    if problem and os.environ.get(REAL_SMOLVM_ENV) == 'require':
        pytest.fail(f'{REAL_SMOLVM_ENV}=require, but smolvm cannot boot a machine here: {problem}')
    if problem:
        pytest.skip(f'smolvm cannot boot a machine here: {problem}; the same scenarios ran against the stand-in')
    return exe


def _smolvm(request, tmp_path, claude_cache):
    return RealSmolvm(tmp_path, claude_cache, request.getfixturevalue('real_smolvm'))


BACKENDS = {'standin': _standin, 'smolvm': _smolvm, 'podman': _podman, 'docker': _docker}


def _project(backend, tmp_path):
    """A project on that backend; its machines, egress proxy and image artifacts are removed afterwards."""
    project = Bottles(tmp_path / 'project', backend)
    try:
        yield project
    finally:
        backend.close(Project(project.root).label)
        project.stop_daemons()
        release_under(project.root)     # a disk an engine's own `rm -f` (a test's cleanup) left mounted
        shutil.rmtree(project.root / '.bottle' / 'images', ignore_errors=True)   # large artifacts


@pytest.fixture(params=list(BACKENDS))
def bottles(request, tmp_path, claude_cache):
    yield from _project(BACKENDS[request.param](request, tmp_path, claude_cache), tmp_path)


@pytest.fixture(params=['podman', 'docker'])
def engine(request, tmp_path, claude_cache):
    """Each engine of the docker CLI family: for what is about the docker backend itself."""
    yield from _project(BACKENDS[request.param](request, tmp_path, claude_cache), tmp_path)


@pytest.fixture
def podman(request, tmp_path, claude_cache):
    """The podman engine only: for what is about podman itself."""
    yield from _project(_podman(request, tmp_path, claude_cache), tmp_path)


@pytest.fixture
def standin(request, tmp_path, claude_cache):
    """The stand-in only: for what is about smolvm itself."""
    backend = _standin(request, tmp_path, claude_cache)
    project = Bottles(tmp_path / 'project', backend)
    try:
        yield project
    finally:
        backend.close(None)
        project.stop_daemons()
        release_under(project.root)     # a test that switched it to podman leaves the disk mounted
