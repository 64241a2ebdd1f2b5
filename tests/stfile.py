"""Hand-made safetensors bytes for hostile-input tests (independent of fp8conv's writer)."""
from __future__ import annotations

import json
import struct
from pathlib import Path


def raw(header: dict | bytes | str, data: bytes = b"", length: int | None = None) -> bytes:
    body = header if isinstance(header, bytes) else (header if isinstance(header, str) else json.dumps(header)).encode()
    return struct.pack("<Q", len(body) if length is None else length) + body + data


def write(path: Path, header, data: bytes = b"", length: int | None = None) -> Path:
    path.write_bytes(raw(header, data, length))
    return path


def entry(dtype: str, shape: list, begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}
