"""The requests a bottle's egress proxy refused, read from the bottle's egress log (one JSON line per
decision, written by addon.py): what `doit status` and the supervisor's page show. Only the log's tail is
read, so a long log costs no more than a short one; the guest's text in it is data, never printed raw.
The log rotates (logbound.RotatingLog): when the live file holds fewer than `limit` refusals, the older
ones are read from the tail of the rotated file (`egress.log.1`)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from daemons.proxy.logbound import rotated

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
