"""The git commands that talk to an upstream with the host's credentials: making and refreshing a
mirror, and pushing to the upstream. They run with the host's environment (its HOME, ssh agent and
credential helpers), never with a request's: see host_env.

Every such command is bounded (Bounds): git's own settings end a connection that stalls (for http(s),
http.lowSpeedLimit/http.lowSpeedTime, given with -c to the gate's commands only; for ssh, ConnectTimeout and
ServerAliveInterval in GIT_SSH_COMMAND, unless the host chose its own ssh command), and the gate ends a
command that runs past its deadline, with everything it started (its own process group: git's remote
helper, ssh, a credential helper). git 2.39 has no connect timeout for http(s): a TLS handshake that never
completes is ended by the deadline."""
from __future__ import annotations

import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

from daemons.gate.config import Repo

# Variables that point git at a repository or inject configuration for one command: the host's own
# (if any) would aim the gate's commands elsewhere, and those that git sets for a hook must not be
# taken for the host's. (Credentials set up through GIT_CONFIG_COUNT belong in a gitconfig instead.)
REPOSITORY_VARIABLES = frozenset({
    'GIT_DIR', 'GIT_WORK_TREE', 'GIT_COMMON_DIR', 'GIT_INDEX_FILE', 'GIT_OBJECT_DIRECTORY',
    'GIT_ALTERNATE_OBJECT_DIRECTORIES', 'GIT_QUARANTINE_PATH', 'GIT_NAMESPACE', 'GIT_PREFIX',
    'GIT_CONFIG_COUNT', 'GIT_CONFIG_PARAMETERS', 'GIT_PROTOCOL', 'GIT_PROJECT_ROOT', 'GIT_HTTP_EXPORT_ALL',
    'GIT_PUSH_OPTION_COUNT', 'GIT_COMMITTER_NAME', 'GIT_COMMITTER_EMAIL'})
REPOSITORY_PREFIXES = ('GIT_CONFIG_KEY_', 'GIT_CONFIG_VALUE_', 'GIT_PUSH_OPTION_')
ENDING_SECONDS = 5.0        # to read what a command printed once its process group is killed
# What git, curl and ssh print when the bounds below end a connection (curl's and ssh's words are not translated).
STALLED = re.compile(r'Operation too slow|Timeout, server .* not responding')
NOT_CONNECTED = re.compile(r'Connection timed out|timed out during banner exchange')


@dataclass(frozen=True)
class Bounds:
    """How long the gate lets an upstream take, in seconds. Each is BOTTLE_GATE_<NAME>_SECONDS in the gate's
    environment (the host's), when set."""
    connect: float = 15.0   # to connect and begin (ssh: ConnectTimeout, which covers its handshake too)
    stall: float = 30.0     # with nothing coming from the upstream, a connection has stalled
    command: float = 300.0  # one git command against an upstream, whole: a big clone or push
    busy: float = 60.0      # a request waits for a mirror that another push or fetch holds (serve.py)

    @staticmethod
    def variables() -> dict[str, str]:
        """{field: the variable that sets it}"""
        return {field.name: f'BOTTLE_GATE_{field.name.upper()}_SECONDS' for field in fields(Bounds)}

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Bounds:
        values = {}
        for field, name in cls.variables().items():
            if name in env:
                try:
                    values[field] = float(env[name])
                except ValueError:
                    values[field] = math.nan
                if not 0 < values[field] < math.inf:
                    raise UpstreamError(f'{name}={env[name]!r} in the git gate\'s environment is not a number of '
                                        'seconds above 0; unset it or fix it, and start the gate again')
        return cls(**values)


class UpstreamError(Exception):
    """A git command against the upstream failed; the message is git's own output."""


class UpstreamTimeout(UpstreamError):
    """The upstream took longer than a bound (Bounds): the message, for a person, names the upstream, what
    timed out and after how long, and what to do."""


def host_env(env: Mapping[str, str]) -> dict[str, str]:
    """The host's environment for the gate's upstream commands: no repository variables, and no
    prompt (nobody is at a terminal to answer it)."""
    clean = {name: value for name, value in env.items()
             if name not in REPOSITORY_VARIABLES and not name.startswith(REPOSITORY_PREFIXES)}
    return {**clean, 'GIT_TERMINAL_PROMPT': '0'}


def git(args: Sequence[str], env: Mapping[str, str], upstream: str, git_dir: Path | None = None
        ) -> subprocess.CompletedProcess:
    """`git [--git-dir GIT_DIR] args...` against `upstream`, within the gate's bounds; UpstreamTimeout when
    one ended it."""
    bounds = Bounds.from_env(env)
    command = ['git', '-c', 'http.lowSpeedLimit=1', '-c', f'http.lowSpeedTime={math.ceil(bounds.stall)}',
               *(['--git-dir', str(git_dir)] if git_dir else []), *args]
    proc = run(command, {**env, **ssh_bounds(upstream, env, bounds)}, bounds.command)
    doing = f'git {args[0]} {upstream}'
    if proc is None:
        raise UpstreamTimeout(
            f'{doing} did not finish within {bounds.command:g} s, the git gate\'s bound for one command against '
            'an upstream (BOTTLE_GATE_COMMAND_SECONDS), and was ended: the upstream is slow or not answering, or '
            f'a credential helper of the host waits for someone. {try_again(upstream)}')
    said = proc.stderr.strip()
    if proc.returncode and STALLED.search(said):
        raise UpstreamTimeout(
            f'{upstream} stopped answering: {doing} got nothing from it for {bounds.stall:g} s (the git gate\'s '
            f'bound, BOTTLE_GATE_STALL_SECONDS) and was ended. {try_again(upstream)} git said:\n{said}')
    if proc.returncode and is_ssh(upstream) and NOT_CONNECTED.search(said):
        raise UpstreamTimeout(
            f'{upstream} did not answer: {doing} could not connect and begin within {bounds.connect:g} s (the git '
            f'gate\'s bound, BOTTLE_GATE_CONNECT_SECONDS). {try_again(upstream)} git said:\n{said}')
    return proc


