"""Units of work run by the worker processes: copy bytes, (re)quantize or dequantize a matrix.

A job reads the rows of one 2-D matrix (one expert of a 3-D stack) from its Source, which holds
either high-precision values or codes plus a scale grid (then the rows are dequantized on the
fly, in float32), and writes its output at offsets the header fixed before the first byte.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import InputError
from .formats import SAFETENSORS_DTYPES
from .kernels import (ErrorStats, NonFiniteError, count_nonfinite, dequantize_rows, nonfinite_error, quantize_2d,
                      tensor_scale_of)
from .safetensors_io import READ_CHUNK_BYTES, TensorReader, write_at
from .scheme import Scheme

CHUNK_BYTES = READ_CHUNK_BYTES
COPY_BYTES = 16 << 20


@dataclass(frozen=True)
class Source:
    """Where a matrix's rows are stored: values of `dtype`, or codes with a scale grid (`scheme`)."""

    path: str
    offset: int
    dtype: str
    scheme: Scheme | None = None
    scale_path: str = ""
    scale_offset: int = 0
    scale_dtype: str = ""

    def tile_rows(self, rows: int, cols: int) -> int:
        if self.scheme is None or self.scheme.granularity == "tensor":
            return 1
        return self.scheme.tile(rows, cols)[0]


@dataclass(frozen=True)
class Job:
    """copy: `nbytes` bytes; quantize: one matrix into codes + scales; dequantize: into out_dtype."""

    kind: str
    name: str
    source: Source
    dst_path: str
    dst_offset: int
    nbytes: int
    rows: int = 0
    cols: int = 0
    scheme: Scheme | None = None
    scale_offset: int = 0
    out_dtype: str = ""
    allow_nonfinite: bool = False

    def written_ranges(self) -> list[tuple[int, int]]:
        """The output byte ranges this job writes."""
        if self.kind == "copy":
            return [(self.dst_offset, self.dst_offset + self.nbytes)]
        if self.kind == "dequantize":
            size = self.rows * self.cols * SAFETENSORS_DTYPES[self.out_dtype].itemsize
            return [(self.dst_offset, self.dst_offset + size)]
        assert self.scheme is not None
        grid = self.scheme.scale_grid(self.rows, self.cols)
        scale_bytes = 4 if self.scheme.granularity == "tensor" else 4 * grid[0] * grid[1]
        return [(self.dst_offset, self.dst_offset + self.rows * self.cols),
                (self.scale_offset, self.scale_offset + scale_bytes)]


# Per-process caches of open files (a worker runs many jobs on the same shards).
_readers: dict[str, TensorReader] = {}
_writers: dict[str, int] = {}


def _reader(path: str) -> TensorReader:
    if path not in _readers:
        _readers[path] = TensorReader(Path(path))
    return _readers[path]


def _writer(path: str) -> int:
    if path not in _writers:
        _writers[path] = os.open(path, os.O_WRONLY)
    return _writers[path]


def close_handles() -> None:
    for reader in _readers.values():
        reader.close()
    for fd in _writers.values():
        os.close(fd)
    _readers.clear()
    _writers.clear()


def forget_handles() -> None:
    """In a freshly forked worker: the parent's handles are not ours to use."""
    _readers.clear()
    _writers.clear()


def run_job(job: Job) -> tuple[str, ErrorStats | None, int]:
    """Execute one job; returns (tensor name, error stats or None, source bytes processed)."""
    if job.kind == "copy":
        _copy(job)
        return job.name, None, job.nbytes
    if job.kind == "dequantize":
        _dequantize(job)
        return job.name, None, job.nbytes
    return job.name, _quantize(job), job.nbytes


def _copy(job: Job) -> None:
    reader, fd = _reader(job.source.path), _writer(job.dst_path)
    buffer = np.empty(min(job.nbytes, COPY_BYTES), np.uint8)
    for start in range(0, job.nbytes, COPY_BYTES):
        part = buffer[: min(COPY_BYTES, job.nbytes - start)]
        reader.read_into(job.source.offset + start, part, job.name)
        write_at(fd, job.dst_offset + start, part)


