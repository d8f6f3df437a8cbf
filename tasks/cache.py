"""The per-user cache every project of the user shares: Claude Code packages, image bases, mitmproxy's
environment (`$XDG_CACHE_HOME/claude-bottle`, else ~/.cache/claude-bottle)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    base = os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache'
    return Path(base) / 'claude-bottle'
