"""The safetensors file format: a strict header parser, bounded row reads and a streaming writer.

The `safetensors` package cannot read FP8 into numpy, and its mmap-based loaders keep file pages
resident, so fp8conv reads with plain `readinto` into buffers it owns and writes at offsets
computed before the first byte (the header is known up front).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from ..errors import InputError
from ..formats import SAFETENSORS_DTYPES
from ..formats.dtypes import DTYPE_BYTES
from .untrusted import load_json, printable

HEADER_CAP = 100 * 1000 * 1000  # the limit the safetensors format itself enforces
METADATA_KEY = "__metadata__"
HASH_BUFFER = 8 << 20
READ_CHUNK_BYTES = 32 << 20  # tensors are read in row chunks of about this size: memory stays bounded


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: dtype tag, shape and absolute byte range in its file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def np_dtype(self) -> np.dtype:
        return SAFETENSORS_DTYPES[self.dtype]

    def as_rows(self) -> "TensorInfo":
        """The same bytes seen as one 2-D matrix [prod(leading dims), last dim]: a reader that
        does not care where matrices of a stack begin walks it in a few large reads, not one per
        matrix (a [50000, 1, 1] tensor is 50,000 matrices of one element)."""
        if len(self.shape) < 2:
            return self
        return TensorInfo(self.name, self.dtype, (math.prod(self.shape[:-1]), self.shape[-1]), self.start, self.end)


@dataclass(frozen=True)
class Header:
    """A parsed and validated safetensors header."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    file_size: int


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def parse_header_bytes(data: bytes, file_size: int, label: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Validate a header (the JSON bytes after the length prefix) against the file size."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{label}: header is not UTF-8 text") from None
    raw = load_json(text, label, "header is not valid JSON")
    if not isinstance(raw, dict):
        raise InputError(f"{label}: header is not a JSON object")
    metadata = raw.pop(METADATA_KEY, {})
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise InputError(f"{label}: __metadata__ must map strings to strings")
    data_start = 8 + len(data)
    data_size = file_size - data_start
    tensors: dict[str, TensorInfo] = {}
    for name, entry in raw.items():
        tensors[name] = _parse_entry(name, entry, data_start, label)
    _check_layout(tensors, data_start, data_size, label)
    return tensors, metadata


def _parse_entry(name: str, entry: object, data_start: int, label: str) -> TensorInfo:
    where = f"{label}: tensor {printable(name)}"
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise InputError(f"{where}: entry must have exactly dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise InputError(f"{where}: unknown dtype {printable(str(dtype))}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise InputError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise InputError(f"{where}: data_offsets {offsets!r} is not [begin, end]")
    begin, end = offsets
    if end < begin:
        raise InputError(f"{where}: data_offsets end {end} is before begin {begin}")
    expected = math.prod(shape) * DTYPE_BYTES[dtype]
    if end - begin != expected:
        raise InputError(f"{where}: holds {end - begin} bytes but {dtype} x {shape} needs {expected}")
    return TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end)


def _check_layout(tensors: dict[str, TensorInfo], data_start: int, data_size: int, label: str) -> None:
    """Offsets must tile the data section exactly: in range, no gaps, no overlaps."""
    cursor = data_start
    for info in sorted(tensors.values(), key=lambda t: (t.start, t.end)):
        if info.start < cursor:
            raise InputError(f"{label}: tensor {printable(info.name)} overlaps the tensor before it")
        if info.start > cursor:
            raise InputError(f"{label}: gap of {info.start - cursor} bytes before tensor {printable(info.name)}")
        cursor = info.end
    end = data_start + data_size
    if cursor > end:
        raise InputError(f"{label}: data section is truncated ({end - data_start} of {cursor - data_start} bytes present)")
    if cursor < end:
        raise InputError(f"{label}: {end - cursor} unexplained bytes after the last tensor")


