"""Pushes held for review (mode `review`): list them, approve one (its exact commit goes upstream,
fast-forward only) or reject it. doit's tasks and the supervisor call these functions.

A held push is a file held/<id>.json in the gate's state directory, written by the post-receive hook
once the push is in the gate. Approving or rejecting removes it and appends a receipt.

What a person reviews is computed here from the objects, never taken from what the agent says: how many
commits the push adds to what the upstream's branches hold, the newest of them (the rest counted), the files
the whole push changes against its base with their line counts and kinds, and the whole diff on request
(`diff`). The base is what an approval changes: see `summarise`.
"""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from daemons.atomic import write_atomic
from daemons.gate import upstream
from daemons.gate.store import append_receipt, held_dir, held_file, mirror_dir, mirror_lock


class ReviewError(Exception):
    """A review that cannot be done; the message says why and what to do."""


@dataclass(frozen=True)
class Held:
    id: str
    bottle: str
    repo: str               # the upstream URL
    ref: str
    old: str
    new: str
    time: str
    commits: list[str]      # "sha subject", newest first, at most COMMITS_KEPT of the `count` the push adds
    path: str               # where the gate serves the repository (its mirror)
    count: int = 0          # every commit the push adds to what the upstream's branches and tags hold
    base: str = ''          # what the files are compared against (EMPTY_TREE for a history of its own)
    files: list = field(default_factory=list)   # [path, added, deleted, kind]: None, None for a binary file;
                                                # kind: '' or what the mode says ("new symlink", ...)
    files_more: int = 0     # files changed beyond those listed
    added: int = 0          # lines, over every text file
    deleted: int = 0
    note: str = ''          # what the person must know of the base ('' when nothing)


LANDING_SECONDS = 900    # a push holds its mirror's lock at most about LOCK_SECONDS; then it landed or not
COMMITS_KEPT = 50
FILES_KEPT = 300
SUBJECT_CHARS = 200
PATH_CHARS = 300
EMPTY_TREE = '4b825dc642cb6eb9a060e54bf8d69288fbee4904'
# No diff driver or textconv of the host's, and no attributes from the agent's own tree (git 2.42 and later
# read a bare repository's from HEAD, attr.tree: a `-diff` there would make a text file "binary").
DIFF = ('-c', f'attr.tree={EMPTY_TREE}', 'diff', '--no-color', '--no-ext-diff', '--no-textconv', '--no-renames')


def summarise(git: Callable[..., str], new: str, patterns: tuple[str, ...], ref: str, ref_tip: str | None,
              head_tip: str | None, unasked: str | None = None) -> dict:
    """The fields of a Held that describe a push of `new` to `ref`, from the objects. `git(*args)` runs git on
    the repository holding them and returns its output; `patterns`: the refs the bottle may push (the gate's
    copies of those are the agent's, not the upstream's); `ref_tip`, `head_tip`: where the upstream's `ref`
    and default branch are, as the upstream said (None: not there); `unasked`: why the upstream could not
    be asked, if it could not.

    The base is what an approval changes: the upstream's `ref` when it has it (approval moves it to `new`,
    a fast-forward), else where `new` leaves the upstream's default branch (a new branch, as a pull request
    shows it). Commits are counted against every branch and tag the gate has of the upstream's."""
    def have(sha: str | None) -> bool:
        return bool(sha) and git('cat-file', '-t', sha).strip() == 'commit'

    excluded = [f'--exclude={pattern}' for pattern in patterns]
    known = [*excluded, '--glob=refs/heads/*', *excluded, '--glob=refs/tags/*', *([ref_tip] if have(ref_tip) else [])]
    count = int(git('rev-list', '--count', new, '--not', *known).strip() or 0)
    listed = git('log', '-z', f'--max-count={COMMITS_KEPT}', '--format=%H %s', new, '--not', *known).split('\0')
    notes = []
    if have(ref_tip):
        base = ref_tip
        if git('merge-base', ref_tip, new).strip() != ref_tip:
            notes.append(f'the upstream\'s {ref} is at {ref_tip[:12]}, which this push does not contain: the '
                         'upstream will refuse it as not a fast-forward')
    else:
        if ref_tip:
            notes.append(f'the upstream\'s {ref} is at {ref_tip[:12]}, which the gate does not have: the upstream '
                         'will refuse this push as not a fast-forward')
        fork = git('merge-base', head_tip, new).strip() if have(head_tip) else ''
        base = fork or EMPTY_TREE
        if not fork:
            notes.append('compared against nothing: this history shares no commit with the upstream\'s default '
                         'branch')
    if unasked:
        notes.append(f'the upstream could not be asked where {ref} is ({unasked[:300]}); the base may be older')
    files, added, deleted = [], 0, 0
    kinds = _kinds(git(*DIFF, '--raw', '-z', base, new))
    for entry in filter(None, git(*DIFF, '--numstat', '-z', base, new).split('\0')):
        plus, minus, path = entry.split('\t', 2)
        binary = plus == '-'
        files.append([path[:PATH_CHARS], None if binary else int(plus), None if binary else int(minus),
                      kinds.get(path, '')])
        added, deleted = added + (0 if binary else int(plus)), deleted + (0 if binary else int(minus))
    return {'count': count, 'commits': [commit[:41 + SUBJECT_CHARS] for commit in listed if commit],
            'base': base, 'files': files[:FILES_KEPT], 'files_more': max(0, len(files) - FILES_KEPT),
            'added': added, 'deleted': deleted, 'note': '; '.join(notes)}


