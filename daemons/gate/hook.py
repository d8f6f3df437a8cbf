"""The gate's receive hooks, run by git receive-pack for each push into a mirror (hooks/):

    python -P -m daemons.gate.hook pre-receive|post-receive      (stdin: "<old> <new> <ref>" lines)

pre-receive applies the policy, then records what the push will be before git can move a ref: in mode
`review` the hold (held/<id>.json) and its receipt; in mode `local` the receipt; in mode `forward` a
`forwarding` receipt, then the push upstream while the pushed objects are still in quarantine (an upstream
refusal refuses the push, and the gate keeps nothing of it). What cannot be written (a full disk) refuses
the push. So a push killed or failing at any point is held or refused: a hold whose commit never reached
the mirror is not listed (review.held). post-receive, once the refs are in the gate, tells the agent the id
of its hold (the hook scripts start no Python for it in the other modes).
All they print reaches the pusher as `remote:` lines. serve.py passes them, in the environment, the
state directory, the bottle, the repository's entry of bottles.json and the names of the host's
variables (BOTTLE_GATE_*). The daemon holds the mirror's lock for the whole push.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from daemons.gate import review, upstream
from daemons.gate.config import Repo
from daemons.gate.store import ZERO, ReceiptError, append_receipt, checkpoint, now


@dataclass(frozen=True)
class Update:
    old: str
    new: str
    ref: str


@dataclass(frozen=True)
class Push:
    state_dir: Path
    bottle: str
    repo: Repo
    updates: list[Update]

    @classmethod
    def from_hook(cls) -> Push:
        updates = [Update(*line.split()) for line in sys.stdin.read().splitlines() if line.strip()]
        return cls(Path(os.environ['BOTTLE_GATE_STATE']), os.environ['BOTTLE_GATE_BOTTLE'],
                   Repo.from_json(json.loads(os.environ['BOTTLE_GATE_REPO'])), updates)

    def receipt(self, update: Update, decision: str, **details) -> None:
        append_receipt(self.state_dir, bottle=self.bottle, repo=self.repo.upstream, path=self.repo.path,
                       ref=update.ref, old=update.old, new=update.new, decision=decision, **details)

    def allowed(self) -> str:
        return ', '.join(self.repo.push) or 'nothing'


def say(text: str) -> None:
    print(f'gate: {text}', file=sys.stderr, flush=True)


def local_git(*args: str) -> subprocess.CompletedProcess:
    """git on the mirror with the hook's own environment: it sees the pushed objects in quarantine."""
    return subprocess.run(['git', *args], capture_output=True, text=True, errors='replace')


def host_environment() -> dict[str, str]:
    """The host's variables serve.py named for the hook (its credentials for the upstream)."""
    return {name: os.environ[name] for name in json.loads(os.environ['BOTTLE_GATE_HOST_ENV']) if name in os.environ}


def git_text(*args: str) -> str:
    """What git on the mirror prints, exactly (text=True would turn every CR into a line break)."""
    return subprocess.run(['git', *args], capture_output=True).stdout.decode('utf-8', 'replace')


def pre_receive(push: Push) -> int:
    refusals = {update: rule for update in push.updates if (rule := refusal(push, update))}
    if refusals:
        for update in push.updates:
            rule, why = refusals.get(update, ('with-the-rest', 'another ref of the same push was refused'))
            say(f'refused {update.ref} (rule {rule}): {why}')
            try:
                push.receipt(update, 'refused', rule=rule)
            except ReceiptError as err:
                say(f'(the gate could not record this refusal: {err})')
        say(f'this bottle may push, as fast-forwards, to: {push.allowed()}')
        return 1
    if push.repo.mode == 'forward':
        return forward(push)
    try:        # the push holds the mirror's lock: the refs are updated next, and only if this returns 0
        if push.repo.mode == 'local':
            for update in push.updates:
                push.receipt(update, 'kept')    # hooks/post-receive says it, once the ref has moved
        else:
            hold_all(push)
    except (OSError, ReceiptError) as err:
        return unrecorded(err)
    checkpoint('ref-update')
    return 0


def unrecorded(err: Exception) -> int:
    say(f'refused: the gate cannot record this push ({err}); nothing of it was kept or sent. Try again '
        'later; if it persists, a person on the host sees to the gate\'s disk')
    return 1


def hold_all(push: Push) -> list[review.Held]:
    """Mode review: each ref's hold and its receipt, on disk before the refs can move. When one cannot be
    written, those written are taken back and the push is refused (the caller): a push is held or refused.
    A hold of the same commit to the same ref that an earlier, cut push of it left is replaced."""
    held = []
    try:
        for update in push.updates:
            earlier = review.holding(push.state_dir, push.bottle, push.repo.path, update.ref, update.new)
            checkpoint('before-hold')
            item = hold(push, update)
            held.append(item)
            push.receipt(update, 'held', id=item.id)
            if earlier:
                review.forget(push.state_dir, earlier.id)
                push.receipt(update, 'dropped', id=earlier.id, rule='never-landed')
    except BaseException:
        for item in held:
            review.forget(push.state_dir, item.id)
        raise
    checkpoint('after-hold')
    return held


HELD_PER_BOTTLE = 20        # pushes of one bottle held for review at once


