"""bottles.json, what the gate serves: for each bottle, its repositories and their push policy.

    {"bottles": {"<bottle>": {"repos": [
        {"upstream": "https://example.com/org/repo.git",  # https, http, ssh://, scp-style or a local path
         "path": "example.com/org/repo",                  # where the gate serves it, without .git
         "push": ["refs/heads/agent/a/*"],                # full ref names the bottle may push
         "mode": "forward" | "review" | "local",
         "max_push_bytes": 104857600}]}}}

A push pattern is a full ref name with at most one '*', which matches any run of characters, '/'
included (as in a git refspec: the gate keeps those refs out of its refreshes with the same patterns
as negative refspecs).
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

# What an accepted push does, by mode, in the words the agent's prompt gives it: the one declaration of the
# modes (the manifest's `mode` takes these, the gate applies them).
MODES = {
    'forward': 'a push goes upstream at once',
    'review': 'a push is held until a person approves it; you are given its review id, and pushing again '
              'replaces it',
    'local': 'a push stays in the gate; nothing goes upstream',
}
BOTTLE_NAME = re.compile(r'[A-Za-z0-9][A-Za-z0-9._-]*')
PATH_SEGMENT = re.compile(r'[A-Za-z0-9_~:@+-][A-Za-z0-9._~:@+-]*')
# `ext::` and `fd::` would run commands or open descriptors on the host: only these forms are served.
UPSTREAM_FORM = re.compile(r'(?!.*::)((https?|ssh|git|file)://\S+|[^\s/:-][^\s/:]*:\S+|/\S*)')
PATTERN_FORBIDDEN = re.compile(r'[\s?\[\\^~:]|\.\.|//|\*.*\*')


class BottlesError(Exception):
    """bottles.json, or what is to be written there, is not valid; the message names the place."""


@dataclass(frozen=True)
class Repo:
    upstream: str
    path: str
    push: tuple[str, ...]
    mode: str
    max_push_bytes: int

    def may_push(self, ref: str) -> bool:
        return any(pattern_matches(pattern, ref) for pattern in self.push)

    def allows_tags(self) -> bool:
        return any(pattern.startswith('refs/tags/') for pattern in self.push)

    def to_json(self) -> dict:
        return {**asdict(self), 'push': list(self.push)}

    @classmethod
    def from_json(cls, data: dict) -> Repo:
        return cls(data['upstream'], data['path'], tuple(data['push']), data['mode'], data['max_push_bytes'])


def pattern_matches(pattern: str, ref: str) -> bool:
    prefix, star, suffix = pattern.partition('*')
    if not star:
        return ref == pattern
    return len(ref) >= len(prefix) + len(suffix) and ref.startswith(prefix) and ref.endswith(suffix)


def parse_bottles(document: object) -> dict[str, list[Repo]]:
    """The bottles of a bottles.json document, each with its repositories; BottlesError names every
    problem found."""
    problems: list[str] = []
    bottles: dict[str, list[Repo]] = {}
    if not isinstance(document, dict) or not isinstance(document.get('bottles'), dict):
        raise BottlesError('expected {"bottles": {"<bottle>": {"repos": [...]}}}')
    for bottle, entry in document['bottles'].items():
        where = f'bottle {bottle!r}'
        if not isinstance(bottle, str) or not BOTTLE_NAME.fullmatch(bottle):
            problems.append(f'{where}: a bottle name is letters, digits, ".", "_" and "-", '
                            'not starting with "." or "-"')
        if not isinstance(entry, dict) or not isinstance(entry.get('repos'), list):
            problems.append(f'{where}: expected {{"repos": [...]}}')
            continue
        repos, paths = [], set()
        for number, item in enumerate(entry['repos'], 1):
            repo = _repo(f'{where}, repository {number}', item, problems)
            if repo and repo.path in paths:
                problems.append(f'{where}: two repositories are served at {repo.path!r}')
            elif repo:
                paths.add(repo.path)
                repos.append(repo)
        bottles[bottle] = repos
    if problems:
        raise BottlesError('; '.join(problems))
    return bottles


def load_bottles(path: Path) -> dict[str, list[Repo]]:
    """What the gate serves now; no file means no bottles."""
    try:
        return parse_bottles(json.loads(path.read_text()))
    except FileNotFoundError:
        return {}
    except ValueError as err:
        raise BottlesError(f'{path} is not JSON: {err}') from None
    except BottlesError as err:
        raise BottlesError(f'{path}: {err}') from None


def _repo(where: str, item: object, problems: list[str]) -> Repo | None:
    if not isinstance(item, dict):
        problems.append(f'{where}: expected an object with upstream, path, push, mode, max_push_bytes')
        return None
    found = len(problems)
    keys = {'upstream', 'path', 'push', 'mode', 'max_push_bytes'}
    if set(item) != keys:
        problems.append(f'{where}: the keys are {", ".join(sorted(keys))}; '
                        f'got {", ".join(sorted(map(str, item)))}')
        return None
    upstream, path, push, mode, size = (item[k] for k in ('upstream', 'path', 'push', 'mode', 'max_push_bytes'))
    if not isinstance(upstream, str) or not UPSTREAM_FORM.fullmatch(upstream):
        problems.append(f'{where}: upstream {upstream!r} is not an https, http, ssh, git or file URL, '
                        'an scp-style host:path, or an absolute path')
    if not isinstance(path, str) or not all(PATH_SEGMENT.fullmatch(s) for s in path.split('/')) \
            or path.endswith('.git'):
        problems.append(f'{where}: path {path!r} must be host[:port]/path segments of letters, digits and '
                        '"._~:@+-", without a leading "/" or "." and without the trailing .git')
    if not isinstance(push, list) or not all(isinstance(p, str) for p in push):
        problems.append(f'{where}: push must be a list of ref patterns')
    else:
        for pattern in push:
            if not pattern.startswith('refs/') or PATTERN_FORBIDDEN.search(pattern):
                problems.append(f'{where}: push pattern {pattern!r} must be a full ref name (refs/...) with at '
                                'most one "*", and no spaces, "..", "//" or any of ? [ \\ ^ ~ :')
    if mode not in MODES:
        problems.append(f'{where}: mode {mode!r} is not one of {", ".join(MODES)}')
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        problems.append(f'{where}: max_push_bytes {size!r} must be a positive whole number')
    if len(problems) > found:
        return None
    return Repo(upstream, path, tuple(push), mode, size)
