"""The scenario projects run `doit` on a copy of dodo.py; the `tasks` it imports must be
this checkout's, even when another claude-bottle is importable first."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.bottles import REPO

pytestmark = pytest.mark.fast


def test_the_projects_import_this_checkout_even_past_a_decoy(standin, tmp_path):
    decoy = tmp_path / 'decoy'
    (decoy / 'tasks').mkdir(parents=True)
    (decoy / 'tasks' / '__init__.py').write_text('raise ImportError("the decoy claude-bottle was imported")\n')
    env = standin.env(PYTHONPATH=str(decoy))
    imported = subprocess.run([sys.executable, '-c', 'import tasks; print(tasks.__file__)'], cwd=standin.root,
                              env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert imported == str(REPO / 'tasks' / '__init__.py')
    run = standin.doit('list', env=env)
    assert 'launch' in run.stdout