def refusal(push: Push, update: Update) -> tuple[str, str] | None:
    """(rule, why) when the policy refuses this ref update."""
    if push.repo.mode == 'review':
        waiting = sum(item.bottle == push.bottle for item in review.held(push.state_dir))
        if waiting + len(push.updates) > HELD_PER_BOTTLE:
            return 'too-many-held', (f'this bottle has {waiting} pushes held for review, and may have '
                                     f'{HELD_PER_BOTTLE} at once; wait until a person approves or rejects some')
    if update.new == ZERO:
        return 'no-delete', 'the gate never deletes a ref'
    if update.ref.startswith('refs/tags/') and not push.repo.allows_tags():
        return 'no-tags', 'tags are refused unless a refs/tags/ pattern in the manifest\'s push list allows them'
    if not push.repo.may_push(update.ref):
        return 'allowed-refs', f'this bottle may push only to {push.allowed()}'
    current = local_git('rev-parse', '--verify', '--quiet', update.ref).stdout.strip() or ZERO
    if current != update.old:
        return 'ref-moved', (f'the ref is at {short(current)} now, not {short(update.old)} as your push expected: '
                             'another push landed first; fetch and push again')
    if update.old != ZERO and local_git('merge-base', '--is-ancestor', update.old, update.new).returncode != 0:
        return 'no-force-push', (f'{short(update.new)} does not contain {short(update.old)}, where the ref is: '
                                 'force pushes are refused; fetch, rebase or merge onto it, and push again')
    return None


def forward(push: Push) -> int:
    """Push the accepted refs upstream, all or none (--atomic), with the host's credentials, once a
    `forwarding` receipt is on disk (one that cannot be written refuses the push: nothing went anywhere).
    The objects are read from the quarantine; a local upstream must not inherit GIT_QUARANTINE_PATH, which
    forbids ref updates. The agent is told whether it landed upstream, whatever happens to the gate's copy."""
    try:
        for update in push.updates:
            push.receipt(update, 'forwarding')
    except ReceiptError as err:
        return unrecorded(err)
    host = host_environment()
    git_dir = Path(os.environ.get('GIT_DIR', '.')).resolve()
    objects = {name: os.environ[name] for name in ('GIT_OBJECT_DIRECTORY', 'GIT_ALTERNATE_OBJECT_DIRECTORIES')
               if name in os.environ}
    try:
        proc = upstream.push(git_dir, push.repo.upstream, [(u.new, u.ref) for u in push.updates],
                             {**upstream.host_env(host), **objects})
        said, landed = (proc.stdout + proc.stderr).strip(), proc.returncode == 0
        failed = 'refused the push (its words are above)'
    except upstream.UpstreamError as err:
        said, landed, failed = str(err), False, 'did not take the push (above: why)'
    if said:
        print(said, file=sys.stderr, flush=True)     # the upstream's own words
    if not landed:
        say(f'the upstream {push.repo.upstream} {failed}; the gate keeps nothing of it')
    else:
        for update in push.updates:
            say(f'{update.ref} landed upstream in {push.repo.upstream} at {short(update.new)}; if git reports an '
                'error below, it concerns the gate\'s own copy only')
    try:
        for update in push.updates:
            push.receipt(update, 'forwarded' if landed else 'refused', upstream=said,
                         **({} if landed else {'rule': 'upstream'}))
    except ReceiptError as err:
        say(f'(the gate could not write the receipt of what the upstream did: {err})')
    if landed:
        checkpoint('ref-update')
    return 0 if landed else 1


def post_receive(push: Push) -> None:
    """Mode review: the refs moved; tell the agent the id each was held as (pre-receive recorded it)."""
    for update in push.updates:
        item = review.holding(push.state_dir, push.bottle, push.repo.path, update.ref, update.new)
        if item is None:
            say(f'{update.ref} is in the gate, but its hold cannot be found: a person on the host looks at '
                '`doit held`')
            continue
        say(f'{update.ref} is held for review as {item.id}: nothing went upstream yet. A person approves it '
            f'on the host (`doit approve --id {item.id}`); with the supervisor, ask for it with '
            f'request_push_review("{item.id}"). A new push to {update.ref} is held as a new review; this one '
            'then can no longer be approved.')


def hold(push: Push, update: Update) -> review.Held:
    """Record the push for review, with what it would change upstream (review.summarise), having asked the
    upstream where the ref and its default branch are."""
    try:
        ref_tip, head_tip = upstream.tips(push.repo.upstream, update.ref, upstream.host_env(host_environment()))
        unasked = None
    except upstream.UpstreamError as err:
        ref_tip = head_tip = None
        unasked = str(err)
    summary = review.summarise(git_text, update.new, push.repo.push, update.ref, ref_tip, head_tip, unasked)
    item = review.Held(id=review.new_id(), bottle=push.bottle, repo=push.repo.upstream, ref=update.ref,
                       old=update.old, new=update.new, time=now(), path=push.repo.path, **summary)
    review.record_held(push.state_dir, item)
    return item


def short(sha: str) -> str:
    return 'nothing' if sha == ZERO else sha[:12]


def main(argv: list[str]) -> int:
    upstream.end_on_sigterm()
    checkpoint(argv[1])
    push = Push.from_hook()
    if argv[1] == 'pre-receive':
        return pre_receive(push)
    post_receive(push)
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv))
