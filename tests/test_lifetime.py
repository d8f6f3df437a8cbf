"""The project's daemons live as long as their use: the teardown of the last bottle that uses the egress proxy,
the git gate or the supervisor stops it (and says so), `doit clean` and `doit prune` too; and a daemon whose
state directory is gone (its checkout deleted) exits by itself. On the stand-in; what is checked is what a
user would see: the processes of the project (its pid files' pids, any process naming its .bottle/), the
ports the daemons listened on, and the lines doit prints."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from daemons.gate.control import GitGate
from daemons.lifecycle import connects
from daemons.proxy.rules import LISTEN_HOST
from daemons.proxy.statedir import CHECK_ENV
from daemons.supervise.control import Supervisor
from tests.proxy_upstreams import Upstream, make_upstream_ca, random_loopback_address
from tests.scenario import setup_agent
from tests.test_git_gate import PASSWORD, host_git_config, make_repository

DAEMONS = {'proxy': 'egress/proxy.pid', 'gate': 'gate/gate.pid', 'supervisor': 'supervise/supervise.pid'}
STOPPED = {'proxy': "stopped the project's egress proxy: no agent uses it",
           'gate': "stopped the project's git gate: no agent uses it",
           'supervisor': "stopped the project's supervisor: no agent uses it"}


def daemons(bottles) -> dict[str, tuple[int, int]]:
    """Each daemon of the project that runs: its pid and the process's start time (a pid the kernel gives
    again to another process is not the daemon)."""
    running = {}
    for name, pid_file in DAEMONS.items():
        try:
            pid = json.loads((bottles.root / '.bottle' / pid_file).read_text())['pid']
        except OSError:
            continue
        if start_time(pid) is not None:
            running[name] = (pid, start_time(pid))
    return running


def start_time(pid: int) -> int | None:
    """The process's start time, None when it is gone (or has ended and waits to be reaped: a daemon this test
    started is its child)."""
    try:
        fields = Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ('Z', 'X') else int(fields[19])


def alive(process: tuple[int, int]) -> bool:
    return start_time(process[0]) == process[1]


def processes_naming(directory: Path) -> list[str]:
    """The command lines of the running processes that name `directory` (every daemon of a project names its
    state there: the gate and the supervisor their state directory, the proxy its CA and doors file)."""
    found = []
    for entry in os.scandir('/proc'):
        if entry.name.isdigit():
            try:
                argv = Path(entry.path, 'cmdline').read_bytes().split(b'\0')
            except OSError:
                continue
            line = ' '.join(arg.decode(errors='replace') for arg in argv)
            if str(directory) in line:
                found.append(f'{entry.name}: {line}')
    return found


def ports(bottles) -> list[int]:
    """The ports the gate and the supervisor recorded (the proxy has none: its doors are Unix sockets)."""
    found = []
    for record in ('gate/gate.json', 'supervise/supervise.json'):
        data = json.loads((bottles.root / '.bottle' / record).read_text())
        found += [data['port']] + ([data['page_port']] if 'page_port' in data else [])
    return found


def assert_none_left(bottles, before: dict, listened: list[int]):
    assert not [name for name, process in before.items() if alive(process)]
    assert processes_naming(bottles.root / '.bottle') == []
    assert not [port for port in listened if connects((LISTEN_HOST, port), 1.0)]


def wait_gone(processes: dict, seconds: float) -> list[str]:
    """Wait up to `seconds` for every process to end; the names of those still alive."""
    deadline = time.monotonic() + seconds
    while any(alive(p) for p in processes.values()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return [name for name, process in processes.items() if alive(process)]


@pytest.fixture
def upstream(tmp_path):
    """An upstream with the repository `app` that the host's git reaches with its credential: its URL and the
    environment doit needs for it."""
    address = random_loopback_address()
    ca, cert, key = make_upstream_ca(tmp_path, address)
    git_root = tmp_path / 'git'
    git_root.mkdir()
    make_repository(git_root, 'app')
    server = Upstream(address, cert, key, git_root=git_root, git_credentials=('gate-user', PASSWORD))
    try:
        yield f'https://{address}/git/app.git', {'GIT_CONFIG_GLOBAL': str(host_git_config(tmp_path, address, ca)),
                                                 'GIT_SSL_CAINFO': str(ca)}
    finally:
        server.close()


def launch_two(bottles, upstream) -> dict:
    """Agents a and b, each with the repository and supervised, up and provisioned: every daemon runs."""
    url, env = upstream
    bottles.extra_env.update(env)
    bottles.supervise()
    for name in ('a', 'b'):
        setup_agent(bottles, name, skills=['review'], git=[{'url': url}])
    bottles.doit('provision')
    running = daemons(bottles)
    assert set(running) == set(DAEMONS), running
    return running


def test_the_last_teardown_stops_the_daemons_and_so_does_doit_clean(standin, upstream):
    running = launch_two(standin, upstream)
    listened = ports(standin)

    first = standin.doit('teardown:a')
    assert daemons(standin) == running and 'stopped' not in first.output, first.output   # b uses all three
    last = standin.doit('teardown:b')
    for line in STOPPED.values():
        assert line in last.stdout, last.output
    assert_none_left(standin, running, listened)
    assert standin.doit('teardown:b').executed == set()         # nothing left to do, nothing said

    running = launch_two(standin, upstream)      # launched again: started again
    listened = ports(standin)
    cleaned = standin.doit('clean')
    for name in DAEMONS:
        assert STOPPED[name].partition(':')[0] in cleaned.stdout, cleaned.output
    assert_none_left(standin, running, listened)


def test_prune_stops_what_no_remaining_bottle_uses(standin, upstream):
    running = launch_two(standin, upstream)
    setup_agent(standin, 'a', skills=['review'], supervise=False)      # a keeps its bottle, without git or supervisor
    (standin.root / 'agents' / 'b.yaml').unlink()                      # b's bottle is forgotten

    pruned = standin.doit('prune')
    assert 'prune: removed state of agent b' in pruned.stdout, pruned.output
    assert STOPPED['gate'] in pruned.stdout and STOPPED['supervisor'] in pruned.stdout, pruned.output
    assert STOPPED['proxy'] not in pruned.output
    assert daemons(standin) == {'proxy': running['proxy']}          # a's door still has its proxy
    again = standin.doit('prune')
    assert 'stopped' not in again.output and again.stdout.strip().endswith('prune: nothing to remove')


def test_the_daemons_of_a_deleted_checkout_exit_by_themselves(standin):
    """No teardown: the checkout is removed with its daemons running, which find their state gone."""
    standin.extra_env[CHECK_ENV] = '1'
    standin.supervise()
    setup_agent(standin, 'a', skills=['review'], git=[{'url': 'https://example.org/acme/app.git'}])
    standin.doit('egress:a', 'gate', 'supervisor')       # every daemon, without a machine or an upstream
    running = daemons(standin)
    assert set(running) == set(DAEMONS), running

    shutil.rmtree(standin.root)
    assert wait_gone(running, 70) == []
    assert processes_naming(standin.root) == []


@pytest.mark.parametrize('service', [GitGate, Supervisor])
def test_a_daemon_whose_state_directory_is_made_anew_exits_too(tmp_path, service):
    state = tmp_path / 'state'
    daemon = service(state, env={**os.environ, CHECK_ENV: '1'})
    daemon.ensure_running()
    process = {'daemon': (daemon.daemon().pid(), start_time(daemon.daemon().pid()))}
    shutil.rmtree(state)
    state.mkdir()               # the same path, another directory: a checkout cloned again where it was
    try:
        assert wait_gone(process, 70) == []
    finally:
        daemon.stop()


@pytest.mark.extended           # waits for the default interval, up to a minute
def test_a_daemon_exits_within_a_minute_by_default(tmp_path):
    state = tmp_path / 'gate'
    gate = GitGate(state, env={k: v for k, v in os.environ.items() if k != CHECK_ENV})
    gate.ensure_running()
    process = {'gate': (gate.daemon().pid(), start_time(gate.daemon().pid()))}
    log = (state / 'gate.log').open()       # kept open: the file goes with its directory
    shutil.rmtree(state)
    try:
        assert wait_gone(process, 70) == []
        said = log.read()
        assert f'exiting: the state directory {state} is gone' in said, said
    finally:
        log.close()
        gate.stop()
