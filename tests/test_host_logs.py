"""The host logs a guest can make grow stay within their bounds (daemons/proxy/logbound.py): a bottle's egress
log, rotated to egress.log.1, with long fields cut and their length noted; a daemon's log (its stdout and
stderr), bounded while it runs and at each start. Against the real egress proxy, with requests sent through a
bottle's door as a guest sends them."""
from __future__ import annotations

import json
import re
import socket
import sys
import time
from pathlib import Path

import pytest

from daemons.lifecycle import Daemon
from daemons.proxy.control import EgressProxy, ensure_venv, write_rules
from daemons.proxy.logbound import DAEMON_LOG_BYTES, EGRESS_LOG_BYTES, FIELD_BYTES, LINE_BYTES, rotated
from daemons.proxy.refusals import refusals
from tests.test_proxy import wait_for

pytestmark = pytest.mark.fast

PATH_BYTES = 60_000            # a path as long as the proxy lets a request head be (bounds.HEAD_BYTES)
SMALL_LOG_BYTES = 256 * 1024   # the bound the fast test gives the proxy, so that a few hundred lines rotate it
CUT = re.compile(r'\.\.\.\((\d+) bytes, cut\)$')


@pytest.fixture(scope='module')
def venv(claude_cache):
    return ensure_venv(claude_cache / 'claude-bottle')     # where doit makes it for the bottles too


def refused_requests(door_socket: Path, count: int, label: str) -> None:
    """`count` refused requests on as few connections as the proxy keeps open, each for a host the bottle may not
    reach with a path of PATH_BYTES; the last one's path starts with /<label>-last/."""
    sent = 0
    while sent < count:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(20)
            sock.connect(str(door_socket))
            stream = sock.makefile('rb')
            while sent < count:
                name = f'{label}-last' if sent == count - 1 else f'{label}-{sent}'
                path = f'/{name}/' + 'a' * (PATH_BYTES - len(name) - 2)
                sock.sendall(f'GET http://denied.example{path} HTTP/1.1\r\nHost: denied.example\r\n\r\n'.encode())
                status = stream.readline()
                if not status:
                    break       # the proxy closed the connection: go on with a new one
                assert b' 403 ' in status, status
                length = 0
                while (header := stream.readline()) not in (b'\r\n', b''):
                    if header.lower().startswith(b'content-length:'):
                        length = int(header.split(b':', 1)[1])
                stream.read(length)
                sent += 1


def whole_lines(path: Path) -> list[dict]:
    """Every line of the log, each whole JSON (json.loads fails on a torn one)."""
    text = path.read_text()
    assert text.endswith('\n'), f'{path} ends inside a line'
    return [json.loads(line) for line in text.splitlines()]


def newest_path(log: Path) -> str:
    """The path of the log's last line, '' while there is none (the proxy writes a line once it has answered)."""
    try:
        return json.loads(log.read_text().splitlines()[-1])['path']
    except (OSError, IndexError, ValueError, KeyError):
        return ''


def log_ends_with(log: Path, text: str) -> bool:
    try:
        return log.read_text().endswith(text)
    except OSError:
        return False


def open_bottle(tmp_path: Path, venv: Path, log_bytes: int | None) -> tuple[EgressProxy, Path, Path]:
    proxy = EgressProxy(tmp_path / 'proxy', venv)
    if log_bytes is not None:
        proxy.door_bounds['bottle_log_bytes'] = log_bytes      # one more `name=value` of the proxy's options
    door = proxy.open_door('loop', tmp_path / 'bottles' / 'loop', tmp_path / 'doors' / 'loop')
    write_rules(door.rules, {'hosts': [{'host': 'allowed.example'}]})
    return proxy, door.socket, door.log


def check_bounded(log: Path, bound: int, label: str, count: int) -> None:
    """The live log and its rotated file each within `bound`, nothing else beside them, every line whole, the
    newest line in the live file, every path cut with the length it had."""
    assert sorted(p.name for p in log.parent.glob('egress.log*')) == ['egress.log', 'egress.log.1']
    assert log.stat().st_size <= bound and rotated(log).stat().st_size <= bound
    live = whole_lines(log)
    older = whole_lines(rotated(log))
    assert live[-1]['path'].startswith(f'/{label}-last/')
    for line in older + live:
        assert line['allowed'] is False and line['status'] == 403
        assert CUT.search(line['path']) and int(CUT.search(line['path']).group(1)) == PATH_BYTES, line['path'][-40:]
        assert len(line['path'].encode()) < FIELD_BYTES + 40
    assert len(older) + len(live) <= count


