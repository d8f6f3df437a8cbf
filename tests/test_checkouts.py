"""Two checkouts of one project side by side (git worktrees, a colleague's clone on the same host):
machines, build machines, doors and proxies carry the checkout's name and never collide, and a
machine named the old way is taken down on the next launch instead of being orphaned."""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from tasks.project import Project
from tests.bottles import REPO, Bottles
from tests.conftest import BACKENDS
from tests.scenario import PROMPT, assert_fully_provisioned, setup_agent

# The last commit that named machines bottle-<agent>, without the checkout's part.
OLD_NAMING_COMMIT = '3b0ad84'


@pytest.fixture(params=['standin', 'podman'])
def checkouts(request, tmp_path, claude_cache):
    """Two checkouts in directories of the same name, on one backend of this host."""
    backend = BACKENDS[request.param](request, tmp_path, claude_cache)
    pair = [Bottles(tmp_path / where / 'proj', backend) for where in ('one', 'two')]
    try:
        yield pair
    finally:
        for bottles in pair:
            backend.close(Project(bottles.root).label)
            bottles.stop_daemons()
            shutil.rmtree(bottles.root / '.bottle' / 'images', ignore_errors=True)


def provision_at_once(checkouts):
    runs = [subprocess.Popen([sys.executable, '-m', 'doit', 'provision'], cwd=bottles.root, env=bottles.env(),
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for bottles in checkouts]
    for run in runs:
        output, _ = run.communicate(timeout=900)
        assert run.returncode == 0, output


def test_two_checkouts_with_the_same_agent_run_side_by_side_and_tear_down_alone(checkouts):
    for n, bottles in enumerate(checkouts):
        setup_agent(bottles, prompt=f'You work in checkout {n}.')
    provision_at_once(checkouts)

    one, two = checkouts
    assert one.machine('a') != two.machine('a')
    for n, bottles in enumerate(checkouts):
        assert bottles.machine('a').startswith('bottle-proj-')       # readable: the checkout directory's name
        assert bottles.backend.machine_state(bottles.machine('a')) == 'running'
        assert_fully_provisioned(bottles)
        assert f'You work in checkout {n}.' in bottles.guest('a', f'cat {PROMPT}')
    assert one.door_dir('a') != two.door_dir('a')

    one.doit('teardown:a')
    assert one.backend.machine_state(one.machine('a')) is None
    assert two.backend.machine_state(two.machine('a')) == 'running'
    assert_fully_provisioned(two)
    assert two.doit('provision').kinds == {'probe': 1}               # the other checkout saw nothing happen


def test_a_machine_named_the_old_way_is_taken_down_on_the_next_launch(checkouts, tmp_path):
    bottles = checkouts[0]
    archive = subprocess.run(['git', 'archive', OLD_NAMING_COMMIT, 'tasks', 'daemons', 'templates', 'dodo.py'],
                             cwd=REPO, capture_output=True)
    if archive.returncode != 0:
        pytest.skip(f'needs this repository\'s history (commit {OLD_NAMING_COMMIT}): '
                    f'{archive.stderr.decode().strip()}')
    old_code = tmp_path / 'old-code'
    old_code.mkdir()
    subprocess.run(['tar', '-x', '-C', str(old_code)], input=archive.stdout, check=True)
    bottles.supervise()     # the old code knows no `supervise:`; the new one then also starts the supervisor
    setup_agent(bottles)
    shutil.copy(old_code / 'dodo.py', bottles.root / 'dodo.py')
    old = subprocess.run([sys.executable, '-m', 'doit', 'provision'], cwd=bottles.root,
                         env={**bottles.env(), 'PYTHONPATH': str(old_code)}, stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, timeout=900)
    assert old.returncode == 0, old.stdout + old.stderr
    assert bottles.backend.machine_state('bottle-a') == 'running'

    shutil.copy(REPO / 'dodo.py', bottles.root / 'dodo.py')
    bottles.doit('provision')
    assert bottles.backend.machine_state('bottle-a') is None
    assert bottles.backend.machine_state(bottles.machine('a')) == 'running'
    assert_fully_provisioned(bottles)


def test_a_new_project_name_moves_the_machine_and_leaves_nothing_behind(standin):
    setup_agent(standin)
    standin.doit('provision')
    before = standin.machine('a')
    defaults = (standin.root / 'agents/_defaults.yaml').read_text()
    standin.write(standin.root / 'agents/_defaults.yaml', defaults + 'project: acme-main\n')
    info = standin.doit('info', 'machine:a', check=False).stdout
    assert 'config_changed' in info                     # doit says why: the name is in its config

    standin.doit('provision')
    assert standin.machine('a') == 'bottle-acme-main-a'
    assert standin.backend.machine_state(before) is None
    assert standin.backend.machine_state('bottle-acme-main-a') == 'running'
    assert_fully_provisioned(standin)