def read_header(path: Path) -> Header:
    """Parse and validate the header of a .safetensors file."""
    label = printable(str(path))
    try:
        with open(path, "rb") as fh:
            file_size = os.fstat(fh.fileno()).st_size
            if file_size < 8:
                raise InputError(f"{label}: file is {file_size} bytes, too short for a safetensors header")
            (length,) = struct.unpack("<Q", fh.read(8))
            if length > HEADER_CAP:
                raise InputError(f"{label}: header length {length} exceeds the {HEADER_CAP}-byte limit")
            if 8 + length > file_size:
                raise InputError(f"{label}: header length {length} runs past the end of the {file_size}-byte file")
            data = fh.read(length)
    except OSError as exc:
        raise InputError(f"{label}: cannot read ({exc.strerror or exc})") from None
    tensors, metadata = parse_header_bytes(data, file_size, label)
    return Header(path, tensors, metadata, file_size)


class TensorReader:
    """Reads tensors or row ranges of tensors from one file into fresh numpy buffers."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._fh = open(path, "rb", buffering=0)
        except OSError as exc:
            raise InputError(f"{printable(str(path))}: cannot open ({exc.strerror or exc})") from None

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> "TensorReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read_bytes(self, start: int, length: int) -> bytes:
        self._fh.seek(start)
        data = self._fh.read(length)
        if len(data) != length:
            raise InputError(f"{printable(str(self.path))}: file shrank while being read")
        return data

    def read_rows(self, info: TensorInfo, first: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows [first, stop) along dim 0 (the whole tensor by default), as an owned array."""
        if not info.shape:
            return self.read_array(info.start, (), info.np_dtype, info.name)
        rows, row_shape = info.shape[0], info.shape[1:]
        stop = rows if stop is None else min(stop, rows)
        row_bytes = math.prod(row_shape) * info.np_dtype.itemsize
        return self.read_array(info.start + first * row_bytes, (stop - first, *row_shape), info.np_dtype, info.name)

    def read_array(self, offset: int, shape: tuple[int, ...], dtype: np.dtype, name: str) -> np.ndarray:
        """An owned array read at an absolute offset with readinto (no mmap pages left resident)."""
        out = np.empty(shape, dtype=dtype)
        if out.size:
            self.read_into(offset, out.reshape(-1).view(np.uint8), name)
        return out

    def read_into(self, offset: int, buffer: np.ndarray, name: str) -> None:
        view = memoryview(buffer)
        got = 0
        try:
            self._fh.seek(offset)
            while got < len(view):
                n = self._fh.readinto(view[got:])
                if not n:
                    raise InputError(f"{printable(str(self.path))}: tensor {printable(name)} is truncated")
                got += n
        except OSError as exc:  # EIO on a failing disk is the source's fault, not the output's
            raise InputError(f"{printable(str(self.path))}: cannot read tensor {printable(name)} ({exc.strerror or exc})") from None


@dataclass(frozen=True)
class OutEntry:
    """A tensor as it will appear in an output file."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_BYTES[self.dtype]


def build_header(entries: Iterable[OutEntry], metadata: dict[str, str] | None = None) -> tuple[bytes, dict[str, int]]:
    """Header bytes (8-byte length prefix included, padded to 8) and each tensor's absolute offset.

    Tensors are laid out in name order so the bytes never depend on worker scheduling.
    """
    ordered = sorted(entries, key=lambda e: e.name)
    body: dict[str, object] = {METADATA_KEY: dict(sorted((metadata or {"format": "pt"}).items()))}
    cursor = 0
    relative: dict[str, int] = {}
    for entry in ordered:
        body[entry.name] = {"dtype": entry.dtype, "shape": list(entry.shape), "data_offsets": [cursor, cursor + entry.nbytes]}
        relative[entry.name] = cursor
        cursor += entry.nbytes
    text = json.dumps(body, separators=(",", ":"), ensure_ascii=True).encode()
    text += b" " * (-len(text) % 8)
    prefix = struct.pack("<Q", len(text)) + text
    return prefix, {name: len(prefix) + off for name, off in relative.items()}


def write_at(fd: int, offset: int, data: np.ndarray | bytes) -> None:
    """pwrite all of `data` at `offset` (loops over short writes)."""
    view = memoryview(data if isinstance(data, bytes) else np.ascontiguousarray(data).reshape(-1).view(np.uint8))
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    buf = bytearray(HASH_BUFFER)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()
