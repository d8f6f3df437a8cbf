"""The README's first command, `./demo.sh`: its engine configuration on a machine that has
none, and a fresh clone's demo whose printed command, pasted into a new shell, attaches."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import pytest

from tasks.manifest import default_project_name, machine_name
from tasks.project import Project
from tests.bottles import (REPO, SKIP_ONBOARDING, Bottles, podman_claude_process, remove_podman_containers,
                           tmux_attach)
from tests.conftest import podman_problem


def fresh_clone(clone):
    """A clone of this checkout as it is: its uncommitted changes and new files included."""
    subprocess.run(['git', 'clone', '-q', str(REPO), str(clone)], check=True)
    diff = subprocess.run(['git', 'diff', 'HEAD', '--binary'], cwd=REPO, capture_output=True, check=True).stdout
    if diff:
        subprocess.run(['git', 'apply', '--whitespace=nowarn'], cwd=clone, input=diff, check=True)
    untracked = subprocess.run(['git', 'ls-files', '-z', '--others', '--exclude-standard'], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.split('\0')
    for name in filter(None, untracked):
        (clone / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, clone / name)
    return clone


def kill_claude(machine: str):
    """From the host: the image has no pkill, and the next attach must start its own claude."""
    top = subprocess.run(['podman', 'top', machine, 'hpid', 'args'], capture_output=True, text=True)
    for line in top.stdout.splitlines()[1:]:
        hpid, args = line.split(None, 1)
        if args.split()[0] == 'claude':
            os.kill(int(hpid), signal.SIGKILL)


def hard_limit(name: str) -> str:
    line = next(line for line in open('/proc/self/limits') if line.startswith(name))
    return line.split()[-2]


def configure_under_dash(conf, limits: list[str] = ()):
    """`./demo.sh configure` under dash (Debian's /bin/sh), optionally under lowered hard limits."""
    env = {**os.environ, 'CLAUDE_BOTTLE_ENGINE_CONF': str(conf)}
    return subprocess.run([*limits, 'dash', str(REPO / 'demo.sh'), 'configure'], env=env,
                          capture_output=True, text=True)


@pytest.mark.fast
def test_the_engine_configuration_is_written_under_dash_into_an_empty_directory(tmp_path):
    conf = tmp_path / 'empty' / 'containers.conf.d' / '50-claude-bottle.conf'
    proc = configure_under_dash(conf)
    assert proc.returncode == 0, proc.stderr
    nofile = min(int(hard_limit('Max open files')), 65536)
    nproc = min(int(hard_limit('Max processes')), 4096)
    assert conf.read_text() == (f'[containers]\ndefault_ulimits = ["nofile={nofile}:{nofile}", '
                                f'"nproc={nproc}:{nproc}"]\n\n[engine]\nruntime = "runc"\n')
    assert proc.stderr == ''

    low = tmp_path / 'low' / 'engine.conf'        # hard limits under the caps are taken as they are
    proc = configure_under_dash(low, ['prlimit', '--nofile=1024:1024', '--nproc=500:500'])
    assert proc.returncode == 0, proc.stderr
    assert 'default_ulimits = ["nofile=1024:1024", "nproc=500:500"]' in low.read_text()

    conf.write_text('# the administrator\'s own\n')       # an existing configuration is left alone
    assert configure_under_dash(conf).returncode == 0
    assert conf.read_text() == '# the administrator\'s own\n'


@pytest.mark.fast
def test_the_scripts_ci_runs_are_posix_sh():
    for script in (REPO / 'demo.sh', REPO / '.ci' / 'run'):
        proc = subprocess.run(['dash', '-n', str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, f'{script}: {proc.stderr}'


def test_demo_from_a_fresh_clone_prints_a_command_that_attaches_from_a_new_shell(tmp_path, claude_cache):
    if podman_problem():
        pytest.skip(podman_problem())
    clone = fresh_clone(tmp_path / 'claude-bottle')
    venv = tmp_path / 'venv'      # so that `pip install -e .` in the clone leaves this checkout's install alone
    subprocess.run([sys.executable, '-m', 'venv', '--system-site-packages', str(venv)], check=True)
    env = {**os.environ, 'PATH': f'{venv / "bin"}{os.pathsep}{os.environ["PATH"]}',
           'XDG_CACHE_HOME': str(claude_cache)}
    env.pop('BOTTLE_BACKEND', None)
    env.pop('PYTHONPATH', None)
    machine = machine_name(default_project_name(clone), 'demo')
    try:
        demo = subprocess.run(['./demo.sh'], cwd=clone, env=env, capture_output=True, text=True, timeout=1800)
        assert demo.returncode == 0, demo.stdout + demo.stderr
        lines = demo.stdout.splitlines()
        relaunch = lines[lines.index('or directly with') - 1].strip()
        direct = lines[lines.index('or directly with') + 1].strip()
        assert relaunch == 'BOTTLE_BACKEND=podman doit launch:demo'
        assert direct.startswith('podman exec -it -u agent ') and direct.endswith(
            f'{machine} claude --append-system-prompt-file /home/agent/.claude-bottle/system-prompt.md')
        subprocess.run(['podman', 'exec', machine, 'sh', '-c', SKIP_ONBOARDING], check=True)
        # A new login shell in the clone, as the user would open one: nothing of this run's
        # environment but PATH (where pip put doit), the download cache and the API key.
        shell = {'HOME': env.get('HOME', '/root'), 'PATH': env['PATH'], 'TERM': 'xterm',
                 'XDG_CACHE_HOME': env['XDG_CACHE_HOME'], 'ANTHROPIC_API_KEY': 'sk-test-not-a-key'}
        for command in (relaunch, direct):
            attached = tmux_attach(clone, command, shell, lambda: podman_claude_process(machine))
            assert attached.ok, attached.output
            assert attached.claude['user'] == 'agent' and attached.claude['uid'] != '0'
            assert attached.claude['args'] == ('--append-system-prompt-file '
                                               '/home/agent/.claude-bottle/system-prompt.md')
            assert attached.claude['tty'] == 'yes'
            kill_claude(machine)
    finally:
        remove_podman_containers(Project(clone).label)
        Bottles.stop_daemons_of(clone)
