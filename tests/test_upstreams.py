"""The test upstream itself (tests/proxy_upstreams.py), reached directly by the real clients the
egress tests use through the proxy: git over smart HTTP and Claude Code against the mock
Messages API. Port 443 on a loopback address, as in test_proxy (the tests run as root)."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.bottles import TEST_CLAUDE_VERSION, extract_member
from tests.proxy_upstreams import Upstream, make_upstream_ca, random_loopback_address

pytestmark = pytest.mark.fast


class Setup:
    """The module's upstream, its CA and the bare repositories it serves under /git/."""


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    s = Setup()
    s.root = tmp_path_factory.mktemp('upstreams')
    s.address = random_loopback_address()
    s.ca, cert, key = make_upstream_ca(s.root, s.address)
    s.git_root = s.root / 'git'
    s.git_root.mkdir()
    s.upstream = Upstream(s.address, cert, key, git_root=s.git_root)
    try:
        yield s
    finally:
        s.upstream.close()


def git(s: Setup, cwd: Path, *args: str) -> str:
    env = {'PATH': os.environ['PATH'], 'HOME': str(s.root), 'GIT_CONFIG_NOSYSTEM': '1',
           'GIT_SSL_CAINFO': str(s.ca), 'GIT_AUTHOR_NAME': 'Test', 'GIT_AUTHOR_EMAIL': 'test@example.test',
           'GIT_COMMITTER_NAME': 'Test', 'GIT_COMMITTER_EMAIL': 'test@example.test'}
    return subprocess.run(['git', *args], cwd=cwd, env=env, capture_output=True, text=True,
                          check=True, timeout=60).stdout.strip()


def commit(s: Setup, work: Path, name: str, text: str) -> str:
    (work / name).write_text(text)
    git(s, work, 'add', name)
    git(s, work, 'commit', '-q', '-m', f'add {name}')
    git(s, work, 'push', '-q', str(s.git_root / 'repo.git'), 'main')
    return git(s, work, 'rev-parse', 'HEAD')


def test_git_clones_and_fetches_over_https(setup, tmp_path):
    s = setup
    git(s, s.git_root, 'init', '-q', '--bare', '-b', 'main', 'repo.git')
    seed = tmp_path / 'seed'
    seed.mkdir()
    git(s, seed, 'init', '-q', '-b', 'main')
    commit(s, seed, 'first.txt', 'one\n')

    git(s, tmp_path, 'clone', '-q', f'https://{s.address}/git/repo.git', 'clone')
    clone = tmp_path / 'clone'
    assert (clone / 'first.txt').read_text() == 'one\n'

    second = commit(s, seed, 'second.txt', 'two\n')
    git(s, clone, 'fetch', '-q')
    assert git(s, clone, 'rev-parse', 'origin/main') == second
    assert git(s, clone, 'show', 'origin/main:second.txt') == 'two'
    assert ('POST', '/git/repo.git/git-upload-pack', s.address) in s.upstream.requests


def test_the_messages_api_answers_json_to_a_chunked_request(setup):
    """curl sends the body chunked, as git does with large POSTs."""
    s = setup
    request = {'model': 'mock', 'max_tokens': 10, 'messages': [{'role': 'user', 'content': 'hi'}]}
    proc = subprocess.run(['curl', '-sS', '--max-time', '20', '--cacert', str(s.ca), '-H', 'Transfer-Encoding: chunked',
                           '-H', 'Content-Type: application/json', '--data-binary', json.dumps(request),
                           f'https://{s.address}/v1/messages'], capture_output=True, text=True, timeout=60)
    answer = json.loads(proc.stdout)
    assert answer['content'] == [{'type': 'text', 'text': s.upstream.reply_text}]
    assert answer['stop_reason'] == 'end_turn'
    assert s.upstream.messages[-1] == request


@pytest.fixture(scope='module')
def claude_binary(claude_cache, tmp_path_factory) -> Path:
    """The native Claude Code binary from a real npm package in the download cache."""
    archives = [a for a in sorted((claude_cache / 'claude-bottle' / 'claude-code').glob('anthropic-ai-claude-code-linux-x64-*.tgz'))
                if not a.name.endswith(f'-{TEST_CLAUDE_VERSION}.tgz')]
    if not archives:
        pytest.skip(f'no real Claude Code package in {claude_cache}/claude-bottle/claude-code (set BOTTLE_TEST_CACHE)')
    return extract_member(archives[-1], 'package/claude', tmp_path_factory.mktemp('claude-code') / 'claude')


def test_claude_code_gets_its_reply_from_the_mock_api(setup, claude_binary, tmp_path):
    s = setup
    home = tmp_path / 'home'
    home.mkdir()
    # Learnt by tracing its connect() calls: with an API key, a base URL and the CA (either
    # NODE_EXTRA_CA_CERTS or SSL_CERT_FILE) `claude -p` needs no login nor config in HOME and
    # makes one streamed POST /v1/messages?beta=true. Without DISABLE_NONESSENTIAL_TRAFFIC it
    # also resolves other hosts (telemetry), which fails offline without holding up the answer.
    env = {'PATH': os.environ['PATH'], 'HOME': str(home), 'ANTHROPIC_BASE_URL': f'https://{s.address}',
           'ANTHROPIC_API_KEY': 'test-key', 'NODE_EXTRA_CA_CERTS': str(s.ca),
           'CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC': '1'}
    proc = subprocess.run([str(claude_binary), '-p', 'ping'], cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert s.upstream.reply_text in proc.stdout
    assert any(method == 'POST' and path.split('?')[0] == '/v1/messages' for method, path, _ in s.upstream.requests)
    assert s.upstream.messages[-1]['stream'] is True
