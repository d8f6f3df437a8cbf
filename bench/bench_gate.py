#!/usr/bin/env python3
"""Git gate benchmark: clone and push of a repository of 1,000 files, through the gate as a bottle
reaches it, beside the same operations straight against the upstream.

    python bench/bench_gate.py [--quick] [--keep]

Everything is real and on loopback: the upstream is a TLS server on a 127.x.y.z address serving the
repository through `git http-backend` with Basic auth (tests/proxy_upstreams.py); the gate is the
project's (daemons/gate) with the host's credentials; the route through it is the bottle's:

    git -> guest relay (TCP) -> door (Unix socket) -> host relay -> egress proxy -> gate -> upstream

with the guest's git configured as provision_git configures it (insteadOf to git.bottle.invalid,
the proxy as http.proxy, no credential). The direct route is git with the host's credentials
against the upstream. Routes are measured in turn within each repetition; figures are medians.

    clone          a fresh `git clone` of the repository (1,000 files, one commit)
    push forward   one new commit (10 files changed) pushed to a new branch: in mode forward the gate
                   takes it and pushes it upstream inside its pre-receive hook before answering
    push local     the same push to a repository in mode local: taken by the gate, nothing upstream

The target is under 1.5x the direct time; missing it does not fail the bench. Runs as root (the
upstream listens on port 443, the only HTTPS port the proxy reaches); mitmproxy's environment is
made once in the user cache (or $BOTTLE_TEST_CACHE), the first time from PyPI.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from daemons.gate.control import GitGate  # noqa: E402
from daemons.proxy.control import EgressProxy, ensure_venv, write_rules  # noqa: E402
from daemons.proxy.rules import GATE_HOST  # noqa: E402
from tasks.cache import cache_dir  # noqa: E402
from tests.proxy_upstreams import GuestRelay, Upstream, make_upstream_ca, random_loopback_address  # noqa: E402

CACHE_ENV = 'BOTTLE_TEST_CACHE'
FILES = 1000
CHANGED = 10
TARGET_RATIO = 1.5
USER, PASSWORD = 'bench', 'bench-secret'
IDENTITY = ['-c', 'user.name=Bench', '-c', 'user.email=bench@example.invalid']


def run(argv: list, env: dict, cwd: Path | None = None) -> None:
    proc = subprocess.run([str(a) for a in argv], env=env, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f'bench failed: {" ".join(map(str, argv))}\n{proc.stderr[-2000:]}')


def make_upstream_repository(root: Path, name: str, env: dict) -> None:
    bare, work = root / f'{name}.git', root / f'{name}-seed'
    run(['git', 'init', '-q', '--bare', '-b', 'main', bare], env)
    run(['git', 'init', '-q', '-b', 'main', work], env)
    for i in range(FILES):
        (work / f'd{i % 20:02d}').mkdir(exist_ok=True)
        (work / f'd{i % 20:02d}' / f'f{i:04d}.txt').write_text(f'file {i}\n' + 'content line\n' * 40)
    run(['git', *IDENTITY, 'add', '.'], env, work)
    run(['git', *IDENTITY, 'commit', '-qm', 'seed'], env, work)
    run(['git', 'push', '-q', bare, 'main'], env, work)


def timed(argv: list, env: dict, cwd: Path | None = None) -> float:
    start = time.perf_counter()
    run(argv, env, cwd)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--quick', action='store_true', help='smoke run: 2 repetitions')
    parser.add_argument('--keep', action='store_true', help='keep the temporary directory')
    args = parser.parse_args()
    reps = 2 if args.quick else 10
    tmp = Path(tempfile.mkdtemp(prefix='cb-gate-bench-'))      # short: the door path is a Unix socket path
    plain = {k: v for k, v in os.environ.items() if not k.startswith('GIT_')}
    address = random_loopback_address()
    ca, cert, key = make_upstream_ca(tmp, address)
    (tmp / 'git').mkdir()
    for name in ('app', 'kept'):
        make_upstream_repository(tmp / 'git', name, plain)
    upstream = Upstream(address, cert, key, git_root=tmp / 'git', git_credentials=(USER, PASSWORD))
    store = tmp / 'host-credentials'
    store.write_text(f'https://{USER}:{PASSWORD}@{address}\n')
    store.chmod(0o600)
    host_config = tmp / 'host-gitconfig'
    host_config.write_text(f'[credential]\n\thelper = store --file={store}\n[http]\n\tsslCAInfo = {ca}\n')
    host = {**plain, 'GIT_CONFIG_GLOBAL': str(host_config), 'GIT_CONFIG_NOSYSTEM': '1', 'GIT_SSL_CAINFO': str(ca)}

    gate = GitGate(tmp / 'gate', env=host)
    repos = [{'upstream': f'https://{address}/git/{name}.git', 'path': f'{address}/git/{name}',
              'push': ['refs/heads/agent/b/*'], 'mode': mode, 'max_push_bytes': 100 << 20}
             for name, mode in (('app', 'forward'), ('kept', 'local'))]
    venv = ensure_venv(Path(os.environ[CACHE_ENV]) if os.environ.get(CACHE_ENV) else cache_dir())
    proxy = EgressProxy(tmp / 'egress', venv)
    guest = None
    try:
        gate.write_bottles({'b': {'repos': repos}})
        gate.ensure_running()
        gate.sync('b')
        door = proxy.open_door('b', tmp / 'bottle', tmp / 'door')
        write_rules(door.rules, {'hosts': [], 'allow_private': []})
        proxy.route_service('gate', gate.port(), gate.key_file)
        guest = GuestRelay(door.socket)
        guest_config = tmp / 'guest-gitconfig'
        guest_config.write_text(f'[http]\n\tproxy = http://127.0.0.1:{guest.port}\n' + ''.join(
            f'[url "http://{GATE_HOST}/{address}/git/{name}"]\n\tinsteadOf = https://{address}/git/{name}\n'
            for name in ('app', 'kept')))
        guest_env = {**plain, 'GIT_CONFIG_GLOBAL': str(guest_config), 'GIT_CONFIG_NOSYSTEM': '1'}
        routes = {'direct': host, 'gate': guest_env}
        times: dict[tuple[str, str], list[float]] = {}
        print(f'{reps} repetitions, {FILES} files, {CHANGED} changed per push', file=sys.stderr)
        for rep in range(reps):
            for route, env in routes.items():
                for repo in ('app', 'kept'):
                    work = tmp / f'{route}-{repo}-{rep}'
                    if repo == 'app':
                        times.setdefault(('clone', route), []).append(
                            timed(['git', 'clone', '-q', f'https://{address}/git/{repo}.git', work], env))
                    else:
                        run(['git', 'clone', '-q', f'https://{address}/git/{repo}.git', work], env)
                    for i in range(CHANGED):
                        (work / 'd00' / f'f{i * 20:04d}.txt').write_text(f'changed {route} {rep}\n')
                    run(['git', *IDENTITY, 'commit', '-qam', f'{route} {rep}'], env, work)
                    what = 'push forward' if repo == 'app' else 'push local'
                    times.setdefault((what, route), []).append(
                        timed(['git', 'push', '-q', 'origin', f'HEAD:agent/b/{route}-{rep}'], env, work))
                    shutil.rmtree(work)
        print(f'\n| operation | direct | through the gate | ratio (target < {TARGET_RATIO}x) |\n|---|---|---|---|')
        for what in ('clone', 'push forward', 'push local'):
            direct, gated = statistics.median(times[(what, 'direct')]), statistics.median(times[(what, 'gate')])
            print(f'| {what} | {direct * 1000:.0f} ms | {gated * 1000:.0f} ms | {gated / direct:.2f}x'
                  f'{"" if gated / direct < TARGET_RATIO else " (over)"} |')
    finally:
        if guest:
            guest.close()
        proxy.stop()
        gate.stop()
        upstream.close()
        if args.keep:
            print(f'kept {tmp}', file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
