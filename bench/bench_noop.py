#!/usr/bin/env python3
"""The no-op launch against its floor, and where a cold launch's time goes.

    python bench/bench_noop.py [--runs N] [--backends podman,standin,podman-remote] [--cache DIR]

For each backend: a throwaway project with one supervised agent (a prompt, two skills), launched once
(the cold launch, timed task by task from doit's JSON reporter), then, side by side in one loop, N rounds
(default 9, at least 7) of three whole processes:

    floor   `python -c "import doit, yaml"` (the interpreter starting and importing doit and PyYAML)
            plus the one backend probe claude-bottle makes (`podman ps -a --format json`, or the
            stand-in's `smolvm machine ls --json`), each its own process, their times added
    no-op   `python -m doit launch:a` with nothing changed

It prints the medians and their ratio (the target is at most 2.0 on podman), and checks that the no-op
made exactly one backend call and ran no task but `launch`. The project's own modules are part of what is
measured, not of the floor; their bytecode is compiled first, as an installed package has it.

podman needs root and the debootstrap base (built into the cache the first time, minutes); the stand-in
needs bubblewrap. podman-remote runs the agent on the tests' worker (tests/remote_worker.py: sshd and a podman
API service of its own on a loopback address), its door forwarded over SSH: its floor is the remote probe
(`podman --connection w ps -a --format json`), and its no-op also asks podman for its connections. The images get the tests' small stand-in for Claude Code: the image does not matter to
a no-op, and a cold launch's image build is shown as one phase.
"""
from __future__ import annotations

import argparse
import compileall
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.bottles import Bottles, Podman, StandinSmolvm, make_fake_claude_archive, make_standin_images  # noqa: E402
from tests.standin import harness  # noqa: E402

PROMPT = 'You are the benchmark agent. Keep changes small and explain each one.'
# The phases of a cold launch, by task family (the part of a task's name before the colon).
PHASES = {
    'image and its inputs': ('claude_code', 'base', 'image'),
    'egress: CA, rules, proxy and door': ('egress_env', 'egress_ca', 'allowlist', 'egress'),
    'the door forwarded to the worker': ('forward',),
    'git gate and supervisor': ('gate', 'supervisor'),
    'machine created and started': ('machine', 'start'),
    'provisioning (CA, git, supervisor, prompt, skills)': ('provision_ca', 'provision_git', 'provision_supervise',
                                                             'provision_prompt', 'provision_skill', 'provision_skills'),
    'launch (prints how to attach)': ('launch',),
}


class BenchFailure(Exception):
    pass