def test_a_loop_of_refused_requests_rotates_the_egress_log_within_its_bound(tmp_path, venv):
    proxy, door, log = open_bottle(tmp_path, venv, SMALL_LOG_BYTES)
    try:
        count = 400         # some 600 kB of lines once cut; 24 MB of them before
        refused_requests(door, count, 'fast')
        assert wait_for(lambda: newest_path(log).startswith('/fast-last/'))
        check_bounded(log, SMALL_LOG_BYTES, 'fast', count)
        # What `doit status` and the supervisor's page show: the newest refusals, read across the rotation.
        shown = refusals(log, limit=len(whole_lines(log)) + 5)
        assert shown[0]['path'].startswith('/fast-last/') and len(shown) == len(whole_lines(log)) + 5
    finally:
        proxy.stop()


@pytest.mark.extended
def test_two_thousand_refused_requests_with_60_kb_paths_stay_within_the_default_bound(tmp_path, venv):
    """The review's attack, bounded in count: 120 MB of paths sent; the bottle's egress logs hold at most
    twice EGRESS_LOG_BYTES whatever is sent, and a couple of MB here."""
    proxy, door, log = open_bottle(tmp_path, venv, None)
    try:
        count = 2000
        started = time.monotonic()
        refused_requests(door, count, 'long')
        assert wait_for(lambda: newest_path(log).startswith('/long-last/'))
        total = sum(p.stat().st_size for p in log.parent.glob('egress.log*'))
        assert log.stat().st_size <= EGRESS_LOG_BYTES and total <= 2 * EGRESS_LOG_BYTES
        assert total < count * 2 * FIELD_BYTES, total       # each line a couple of kB at most
        assert all(CUT.search(line['path']) for line in whole_lines(log))
        assert time.monotonic() - started < 300
    finally:
        proxy.stop()


# --- a daemon's own log --------------------------------------------------------------------------

PRINTER = f"""
import sys, time
sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
from daemons.proxy.logbound import bound_output
bound_output(max_bytes=int(sys.argv[1]))
print('x' * 100_000)                    # one long line
for number in range(int(sys.argv[2])):
    print(f'line {{number}} ' + 'y' * 1000, file=sys.stderr if number % 2 else sys.stdout)
print('newest', flush=True)
time.sleep(600)
"""


def test_a_daemon_printing_without_end_keeps_its_log_within_the_bound(tmp_path):
    bound = 64 * 1024
    daemon = Daemon('printer', tmp_path / 'state', [sys.executable, '-c', PRINTER, str(bound), '2000'])
    daemon.start()
    try:
        assert wait_for(lambda: log_ends_with(daemon.log_file, 'newest\n'))
        older = rotated(daemon.log_file)
        assert daemon.log_file.stat().st_size <= bound and older.stat().st_size <= bound
        assert re.search(r'^line 1999 y+$', daemon.log_file.read_text(), re.M)
        assert daemon.log_tail(3).splitlines()[-1] == 'newest'
    finally:
        daemon.stop()
    # The long line, cut with its length, is in the first (lost) part; a fresh start shows the cut itself.
    daemon = Daemon('printer', tmp_path / 'cut', [sys.executable, '-c', PRINTER, str(bound), '0'])
    daemon.start()
    try:
        assert wait_for(lambda: log_ends_with(daemon.log_file, 'newest\n'))
        cut_line = next(line for line in daemon.log_file.read_text().splitlines() if line.startswith('xxx'))
        assert cut_line == 'x' * LINE_BYTES + '...(100000 bytes, cut)'
    finally:
        daemon.stop()


def test_a_log_past_the_bound_is_rotated_when_its_daemon_starts(tmp_path):
    """Any daemon, also one that does not bound its own output: each start finds its log within the bound."""
    daemon = Daemon('sleeper', tmp_path / 'state', [sys.executable, '-c', 'import time; time.sleep(600)'])
    daemon.state_dir.mkdir(parents=True)
    daemon.log_file.write_text('old line\n' * (DAEMON_LOG_BYTES // 9 + 1))
    daemon.start()
    try:
        assert daemon.log_file.stat().st_size < 1024 and 'starting sleeper' in daemon.log_file.read_text()
        assert rotated(daemon.log_file).read_text().startswith('old line\n')
        assert daemon.log_tail(2).splitlines()[0] == 'old line'      # the tail reads on into the rotated file
    finally:
        daemon.stop()
