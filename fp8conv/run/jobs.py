"""Running the units of work (records in run/work.py) in the worker processes: copy bytes, write a constant,
(re)quantize or dequantize a row range of one matrix.

A job reads the rows of one 2-D matrix (one expert of a 3-D stack) from its Source, which holds
either high-precision values or codes plus a scale grid (and zero points) in some layout (then the
rows are dequantized on the fly, in float32), and writes its output at offsets the plan fixed
before the first byte: the byte ranges of every output tensor come from the layout's TensorSpecs.
"""
from __future__ import annotations

import math
import os
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import InputError
from ..formats import SAFETENSORS_DTYPES
from ..numerics.kernels import (NonFiniteError, compiled_rows, count_nonfinite, dequantize_rows, microscale_nonfinite_error,
                                nonfinite_error, quantize_2d, quantize_rows_into, stats_of, tensor_scale_of)
from ..numerics.stats import ErrorStats
from ..layouts import ZERO_POINT, decode_codes, decode_zero_points, get_layout
from ..io.safetensors import TensorReader, write_at
from ..plan.scheme import MAX_TILE, Scheme
from ..io.untrusted import printable
from .work import CopyJob, DequantizeJob, Job, Part, QuantizeJob, RowsJob, Source, WriteJob  # noqa: F401  (Part, Source: API)

COPY_BYTES = 16 << 20
PIECE_BYTES = 4 << 20  # the compiled kernel's reads: a piece stays in cache from the read to the write


# Per-process caches of open files (a worker runs many jobs on the same shards).
_readers: dict[str, TensorReader] = {}
_writers: dict[str, int] = {}


MAX_OPEN = 64  # cached handles per process (checked between jobs): thousands of shards stay under the file limit


def _reader(path: str) -> TensorReader:
    if path not in _readers:
        _readers[path] = TensorReader(Path(path))
    return _readers[path]


def _writer(path: str) -> int:
    if path not in _writers:
        _writers[path] = os.open(path, os.O_WRONLY)
    return _writers[path]


def close_handles() -> None:
    # Each handle leaves the table before it is closed: a KeyboardInterrupt between the two leaks
    # one descriptor, never closes it twice (a second close could hit a number another thread has
    # opened since, e.g. the writeback or hashing threads).
    while _readers:
        _readers.popitem()[1].close()
    while _writers:
        os.close(_writers.popitem()[1])


def forget_handles() -> None:
    """In a freshly forked worker: the parent's handles are not ours to use."""
    _readers.clear()
    _writers.clear()


def run_job(job: Job) -> tuple[str, ErrorStats | None, int]:
    """Execute one job; returns (tensor name, error stats or None, source bytes processed)."""
    if len(_readers) + len(_writers) >= MAX_OPEN:  # between jobs: a job holds at most three
        close_handles()
    if isinstance(job, RowsJob) and job.matrices > 1:
        return job.name, _run_stack(job), job.nbytes
    kind = next(k for k in type(job).__mro__ if k in RUNNERS)
    stats, done = RUNNERS[kind](job)
    return job.name, stats, done


def _run_copy(job: CopyJob) -> tuple[ErrorStats | None, int]:
    _copy(job)
    return None, job.nbytes


def _run_write(job: WriteJob) -> tuple[ErrorStats | None, int]:
    write_at(_writer(job.dst_path), job.dst_offset, job.data)
    return None, 0


def _run_dequantize(job: DequantizeJob) -> tuple[ErrorStats | None, int]:
    _dequantize(job)
    return None, job.nbytes


def _run_quantize(job: QuantizeJob) -> tuple[ErrorStats | None, int]:
    return _quantize(job), job.nbytes


# How each kind of job is done: (error stats or None, source bytes processed).
RUNNERS = {CopyJob: _run_copy, WriteJob: _run_write, DequantizeJob: _run_dequantize, QuantizeJob: _run_quantize}


def _run_stack(job: RowsJob) -> ErrorStats | None:
    """Several small matrices of a stack: high-precision sources are read, quantized and written at
    once where the layout's tensors stack (see _quantize_stack); others run matrix by matrix."""
    if isinstance(job, QuantizeJob) and job.source.scheme is None:
        stats = _quantize_stack(job)
        if stats is not None:
            return stats
    stats = None
    for m in range(job.matrices):
        _, part, _ = run_job(job.one_matrix(m))
        if part is not None:
            stats = stats or ErrorStats()
            stats.merge(part)
    return stats


