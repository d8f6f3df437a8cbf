"""The supervisor through doit: `supervisor` keeps the project's daemon running for the supervised agents,
provision_supervise:<agent> registers it in the guest's Claude Code with nothing secret, the human decides
from the command line, and an approved host stays in the bottle's rules across relaunches, re-renders and
teardowns until revoked. The requests come from the bottle's side: an MCP client speaking through the
bottle's own door, as the guest's Claude Code does (tests/test_fence.py has the real Claude in a bottle)."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess

import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from daemons.proxy import rules
from daemons.proxy.rules import SUPERVISE_HOST
from daemons.supervise.control import Supervisor
from tasks import egress
from tasks.project import Project
from tests.bottles import Bottles
from tests.conftest import BACKENDS, _project
from tests.proxy_upstreams import GuestRelay
from tests.scenario import setup_agent
from tests.test_shown import raw_in_output

REGISTRATION = '/home/agent/.claude-test-mcp/supervise'     # where the images' test claude keeps it


@pytest.fixture(params=['standin', 'podman'])
def supervised(request, tmp_path, claude_cache):
    yield from _project(BACKENDS[request.param](request, tmp_path, claude_cache), tmp_path)


def supervisor(bottles) -> Supervisor:
    return Supervisor(bottles.root / '.bottle' / 'supervise')


def ask(bottles, agent: str, tool: str, arguments: dict) -> str:
    """Call a supervisor tool from the agent's side of its door; the tool's text answer."""
    async def call():
        relay = GuestRelay(egress.door_socket(Project(bottles.root), agent))
        try:
            async with httpx2.AsyncClient(proxy=relay.url, timeout=60) as http:
                transport = streamable_http_client(f'http://{SUPERVISE_HOST}/mcp', http_client=http)
                async with Client(transport, mode='legacy') as client:
                    result = await client.call_tool(tool, arguments)
        finally:
            relay.close()
        assert not result.is_error, result.content
        return result.content[0].text
    return asyncio.run(call())


def pending_id(answer: str) -> str:
    assert answer.startswith('still pending as request '), answer
    return answer.removeprefix('still pending as request ').split(';')[0]


def allowed_hosts(bottles, agent: str) -> list[str]:
    return [entry['host'] for entry in rules.load(bottles.root / '.bottle' / 'agents' / agent
                                                  / 'egress-rules.json').to_json()['hosts']]


def registration(bottles, agent: str) -> dict | None:
    text = bottles.guest(agent, f'cat {REGISTRATION} 2>/dev/null || :')
    return json.loads(text) if text.strip() else None


def test_the_supervisor_is_registered_without_a_secret_and_restarted_when_killed(supervised):
    supervised.supervise()
    setup_agent(supervised, 'a')
    setup_agent(supervised, 'b', supervise=False)
    supervised.doit('provision')

    served = supervisor(supervised)
    assert served.healthy()
    assert registration(supervised, 'a') == {'type': 'http', 'url': f'http://{SUPERVISE_HOST}/mcp',
                                              'timeout': (600 + 120) * 1000}
    assert registration(supervised, 'b') is None
    key = served.key_file.read_text().strip()
    assert key not in supervised.guest('a', 'cat /home/agent/.claude-test-mcp/* /home/agent/.claude.json '
                                            '2>/dev/null; cat /proc/*/environ 2>/dev/null | tr "\\0" "\\n"; true')
    assert 'supervise' in supervised.prompt_text('a') and 'request_egress' in supervised.prompt_text('a')
    assert 'request_egress' not in supervised.prompt_text('b')

    os.kill(served.daemon().pid(), signal.SIGKILL)
    relaunch = supervised.doit('launch:a')
    assert 'supervisor' in relaunch.executed and 'provision_supervise:a' not in relaunch.executed, relaunch.output
    assert served.healthy()
    again = supervised.doit('launch:a')
    assert again.count('probe') == 1 and again.kinds == {'probe': 1}, again.calls
    assert again.executed == {'launch:a'}, again.output

    setup_agent(supervised, 'b')                        # supervised now: only its registration moves
    setup_agent(supervised, 'a', supervise=False)       # and a's goes
    run = supervised.doit('provision')
    assert {'provision_supervise:a', 'provision_supervise:b'} <= run.executed
    assert not any(task.startswith(('provision_skill', 'provision_ca', 'machine')) for task in run.executed)
    assert registration(supervised, 'a') is None and registration(supervised, 'b')['url'].endswith('/mcp')


def test_an_approval_outlives_relaunches_and_teardowns_until_revoked(standin):
    standin.supervise()
    setup_agent(standin, 'a', supervise_wait=1)
    standin.doit('provision')
    waited = ask(standin, 'a', 'request_egress', {'host': 'docs.example.org', 'reason': 'the manual'})
    request = pending_id(waited)        # the manifest's bounded wait, 1 s, reached the daemon

    listed = standin.doit('supervise').stdout
    assert f'request {request}: a asks to reach a host' in listed, listed
    assert '    host: docs.example.org\n    reason: the manual\n' in listed, listed
    assert f'page: {supervisor(standin).page_url()}' in listed

    approved = standin.doit('approve', '--id', request)
    assert (f'approve: request {request} granted: host docs.example.org for bottle a, until revoked (doit revoke '
            '--agent a --host docs.example.org)') in approved.stdout, approved.stdout
    assert 'docs.example.org' in allowed_hosts(standin, 'a')
    assert ask(standin, 'a', 'check_request', {'request_id': request}).startswith(
        'approved: docs.example.org is allowed for this bottle from now on')
    twice = standin.doit('approve', '--id', request, check=False)
    assert twice.returncode == 1 and 'is approved already' in twice.output and 'decided once' in twice.output

    setup_agent(standin, 'a', supervise_wait=1, network={'allow_hosts': ['other.example.org']})
    standin.doit('provision')               # the rules are rendered again: the approval stays
    assert {'docs.example.org', 'other.example.org'} <= set(allowed_hosts(standin, 'a'))
    standin.doit('teardown:a')
    standin.doit('provision')
    assert 'docs.example.org' in allowed_hosts(standin, 'a')

    revoked = standin.doit('revoke', '--agent', 'a', '--host', 'docs.example.org')
    assert 'docs.example.org is no longer approved for a' in revoked.stdout
    assert 'docs.example.org' not in allowed_hosts(standin, 'a')
    standin.doit('provision')
    assert 'docs.example.org' not in allowed_hosts(standin, 'a') and 'other.example.org' in allowed_hosts(standin, 'a')


def test_the_human_answers_and_denies_from_the_command_line(standin):
    standin.supervise()
    setup_agent(standin, 'a', supervise_wait=1)
    standin.doit('provision')
    question = pending_id(ask(standin, 'a', 'ask_human', {'question': 'Ship it?', 'choices': ['yes', 'no']}))
    listed = standin.doit('supervise').stdout
    assert f'request {question}: a asks a question' in listed and '    question: Ship it?\n' in listed, listed
    assert '    choice 1: yes\n    choice 2: no\n' in listed, listed
    wrong = standin.doit('answer', '--id', question, '--text', 'maybe', check=False)
    assert wrong.returncode == 1 and "asks to choose one of ['yes', 'no'], not 'maybe'" in wrong.output
    standin.doit('answer', '--id', question, '--text', 'yes')
    answer = ask(standin, 'a', 'check_request', {'request_id': question})
    assert answer.startswith('answered (request') and answer.endswith(': yes') and '(command line)' in answer

    host = pending_id(ask(standin, 'a', 'request_egress', {'host': 'example.net', 'reason': 'why not'}))
    standin.doit('reject', '--id', host, '--reason', 'not today')
    assert ask(standin, 'a', 'check_request', {'request_id': host}).endswith(': not today')
    assert 'example.net' not in allowed_hosts(standin, 'a')
    assert 'no request waits for an answer' in standin.doit('supervise').stdout

    # What the agent wrote reaches the terminal neutralised; approve says what it granted from the record.
    hostile = pending_id(ask(standin, 'a', 'request_egress', {'host': 'xn--pypal-4ve.org', 'reason': HOSTILE_REASON}))
    listed = standin.doit('supervise')
    assert raw_in_output(listed.output) == [], listed.output
    assert ('    host: xn--pypal-4ve.org (an international name; in Unicode "p\u0430ypal.org", which may imitate '
            'another name)\n') in listed.stdout, listed.stdout
    assert '    reason: ok\\x0d\\x1b[2Kmay it reach pypi.org? \\u202egro.ipyp\\u202c\n' in listed.stdout, listed.stdout
    approved = standin.doit('approve', '--id', hostile)
    assert approved.stdout.split('\n', 1)[1] == (f'approve: request {hostile} granted: host xn--pypal-4ve.org (an international name; '
                               'in Unicode "p\u0430ypal.org", which may imitate another name) for bottle a, until '
                               'revoked (doit revoke --agent a --host xn--pypal-4ve.org)\n'), approved.output
    assert 'xn--pypal-4ve.org' in allowed_hosts(standin, 'a') and 'pypi.org' not in allowed_hosts(standin, 'a')
    refused_path = refuse_through_door(standin, 'a', b'/x\x1b[2J\x1b]0;owned\x07\x7f')
    status = standin.doit('status')
    assert raw_in_output(status.output) == [], status.output
    assert refused_path in status.stdout, status.stdout

    for args, said in ((('approve',), 'approve needs --id'),
                       (('approve', '--id', 'nope'), "no request or held push has the id 'nope'"),
                       (('answer', '--id', question), 'answer needs --text'),
                       (('revoke', '--agent', 'a', '--host', 'example.net'), "'example.net' is not an approved host")):
        refused = standin.doit(*args, check=False)
        assert refused.returncode == 1 and said in refused.output and 'Traceback' not in refused.output, refused.output


HOSTILE_REASON = 'ok\r\x1b[2Kmay it reach pypi.org? \u202egro.ipyp\u202c'


def refuse_through_door(bottles, agent: str, path: bytes) -> str:
    """A request for a host the bottle may not reach, with `path` as sent, through the bottle's door; what
    `doit status` then shows of it."""
    relay = GuestRelay(egress.door_socket(Project(bottles.root), agent))
    try:
        with socket.create_connection(('127.0.0.1', relay.port), timeout=30) as sock:
            sock.sendall(b'GET http://blocked.example' + path + b' HTTP/1.1\r\nHost: blocked.example\r\n\r\n')
            assert b' 403 ' in sock.recv(65536).split(b'\r\n')[0]
    finally:
        relay.close()
    return 'GET blocked.example/x\\x1b[2J\\x1b]0;owned\\x07\\x7f'


def daemon_pids(bottles) -> dict[str, int]:
    """The pids the project's pid files name: the proxy and the supervisor."""
    state = bottles.root / '.bottle'
    files = {'proxy': state / 'egress' / 'proxy.pid', 'supervisor': state / 'supervise' / 'supervise.pid'}
    return {name: json.loads(path.read_text())['pid'] for name, path in files.items()}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def test_a_copied_project_starts_its_own_daemons_and_never_touches_the_originals(standin, tmp_path):
    standin.supervise()
    setup_agent(standin, 'a')
    standin.doit('provision')
    original = daemon_pids(standin)

    copy_root = tmp_path / 'copy'
    subprocess.run(['cp', '-a', str(standin.root), str(copy_root)], check=True)    # .bottle/ and its pid files
    copy = Bottles(copy_root, standin.backend)
    copy.supervise()
    copy.doit('provision')
    copied = daemon_pids(copy)
    assert not set(copied.values()) & set(original.values()), (original, copied)
    assert all(alive(pid) for pid in original.values())
    assert Supervisor(copy_root / '.bottle' / 'supervise').healthy()

    copy.doit('teardown:a')         # its door closes and its proxy stops with it; the original's stay
    copy.stop_daemons()
    assert all(alive(pid) for pid in original.values()) and daemon_pids(standin) == original
    again = standin.doit('launch:a')
    assert again.kinds == {'probe': 1} and again.executed == {'launch:a'}, again.output


def test_a_supervisor_that_stops_answering_is_found_by_status(standin):
    standin.supervise()
    setup_agent(standin, 'a')
    standin.doit('provision')
    assert 'supervisor answering' in standin.doit('status').stdout
    pid = supervisor(standin).daemon().pid()
    os.kill(pid, signal.SIGSTOP)        # its port still takes connections; nothing answers MCP
    try:
        assert 'supervisor not answering' in standin.doit('status').stdout
    finally:
        os.kill(pid, signal.SIGCONT)
    assert 'supervisor answering' in standin.doit('status').stdout
