"""The hosts a person approved for a bottle through the supervisor: one JSON list per bottle, in
<supervise state>/approved/<bottle>.json, outside the bottle's own state so it outlives relaunches and
teardowns until revoked.

This module alone reads and writes that file, and alone widens or narrows a bottle's rules for an approval,
through the proxy's one writer of rules (daemons.proxy.control.write_rules): `merged` for a new rendering of
the rules (allowlist:<agent> merges the approvals in), `add` and `remove` for a decision taken now, which
the proxy applies from the next request on. An approval is a whole host (every method and path).
"""
from __future__ import annotations

import json
from pathlib import Path

from daemons.atomic import write_atomic
from daemons.proxy import rules
from daemons.proxy.control import write_rules
from daemons.supervise.store import SuperviseError


def directory(state_dir: Path) -> Path:
    """Where the approvals of every bottle of the supervisor at `state_dir` are."""
    return Path(state_dir) / 'approved'


def file(state_dir: Path, bottle: str) -> Path:
    return directory(state_dir) / f'{bottle}.json'


def recorded(state_dir: Path) -> dict[str, Path]:
    """Every bottle that has approvals, and their file."""
    found = directory(state_dir)
    return {path.stem: path for path in sorted(found.glob('*.json'))} if found.is_dir() else {}


def forget(path: Path) -> None:
    """Drop every approval of a bottle (its manifest is gone: `doit prune`)."""
    Path(path).unlink(missing_ok=True)


def read(path: Path) -> list[str]:
    """The approved hosts; none when the file is missing. A file that is not a list of host names is an
    error that names it and the fix."""
    text = _text(path)
    if text is None:
        return []
    try:
        hosts = json.loads(text)
    except ValueError:
        hosts = None
    if not isinstance(hosts, list) or not all(isinstance(host, str) for host in hosts):
        raise SuperviseError(f'{path} is not a list of approved hosts; fix it, or remove it to drop every '
                             'approval of that bottle')
    return hosts


def text(path: Path) -> str | None:
    """The file as it is, for an up-to-date check (a change of it renders the rules again); None when missing.
    An unreadable one reads as its error, which `read` reports when the rules are rendered."""
    try:
        return _text(path)
    except SuperviseError as err:
        return f'({err})'


def merged(data: dict, hosts: list[str]) -> dict:
    """Rules (their JSON form, rules.py) with every approved host allowed, each once."""
    entries = data['hosts'] + [entry for entry in _entries(hosts) if entry not in data['hosts']]
    return {**data, 'hosts': entries}


def add(path: Path, rules_file: Path, host: str) -> None:
    """Approve a host: into the approved hosts first (which later renderings of the rules merge in), then into
    the rules the proxy reads on each request."""
    hosts = read(path)
    if host not in hosts:
        _write(path, sorted([*hosts, host]))
    data = _rules(rules_file, f'cannot add {host} to the bottle\'s rules')
    updated = merged(data, [host])
    if updated != data:
        write_rules(rules_file, updated)


def remove(path: Path, rules_file: Path, host: str, bottle: str) -> None:
    """Withdraw an approved host from the approved hosts and the rules: the proxy refuses it from the next
    request on. A host the manifest itself allows comes back with the next rendering (the next launch)."""
    hosts = read(path)
    if host not in hosts:
        raise SuperviseError(f'{host!r} is not an approved host of bottle {bottle}; the page lists them')
    _write(path, [h for h in hosts if h != host])
    data = _rules(rules_file, f'cannot remove {host} from the bottle\'s rules')
    write_rules(rules_file, {**data, 'hosts': [entry for entry in data['hosts'] if entry not in _entries([host])]})


def _entries(hosts: list[str]) -> list[dict]:
    return [{'host': host} for host in hosts]


def _rules(rules_file: Path, doing: str) -> dict:
    try:
        return rules.load(Path(rules_file)).to_json()
    except rules.RulesError as err:
        raise SuperviseError(f'{doing}: {err}; relaunch the bottle') from None


def _text(path: Path) -> str | None:
    try:
        return Path(path).read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as err:
        raise SuperviseError(f'{path} cannot be read ({err}); fix or remove it') from None


def _write(path: Path, hosts: list[str]) -> None:
    """The one writer of an approved-hosts file."""
    write_atomic(Path(path), json.dumps(hosts, indent=2) + '\n')
