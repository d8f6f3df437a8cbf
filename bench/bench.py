#!/usr/bin/env python3
"""Provisioning benchmark: claude-bottle against the original mkdir + cp system.

    python bench/bench.py [--latency-ms N] [--quick] [--keep]

Everything runs against the smolvm stand-in (tests/standin/smolvm), which really
executes guest commands with bubblewrap and sleeps a fixed latency at the start of
every call, like a real CLI round trip. Four scenarios:

    cold launch          machine created, started and provisioned from nothing
    no-op relaunch       launch again, nothing changed
    one skill file edited
    N agents no-op       every agent of a fleet provisioned again, nothing changed

claude-bottle side: a throwaway project (tests.bottles.Bottles) driven through the
real CLI, `python -m doit launch:a` (stdin is not a terminal, so launch prints the
attach command instead of attaching) and `python -m doit provision` for the fleet.
Backend calls are read from the stand-in's call log for exactly that invocation;
time is the wall time of the whole invocation (Python and doit start-up included).

Baseline side ("the original system"): `Baseline.launch` below does, on EVERY
launch, what the original system did: `smolvm machine start` (idempotent), then per
skill one `exec ... mkdir -p` of its directories and one `machine cp` per file, plus
one `cp` of the prompt. It runs against its own stand-in data dir with the same
latency and is really executed, so its time is measured, not estimated.

Cold launch, both sides: the image is already built (packed once, beforehand, by
claude-bottle's own `doit image`; its cost is printed but is in neither column), and
both sides create the machine from that same packed image, start it and provision it.
claude-bottle's side also opens the bottle's egress door (the project's proxy started, its
CA made) and provisions the CA, which the original system did not have: that is in its column.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.bottles import Bottles, StandinSmolvm, make_fake_claude_archive, make_standin_images  # noqa: E402
from tests.standin import harness  # noqa: E402

# 50 ms: the order of one real smolvm CLI round trip (process start, connect to the
# machine's agent, one request and its answer), which is what each call costs in
# real use on top of the work it does. The stand-in sleeps it at the start of every call.
DEFAULT_LATENCY_MS = 50

HOME = '/home/agent'
GUEST_SKILLS = f'{HOME}/.claude/skills'
GUEST_PROMPT = f'{HOME}/.claude-bottle/system-prompt.md'
UID = 1000
PROMPT = 'You are the benchmark agent. Keep changes small and explain each one.'

# The 10 files of every skill: a SKILL.md, loose documents, and two subdirectories.
SKILL_FILES = ['SKILL.md', 'reference.md', 'checklist.md', 'glossary.md', 'template.md',
               'scripts/run.sh', 'scripts/check.py', 'examples/one.md', 'examples/two.md',
               'examples/three.md']
EDITED_FILE = 'examples/two.md'


class BenchFailure(Exception):
    """A doit invocation or a baseline call failed; the message carries its output."""


@dataclass
class Shape:
    skills: int            # skills of the single agent
    fleet: int             # agents in the fleet scenario
    fleet_skills: int      # skills of each fleet agent
    files: int = len(SKILL_FILES)


@dataclass
class Measure:
    calls: int
    seconds: float
    kinds: Counter
    argvs: list[list[str]]
    output: str = ''


# --- the data ----------------------------------------------------------------------------------

def skill_files(name: str) -> dict[str, str]:
    body = ''.join(f'- point {i} of {name}: keep it short, test it, name it well.\n' for i in range(20))
    files = {}
    for rel in SKILL_FILES:
        if rel == 'SKILL.md':
            files[rel] = f'---\nname: {name}\ndescription: benchmark skill {name}\n---\nDo {name}.\n{body}'
        elif rel.endswith('.sh'):
            files[rel] = f'#!/bin/sh\necho {name}\n'
        elif rel.endswith('.py'):
            files[rel] = f'print({name!r})\n'
        else:
            files[rel] = f'# {rel} of {name}\n{body}'
    return files


def make_project(root: Path, backend: StandinSmolvm, agents: dict[str, list[str]]) -> Bottles:
    bottles = Bottles(root, backend)
    bottles.supervise()                 # as a user's agents are by default
    for skill in sorted({s for skills in agents.values() for s in skills}):
        bottles.skill(skill, skill_files(skill))
    for name, skills in agents.items():
        bottles.agent(name, prompt=PROMPT, skills=skills)
    return bottles


# --- claude-bottle side ------------------------------------------------------------------------

def doit(bottles: Bottles, *args: str) -> Measure:
    started = time.perf_counter()
    run = bottles.doit(*args, check=False)
    seconds = time.perf_counter() - started
    if run.returncode != 0:
        raise BenchFailure(f'`doit {" ".join(args)}` exited {run.returncode} in {bottles.root}:\n{run.output}')
    return Measure(len(run.calls), seconds, run.kinds, run.calls, run.output)


def image_artifact(bottles: Bottles) -> Path:
    found = sorted((bottles.root / '.bottle' / 'images').glob('*/image.smolmachine'))
    if len(found) != 1:
        raise BenchFailure(f'expected one packed image in {bottles.root}/.bottle/images, found {found}')
    return found[0]


# --- baseline side: the original system --------------------------------------------------------

class Baseline:
    """The original system against its own stand-in data dir: no state, everything every time."""

    def __init__(self, data: Path, index: Path, latency_ms: int):
        self.data = data
        self.env = {**os.environ, **harness.standin_env(data, index, latency_ms)}

    def smolvm(self, *args: str) -> str:
        proc = subprocess.run(['smolvm', *args], env=self.env, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            raise BenchFailure(f'baseline `smolvm {" ".join(args[:6])} ...` exited {proc.returncode}:\n'
                               f'{proc.stdout}{proc.stderr}')
        return proc.stdout

    def create(self, machine: str, image: Path):
        self.smolvm('machine', 'create', '--name', machine, '--from', str(image), '--cpus', '2',
                    '--mem', '2048', '--', 'sleep', 'infinity')

    def launch(self, machine: str, skills_root: Path, skills: list[str], prompt: Path):
        """What the original system did on every launch."""
        self.smolvm('machine', 'start', '--name', machine)        # idempotent
        for skill in skills:
            source = skills_root / skill
            files = sorted(p for p in source.rglob('*') if p.is_file())
            dirs = sorted({f'{GUEST_SKILLS}/{skill}/{p.parent.relative_to(source)}'.removesuffix('/.')
                           for p in files})
            self.smolvm('machine', 'exec', '--name', machine, '--', 'mkdir', '-p', *dirs)
            for path in files:
                self.smolvm('machine', 'cp', str(path),
                            f'{machine}:{GUEST_SKILLS}/{skill}/{path.relative_to(source)}',
                            '--mode', '644', '--uid', str(UID), '--gid', str(UID))
        self.smolvm('machine', 'cp', str(prompt), f'{machine}:{GUEST_PROMPT}', '--mode', '600',
                    '--uid', str(UID), '--gid', str(UID))

    def measure(self, work) -> Measure:
        mark = len(harness.read_calls(self.data))
        started = time.perf_counter()
        work()
        seconds = time.perf_counter() - started
        calls = harness.read_calls(self.data)[mark:]
        kinds = Counter(' '.join(harness.call_path(c)[1:]) or '?' for c in calls)
        return Measure(len(calls), seconds, kinds, [c['argv'] for c in calls])

    def guest(self, machine: str, script: str) -> str:
        return self.smolvm('machine', 'exec', '--name', machine, '--', 'sh', '-c', script)


# --- checks that both sides did the work they are timed for ------------------------------------

def guest_file_count(run_in_guest) -> int:
    """Skill files in a guest (claude-bottle's hidden list of managed skills not counted)."""
    return int(run_in_guest(f'find {GUEST_SKILLS} -type f ! -name ".*" | wc -l').strip())


def check(condition: bool, what: str):
    if not condition:
        raise BenchFailure(f'sanity check failed: {what}')


# --- the bench ---------------------------------------------------------------------------------

def bench(tmp: Path, latency_ms: int, shape: Shape, log) -> tuple[list, dict, list[str]]:
    """Run every scenario; return (rows, facts, oddities)."""
    cache = tmp / 'cache'
    make_fake_claude_archive(cache)
    share_proxy_env(cache)
    index = make_standin_images(tmp / 'images')
    facts, rows, oddities = {}, [], []

    single_skills = [f's{i:02d}' for i in range(shape.skills)]
    single = make_project(tmp / 'single' / 'project', StandinSmolvm(tmp / 'single', index, cache, latency_ms),
                          {'a': single_skills})
    fleet_agents = {f'f{i:02d}': [f'f{i:02d}-s{j}' for j in range(shape.fleet_skills)]
                    for i in range(shape.fleet)}
    fleet = make_project(tmp / 'fleet' / 'project', StandinSmolvm(tmp / 'fleet', index, cache, latency_ms),
                         fleet_agents)
    base = Baseline(tmp / 'baseline' / 'smolvm-data', index, latency_ms)
    standins = [single.backend.data, fleet.backend.data, base.data]

    try:
        # Setup, not measured: the image, packed once by claude-bottle.
        log('building the image (claude-bottle `doit image`, not part of any scenario) ...')
        built = doit(single, 'image')
        facts['image build (setup)'] = f'{built.calls} calls, {built.seconds:.1f} s'
        artifact = image_artifact(single)

        # 1. cold launch
        log('cold launch ...')
        cb = doit(single, 'launch:a')
        check('doit launch:a' in cb.output, 'launch printed the attach command')
        prompt = single.root / '.bottle' / 'agents' / 'a' / 'prompt.md'
        skills_root = single.root / 'agents' / 'skills'

        def launch_a():
            base.launch('base-a', skills_root, single_skills, prompt)

        bl = base.measure(lambda: (base.create('base-a', artifact), launch_a()))
        rows.append(('cold launch', cb, bl))
        expected_files = shape.skills * shape.files
        check(guest_file_count(lambda script: single.guest('a', script)) == expected_files,
              f'claude-bottle guest has {expected_files} skill files')
        check(guest_file_count(lambda script: base.guest('base-a', script)) == expected_files,
              f'baseline guest has {expected_files} skill files')
        # probe, create, start, the CA with its trust script and the agent's curlrc (provision_ca, counted
        # as cp: they write files), the prompt's cp, one exec for the git gate's gitconfig (provision_git),
        # one for the supervisor's registration (provision_supervise), one exec per skill, one exec to prune
        expected = Counter({'probe': 1, 'create': 1, 'start': 1, 'cp': 3, 'exec': shape.skills + 3})
        if cb.kinds != expected:
            oddities.append(f'cold launch made {kinds_text(cb.kinds)} (expected {kinds_text(expected)}): '
                            f'{[a[:5] for a in cb.argvs]}')

        # 2. no-op relaunch
        log('no-op relaunch ...')
        cb = doit(single, 'launch:a')
        bl = base.measure(launch_a)
        rows.append(('no-op relaunch', cb, bl))
        if cb.calls != 1:
            oddities.append(f'no-op relaunch made {cb.calls} backend calls: {cb.argvs}')

        # 3. one skill file edited
        log('one skill file edited ...')
        edited = skills_root / single_skills[len(single_skills) // 2] / EDITED_FILE
        edited.write_text(edited.read_text() + 'one more line, edited\n')
        cb = doit(single, 'launch:a')
        bl = base.measure(launch_a)
        guest_path = f'{GUEST_SKILLS}/{edited.parent.parent.name}/{EDITED_FILE}'
        check(single.guest('a', f'cat {guest_path}') == edited.read_text(), 'edit reached claude-bottle guest')
        check(base.guest('base-a', f'cat {guest_path}') == edited.read_text(), 'edit reached baseline guest')
        rows.append(('one skill file edited', cb, bl))
        if cb.calls != 2 or cb.kinds != Counter({'probe': 1, 'exec': 1}):
            oddities.append(f'one edited file made {cb.calls} backend calls (expected probe + one exec): '
                            f'{[a[:5] for a in cb.argvs]}')

        # 4. fleet no-op. Setup (not measured): claude-bottle's fleet up and provisioned with
        # 8 threads; the baseline's machines created and launched once, 8 at a time.
        log(f'{shape.fleet} agents: setting up both fleets (not measured) ...')
        doit(fleet, '-n', '8', '-P', 'thread', 'provision')
        fleet_artifact = image_artifact(fleet)
        fleet_prompt = {name: fleet.root / '.bottle' / 'agents' / name / 'prompt.md' for name in fleet_agents}
        fleet_skills_root = fleet.root / 'agents' / 'skills'

        def first_launch(name):
            base.create(f'base-{name}', fleet_artifact)
            base.launch(f'base-{name}', fleet_skills_root, fleet_agents[name], fleet_prompt[name])
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(first_launch, fleet_agents))

        log(f'{shape.fleet} agents no-op ...')
        cb = doit(fleet, 'provision')
        bl = base.measure(lambda: [base.launch(f'base-{name}', fleet_skills_root, skills, fleet_prompt[name])
                                   for name, skills in fleet_agents.items()])
        rows.append((f'{shape.fleet} agents no-op', cb, bl))
        if cb.calls != 1:
            oddities.append(f'{shape.fleet} agents no-op made {cb.calls} backend calls: {cb.argvs}')
    finally:
        for data in standins:
            harness.stop_all(data)
        for project in (single, fleet):
            project.stop_daemons()
    return rows, facts, oddities


def share_proxy_env(cache: Path):
    """The egress proxy's environment from the user's cache (made there once, from PyPI), so a
    bench run does not reinstall mitmproxy in its throwaway cache."""
    from daemons.proxy.control import ensure_venv
    from tasks.cache import cache_dir
    shared = ensure_venv(cache_dir())
    (cache / 'claude-bottle').mkdir(parents=True, exist_ok=True)
    (cache / 'claude-bottle' / shared.name).symlink_to(shared)


def table(rows) -> str:
    head = ('scenario', 'cb calls', 'cb s', 'base calls', 'base s', 'calls x', 'time x')
    lines = [f'{head[0]:<24}{head[1]:>9}{head[2]:>9}{head[3]:>12}{head[4]:>9}{head[5]:>10}{head[6]:>9}']
    lines.append('-' * len(lines[0]))
    for name, cb, bl in rows:
        lines.append(f'{name:<24}{cb.calls:>9}{cb.seconds:>9.2f}{bl.calls:>12}{bl.seconds:>9.2f}'
                     f'{bl.calls / cb.calls:>9.1f}x{bl.seconds / cb.seconds:>8.1f}x')
    return '\n'.join(lines)


def kinds_text(kinds: Counter) -> str:
    return ', '.join(f'{kind} {n}' for kind, n in sorted(kinds.items(), key=lambda kv: (-kv[1], kv[0])))


def report(rows, facts, oddities, shape: Shape, latency_ms: int, total: float, load: str) -> str:
    cpus = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else cpus
    subdirs = sorted({str(Path(f).parent) for f in SKILL_FILES})
    out = [
        'claude-bottle provisioning bench (smolvm stand-in)',
        f'machine:  {platform.system()} {platform.machine()}, {cpus} CPUs ({usable} usable), '
        f'Python {platform.python_version()}, load average at start {load}; '
        f'stand-in latency {latency_ms} ms per smolvm call',
        f'agent a:  {shape.skills} skills x {shape.files} files (dirs per skill: {", ".join(subdirs)}), '
        f'plus a prompt',
        f'fleet:    {shape.fleet} agents x {shape.fleet_skills} skills x {shape.files} files, plus a prompt '
        f'each (no skill shared)',
        'cold:     both sides start from the same already packed image (claude-bottle `doit image` '
        f'beforehand: {facts["image build (setup)"]}, in neither column); each creates the machine '
        'from it, starts it and provisions it',
        'baseline: on every launch `machine start`, one `exec mkdir -p` per skill, one `cp` per file, '
        'one `cp` for the prompt; agents one after another',
        'cb:       claude-bottle, wall time of the whole `python -m doit launch:a` (or `provision` for the '
        'fleet, sequential) including interpreter and doit start-up',
        '',
        table(rows),
        '(calls x, time x: baseline / claude-bottle)',
        '',
        'claude-bottle calls by kind:',
    ]
    out += [f'  {name:<24}{kinds_text(cb.kinds)}' for name, cb, _ in rows]
    out.append('baseline calls by kind:')
    out += [f'  {name:<24}{kinds_text(bl.kinds)}' for name, _, bl in rows]
    out.append('')
    out.append('oddities: ' + ('none' if not oddities else ''))
    out += [f'  {o}' for o in oddities]
    out.append(f'whole bench: {total:.0f} s (setup included)')
    return '\n'.join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--latency-ms', type=int, default=DEFAULT_LATENCY_MS,
                        help=f'stand-in latency per smolvm call (default {DEFAULT_LATENCY_MS})')
    parser.add_argument('--quick', action='store_true',
                        help='smoke run: agent a with 5 skills, a fleet of 10 agents')
    parser.add_argument('--keep', action='store_true', help='keep the temporary directory')
    args = parser.parse_args()
    shape = Shape(skills=5, fleet=10, fleet_skills=2) if args.quick else Shape(skills=20, fleet=50, fleet_skills=2)

    def log(message):
        print(f'[{time.perf_counter() - began:6.1f} s] {message}', file=sys.stderr, flush=True)

    began = time.perf_counter()
    load = ' '.join(f'{x:.2f}' for x in os.getloadavg())
    tmp = Path(tempfile.mkdtemp(prefix='claude-bottle-bench-'))
    try:
        rows, facts, oddities = bench(tmp, args.latency_ms, shape, log)
    except BenchFailure as err:
        print(f'bench failed: {err}', file=sys.stderr)
        if not args.keep:
            print('(the temporary projects are removed; rerun with --keep to look at them)', file=sys.stderr)
        return 1
    finally:
        if args.keep:
            print(f'kept {tmp}', file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    total = time.perf_counter() - began
    print(report(rows, facts, oddities, shape, args.latency_ms, total, load))
    return 0


if __name__ == '__main__':
    sys.exit(main())
