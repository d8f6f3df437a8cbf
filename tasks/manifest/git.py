"""Repositories the agent reaches only through the git gate: the URL forms git takes (REPO_URLS), GitRepo
(one repository, as the Agent holds it and as it goes into the gate's bottles file) and GitRepoList (the
kind of `git`).

Apart because a repository's URL forms, gate path and push patterns follow the gate (daemons/gate), not
the rest of the manifest.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from daemons.gate.config import MODES as GIT_MODES    # standard library only, shared with the gate
from tasks.manifest.kinds import Choice, Index, Integer, Kind, show, unknown_keys

# A repository URL as git takes it: https://host[:port]/path, ssh://[user@]host[:port]/path or the
# scp-like [user@]host:path. The path is plain (letters, digits, ".", "_", "~", "-" and "/").
_REPO_HOST = r'(?P<host>[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)'
_REPO_PATH = r'(?P<path>(?!\.\.?/)[A-Za-z0-9._~-]+(?:/(?!\.\.?(?:/|$))[A-Za-z0-9._~-]+)*)/?'
REPO_URLS = (
    re.compile(rf'https://{_REPO_HOST}(?::(?P<port>[0-9]{{1,5}}))?/{_REPO_PATH}'),
    re.compile(rf'ssh://(?:(?P<user>[a-z_][a-z0-9_.-]*)@)?{_REPO_HOST}(?::(?P<port>[0-9]{{1,5}}))?/{_REPO_PATH}'),
    re.compile(rf'(?:(?P<user>[a-z_][a-z0-9_.-]*)@)?{_REPO_HOST}:(?!/){_REPO_PATH}'),
)
GIT_DEFAULT_MODE = 'review'
MAX_PUSH_MB = 10240
# What git check-ref-format refuses in a ref, but for "*", which patterns use.
_BAD_REF = re.compile(r'[\x00-\x20\x7f~^:?\[\\]|\.\.|//|@\{|^/|/$|\.lock(?:/|$)|/\.|^\.|\.$')


@dataclass(frozen=True)
class GitRepo:
    """A repository the agent reaches only through the git gate."""
    url: str
    push: tuple[str, ...] | None       # full ref patterns; None: the agent's default, set by load_agents
    mode: str
    max_push_mb: int

    @property
    def parts(self) -> re.Match:
        return next(m for m in (pattern.fullmatch(self.url) for pattern in REPO_URLS) if m)

    @property
    def path(self) -> str:
        return self.parts['path'].removesuffix('.git')

    @property
    def gate_path(self) -> str:
        """Where the gate serves it: host (with an https port other than 443), then the path without
        `.git`; the same for every URL form of one repository."""
        match = self.parts
        https_port = match['port'] if self.url.startswith('https://') and match['port'] not in (None, '443') else None
        return f'{match["host"].lower()}{":" + https_port if https_port else ""}/{self.path}'

    def url_forms(self) -> tuple[str, ...]:
        """The URL prefixes git may be given for this repository (https, ssh and scp-like), each
        rewritten to the gate; a longer URL (`repo-2`) shares the prefix and reaches the gate too,
        which answers for listed repositories only."""
        match = self.parts
        host, path = match['host'].lower(), self.path
        user = match.groupdict().get('user') or 'git'
        https = f'https://{host}{":" + match["port"] if self.url.startswith("https://") and match["port"] else ""}'
        return (f'{https}/{path}', f'ssh://{user}@{host}/{path}', f'{user}@{host}:{path}')

    def gate_entry(self) -> dict:
        """The repository in the gate's bottles file (daemons/gate)."""
        return {'upstream': self.url, 'path': self.gate_path, 'push': list(self.push or ()), 'mode': self.mode,
                'max_push_bytes': self.max_push_mb << 20}


def full_ref_pattern(pattern: str) -> str:
    """A `push` pattern as a full ref: a branch pattern (`agent/a/*`) is under refs/heads/."""
    return pattern if pattern.startswith('refs/') else f'refs/heads/{pattern}'


class GitRepoList(Kind):
    """Repositories the agent clones and pushes through the git gate."""
    name = 'list of `{url, push, mode, max_push_mb}`'
    ENTRY_KEYS = ('url', 'push', 'mode', 'max_push_mb')
    EXAMPLE = '{url: https://github.com/acme/app.git, push: [agent/reviewer/*], mode: review}'

    def problems(self, value):
        if not isinstance(value, list):
            yield (), f'expected a list of repositories such as - {self.EXAMPLE}, got {show(value)}'
            return
        seen: dict[str, int] = {}
        for i, entry in enumerate(value):
            at = (Index(i),)
            if not isinstance(entry, dict):
                yield at, f'expected a mapping such as {self.EXAMPLE}, got {show(entry)}'
                continue
            for key, problem in unknown_keys(entry, self.ENTRY_KEYS, 'a repository'):
                yield at + (key,), problem
            url = entry.get('url')
            if not isinstance(url, str) or not any(p.fullmatch(url) for p in REPO_URLS):
                yield at + ('url',), (f'expected a repository URL such as https://github.com/acme/app.git, '
                                      f'ssh://git@github.com/acme/app.git or git@github.com:acme/app.git, '
                                      f'got {show(url)}')
            else:
                path = GitRepo(url, None, 'review', 1).gate_path
                if path in seen:
                    yield at + ('url',), f'the same repository as entry {seen[path]} ({path}); keep one'
                seen.setdefault(path, i)
            push = entry.get('push', [])
            if not isinstance(push, list) or ('push' in entry and not push):
                yield at + ('push',), (f'expected a non-empty list of branch patterns such as [agent/reviewer/*], '
                                       f'got {show(push)}; leave push out for agent/<agent>/*')
            else:
                for j, pattern in enumerate(push):
                    if not isinstance(pattern, str) or not pattern or _BAD_REF.search(pattern) \
                            or pattern.count('*') > 1 or pattern.startswith('refs/') and pattern.count('/') < 2:
                        yield at + ('push', Index(j)), (
                            f'expected a branch pattern such as agent/reviewer/* (or a full ref pattern such '
                            f'as refs/tags/v*), with at most one "*", got {show(pattern)}')
            if 'mode' in entry:
                yield from ((at + ('mode',) + below, error) for below, error in Choice(*GIT_MODES).problems(
                    entry['mode']))
            if 'max_push_mb' in entry:
                yield from ((at + ('max_push_mb',) + below, error) for below, error in Integer(
                    1, MAX_PUSH_MB, 'MiB').problems(entry['max_push_mb']))

    def schema(self):
        return {'type': 'array', 'items': {
            'type': 'object', 'required': ['url'], 'additionalProperties': False,
            'properties': {'url': {'type': 'string', 'anyOf': [
                               {'pattern': '^(?:' + re.sub(r'\?P<\w+>', '', p.pattern) + ')$'} for p in REPO_URLS]},
                           'push': {'type': 'array', 'minItems': 1, 'items': {'type': 'string', 'minLength': 1}},
                           'mode': {'enum': list(GIT_MODES)},
                           'max_push_mb': {'type': 'integer', 'minimum': 1, 'maximum': MAX_PUSH_MB}}}}

    def convert(self, value, base_dir):
        return tuple(GitRepo(entry['url'], tuple(full_ref_pattern(p) for p in entry['push']) if 'push' in entry
                             else None, entry.get('mode', GIT_DEFAULT_MODE), entry.get('max_push_mb', 100))
                     for entry in value)
