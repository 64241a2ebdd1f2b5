"""Writing one file atomically: a temp file beside it, then a rename, so a reader sees the old file or the
whole new one."""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import OutputError


def write_atomic(path: Path, data: str | bytes) -> Path:
    """Write `data` (text as UTF-8) to `path` by temp file + rename; raises OutputError, leaving no temp file."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.part"
    try:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        if tmp.parent.is_dir():
            tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path
