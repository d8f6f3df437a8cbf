"""The requests a bottle's egress proxy refused, read from the bottle's egress log (one JSON line per
decision, written by addon.py): what `doit status` and the supervisor's page show. Only the log's tail is
read, so a long log costs no more than a short one; the guest's text in it is data, never printed raw."""
from __future__ import annotations

import json
import os
from pathlib import Path

TAIL_BYTES = 256 * 1024
FIELDS = ('time', 'method', 'host', 'port', 'path', 'reason')


def refusals(log: Path, limit: int = 20) -> list[dict]:
    """The last `limit` requests the proxy refused, newest first, each with FIELDS (None where missing)."""
    try:
        with open(log, 'rb') as stream:
            stream.seek(max(0, os.fstat(stream.fileno()).st_size - TAIL_BYTES))
            lines = stream.read().decode(errors='replace').splitlines()
    except OSError:
        return []
    refused = []
    for line in reversed(lines):
        try:
            entry = json.loads(line)
        except ValueError:
            continue        # the first line of the tail is usually cut
        if isinstance(entry, dict) and entry.get('allowed') is False:
            refused.append({key: entry.get(key) for key in FIELDS})
            if len(refused) == limit:
                break
    return refused