def try_again(upstream: str) -> str:
    return f'Try again later; a person on the host can try `git ls-remote {upstream}` there.'


def run(command: Sequence[str], env: Mapping[str, str], seconds: float) -> subprocess.CompletedProcess | None:
    """`command` in a process group of its own, ended with all of that group after `seconds` (None then):
    killing git alone would leave its remote helper or ssh holding the connection."""
    proc = subprocess.Popen(command, env=dict(env), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, errors='replace', process_group=0)
    with _lock:
        _running.add(proc)
    try:
        out, err = proc.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        end(proc)          # git is not reaped yet: its group is still its own
        ended = proc.wait() == -signal.SIGKILL      # else git had ended, and something that left its group
        out, err = _output(proc)                    # holds the pipes
        if ended:
            return None
    finally:
        with _lock:
            _running.discard(proc)
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


_running: set[subprocess.Popen] = set()     # commands running now, for end_all
_lock = threading.Lock()


def end(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def end_all() -> None:
    """End every upstream command of this process with its group."""
    with _lock:
        for proc in _running:
            if proc.returncode is None:
                end(proc)


def end_on_sigterm() -> None:
    """SIGTERM (the host stopping the gate: daemons.lifecycle signals the daemon's process group, which the
    commands left) ends this process's commands, then the process. From the main thread."""
    def ended(signum, frame):
        end_all()
        sys.exit(128 + signum)
    signal.signal(signal.SIGTERM, ended)


def _output(proc: subprocess.Popen) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=ENDING_SECONDS)
    except subprocess.TimeoutExpired:
        proc.stdout.close()
        proc.stderr.close()
        return '', ''


def is_ssh(upstream: str) -> bool:
    """ssh://, or scp-style host:path (config.UPSTREAM_FORM: the other forms have :// or start with /)."""
    return upstream.startswith('ssh://') or ('://' not in upstream and not upstream.startswith('/'))


def ssh_bounds(upstream: str, env: Mapping[str, str], bounds: Bounds) -> dict[str, str]:
    """GIT_SSH_COMMAND with the bounds, for an ssh upstream, unless the host chose its ssh command (GIT_SSH_COMMAND,
    GIT_SSH or core.sshCommand): options added to a command of the host's could break it (plink, a wrapper), so
    that one runs as the host set it, ended by the command's deadline. The options given here take precedence
    over the host's ~/.ssh/config."""
    if not is_ssh(upstream) or 'GIT_SSH_COMMAND' in env or 'GIT_SSH' in env:
        return {}
    chosen = run(['git', 'config', '--get', 'core.sshCommand'], {**env, 'GIT_DIR': os.devnull}, bounds.command)
    if chosen is None or chosen.returncode == 0:
        return {}
    interval = math.ceil(bounds.stall / 3)
    return {'GIT_SSH_COMMAND': f'ssh -o ConnectTimeout={math.ceil(bounds.connect)} '
                               f'-o ServerAliveInterval={interval} -o ServerAliveCountMax=3'}


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
        _check(git(['clone', '--bare', '--quiet', repo.upstream, str(build)], env, repo.upstream))
        _check(subprocess.run(['git', '--git-dir', str(build), 'config', '--remove-section', 'remote.origin'],
                              env=dict(env), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              errors='replace'))
        os.rename(build, mirror)
    finally:
        shutil.rmtree(build, ignore_errors=True)


def refresh_mirror(mirror: Path, repo: Repo, env: Mapping[str, str]) -> None:
    """Bring the upstream's branches and tags into the mirror and drop those it no longer has, except
    the refs the bottle may push (negative refspecs): those are the gate's."""
    keep = [f'^{pattern}' for pattern in repo.push]
    _check(git(['fetch', '--quiet', '--prune', '--no-write-fetch-head', repo.upstream,
                '+refs/heads/*:refs/heads/*', '+refs/tags/*:refs/tags/*', *keep], env, repo.upstream, mirror))


def tips(upstream: str, ref: str, env: Mapping[str, str]) -> tuple[str | None, str | None]:
    """(where `ref` is in the upstream, where the upstream's default branch is), None where there is none,
    by one `git ls-remote --symref`. UpstreamError when the upstream cannot be asked."""
    proc = git(['ls-remote', '--symref', upstream, 'HEAD', ref], env, upstream)
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
    The host's own hooks (a global core.hooksPath) are not run for the gate's pushes. UpstreamTimeout when
    the gate's bounds ended it; otherwise git's result, the upstream's refusal included."""
    refspecs = [f'{new}:{ref}' for new, ref in updates]
    return git(['push', '--atomic', '--no-verify', upstream, *refspecs], env, upstream, git_dir)


def _check(proc: subprocess.CompletedProcess) -> None:
    if proc.returncode != 0:
        raise UpstreamError((proc.stderr or proc.stdout).strip() or f'git exited {proc.returncode}')