MODES = {'100644': 'file', '100755': 'executable', '120000': 'symlink', '160000': 'submodule', '040000': 'directory'}


def _kinds(raw: str) -> dict[str, str]:
    """What `git diff --raw -z` says of each path beyond its lines: a new, deleted or changed mode (an
    executable, a symlink, a submodule)."""
    kinds, fields = {}, raw.split('\0')
    for head, path in zip(fields[0::2], fields[1::2]):
        parts = head.lstrip(':').split()
        if len(parts) < 5:
            continue
        old, new, status = parts[0], parts[1], parts[4]
        if status == 'A':
            kind = f'new {MODES.get(new, new)}' if new != '100644' else ''
        elif status == 'D':
            kind = f'deleted {MODES.get(old, old)}'
        elif old != new:
            kind = f'{MODES.get(old, old)} made {MODES.get(new, new)}'
        else:
            kind = '' if new in ('100644', '100755') else MODES.get(new, new)
        if kind:
            kinds[path] = kind
    return kinds


def diff(state_dir: Path, item: Held) -> str:
    """The whole change of a held push against its base, as git shows it (no driver of the host's)."""
    mirror = mirror_dir(state_dir, item.bottle, item.path)
    proc = subprocess.run(['git', '--git-dir', str(mirror), *DIFF, '--stat', '--patch', item.base or EMPTY_TREE,
                           item.new], capture_output=True)       # bytes: text=True would turn a CR into a line
    if proc.returncode != 0:
        raise ReviewError(f'the diff of held push {item.id} cannot be made: '
                          f'{proc.stderr.decode(errors="replace").strip()[:500]}')
    return proc.stdout.decode('utf-8', 'replace')


def new_id() -> str:
    return secrets.token_hex(4)


def record_held(state_dir: Path, item: Held) -> None:
    write_atomic(held_file(state_dir, item.id), json.dumps(asdict(item), indent=2) + '\n')


def find(state_dir: Path, held_id: str) -> Held | None:
    """The held push with that id, or None."""
    path = held_file(state_dir, held_id)
    return _read(path) if held_id.isalnum() and path.is_file() else None


def held(state_dir: Path) -> list[Held]:
    """Every push waiting for review, oldest first. A hold is written before its push's refs move
    (hook.hold_all); one whose commit never reached the gate (the push was cut after it) is left out, and
    dropped with a receipt once no push can still be landing it (LANDING_SECONDS)."""
    items = []
    for path in held_dir(state_dir).glob('*.json'):
        item = _read(path)
        if _in_gate(state_dir, item):
            items.append(item)
        elif time.time() - path.stat().st_mtime > LANDING_SECONDS:
            forget(state_dir, item.id)
            append_receipt(state_dir, bottle=item.bottle, repo=item.repo, path=item.path, ref=item.ref,
                           old=item.old, new=item.new, id=item.id, decision='dropped', rule='never-landed')
    return sorted(items, key=lambda item: (item.time, item.id))


def holding(state_dir: Path, bottle: str, path: str, ref: str, new: str) -> Held | None:
    """The newest hold of that bottle's push of `new` to `ref` in that repository."""
    found = [item for item in (_read(p) for p in held_dir(state_dir).glob('*.json'))
             if (item.bottle, item.path, item.ref, item.new) == (bottle, path, ref, new)]
    return max(found, key=lambda item: (item.time, item.id)) if found else None


