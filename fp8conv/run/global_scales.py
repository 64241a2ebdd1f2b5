"""NVFP4 global scales: one per matrix, from the amax of the whole tensor (or of all partners of a fused
set: q/k/v, gate/up, w1/w3, wherever their shards are), computed before any job writes a byte. With
`--observer expanded` a weight's amax counts 1.25x (numerics/expanded.py `global_maximum`), so the global
scale leaves the largest groups room for scales above their range.

The amax pass reads every such weight once. It runs in the same kind of forked workers as the jobs,
each taking a row range of one matrix: on 2 cores it took half the time it took in the parent alone,
the parent's serial stage before the first job (bench/RESULTS.md). A max is exact in any order, so the
scales do not depend on the workers or the split.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

from ..formats import SAFETENSORS_DTYPES
from ..formats.dtypes import DTYPE_BYTES
from ..io.checkpoint import Checkpoint
from ..layouts.read import Readers, matrix_chunks
from ..numerics.expanded import global_maximum
from ..numerics.kernels import count_nonfinite, microscale_nonfinite_error
from ..numerics.microscale import nvfp4_global_scale, tensor_amax
from ..plan.decisions import CARRY
from ..plan.fusion import fused_sets
from ..plan.records import ConversionPlan
from .options import RunOptions
from .reading import dequantized_chunks
from .runner import run_parallel

# A work item: (tensor name, matrix index, first row, stop row); matrix -1: a quantized source's whole tensor.
Item = tuple[str, int, int, int]
# Rows are read into one reused buffer of about this size: a fresh 32 MiB array per chunk was a fresh mapping whose
# pages the kernel zeroed on every read (a fifth of an NVFP4 conversion's CPU time, bench/RESULTS.md), and a
# buffer this size stays in cache between the read and the max.
AMAX_CHUNK_BYTES = 4 << 20


def global_scales(checkpoint: Checkpoint, plan: ConversionPlan, options: RunOptions,
                  initializer: Callable[[], None] | None = None) -> dict[str, list[np.float32]]:
    """{weight: [global scale per matrix]} for every NVFP4 weight the plan quantizes; `options.workers`
    forked workers (started with `initializer`) share the reading where there are 2 or more."""
    names = [n for n, s in plan.schemes.items() if s.global_scale and plan.decisions[n].action != CARRY]
    if not names:
        return {}
    # The arithmetic dtype is the weight's as the kernel sees it: the source dtype, or float32 when dequantized.
    # Resolved here, before any fork: a bf16 source loads ml_dtypes (0.1-2 s) once, not in every worker.
    arith = {n: SAFETENSORS_DTYPES["F32" if n in plan.source_quant else plan.tensors[n].dtype] for n in names}
    amax = {name: [np.float32(0)] * _matrices(plan, name) for name in names}
    items = [item for name in names for item in _items(plan, name, options.job_bytes)]

    def merge(index: int, partial: list[np.float32]) -> None:
        name, matrix, _, _ = items[index]
        first = 0 if matrix < 0 else matrix
        per = amax[name]
        for k, value in enumerate(partial):
            per[first + k] = np.maximum(per[first + k], value)

    def run(item: Item) -> list[np.float32]:
        with Readers(checkpoint) as readers:
            return _amax(readers, plan, options, item)

    if options.workers <= 1 or len(items) <= 1:
        for index, item in enumerate(items):
            merge(index, run(item))
    else:
        run_parallel(run, items, options.workers, merge, initializer=initializer)
    for name, per in amax.items():
        if not all(np.isfinite(a) for a in per):
            with Readers(checkpoint) as readers:
                counts = count_nonfinite(rows for _, _, rows in _chunks(readers, plan, options, name))
            raise microscale_nonfinite_error(name, plan.schemes[name].microscale, *counts)
    return _scales(plan, names, amax, arith)


def _matrices(plan: ConversionPlan, name: str) -> int:
    qw = plan.source_quant.get(name)
    return math.prod((qw.shape if qw is not None else plan.tensors[name].shape)[:-2])


def _items(plan: ConversionPlan, name: str, job_bytes: int) -> list[Item]:
    """Row ranges of about job_bytes of each matrix of a high-precision weight; a quantized source whole."""
    if name in plan.source_quant:
        return [(name, -1, 0, 0)]
    info = plan.tensors[name]
    if info.numel == 0:
        return []
    *lead, rows, cols = info.shape
    step = max(1, job_bytes // max(cols * DTYPE_BYTES[info.dtype], 1))
    return [(name, e, r0, min(rows, r0 + step)) for e in range(math.prod(lead)) for r0 in range(0, rows, step)]


def _chunks(readers: Readers, plan: ConversionPlan, options: RunOptions, name: str):
    qw = plan.source_quant.get(name)
    if qw is not None:
        return dequantized_chunks(readers, qw, options.chunk_bytes)
    return matrix_chunks(readers, plan.tensors[name], 1, options.chunk_bytes)


def _amax(readers: Readers, plan: ConversionPlan, options: RunOptions, item: Item) -> list[np.float32]:
    """The amax of one item: [one value] for a row range, [one per matrix] for a whole quantized source."""
    name, matrix, first, stop = item
    if matrix < 0:
        per = [np.float32(0)] * _matrices(plan, name)
        for e, _, rows in _chunks(readers, plan, options, name):
            per[e] = np.maximum(per[e], tensor_amax(rows))
        return per
    info = plan.tensors[name]
    *_, rows_total, cols = info.shape
    dtype = SAFETENSORS_DTYPES[info.dtype]
    step = max(1, min(options.chunk_bytes, AMAX_CHUNK_BYTES) // max(cols * dtype.itemsize, 1))
    found = np.float32(0)
    reader = readers.of(name)
    buffer = np.empty(min(step, stop - first) * cols, dtype)
    for r0 in range(first, stop, step):
        n = min(step, stop - r0)
        offset = info.start + (matrix * rows_total + r0) * cols * dtype.itemsize
        rows = buffer[: n * cols].reshape(n, cols)
        reader.read_into(offset, rows.reshape(-1).view(np.uint8), name)
        found = np.maximum(found, tensor_amax(rows))
    return [found]


def _scales(plan: ConversionPlan, names: list[str], amax: dict[str, list[np.float32]], arith: dict[str, np.dtype]
            ) -> dict[str, list[np.float32]]:
    """Each matrix's scale from its amax (in its arithmetic dtype; 1.25x with the expanded observer); one shared
    scale for a fused set's members, from the largest of theirs."""
    top = {n: [global_maximum(a) if plan.schemes[n].observer == "expanded" else a for a in per]
           for n, per in amax.items()}
    scales = {n: [nvfp4_global_scale(a, arith[n]) for a in per] for n, per in top.items()}
    logical = {plan.source_quant[n].name if n in plan.source_quant else n: n for n in names if len(amax[n]) == 1}
    for group in fused_sets(list(logical)):
        members = [logical[m] for m in group]
        shared = nvfp4_global_scale(max(top[n][0] for n in members), arith[members[0]])
        for n in members:
            scales[n] = [shared]
    return scales
