"""The requests a bottle's egress proxy refused, read from the bottle's egress log (one JSON line per
decision, written by addon.py): what `doit status` and the supervisor's page show. Only the log's tail is
read, so a long log costs no more than a short one; the guest's text in it is data, never printed raw.
The log rotates (logbound.RotatingLog): when the live file holds fewer than `limit` refusals, the older
ones are read from the tail of the rotated file (`egress.log.1`). And how many requests each bound secret
went into (secret_uses), from the whole of both files (bounded: logbound.EGRESS_LOG_BYTES each)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from daemons.proxy.logbound import rotated

SECRET_MARK = b'"secret": '

TAIL_BYTES = 256 * 1024
FIELDS = ('time', 'method', 'host', 'port', 'path', 'reason')


def refusals(log: Path, limit: int = 20) -> list[dict]:
    """The last `limit` requests the proxy refused, newest first, each with FIELDS (None where missing)."""
    refused = []
    for path in (log, rotated(Path(log))):
        for line in reversed(_tail(path)):
            try:
                entry = json.loads(line)
            except ValueError:
                continue        # the first line of the tail is usually cut
            if isinstance(entry, dict) and entry.get('allowed') is False:
                refused.append({key: entry.get(key) for key in FIELDS})
                if len(refused) == limit:
                    return refused
    return refused


def _tail(path: Path) -> list[str]:
    """The lines of the last TAIL_BYTES of the file at `path`; none when it cannot be read."""
    try:
        with open(path, 'rb') as stream:
            stream.seek(max(0, os.fstat(stream.fileno()).st_size - TAIL_BYTES))
            return stream.read().decode(errors='replace').splitlines()
    except OSError:
        return []


class SecretUses:
    """NAME -> how many requests the proxy let through with that secret's value put in, in a bottle's log (live
    and rotated). Each file is read from where the last call stopped while it is the same file (its inode),
    so a page asking every few seconds reads only what the log gained."""

    def __init__(self):
        self._files: dict[str, tuple[int, int, dict[str, int]]] = {}     # path -> (inode, offset, counts)

    def __call__(self, log: Path) -> dict[str, int]:
        total: dict[str, int] = {}
        for path in (rotated(Path(log)), Path(log)):
            for name, count in self._counted(str(path)).items():
                total[name] = total.get(name, 0) + count
        return total

    def _counted(self, path: str) -> dict[str, int]:
        try:
            with open(path, 'rb') as stream:
                info = os.fstat(stream.fileno())
                inode, offset, counts = self._files.get(path, (None, 0, {}))
                if inode != info.st_ino or info.st_size < offset:
                    offset, counts = 0, {}
                stream.seek(offset)
                data = stream.read(max(0, info.st_size - offset))
        except OSError:
            self._files.pop(path, None)
            return {}
        whole = data[:data.rfind(b'\n') + 1]          # a line being written is counted once it is whole
        counts = dict(counts)
        for line in whole.splitlines():
            if SECRET_MARK not in line:
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and entry.get('allowed') is True and isinstance(entry.get('secret'), str):
                counts[entry['secret']] = counts.get(entry['secret'], 0) + 1
        self._files[path] = (info.st_ino, offset + len(whole), counts)
        return counts


def secret_uses(log: Path) -> dict[str, int]:
    """SecretUses once: the whole of the bottle's log read (for `doit status`)."""
    return SecretUses()(log)
