"""The work items the workers run, as records: copy bytes, write a constant, (re)quantize or dequantize a row
range of one matrix, and where their rows are stored (Source, Part). Each says what it writes; run/jobs.py runs
them (one function per kind, `run_job` dispatches)."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar

from ..formats import SAFETENSORS_DTYPES
from ..io.safetensors import READ_CHUNK_BYTES
from ..layouts import CODES, TensorSpec
from ..plan.scheme import Scheme


@dataclass(frozen=True)
class Part:
    """A grid stored beside quantized codes (scales, zero points): where this matrix's grid starts, its
    dtype, how many weight rows one stored row covers (0: one record for the matrix) and whether it
    is packed into int32 along the rows (compressed-tensors zero points)."""

    path: str
    offset: int
    dtype: str
    unit_rows: int
    packed: bool = False


@dataclass(frozen=True)
class Source:
    """Where a matrix's rows are stored: values of `dtype`, or codes (int32-packed or not) with a
    scale grid and optional zero points (`scheme`).

    `transposed` (OpenAI MXFP4 experts): the job's matrix [rows, cols] is [out, in], the quantized
    orientation, while the high-precision side (the source values of a quantize job, the output of a
    dequantize job) is stored [cols, rows]; such jobs run whole, one matrix at a time."""

    path: str
    offset: int
    dtype: str
    scheme: Scheme | None = None
    packed: bool = False
    scale: Part | None = None
    zero_point: Part | None = None
    global_scale: Part | None = None
    transposed: bool = False

    def tile_rows(self, rows: int, cols: int) -> int:
        """Row alignment a chunk of this source must keep (whole tiles, whole packed zero-point words)."""
        if self.scheme is None or self.scheme.granularity == "tensor":
            return 1
        step = self.scheme.tile(rows, cols)[0]
        if self.zero_point is not None and self.zero_point.unit_rows:
            step = math.lcm(step, self.zero_point.unit_rows)
        return step

    def row_bytes(self, cols: int) -> int:
        if self.packed:
            assert self.scheme is not None
            return self.scheme.fmt.packed_bytes(cols)
        return cols * SAFETENSORS_DTYPES[self.dtype].itemsize


@dataclass(frozen=True)
class Job:
    """A unit of work run by a worker: it reads from `source` and writes at `dst_offset` of `dst_path`;
    `nbytes` is what it reads (its cost). The kinds of work are the subclasses below; run/jobs.py runs them."""

    name: str
    source: Source
    dst_path: str
    dst_offset: int
    nbytes: int

    kernel_free: ClassVar[bool] = True  # runs no kernel: dispatched first in its wave

    def written_ranges(self) -> list[tuple[int, int]]:
        """The output byte ranges this job writes."""
        return [(self.dst_offset, self.dst_offset + self.nbytes)]


@dataclass(frozen=True)
class CopyJob(Job):
    """`nbytes` bytes copied unchanged."""


@dataclass(frozen=True)
class WriteJob(Job):
    """A constant tensor (`data`) written as is."""

    data: bytes = b""


@dataclass(frozen=True)
class RowsJob(Job):
    """Rows [first_row, first_row + rows) of matrix `matrix` (of `matrix_rows` rows, `cols` columns), or
    `matrices` consecutive small matrices of a 3-D stack at once (`stack`: where each is stored)."""

    rows: int = 0
    cols: int = 0
    matrix: int = 0
    first_row: int = 0
    matrix_rows: int = 0
    chunk_bytes: int = READ_CHUNK_BYTES
    matrices: int = 1
    stack: tuple[Source, ...] = ()
    label: str = ""  # the weight's own name for messages, where `name` is its stored codes' (weight_packed)

    kernel_free: ClassVar[bool] = False

    def matrix_out_bytes(self) -> int:
        """Output bytes of one whole matrix at dst_offset."""
        raise NotImplementedError

    def out_row_bytes(self) -> int:
        """Output bytes at dst_offset per row of the matrix (what orders the row ranges of a split job)."""
        raise NotImplementedError

    def one_matrix(self, m: int) -> "RowsJob":
        """Matrix m of a grouped job, as a job of its own."""
        source = self.stack[m]
        return replace(self, source=source, dst_offset=self.dst_offset + m * self.matrix_out_bytes(),
                       nbytes=self.rows * source.row_bytes(self.cols), matrix=self.matrix + m, matrices=1, stack=())


@dataclass(frozen=True)
class DequantizeJob(RowsJob):
    """The rows decoded to float32 and written as `out_dtype` (a safetensors tag)."""

    out_dtype: str = ""

    def written_ranges(self) -> list[tuple[int, int]]:
        return [(self.dst_offset, self.dst_offset + self.matrices * self.matrix_out_bytes())]

    def matrix_out_bytes(self) -> int:
        return self.rows * self.out_row_bytes()

    def out_row_bytes(self) -> int:
        return self.cols * SAFETENSORS_DTYPES[self.out_dtype].itemsize


@dataclass(frozen=True)
class QuantizeJob(RowsJob):
    """The rows quantized under `scheme` into the layout's tensors (`outputs`: spec and absolute start of each)."""

    scheme: Scheme | None = None
    allow_nonfinite: bool = False
    layout: str = ""
    outputs: tuple[tuple[TensorSpec, int], ...] = ()
    backend: str = "auto"
    global_scale: float | None = None  # NVFP4: the matrix's (or its fused set's) float32 global scale
    stack_global_scales: tuple[float, ...] = ()  # NVFP4: each matrix's global scale in a grouped job

    def written_ranges(self) -> list[tuple[int, int]]:
        ranges = []
        for spec, start in self.outputs:
            if not spec.unit_rows and self.first_row:
                continue  # one record per matrix: written by the matrix's first row range
            begin = start + spec.offset(self.matrix, self.first_row, self.matrix_rows)
            if self.matrices > 1:
                end = begin + self.matrices * spec.matrix_bytes
            elif not spec.unit_rows:
                end = begin + spec.row_bytes(self.matrix_rows)
            else:
                last = self.first_row + self.rows
                stored = -(-last // spec.unit_rows) - self.first_row // spec.unit_rows
                end = begin + stored * spec.row_bytes(self.matrix_rows)
            ranges.append((begin, end))
        return ranges

    def matrix_out_bytes(self) -> int:
        return next(s.matrix_bytes for s, _ in self.outputs if s.role == CODES)

    def out_row_bytes(self) -> int:
        # quantize jobs place their outputs by first_row; dst_offset (their codes) orders them
        return next(s for s, _ in self.outputs if s.role == CODES).row_bytes(self.rows)

    def one_matrix(self, m: int) -> "QuantizeJob":
        global_scale = self.stack_global_scales[m] if self.stack_global_scales else self.global_scale
        return replace(super().one_matrix(m), global_scale=global_scale, stack_global_scales=())
