"""The host programs claude-bottle starts are all declared, each with its Debian package, in
daemons/hostprograms.py, which demo.sh and test.sh install from. The scenario that records what the code
really starts is in tests/test_git_gate.py (gate, supervisor, proxy and doors on every backend); here,
the recorder and the check themselves (tests/audit_log.py), and the declaration's words."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from daemons.hostprograms import PROGRAMS, HostProgramMissing, main, missing_packages, require
from tests.audit_log import assert_declared, recorded, undeclared

pytestmark = pytest.mark.fast

AUDIT = Path(__file__).resolve().parent / 'audit'


def test_the_recorder_sees_every_way_a_python_process_starts_a_program(tmp_path):
    log = tmp_path / 'audit.jsonl'
    code = ('import os, subprocess, sys\n'
            'subprocess.run(["true"])\n'
            'subprocess.run("exit 0", shell=True)\n'
            'pid = os.posix_spawnp("git", ["git", "--version"], dict(os.environ))\n'
            'os.waitpid(pid, 0)\n'
            'os.execvp("env", ["env", "true"])\n')
    env = {**os.environ, 'PYTHONPATH': str(AUDIT), 'CLAUDE_BOTTLE_AUDIT_LOG': str(log)}
    subprocess.run([sys.executable, '-c', code], env=env, check=True, capture_output=True)
    # (execvp tries each PATH directory in turn: one record per try)
    assert list(dict.fromkeys(r['program'] for r in recorded(log))) == ['true', 'sh', 'git', 'env']
    # an undeclared program fails the check, naming it and what started it
    assert undeclared(recorded(log)) == {'true': '-c', 'sh': '-c', 'env': '-c'}
    with pytest.raises(AssertionError, match="not declared in daemons/hostprograms.py.*'true'"):
        assert_declared(log)


def test_without_the_variable_nothing_is_recorded(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != 'CLAUDE_BOTTLE_AUDIT_LOG'}
    env['PYTHONPATH'] = str(AUDIT)
    subprocess.run([sys.executable, '-c', 'import subprocess; subprocess.run(["true"])'], env=env, check=True,
                   cwd=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_missing_program_is_one_line_naming_its_package(monkeypatch, tmp_path):
    monkeypatch.setenv('PATH', str(tmp_path))
    monkeypatch.setattr('daemons.hostprograms.SBIN', ())
    with pytest.raises(HostProgramMissing) as missing:
        require('socat')
    assert str(missing.value) == ("socat is not installed on this host: it is needed for the tests' stand-in for the "
                                  "relay inside a bottle; install it (apt-get install socat) and run the same command "
                                  "again")
    assert '\n' not in str(missing.value)
    assert missing_packages('demo') == ['podman', 'runc', 'e2fsprogs', 'mount', 'debootstrap', 'tar', 'npm', 'git']
    assert 'docker.io' in missing_packages('tests') and missing_packages('tests').count('docker.io') == 1


def test_the_command_line_prints_what_demo_sh_installs(capsys):
    assert main(['missing', 'demo']) == 0
    assert capsys.readouterr().out.split() == missing_packages('demo')
    assert main(['table']) == 0
    table = capsys.readouterr().out
    assert all(name in table for name in PROGRAMS)
    assert main(['nonsense']) == 2


def test_the_readme_lists_the_declaration_as_it_prints_it():
    table = subprocess.run([sys.executable, '-m', 'daemons.hostprograms', 'table'], capture_output=True, text=True,
                           check=True, cwd=AUDIT.parent.parent).stdout
    readme = (AUDIT.parent.parent / 'README.md').read_text()
    assert ''.join(f'    {line}\n' for line in table.splitlines()) in readme
