"""Reading a quantized source weight back as float32 rows, through the same jobs the workers run (so
`inspect --stats`, `verify --against`, planning and re-quantization decode exactly as a conversion does)."""
from __future__ import annotations

import math

import numpy as np

from ..io.safetensors import TensorInfo
from ..layouts.read import QuantizedWeight, Readers
from .jobs import close_handles, read_rows
from .work import DequantizeJob, Part, Source


def source_of(qw: QuantizedWeight, path_of, matrix: int):
    """The jobs.Source of matrix `matrix` of a quantized weight (`path_of(tensor name)` gives its file)."""
    assert qw.scheme is not None and qw.scale is not None
    scheme = qw.scheme
    *lead, rows, cols = qw.matrix_shape
    matrices = max(math.prod(lead), 1)
    tile_rows = 0 if scheme.granularity == "tensor" else scheme.tile(rows, cols)[0]

    def part(info: TensorInfo, unit_rows: int, packed: bool = False) -> Part:
        return Part(str(path_of(info.name)), info.start + matrix * (info.nbytes // matrices), info.dtype, unit_rows, packed)

    zero_point = None
    if qw.zero_point is not None:
        unit = tile_rows * scheme.fmt.per_word if qw.zp_packed else tile_rows
        zero_point = part(qw.zero_point, unit, qw.zp_packed)
    global_scale = part(qw.global_scale, 0) if qw.global_scale is not None else None
    return Source(str(path_of(qw.weight.name)), qw.weight.start + matrix * (qw.weight.nbytes // matrices),
                  qw.weight.dtype, scheme, qw.packed, part(qw.scale, tile_rows), zero_point, global_scale, qw.transposed)


def dequantized_chunks(readers: Readers, qw: QuantizedWeight, chunk_bytes: int):
    """(matrix index, first row, float32 rows) of w' = (q - zp) * scale, chunk by chunk, in the weight's own
    orientation (a transposed weight's matrix comes whole)."""
    assert qw.scheme is not None
    *lead, rows, cols = qw.matrix_shape
    try:
        for e in range(math.prod(lead)):
            source = source_of(qw, readers.path, e)
            if qw.transposed:
                job = DequantizeJob(qw.name, source, "", 0, 0, rows, cols, matrix=e, matrix_rows=rows)
                yield e, 0, np.ascontiguousarray(read_rows(job, 0, rows).T)
                continue
            step = source.tile_rows(rows, cols)
            step = max(step, (chunk_bytes // max(source.row_bytes(cols), 1)) // step * step)
            job = DequantizeJob(qw.name, source, "", 0, 0, rows, cols, matrix=e, matrix_rows=rows)
            for r0 in range(0, rows, step):
                yield e, r0, read_rows(job, r0, min(step, rows - r0))
    finally:
        close_handles()
