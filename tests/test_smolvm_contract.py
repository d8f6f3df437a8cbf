"""The smolvm backend against the real smolvm 1.32.2 CLI (tests/real_smolvm.py; test.sh installs it), which
parses every command here but cannot boot a VM on these machines (issue 24, its first part).

Every command line the backend sent in a stand-in launch (each kind once: ls, create from an image and from
a pack, update, pack create, start, exec as root and through the agent's setpriv, cp, stop, delete, with
labels, cpus, mem, env and the door's --mount-socket) and the attach command are given to the real binary,
in a HOME of the test's own where no machine exists: each must get past the parser (clap answers a line it
cannot parse with exit code 2 and "error: ..."), whatever it then says of the machine. A misspelt flag is
refused the same way, so the check cannot pass by not checking. The backend reads the real `machine ls
--json`."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest

from tasks.backends.protocol import BackendError
from tasks.backends.smolvm import Smolvm
from tests.conftest import CACHE_ENV
from tests.real_smolvm import VERSION, binary
from tests.scenario import TEST_SECRET, TEST_SECRET_NETWORK, setup_agent

pytestmark = pytest.mark.fast
CALL_SECONDS = 60


@pytest.fixture(scope='module')
def real(tmp_path_factory) -> dict:
    """How to run the real smolvm: {'argv0': binary, 'env': a HOME of its own}."""
    found = binary(Path(os.environ[CACHE_ENV])) if os.environ.get(CACHE_ENV) else None
    if found is None:
        pytest.skip(f'the real smolvm {VERSION} is not installed: ./test.sh installs it (python -m tests.real_smolvm)')
    home = tmp_path_factory.mktemp('real-smolvm-home')
    return {'argv0': str(found), 'env': {'PATH': os.environ['PATH'], 'HOME': str(home)}, 'home': home}


def run_real(real: dict, argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([real['argv0'], *argv], env=real['env'], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=CALL_SECONDS)


def parse_refusal(proc: subprocess.CompletedProcess) -> str | None:
    """What the real parser said, when it refused the command line (clap: exit 2, "error: ...")."""
    if proc.returncode == 2 and proc.stderr.lstrip().startswith('error:'):
        return proc.stderr.strip()
    return None


def test_a_misspelt_flag_is_a_parse_refusal(real):
    assert parse_refusal(run_real(real, ['machine', 'exec', '--nmae', 'x', '--', 'true'])), 'not refused'
    assert parse_refusal(run_real(real, ['machine', 'create', '--name', 'x', '--memory', '512'])), 'not refused'
    assert parse_refusal(run_real(real, ['machine', 'ls', '--json'])) is None


def test_every_command_the_backend_sends_gets_past_the_real_parser(standin, real):
    standin.own_images()            # the launch builds its image: the commands of a build are replayed too
    setup_agent(standin, secrets=[TEST_SECRET], network=TEST_SECRET_NETWORK)
    run = standin.doit('launch:a', env=standin.env(BOTTLE_TEST_SECRET='value-never-printed'))
    standin.doit('teardown:a')
    calls = standin.backend.calls_since(0)
    attach = next(line for line in run.stdout.splitlines() if line.strip().startswith('smolvm machine exec'))
    calls.append(shlex.split(attach)[1:])          # the printed attach command, as a shell splits it
    by_form: dict[tuple, list[str]] = {}        # each kind of call with each set of flags, once
    for argv in calls:
        head = argv[:argv.index('--')] if '--' in argv else argv
        kind = standin.backend.kind(argv) + (' as agent' if 'setpriv' in argv else '')
        by_form.setdefault((kind, *sorted({a.split('=')[0] for a in head if a.startswith('-')})), argv)
    assert {'probe', 'create', 'update', 'pack', 'start', 'exec', 'exec as agent', 'cp', 'stop', 'delete'} <= \
        {form[0] for form in by_form}, sorted(by_form)
    assert any(form[0] == 'create' and {'--from', '--mount-socket', '--label', '-e', '--cpus', '--mem'} <= set(form)
               for form in by_form), sorted(by_form)
    refused = {' '.join(form): said for form, argv in by_form.items() if (said := parse_refusal(run_real(real, argv)))}
    assert refused == {}, refused
    left = json.loads(run_real(real, ['machine', 'ls', '--json']).stdout)
    for machine in left:
        run_real(real, ['machine', 'delete', '--name', machine['name'], '-f'])
    assert [machine['name'] for machine in left] == []       # what a replay made, a replay of delete removed

def test_the_backend_reads_the_real_machine_list_and_names_what_needs_a_running_machine(real, monkeypatch, tmp_path):
    shim = tmp_path / 'bin'
    shim.mkdir()
    (shim / 'smolvm').write_text(f'#!/bin/sh\nexec {real["argv0"]} "$@"\n')
    (shim / 'smolvm').chmod(0o755)
    monkeypatch.setenv('PATH', f'{shim}{os.pathsep}{os.environ["PATH"]}')
    monkeypatch.setenv('HOME', real['env']['HOME'])
    rootfs = tmp_path / 'rootfs'
    (rootfs / 'etc').mkdir(parents=True)
    (rootfs / 'etc' / 'os-release').write_text('ID=debian\n')
    name = 'contract-listed'
    created = run_real(real, ['machine', 'create', '--name', name, '--image', str(rootfs), '--label',
                              'claude-bottle.agent=a', '--', 'sleep', 'infinity'])
    assert created.returncode == 0, created.stderr
    try:
        backend = Smolvm()
        listed = backend._probe()
        assert listed[name].state == 'created' and listed[name].labels == {'claude-bottle.agent': 'a'}, listed
        with pytest.raises(BackendError) as failed:
            backend.exec(name, ['true'])
        assert f"machine '{name}' is not running" in str(failed.value), failed.value
    finally:
        assert run_real(real, ['machine', 'delete', '--name', name, '-f']).returncode == 0
    assert name not in backend._probe()