def _chunk_rows(job: Job, target_tile_rows: int, element_bytes: int | None = None) -> int:
    """Rows per chunk: about CHUNK_BYTES (of source, or of `element_bytes` per element), whole tiles
    of both source and target."""
    row_bytes = max(job.cols * (element_bytes or SAFETENSORS_DTYPES[job.source.dtype].itemsize), 1)
    step = math.lcm(job.source.tile_rows(job.rows, job.cols), target_tile_rows)
    return max(step, (CHUNK_BYTES // row_bytes) // step * step)


def read_rows(job: Job, first: int, count: int, out_dtype: np.dtype | type = np.float32) -> np.ndarray:
    """Rows [first, first + count) of the job's source matrix: stored values, or w = q * scale
    computed in float32 (rounded into `out_dtype`)."""
    src = job.source
    dtype = SAFETENSORS_DTYPES[src.dtype]
    values = _reader(src.path).read_array(src.offset + first * job.cols * dtype.itemsize, (count, job.cols), dtype, job.name)
    if src.scheme is None:
        return values
    scale_dtype = SAFETENSORS_DTYPES[src.scale_dtype]
    if src.scheme.granularity == "tensor":
        grid = _reader(src.scale_path).read_array(src.scale_offset, (1, 1), scale_dtype, job.name)
    else:
        tile_rows = src.tile_rows(job.rows, job.cols)
        grid_cols = src.scheme.scale_grid(job.rows, job.cols)[1]
        g0, g1 = first // tile_rows, -(-(first + count) // tile_rows)
        offset = src.scale_offset + g0 * grid_cols * scale_dtype.itemsize
        grid = _reader(src.scale_path).read_array(offset, (g1 - g0, grid_cols), scale_dtype, job.name)
    return dequantize_rows(values, grid.astype(np.float32), src.scheme, out_dtype)


def _chunks(job: Job, chunk_rows: int, out_dtype: np.dtype | type = np.float32) -> Iterator[tuple[int, np.ndarray]]:
    for first in range(0, job.rows, chunk_rows):
        yield first, read_rows(job, first, min(chunk_rows, job.rows - first), out_dtype)


def _dequantize(job: Job) -> None:
    fd = _writer(job.dst_path)
    out_dtype = SAFETENSORS_DTYPES[job.out_dtype]
    # Chunks sized by their float32 form (4 bytes an element), not by the 1-byte codes.
    for first, rows in _chunks(job, _chunk_rows(job, 1, element_bytes=4), out_dtype):
        write_at(fd, job.dst_offset + first * job.cols * out_dtype.itemsize, rows)


def _quantize(job: Job) -> ErrorStats:
    scheme = job.scheme
    assert scheme is not None
    fd = _writer(job.dst_path)
    whole = scheme.granularity == "tensor"
    tile_rows = 1 if whole else scheme.tile(job.rows, job.cols)[0]
    chunk_rows = _chunk_rows(job, tile_rows)
    grid_cols = scheme.scale_grid(job.rows, job.cols)[1]
    tensor_scale = None
    if whole:
        def whole_matrix() -> Iterator[np.ndarray]:
            return (chunk for _, chunk in _chunks(job, chunk_rows))

        tensor_scale = tensor_scale_of(whole_matrix, scheme.fmt, job.allow_nonfinite, job.name)
        write_at(fd, job.scale_offset, np.array([tensor_scale], np.float32))
    stats = ErrorStats()
    try:
        for first, chunk in _chunks(job, chunk_rows):
            q = quantize_2d(chunk, scheme, tensor_scale, job.allow_nonfinite, job.name)
            write_at(fd, job.dst_offset + first * job.cols, q.codes)
            if not whole:
                write_at(fd, job.scale_offset + (first // tile_rows) * grid_cols * 4, q.scales)
            stats.merge(q.stats)
    except NonFiniteError:
        raise _count_nonfinite(job, chunk_rows) from None
    return stats


def _count_nonfinite(job: Job, chunk_rows: int) -> InputError:
    """The error for NaN/Inf found in one chunk, with the counts over the whole matrix."""
    return nonfinite_error(job.name, *count_nonfinite(chunk for _, chunk in _chunks(job, chunk_rows)))
