"""The git commands that talk to an upstream with the host's credentials: making and refreshing a
mirror, and pushing to the upstream. They run with the host's environment (its HOME, ssh agent and
credential helpers), never with a request's: see host_env."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from daemons.gate.config import Repo

UPSTREAM_SECONDS = 300
# Variables that point git at a repository or inject configuration for one command: the host's own
# (if any) would aim the gate's commands elsewhere, and those that git sets for a hook must not be
# taken for the host's. (Credentials set up through GIT_CONFIG_COUNT belong in a gitconfig instead.)
REPOSITORY_VARIABLES = frozenset({
    'GIT_DIR', 'GIT_WORK_TREE', 'GIT_COMMON_DIR', 'GIT_INDEX_FILE', 'GIT_OBJECT_DIRECTORY',
    'GIT_ALTERNATE_OBJECT_DIRECTORIES', 'GIT_QUARANTINE_PATH', 'GIT_NAMESPACE', 'GIT_PREFIX',
    'GIT_CONFIG_COUNT', 'GIT_CONFIG_PARAMETERS', 'GIT_PROTOCOL', 'GIT_PROJECT_ROOT', 'GIT_HTTP_EXPORT_ALL',
    'GIT_PUSH_OPTION_COUNT', 'GIT_COMMITTER_NAME', 'GIT_COMMITTER_EMAIL'})
REPOSITORY_PREFIXES = ('GIT_CONFIG_KEY_', 'GIT_CONFIG_VALUE_', 'GIT_PUSH_OPTION_')


class UpstreamError(Exception):
    """A git command against the upstream failed; the message is git's own output."""


def host_env(env: Mapping[str, str]) -> dict[str, str]:
    """The host's environment for the gate's upstream commands: no repository variables, and no
    prompt (nobody is at a terminal to answer it)."""
    clean = {name: value for name, value in env.items()
             if name not in REPOSITORY_VARIABLES and not name.startswith(REPOSITORY_PREFIXES)}
    return {**clean, 'GIT_TERMINAL_PROMPT': '0'}


def git(args: Sequence[str], env: Mapping[str, str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(['git', *args], env=dict(env), stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, errors='replace', timeout=UPSTREAM_SECONDS)
    except subprocess.TimeoutExpired:
        raise UpstreamError(f'git {args[0] if args else ""} got no answer from the upstream within '
                            f'{UPSTREAM_SECONDS} s') from None


def update_mirror(mirror: Path, repo: Repo, env: Mapping[str, str]) -> None:
    """Make the mirror, or refresh it, from the upstream. The caller holds the mirror's lock."""
    if mirror.is_dir():
        refresh_mirror(mirror, repo, env)
    else:
        make_mirror(mirror, repo, env)


def make_mirror(mirror: Path, repo: Repo, env: Mapping[str, str]) -> None:
    """A bare clone of the upstream. The mirror appears whole or not at all, and its config keeps no URL."""
    mirror.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(dir=mirror.parent, prefix=f'.{mirror.name}.'))
    try:
        _check(git(['clone', '--bare', '--quiet', repo.upstream, str(build)], env))
        _check(git(['--git-dir', str(build), 'config', '--remove-section', 'remote.origin'], env))
        os.rename(build, mirror)
    finally:
        shutil.rmtree(build, ignore_errors=True)


def refresh_mirror(mirror: Path, repo: Repo, env: Mapping[str, str]) -> None:
    """Bring the upstream's branches and tags into the mirror and drop those it no longer has, except
    the refs the bottle may push (negative refspecs): those are the gate's."""
    keep = [f'^{pattern}' for pattern in repo.push]
    _check(git(['--git-dir', str(mirror), 'fetch', '--quiet', '--prune', '--no-write-fetch-head', repo.upstream,
                '+refs/heads/*:refs/heads/*', '+refs/tags/*:refs/tags/*', *keep], env))


def tips(upstream: str, ref: str, env: Mapping[str, str]) -> tuple[str | None, str | None]:
    """(where `ref` is in the upstream, where the upstream's default branch is), None where there is none,
    by one `git ls-remote --symref`. UpstreamError when the upstream cannot be asked."""
    proc = git(['ls-remote', '--symref', upstream, 'HEAD', ref], env)
    _check(proc)
    ref_tip = head_tip = None
    for line in proc.stdout.splitlines():
        left, _, name = line.partition('\t')
        if not left.startswith('ref: '):
            ref_tip = left if name == ref else ref_tip
            head_tip = left if name == 'HEAD' else head_tip
    return ref_tip, head_tip


def push(git_dir: Path, upstream: str, updates: Sequence[tuple[str, str]], env: Mapping[str, str]
         ) -> subprocess.CompletedProcess:
    """`git push --atomic upstream new:ref ...`: plain pushes, so the upstream takes fast-forwards only.
    The host's own hooks (a global core.hooksPath) are not run for the gate's pushes."""
    refspecs = [f'{new}:{ref}' for new, ref in updates]
    return git(['--git-dir', str(git_dir), 'push', '--atomic', '--no-verify', upstream, *refspecs], env)


def _check(proc: subprocess.CompletedProcess) -> None:
    if proc.returncode != 0:
        raise UpstreamError((proc.stderr or proc.stdout).strip() or f'git exited {proc.returncode}')
