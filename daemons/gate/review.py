"""Pushes held for review (mode `review`): list them, approve one (its exact commit goes upstream,
fast-forward only) or reject it. doit's tasks and the supervisor call these functions.

A held push is a file held/<id>.json in the gate's state directory, written by the post-receive hook
once the push is in the gate. Approving or rejecting removes it and appends a receipt.
"""
from __future__ import annotations

import json
import os
import secrets
import subprocess
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
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
    commits: list[str]      # "sha subject", newest first: what the push adds to the upstream's branches
    path: str               # where the gate serves the repository (its mirror)


def new_id() -> str:
    return secrets.token_hex(4)


def record_held(state_dir: Path, item: Held) -> None:
    write_atomic(held_file(state_dir, item.id), json.dumps(asdict(item), indent=2) + '\n')


def held(state_dir: Path) -> list[Held]:
    """Every push waiting for review, oldest first."""
    items = [_read(path) for path in held_dir(state_dir).glob('*.json')]
    return sorted(items, key=lambda item: (item.time, item.id))


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
        except upstream.UpstreamError as err:
            output, refused = str(err), True
        receipt = {'bottle': item.bottle, 'repo': item.repo, 'path': item.path, 'ref': item.ref,
                   'old': item.old, 'new': item.new, 'id': held_id, 'upstream': output}
        if refused:
            append_receipt(state_dir, **receipt, decision='refused', rule='upstream')
            raise ReviewError(f'the upstream {item.repo} refused {item.ref} at {item.new[:12]}; held push '
                              f'{held_id} stays held. The upstream said:\n{output}')
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
