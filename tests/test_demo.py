"""The README's commands, `./demo.sh` and `./test.sh`: POSIX sh, as are the CI's scripts; the demo's
engine configuration on a machine that has none; a fresh clone's demo whose printed command, pasted
into a new shell, attaches. (Both commands on a pristine Debian 12 root: the CI step, .ci/pristine.)"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tasks.launch import relaunch_command
from tasks.manifest import default_project_name, machine_name
from tasks.backends.disk import release_under
from tasks.project import Project
from tests.bottles import (REPO, SKIP_ONBOARDING, Bottles, podman_claude_process, remove_podman_containers,
                           tmux_attach)
from tests.conftest import podman_problem

SYSTEM_PATH = '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'     # a new root shell's on Debian


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
    scripts = [REPO / 'demo.sh', REPO / 'test.sh', *sorted(p for p in (REPO / '.ci').iterdir() if p.is_file())]
    assert REPO / '.ci' / 'run' in scripts
    for script in scripts:
        assert script.read_text().startswith('#!/bin/sh\n'), script
        proc = subprocess.run(['dash', '-n', str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, f'{script}: {proc.stderr}'


@pytest.mark.fast
def test_the_printed_command_names_a_doit_that_a_new_shell_finds(tmp_path, monkeypatch):
    """`doit` only when it is this Python's and on PATH; else the script's absolute path (a venv's,
    such as demo.sh's .venv); else this Python's `-m doit`. A new shell has neither the venv on PATH
    nor the backend this run chose."""
    project = tmp_path / 'my project'
    (project / 'agents').mkdir(parents=True)
    (project / 'agents' / 'a.yaml').write_text('backend: podman\nsupervise: false\n')
    agent = Project(project).agents['a']
    bindir = tmp_path / 'a venv' / 'bin'
    bindir.mkdir(parents=True)
    python = bindir / 'python'
    python.touch()
    monkeypatch.setattr(sys, 'executable', str(python))
    monkeypatch.setenv('PWD', str(project))
    monkeypatch.setenv('BOTTLE_BACKEND', 'podman')
    monkeypatch.setenv('PATH', '/usr/bin:/bin')
    assert relaunch_command(Project(project), agent) == f"BOTTLE_BACKEND=podman '{python}' -m doit launch:a"
    doit = bindir / 'doit'
    doit.write_text('#!/bin/sh\n')
    doit.chmod(0o755)
    assert relaunch_command(Project(project), agent) == f"BOTTLE_BACKEND=podman '{doit}' launch:a"
    monkeypatch.setenv('PATH', f'{bindir}:/usr/bin:/bin')      # the venv activated
    assert relaunch_command(Project(project), agent) == 'BOTTLE_BACKEND=podman doit launch:a'
    monkeypatch.delenv('BOTTLE_BACKEND')
    monkeypatch.setenv('PWD', str(tmp_path))
    assert relaunch_command(Project(project), agent) == f"cd '{project}' && doit launch:a"


def share_test_packages(venv: Path):
    """The venv demo.sh makes, made ahead with this Python's packages on its path: demo.sh then
    finds a working venv and its `pip install -e .` has only claude-bottle itself to install, so the
    test downloads nothing. (That demo.sh makes the venv on a machine without one, python3-venv
    included, the CI's pristine Debian 12 root proves: .ci/pristine.)"""
    subprocess.run([sys.executable, '-m', 'venv', str(venv)], check=True)
    purelib = subprocess.run([str(venv / 'bin' / 'python'), '-c', 'import sysconfig; print(sysconfig.get_path("purelib"))'],
                             capture_output=True, text=True, check=True).stdout.strip()
    ours = dict.fromkeys(sysconfig.get_path(name) for name in ('purelib', 'platlib'))
    (Path(purelib) / 'claude-bottle-test-packages.pth').write_text(''.join(f'{path}\n' for path in ours))


def test_demo_from_a_fresh_clone_prints_a_command_that_attaches_from_a_new_shell(tmp_path, claude_cache):
    if podman_problem():
        pytest.skip(podman_problem())
    clone = fresh_clone(tmp_path / 'claude-bottle')
    venv = clone / '.venv'
    share_test_packages(venv)
    env = {**os.environ, 'XDG_CACHE_HOME': str(claude_cache)}
    env.pop('BOTTLE_BACKEND', None)
    env.pop('PYTHONPATH', None)
    env.pop('VIRTUAL_ENV', None)
    machine = machine_name(default_project_name(clone), 'demo')
    try:
        demo = subprocess.run(['./demo.sh'], cwd=clone, env=env, capture_output=True, text=True, timeout=1800)
        assert demo.returncode == 0, demo.stdout + demo.stderr
        lines = demo.stdout.splitlines()
        relaunch = lines[lines.index('or directly with') - 1].strip()
        direct = lines[lines.index('or directly with') + 1].strip()
        # the venv's doit, by its absolute path (no doit script here: the shared packages had doit)
        doit = venv / 'bin' / 'doit'
        doit = str(doit) if doit.exists() else f'{venv / "bin" / "python"} -m doit'
        assert relaunch == f'BOTTLE_BACKEND=podman {doit} launch:demo'
        assert direct.startswith('podman exec -it -u agent ') and direct.endswith(
            f'{machine} claude --append-system-prompt-file /home/agent/.claude-bottle/system-prompt.md')
        assert (venv / '.installed').read_bytes() == (clone / 'pyproject.toml').read_bytes()
        subprocess.run(['podman', 'exec', machine, 'sh', '-c', SKIP_ONBOARDING], check=True)
        # A new login shell in the clone, as the user would open one: a plain PATH (not the venv's),
        # the download cache and the API key, nothing else of this run's environment.
        shell = {'HOME': env.get('HOME', '/root'), 'PATH': SYSTEM_PATH, 'TERM': 'xterm',
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
        release_under(clone)        # the demo bottle's disk, which podman's own `rm -f` leaves mounted
        Bottles.stop_daemons_of(clone)
