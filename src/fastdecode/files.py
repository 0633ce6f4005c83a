"""Writing files so that an interruption never leaves half of one behind."""
from __future__ import annotations

import os
from pathlib import Path


def atomic_write(path: Path, write) -> None:
    """write(a temporary path beside `path`), then rename it to `path`."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