def _quantize_stack(job: QuantizeJob) -> ErrorStats | None:
    """Quantize k matrices [rows, cols] as one [k * rows, cols] matrix under a scheme whose tiles
    cannot straddle two, and write each declared tensor in one piece. None (nothing written) when
    that would not give every matrix exactly the bytes it gets alone."""
    scheme, src, rows = job.scheme, job.source, job.rows
    assert scheme is not None
    if scheme.global_scale:
        return None  # each matrix has its own global scale (and global-scale record): matrix by matrix
    flat = _stacked_scheme(scheme, rows, job.cols)
    matrix_bytes = rows * src.row_bytes(job.cols)
    if flat is None or src.transposed or any(s.offset != src.offset + m * matrix_bytes for m, s in enumerate(job.stack)):
        return None
    grid_rows = flat.scale_grid(rows, job.cols)[0]
    for spec, _ in job.outputs:
        if spec.role == ZERO_POINT and spec.dtype == "I32" and grid_rows % scheme.fmt.per_word:
            return None  # packed zero points of two matrices would share a word
    values = _reader(src.path).read_array(src.offset, (job.matrices * rows, job.cols), SAFETENSORS_DTYPES[src.dtype],
                                          job.name)
    try:
        q = quantize_2d(values, flat, None, job.allow_nonfinite, job.name, job.backend)
    except NonFiniteError:
        if scheme.microscale:
            raise microscale_nonfinite_error(job.name, scheme.microscale, *count_nonfinite([values])) from None
        raise nonfinite_error(job.name, *count_nonfinite([values])) from None
    layout = get_layout(job.layout)
    pieces = []
    for spec, start in job.outputs:
        if spec.data is not None:
            continue
        data = np.ascontiguousarray(layout.encode(spec, flat, q.codes, q.scales, q.zero_points))
        if data.nbytes != job.matrices * spec.matrix_bytes:
            return None
        pieces.append((start + spec.offset(job.matrix, 0, rows), data))
    fd = _writer(job.dst_path)
    for offset, data in pieces:
        write_at(fd, offset, data)
    return q.stats


def _stacked_scheme(scheme: Scheme, rows: int, cols: int) -> Scheme | None:
    """A scheme that, applied to matrices stacked into one [k * rows, cols] matrix, gives each
    matrix exactly the codes and scale grid `scheme` gives it alone (None when there is none):
    tiles must not straddle two matrices. Tensor granularity is the block (rows, cols); a block
    taller than the matrix is the block as tall as the matrix (zero padding never changes an amax)."""
    if scheme.granularity in ("channel", "group"):
        return scheme
    if scheme.granularity == "tensor":
        tile = (rows, cols)
    else:
        tile = (min(scheme.block_size[0], rows), scheme.block_size[1])
    if rows % tile[0] or max(tile) > MAX_TILE:
        return None
    return replace(scheme, granularity="block", block_size=tile)


def _copy(job: CopyJob) -> None:
    reader, fd = _reader(job.source.path), _writer(job.dst_path)
    buffer = np.empty(min(job.nbytes, COPY_BYTES), np.uint8)
    for start in range(0, job.nbytes, COPY_BYTES):
        part = buffer[: min(COPY_BYTES, job.nbytes - start)]
        reader.read_into(job.source.offset + start, part, job.name)
        write_at(fd, job.dst_offset + start, part)