def wall(argv: list[str], env: dict, cwd: Path) -> float:
    started = time.perf_counter()
    proc = subprocess.run(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise BenchFailure(f'`{" ".join(argv)}` exited {proc.returncode}:\n{proc.stdout.decode()}{proc.stderr.decode()}')
    return seconds


def cold_phases(bottles: Bottles) -> tuple[float, dict[str, float]]:
    """The first launch, whole, and the time of each phase (the tasks' own, from doit's JSON reporter)."""
    started = time.perf_counter()
    run = bottles.doit('--reporter=json', 'launch:a', check=False)
    total = time.perf_counter() - started
    if run.returncode != 0:
        raise BenchFailure(f'the cold launch failed:\n{run.output}')
    report = json.loads(run.stdout[run.stdout.index('{'):])
    phases = dict.fromkeys(PHASES, 0.0)
    for task in report['tasks']:
        family = task['name'].split(':')[0]
        phase = next((p for p, families in PHASES.items() if family in families), None)
        if phase and task.get('elapsed'):
            phases[phase] += float(task['elapsed'])
    return total, phases


def project(tmp: Path, backend, **manifest) -> Bottles:
    bottles = Bottles(tmp / 'project', backend)
    bottles.supervise()                  # as a user's agents are by default
    for skill in ('review', 'style'):
        bottles.skill(skill)
    bottles.agent('a', prompt=PROMPT, skills=['review', 'style'], **manifest)
    return bottles


def remote_project(work: Path, cache: Path, stack: contextlib.ExitStack) -> tuple[Bottles, list[str]]:
    """A project whose agent runs on the tests' worker, and the probe of that engine."""
    from tests.remote_worker import Worker
    from tests.test_engines import _host_settings
    (work / 'worker-control').mkdir()
    worker = stack.enter_context(Worker(work / 'worker-control'))
    home = work / 'home'
    (home / '.ssh').mkdir(parents=True, mode=0o700)
    (home / '.ssh' / 'known_hosts').write_text(worker.known_hosts.read_text())
    conf = work / 'containers.conf'
    conf.write_text(_host_settings() + f'\n[engine.service_destinations.w]\nuri = "{worker.uri}"\n'
                                       f'identity = "{worker.key}"\n')
    bottles = project(work, Podman(work, cache), engine='w')
    bottles.extra_env.update(CONTAINERS_CONF=str(conf), HOME=str(home))
    stack.callback(lambda: worker.ssh('rm', '-rf', '/root/.claude-bottle', check=False))
    return bottles, ['podman', '--connection', 'w', 'ps', '-a', '--format', 'json']


def measure(name: str, bottles: Bottles, probe: list[str], plain_env: dict, runs: int, log) -> dict:
    log(f'{name}: cold launch')
    cold, phases = cold_phases(bottles)
    bottles.doit('launch:a')             # settles anything a first run leaves (renders remembered, ...)
    check = bottles.doit('launch:a')     # through the backend's logged CLI: what a no-op does
    expected = {'probe': 1, 'system': 1} if name == 'podman-remote' else {'probe': 1}   # and podman's connections
    if check.kinds != expected or check.executed != {'launch:a'}:
        raise BenchFailure(f'{name}: a no-op launch made {dict(check.kinds)} and ran {sorted(check.executed)}')
    floor_python = [sys.executable, '-c', 'import doit, yaml']
    noop = [sys.executable, '-m', 'doit', 'launch:a']
    floors, noops = [], []
    log(f'{name}: {runs} rounds of floor and no-op, side by side')
    for _ in range(runs):
        floors.append(wall(floor_python, plain_env, bottles.root) + wall(probe, plain_env, bottles.root))
        noops.append(wall(noop, plain_env, bottles.root))
    floor, noop_median = statistics.median(floors), statistics.median(noops)
    return {'backend': name, 'floor': floor, 'noop': noop_median, 'ratio': noop_median / floor,
            'spread': (min(noops), max(noops)), 'cold': cold, 'phases': phases}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--runs', type=int, default=9, help='rounds of floor and no-op (at least 7)')
    parser.add_argument('--backends', default='podman,standin',
                        help='comma-separated: podman, standin, podman-remote')
    parser.add_argument('--cache', type=Path, default=Path(os.environ.get('BOTTLE_TEST_CACHE') or
                                                          Path.home() / '.cache' / 'claude-bottle-bench'),
                        help='download cache (Claude Code, the debootstrap base); kept between runs')
    args = parser.parse_args()
    if args.runs < 7:
        parser.error('--runs: at least 7')
    compileall.compile_dir(REPO / 'tasks', quiet=1)
    compileall.compile_dir(REPO / 'daemons', quiet=1)

    def log(text):
        print(f'[{time.strftime("%H:%M:%S")}] {text}', file=sys.stderr, flush=True)

    args.cache.mkdir(parents=True, exist_ok=True)
    make_fake_claude_archive(args.cache)
    results = []
    with tempfile.TemporaryDirectory(prefix='bench-noop-') as tmp_text, \
            contextlib.ExitStack() as stack:
        tmp = Path(tmp_text)
        for name in args.backends.split(','):
            work = tmp / name
            work.mkdir()
            if name == 'podman-remote':
                bottles, probe = remote_project(work, args.cache, stack)
            elif name == 'standin':
                backend = StandinSmolvm(work, make_standin_images(work / 'images'), args.cache)
                probe = ['smolvm', 'machine', 'ls', '--json']
            elif name == 'podman':
                backend = Podman(work, args.cache)
                probe = ['podman', 'ps', '-a', '--format', 'json']
            else:
                parser.error(f'unknown backend {name!r}')
            if name != 'podman-remote':
                bottles = project(work, backend)
            plain = bottles.env()
            if name.startswith('podman'):       # timed without the tests' logging shim in front of podman
                plain['PATH'] = os.environ['PATH']
            try:
                results.append(measure(name, bottles, probe, plain, args.runs, log))
            finally:
                bottles.doit('teardown:a', check=False)
                bottles.stop_daemons()
                if name == 'standin':
                    harness.stop_all(backend.data)

    print(f'no-op launch against its floor (medians of {args.runs} whole-process runs each, supervised; '
          f'Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f} at the end)')
    print(f'{"backend":13} {"floor s":>8} {"no-op s":>8} {"ratio":>6}  no-op range')
    for r in results:
        print(f'{r["backend"]:13} {r["floor"]:8.3f} {r["noop"]:8.3f} {r["ratio"]:6.2f}  '
              f'{r["spread"][0]:.3f}-{r["spread"][1]:.3f}')
    for r in results:
        print(f'\ncold launch on {r["backend"]}: {r["cold"]:.1f} s in all; by phase (the tasks\' own time):')
        for phase, seconds in r['phases'].items():
            print(f'  {phase:52} {seconds:6.2f} s')
        rest = r['cold'] - sum(r['phases'].values())
        print(f'  {"doit, Python and the up-to-date checks":52} {rest:6.2f} s')
    return 0


if __name__ == '__main__':
    try:
        sys.exit(main())
    except BenchFailure as err:
        print(f'bench failed: {err}', file=sys.stderr)
        sys.exit(1)
