"""When the backend misbehaves or the user presses Ctrl-C: one readable line, never a
traceback, and the next run finishes the work. The backend's CLI is wrapped in a shim that
injects the fault; everything else is real. A garbage probe is tried on every backend; crashes
and Ctrl-C at each step on the stand-in, whose calls are the quickest."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.scenario import assert_fully_provisioned, setup_agent

pytestmark = pytest.mark.extended

# The backend's CLI with one fault, chosen by FAULT:
#   garbage-probe     the machine listing (`smolvm machine ls`, `podman ps`, `docker ps`) prints
#                     JSON that is not a list of machines
#   crash:WORDS       a call whose argv contains WORDS dies of SIGSEGV
#   pause:WORDS       the first call whose argv contains WORDS writes $FAULT_MARK and waits
FAULTY_CLI = '''#!/bin/sh
case "$FAULT" in
  garbage-probe)
    case "$1 $2" in "machine ls"|ps*) echo '[{"nam": "bottle-x", "labels": 7}]'; exit 0 ;; esac ;;
  crash:*)
    case "$*" in *"${FAULT#crash:}"*) kill -SEGV $$ ;; esac ;;
  pause:*)
    case "$*" in *"${FAULT#pause:}"*)
      if [ ! -e "$FAULT_MARK" ]; then echo "$*" > "$FAULT_MARK"; sleep 120; fi ;;
    esac ;;
esac
exec {real} "$@"
'''


def with_fault(bottles, tmp_path):
    """The project, with its backend CLI behind a shim that injects the fault named by FAULT."""
    cli = bottles.backend.cli
    real = shutil.which(cli, path=bottles.env()['PATH'])
    shim = tmp_path / 'faulty-bin'
    shim.mkdir()
    (shim / cli).write_text(FAULTY_CLI.replace('{real}', real))
    (shim / cli).chmod(0o755)
    bottles.own_images()            # a fault may be injected into the pack
    setup_agent(bottles)

    def env(fault: str, **more) -> dict:
        return bottles.env(PATH=f'{shim}{os.pathsep}{bottles.env()["PATH"]}', FAULT=fault, **more)
    bottles.faulty_env = env
    return bottles


@pytest.fixture
def faulty(standin, tmp_path):
    return with_fault(standin, tmp_path)


def assert_one_clear_failure(run, *words):
    assert run.returncode == 1, run.output
    assert 'Traceback' not in run.output, run.output
    for word in words:
        assert word in run.output, run.output


def test_a_probe_that_returns_garbage_fails_the_task_in_words_and_the_next_run_completes(bottles, tmp_path):
    faulty = with_fault(bottles, tmp_path)
    run = faulty.doit('launch:a', check=False, env=faulty.faulty_env('garbage-probe'))
    assert_one_clear_failure(run, 'TaskFailed', 'printed what is not a list of', 'supported version')
    faulty.doit('launch:a')
    assert_fully_provisioned(faulty)


# {a}: agent a's machine name, which carries the checkout's name
@pytest.mark.parametrize('step', ['machine create --name {a}', 'machine start --name {a}',
                                  'pack create', 'machine exec --name {a}'])
def test_a_backend_cli_that_crashes_fails_the_task_in_words_and_the_next_run_completes(faulty, step):
    run = faulty.doit('launch:a', check=False, env=faulty.faulty_env(f'crash:{step.format(a=faulty.machine("a"))}'))
    assert_one_clear_failure(run, 'TaskFailed', 'was killed by SIGSEGV')
    faulty.doit('launch:a')
    assert_fully_provisioned(faulty)


@pytest.mark.parametrize('step', ['machine ls', 'machine create --name bottle-build-', 'pack create',
                                  'machine create --name {a}', 'machine start --name {a}',
                                  'machine exec --name {a}'])
def test_ctrl_c_at_each_step_prints_one_line_and_the_next_run_completes(faulty, tmp_path, step):
    mark = tmp_path / 'paused'
    # A terminal's Ctrl-C reaches the whole foreground process group: doit and the smolvm it runs.
    proc = subprocess.Popen([sys.executable, '-m', 'doit', 'launch:a'], cwd=faulty.root,
                            env=faulty.faulty_env(f'pause:{step.format(a=faulty.machine("a"))}', FAULT_MARK=str(mark)),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    deadline = time.monotonic() + 300
    while not mark.exists():
        assert proc.poll() is None and time.monotonic() < deadline, f'never reached {step!r}'
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGINT, output       # the shell shows 130, as for any Ctrl-C
    assert 'Traceback' not in output, output
    interrupted = [line for line in output.splitlines() if 'interrupted' in line]
    assert len(interrupted) == 1 and 'run the same command again' in interrupted[0], output
    faulty.doit('launch:a')
    assert_fully_provisioned(faulty)