def _chunk_rows(job: RowsJob, target_tile_rows: int, element_bytes: int | None = None) -> int:
    """Rows per chunk: about chunk_bytes (of source, or of `element_bytes` per element), whole tiles
    of both source and target."""
    if job.source.transposed:
        return job.matrix_rows  # the stored [cols, rows] matrix is read whole and transposed
    row_bytes = max(job.cols * element_bytes if element_bytes else job.source.row_bytes(job.cols), 1)
    step = math.lcm(job.source.tile_rows(job.matrix_rows, job.cols), target_tile_rows)
    return max(step, (job.chunk_bytes // row_bytes) // step * step)


def _read_grid(part: Part, job: RowsJob, first: int, count: int, grid_cols: int) -> np.ndarray:
    """The stored grid rows covering weight rows [first, first + count) of the job's matrix."""
    dtype = SAFETENSORS_DTYPES[part.dtype]
    if not part.unit_rows:
        return _reader(part.path).read_array(part.offset, (1, 1), dtype, job.name)
    g0, g1 = first // part.unit_rows, -(-(first + count) // part.unit_rows)
    return _reader(part.path).read_array(part.offset + g0 * grid_cols * dtype.itemsize, (g1 - g0, grid_cols), dtype,
                                         job.name)


def read_rows(job: RowsJob, first: int, count: int, out_dtype: np.dtype | type = np.float32) -> np.ndarray:
    """Rows [first, first + count) (of the job's row range) of its source matrix: stored values, or
    w = (q - zp) * scale computed in float32 (rounded into `out_dtype`)."""
    src = job.source
    first += job.first_row
    if src.transposed and src.scheme is None:
        stored = _reader(src.path).read_array(src.offset, (job.cols, job.matrix_rows), SAFETENSORS_DTYPES[src.dtype],
                                              job.name)
        return np.ascontiguousarray(stored[:, first : first + count].T)
    values = _reader(src.path).read_array(src.offset + first * src.row_bytes(job.cols),
                                          (count, src.row_bytes(job.cols) // SAFETENSORS_DTYPES[src.dtype].itemsize),
                                          SAFETENSORS_DTYPES[src.dtype], job.name)
    if src.scheme is None:
        return values
    scheme = src.scheme
    codes = decode_codes(values, scheme.format, src.packed, job.cols)
    assert src.scale is not None
    grid_rows, grid_cols = (1, 1) if scheme.granularity == "tensor" else scheme.scale_grid(job.matrix_rows, job.cols)
    grid = _read_grid(src.scale, job, first, count, grid_cols)
    if scheme.microscale:
        global_scale = None
        if src.global_scale is not None:
            global_scale = _read_grid(src.global_scale, job, 0, 1, 1).astype(np.float32).reshape(-1)[0]
        grid = scheme.scale_fmt.values(grid, global_scale)
    else:
        grid = grid.astype(np.float32)
    zero_points = None
    if src.zero_point is not None:
        zp = src.zero_point
        if zp.packed:
            per = scheme.fmt.per_word
            tile = zp.unit_rows // per
            p0 = first // zp.unit_rows
            raw = _read_grid(zp, job, first, count, grid_cols)
            unpacked = decode_zero_points(raw, scheme.format, True, min(raw.shape[0] * per, grid_rows - p0 * per))
            g0 = first // tile - p0 * per
            zero_points = unpacked[g0 : g0 + grid.shape[0]]
        else:
            zero_points = decode_zero_points(_read_grid(zp, job, first, count, grid_cols), scheme.format, False,
                                             grid.shape[0])
    return dequantize_rows(codes, grid, scheme, out_dtype, zero_points)


def _chunks(job: RowsJob, chunk_rows: int, out_dtype: np.dtype | type = np.float32) -> Iterator[tuple[int, np.ndarray]]:
    for first in range(0, job.rows, chunk_rows):
        yield first, read_rows(job, first, min(chunk_rows, job.rows - first), out_dtype)


def _dequantize(job: DequantizeJob) -> None:
    fd = _writer(job.dst_path)
    out_dtype = SAFETENSORS_DTYPES[job.out_dtype]
    # Chunks sized by their float32 form (4 bytes an element), not by the stored codes.
    for first, rows in _chunks(job, _chunk_rows(job, 1, element_bytes=4), out_dtype):
        overflow = _count_inf(rows)
        if overflow:
            import ml_dtypes  # here, not at import (formats/dtypes.py says why)

            limit = float(ml_dtypes.finfo(out_dtype).max)
            hint = ("the source's codes times their scales are past float32: the checkpoint is damaged"
                    if out_dtype.itemsize >= 4 else "use a wider --dtype (fp32)")
            raise InputError(
                f"tensor {printable(job.label or job.name)}: {overflow} dequantized values (rows {first}..{first + len(rows) - 1}) "
                f"exceed the largest finite {job.out_dtype} ({limit:g}) and would be written as Inf; {hint}")
        if job.source.transposed:  # the whole [out, in] matrix, written [in, out] as the weight is named
            rows = np.ascontiguousarray(rows.T)
        write_at(fd, job.dst_offset + first * job.cols * out_dtype.itemsize, rows)


def target_tile_rows(scheme: Scheme, outputs, rows: int, cols: int) -> int:
    """Row alignment of a quantize target: whole tiles, whole packed zero-point words."""
    if scheme.granularity == "tensor":
        return 1
    step = scheme.tile(rows, cols)[0]
    for spec, _ in outputs:
        if spec.unit_rows:
            step = math.lcm(step, spec.unit_rows)
    return step


def _count_inf(values: np.ndarray) -> int:
    """Inf values of a float32 / f16 / bf16 array (bit patterns for the 2-byte types: fast)."""
    if values.dtype.itemsize == 4:
        return int(np.count_nonzero(np.isinf(values)))
    bits = values.view(np.uint16) & np.uint16(0x7FFF)
    inf = 0x7C00 if values.dtype == np.float16 else 0x7F80
    return int(np.count_nonzero(bits == inf))


def _quantize(job: QuantizeJob) -> ErrorStats:
    scheme = job.scheme
    assert scheme is not None
    layout = get_layout(job.layout)
    fd = _writer(job.dst_path)
    chunk_rows = _chunk_rows(job, target_tile_rows(scheme, job.outputs, job.matrix_rows, job.cols))
    tensor_scale = None
    if scheme.granularity == "tensor":
        def whole_matrix() -> Iterator[np.ndarray]:
            return (chunk for _, chunk in _chunks(job, chunk_rows))

        tensor_scale = tensor_scale_of(whole_matrix, scheme, job.allow_nonfinite, job.name)
    elif scheme.global_scale:
        if job.global_scale is None:  # pragma: no cover - the pipeline computes it before any job
            raise ValueError(f"internal: no {scheme.microscale} global scale for {job.name}")
        tensor_scale = np.float32(job.global_scale)
    stats = ErrorStats()

    def emit(q, first: int) -> None:
        row = job.first_row + first
        for spec, start in job.outputs:
            if spec.data is not None or (not spec.unit_rows and (first or job.first_row)):
                continue
            data = layout.encode(spec, scheme, q.codes, q.scales, q.zero_points, q.global_scale)
            write_at(fd, start + spec.offset(job.matrix, row, job.matrix_rows), data)

    # The compiled kernel takes a chunk in pieces of about PIECE_BYTES, carrying its sums: the same
    # codes, scales and statistics (merged chunk by chunk, as before) from reads that stay in cache.
    piece_rows = _chunk_rows(replace(job, chunk_bytes=PIECE_BYTES), target_tile_rows(scheme, job.outputs,
                                                                                    job.matrix_rows, job.cols))
    pieces = piece_rows < chunk_rows and compiled_rows(scheme, _row_dtype(job), job.backend)
    try:
        for first in range(0, job.rows, chunk_rows):
            count = min(chunk_rows, job.rows - first)
            if pieces and _quantize_pieces(job, scheme, tensor_scale, first, count, piece_rows, emit, stats):
                continue
            q = quantize_2d(read_rows(job, first, count), scheme, tensor_scale, job.allow_nonfinite, job.name,
                            job.backend)
            emit(q, first)
            stats.merge(q.stats)
    except NonFiniteError:
        raise _count_nonfinite(job, chunk_rows) from None
    return stats


def _quantize_pieces(job: QuantizeJob, scheme: Scheme, tensor_scale, first: int, count: int, piece_rows: int, emit,
                     stats: ErrorStats) -> bool:
    """Rows [first, first + count) by the compiled kernel, piece by piece; False (the chunk's
    statistics untouched) when a piece holds NaN/Inf: the caller redoes the chunk (quantize_2d maps
    or refuses them, and rewrites the same bytes for the pieces written)."""
    carried = np.zeros(5)
    for at in range(first, first + count, piece_rows):
        q = quantize_rows_into(read_rows(job, at, min(piece_rows, first + count - at)), scheme, tensor_scale, carried,
                               job.name)
        if q is None:
            return False
        emit(q, at)
    stats.merge(stats_of(count * job.cols, carried))
    return True


def _row_dtype(job: RowsJob) -> np.dtype:
    """The dtype read_rows gives: the stored one, float32 for a quantized source."""
    return np.dtype(np.float32) if job.source.scheme is not None else SAFETENSORS_DTYPES[job.source.dtype]


def _count_nonfinite(job: RowsJob, chunk_rows: int) -> InputError:
    """The error for NaN/Inf found in one chunk, with the counts over the whole matrix."""
    counts = count_nonfinite(chunk for _, chunk in _chunks(job, chunk_rows))
    if isinstance(job, QuantizeJob) and job.scheme is not None and job.scheme.microscale:
        return microscale_nonfinite_error(job.name, job.scheme.microscale, *counts)
    return nonfinite_error(job.name, *counts)
