"""The README's first command, `./demo.sh`, from a fresh clone; then its printed attach
command on a real terminal (tmux) starts Claude Code in the bottle."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tasks.project import Project
from tests.bottles import REPO, SKIP_ONBOARDING, podman_claude_process, remove_podman_containers, tmux_attach
from tests.conftest import podman_problem


def test_demo_from_a_fresh_clone_ends_with_a_working_attach_command(tmp_path, claude_cache):
    if podman_problem():
        pytest.skip(podman_problem())
    clone = tmp_path / 'claude-bottle'
    subprocess.run(['git', 'clone', '-q', str(REPO), str(clone)], check=True)
    venv = tmp_path / 'venv'      # so that `pip install -e .` in the clone leaves this checkout's install alone
    subprocess.run([sys.executable, '-m', 'venv', '--system-site-packages', str(venv)], check=True)
    env = {**os.environ, 'PATH': f'{venv / "bin"}{os.pathsep}{os.environ["PATH"]}',
           'XDG_CACHE_HOME': str(claude_cache)}
    env.pop('BOTTLE_BACKEND', None)
    try:
        demo = subprocess.run(['./demo.sh'], cwd=clone, env=env, capture_output=True, text=True, timeout=1800)
        assert demo.returncode == 0, demo.stdout + demo.stderr
        lines = demo.stdout.splitlines()
        attach = lines[lines.index('or directly with') + 1].strip()
        assert attach.startswith('podman exec -it -u agent ') and attach.endswith(
            'bottle-demo claude --append-system-prompt-file /home/agent/.claude-bottle/system-prompt.md')
        subprocess.run(['podman', 'exec', 'bottle-demo', 'sh', '-c', SKIP_ONBOARDING], check=True)
        attached = tmux_attach(clone, attach, env, lambda: podman_claude_process('bottle-demo'))
        assert attached.ok, attached.output
        assert attached.claude['user'] == 'agent' and attached.claude['uid'] != '0'
        assert attached.claude['args'] == '--append-system-prompt-file /home/agent/.claude-bottle/system-prompt.md'
        assert attached.claude['tty'] == 'yes'
    finally:
        remove_podman_containers(Project(clone).label)
