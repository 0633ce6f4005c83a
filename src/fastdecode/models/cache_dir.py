"""Where fastdecode keeps converted weights: $FASTDECODE_CACHE, else $XDG_CACHE_HOME/fastdecode."""
from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    if os.environ.get("FASTDECODE_CACHE"):
        return Path(os.environ["FASTDECODE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fastdecode"
