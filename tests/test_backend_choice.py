"""The default backend is the first that works here (smolvm, podman, docker with a running
engine); BOTTLE_BACKEND and the manifest key decide when set; the choice is visible; and
when nothing works, one paragraph says what each backend needs."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import yaml

from tests.scenario import assert_fully_provisioned, path_without, setup_agent

BACKEND_CLIS = ('smolvm', 'podman', 'docker')


def without_backend_key(bottles):
    defaults = bottles.root / 'agents' / '_defaults.yaml'
    spec = yaml.safe_load(defaults.read_text())
    spec.pop('backend')
    defaults.write_text(yaml.safe_dump(spec))


def test_smolvm_is_chosen_when_it_is_installed(standin):
    standin.own_images()
    setup_agent(standin)
    without_backend_key(standin)
    run = standin.doit('launch:a', env=standin.env(BOTTLE_BACKEND=None))
    assert run.count('pack') == 1 and run.count('create', standin.machine('a')) == 1    # the stand-in did the work
    assert f'{standin.machine("a")} on smolvm' in run.output
    assert_fully_provisioned(standin)


def test_podman_is_chosen_without_smolvm_and_the_choice_is_shown(standin, tmp_path):
    setup_agent(standin)
    without_backend_key(standin)
    path = path_without({'smolvm'}, standin.env()['PATH'], tmp_path)
    run = standin.doit('list', '--all', 'machine', env=standin.env(PATH=path, BOTTLE_BACKEND=None))
    assert f'create machine {standin.machine("a")} on podman' in run.output
    assert run.calls == []                               # choosing costs no backend call


def test_docker_elsewhere_is_detected_and_a_machine_there_without_its_engine_named_is_refused(standin, tmp_path,
                                                                                           monkeypatch):
    """An ssh:// DOCKER_HOST (or current context) makes docker a backend that works, without a call; a machine it
    would make there, where this host's door does not exist, is refused in words: the engine must be named."""
    from tasks.backends.docker import Docker
    from tasks.backends.protocol import BackendError
    setup_agent(standin)
    without_backend_key(standin)
    path = path_without({'smolvm', 'podman'}, standin.env()['PATH'], tmp_path)
    elsewhere = 'ssh://root@192.0.2.1'                   # TEST-NET-1: never dialled here
    run = standin.doit('list', '--all', 'machine', env=standin.env(PATH=path, BOTTLE_BACKEND=None, DOCKER_HOST=elsewhere))
    assert f'create machine {standin.machine("a")} on docker' in run.output, run.output
    monkeypatch.setenv('DOCKER_HOST', elsewhere)
    with pytest.raises(BackendError) as refused:
        Docker('docker')._create(SimpleNamespace(name='bottle-x-a'))
    assert f'would be made on {elsewhere}' in str(refused.value) and '`engine: NAME`' in str(refused.value)


def test_the_environment_and_the_manifest_key_win_over_detection(standin):
    setup_agent(standin)
    without_backend_key(standin)
    run = standin.doit('list', '--all', 'machine', env=standin.env(BOTTLE_BACKEND='docker'))
    assert f'{standin.machine("a")} on docker' in run.output
    standin.agent('b', backend='podman')
    run = standin.doit('list', '--all', 'machine', env=standin.env(BOTTLE_BACKEND=None))
    assert f'{standin.machine("a")} on smolvm' in run.output and f'{standin.machine("b")} on podman' in run.output


def test_when_no_backend_works_one_paragraph_says_what_each_needs(standin, tmp_path):
    setup_agent(standin)
    without_backend_key(standin)
    path = path_without(BACKEND_CLIS, standin.env()['PATH'], tmp_path)
    run = standin.doit('launch:a', check=False, env=standin.env(PATH=path, BOTTLE_BACKEND=None))
    assert run.returncode == 3 and 'Traceback' not in run.output, run.output
    paragraph = next(line for line in run.output.splitlines() if 'no backend works on this host' in line)
    for needs in ('smolmachines.com/install.sh', 'apt-get install podman', 'docker.io', 'BOTTLE_BACKEND'):
        assert needs in paragraph, paragraph
    assert run.calls == []


def test_a_missing_smolvm_named_by_the_manifest_points_at_the_backend_that_works(standin, tmp_path):
    setup_agent(standin)
    path = path_without({'smolvm'}, standin.env()['PATH'], tmp_path)
    run = standin.doit('launch:a', check=False, env=standin.env(PATH=path))
    assert run.returncode == 1 and 'Traceback' not in run.output
    assert 'smolvm is not installed' in run.output
    assert 'podman works here: set BOTTLE_BACKEND=podman' in run.output