def forget(state_dir: Path, held_id: str) -> None:
    held_file(state_dir, held_id).unlink(missing_ok=True)


def _in_gate(state_dir: Path, item: Held) -> bool:
    """Whether the held push's ref moved in the gate: its commit is on the ref there (where it is, or
    under a newer push). Its objects alone say nothing: git keeps them when the ref update fails."""
    mirror = mirror_dir(state_dir, item.bottle, item.path)
    return subprocess.run(['git', '--git-dir', str(mirror), 'merge-base', '--is-ancestor', item.new, item.ref],
                          capture_output=True).returncode == 0


def approve(state_dir: Path, held_id: str, env: Mapping[str, str] | None = None) -> str:
    """Push the held commit to its ref upstream (a plain push: the upstream takes a fast-forward only),
    with the host's credentials from `env` (default: this process's environment). Returns the upstream's
    output. ReviewError when the agent pushed that ref again since (the newer push is the one to review)
    or when the upstream refuses."""
    with _locked(state_dir, held_id) as item:
        mirror = mirror_dir(state_dir, item.bottle, item.path)
        current = gate_ref(state_dir, item)
        if current != item.new:
            newer = superseded_by(state_dir, item, current)
            raise ReviewError(
                f'held push {held_id} cannot be approved: the agent pushed again; {item.ref} of bottle '
                f'{item.bottle} in the gate is now at {current[:12] or "nothing"}, not {item.new[:12]}. '
                + (f'Review the newer push {newer} instead.' if newer else 'No newer push is held for it.'))
        try:
            proc = upstream.push(mirror, item.repo, [(item.new, item.ref)], upstream.host_env(env or os.environ))
            output, refused = (proc.stdout + proc.stderr).strip(), proc.returncode != 0
            failed = 'refused'
        except upstream.UpstreamError as err:
            output, refused, failed = str(err), True, 'did not take'
        receipt = {'bottle': item.bottle, 'repo': item.repo, 'path': item.path, 'ref': item.ref,
                   'old': item.old, 'new': item.new, 'id': held_id, 'upstream': output}
        if refused:
            append_receipt(state_dir, **receipt, decision='refused', rule='upstream')
            raise ReviewError(f'the upstream {item.repo} {failed} {item.ref} at {item.new[:12]}; held push '
                              f'{held_id} stays held. Why:\n{output}')
        append_receipt(state_dir, **receipt, decision='approved')
        held_file(state_dir, held_id).unlink()
    return output


def gate_ref(state_dir: Path, item: Held) -> str:
    """Where the held push's ref is in the gate now ('' when it is not there)."""
    mirror = mirror_dir(state_dir, item.bottle, item.path)
    return subprocess.run(['git', '--git-dir', str(mirror), 'rev-parse', '--verify', '--quiet', item.ref],
                          capture_output=True, text=True).stdout.strip()


def superseded_by(state_dir: Path, item: Held, current: str) -> str | None:
    """The id of the held push that put the ref where it is now, when that is not `item`."""
    return next((other.id for other in held(state_dir) if other.id != item.id and
                 (other.bottle, other.path, other.ref, other.new) == (item.bottle, item.path, item.ref, current)), None)


def reject(state_dir: Path, held_id: str) -> None:
    """Drop the held push: nothing goes upstream. The commits stay in the gate, on the agent's ref."""
    with _locked(state_dir, held_id) as item:
        held_file(state_dir, held_id).unlink()
        append_receipt(state_dir, bottle=item.bottle, repo=item.repo, path=item.path, ref=item.ref, old=item.old,
                       new=item.new, id=held_id, decision='rejected')


@contextmanager
def _locked(state_dir: Path, held_id: str):
    """The held push, with its mirror locked: read again under the lock, so of an approval and a
    rejection at once, one finds it and the other is told it is gone."""
    item = _load(state_dir, held_id)
    with mirror_lock(mirror_dir(state_dir, item.bottle, item.path)):
        yield _load(state_dir, held_id)


def _load(state_dir: Path, held_id: str) -> Held:
    path = held_file(state_dir, held_id)
    if not held_id.isalnum() or not path.is_file():
        raise ReviewError(f'no push is held for review as {held_id!r} in {held_dir(state_dir)}: it was approved '
                          'or rejected already, or the id is mistyped; the list of held pushes has the ids')
    return _read(path)


def _read(path: Path) -> Held:
    try:
        return Held(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError) as err:
        raise ReviewError(f'{path} is not a held push the gate wrote ({err}); remove it') from None
