"""What tests/audit/sitecustomize.py recorded: the programs a test's Python processes started on the host
(recorded), the ones daemons/hostprograms.py does not declare (undeclared), and the check that there are
none (assert_declared); the files they wrote under a project's state and which function wrote each
(writers), and the check that a kind of file has one writer (assert_one_writer)."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from daemons.hostprograms import PROGRAMS

# The interpreter claude-bottle runs on (the daemons, mitmproxy's environment, pip making it): its own, not
# a program of the host's to install.
INTERPRETER = re.compile(r'python[0-9.]*')
STANDIN = 'smolvm'      # what the stand-in starts (bwrap...) is the stand-in's, which plays the backend
# pip, making mitmproxy's environment, looks around for its user agent (ldconfig, lsb_release, uname, rustc),
# each optional: its own business, not a program claude-bottle needs.
PIP = re.compile(r'.*/pip/__main__\.py')


def lines(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def recorded(log: Path) -> list[dict]:
    """The programs started: {"program", "by"} each."""
    return [line for line in lines(log) if 'program' in line]


def writers(log: Path, matches) -> dict[str, set[str]]:
    """For each file written whose path `matches` (a predicate), the functions (module:function) that wrote it."""
    found: dict[str, set[str]] = {}
    for line in lines(log):
        if 'wrote' in line and matches(line['wrote']):
            found.setdefault(line['wrote'], set()).add(line['writer'])
    return found


def assert_one_writer(log: Path, what: str, matches, writer: str):
    """Every file of a kind (`what`, told by `matches`) was written, and only by `writer`."""
    found = writers(log, matches)
    if not found:
        seen = {(line['wrote'].rpartition('/.bottle/')[2], line['writer']) for line in lines(log) if 'wrote' in line}
        raise AssertionError(f'no {what} was written in this scenario (the check would show nothing); {log} has '
                             f'{len(lines(log))} lines, these writes: {sorted(seen)}')
    others = {path: sorted(by - {writer}) for path, by in found.items() if by - {writer}}
    assert not others, f'{what} written by another function than {writer}: {others}'


def undeclared(records: list[dict]) -> dict[str, str]:
    """Each program started on the host that the declaration lacks, with the program that started it."""
    return {r['program']: os.path.basename(r['by']) for r in records
            if r['program'] not in PROGRAMS and not INTERPRETER.fullmatch(r['program'])
            and os.path.basename(r['by']) != STANDIN and not PIP.fullmatch(r['by'])}


def assert_declared(log: Path):
    missing = undeclared(recorded(log))
    assert not missing, ('host programs started but not declared in daemons/hostprograms.py (add each with its '
                         f'Debian package): {missing}')
