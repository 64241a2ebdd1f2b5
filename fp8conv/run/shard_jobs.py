"""The work items of one output shard: byte copies, constants, and one job per matrix (or row range of a large
one), in file order."""
from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

from ..formats import SAFETENSORS_DTYPES
from ..io.safetensors import TensorInfo
from ..layouts import CODES, GLOBAL_SCALE, SCALE, ZERO_POINT
from ..plan.decisions import CARRY, COPY, DEQUANTIZE
from ..plan.records import ConversionPlan, OutShard
from .jobs import target_tile_rows
from .work import CopyJob, DequantizeJob, Job, QuantizeJob, RowsJob, Source, WriteJob
from .options import RunOptions
from .reading import source_of


def _source_of(plan: ConversionPlan, info: TensorInfo, sources: dict[str, Path], matrix: int) -> Source:
    """Where matrix `matrix` of a tensor is stored (codes + scale grid + zero points when quantized in the source)."""
    qw = plan.source_quant.get(info.name)
    if qw is None:
        *_, rows, cols = info.shape
        path = str(sources[plan.source_shard[info.name]])
        return Source(path, info.start + matrix * rows * cols * info.np_dtype.itemsize, info.dtype)
    return source_of(qw, lambda name: sources[plan.source_shard[name]], matrix)


def _carried_scale_jobs(plan: ConversionPlan, name: str, dst: Path, offsets: dict[str, int],
                        sources: dict[str, Path]) -> list[Job]:
    """Byte copies of a carried weight's scale (and global scale, zero points) into the layout's tensors."""
    jobs: list[Job] = []
    scale = plan.source_quant[name].scale
    target = plan.spec(name, SCALE)
    assert scale is not None and target is not None
    jobs.append(CopyJob(scale.name, Source(str(sources[plan.source_shard[scale.name]]), scale.start, scale.dtype),
                        str(dst), offsets[target.name], scale.nbytes))
    for role, stored in ((GLOBAL_SCALE, plan.source_quant[name].global_scale),
                         (ZERO_POINT, plan.source_quant[name].zero_point)):
        target = plan.spec(name, role)
        if stored is not None and target is not None:
            jobs.append(CopyJob(stored.name, Source(str(sources[plan.source_shard[stored.name]]), stored.start,
                                                    stored.dtype), str(dst), offsets[target.name], stored.nbytes))
    return jobs


def _matrix_jobs(plan: ConversionPlan, name: str, base: int, dst: Path, offsets: dict[str, int],
                 sources: dict[str, Path], options: RunOptions) -> list[Job]:
    """One dequantize or quantize job per 2-D matrix of `name` (small matrices of a stack grouped), written
    from byte offset `base` of the tensor's first output."""
    jobs: list[Job] = []
    info = plan.tensors[name]
    action = plan.decisions[name].action
    qw = plan.source_quant.get(name)
    shape = qw.shape if qw is not None else info.shape
    *lead, rows, cols = shape
    matrices = math.prod(lead)
    # OpenAI MXFP4 experts: the job's matrix is the quantized [out, in]; the [in, out] side is transposed.
    transposed = qw.transposed if qw is not None else bool(plan.layout and plan.layout.transposes)
    if transposed:
        rows, cols = cols, rows

    def source_at(e: int) -> Source:
        return replace(_source_of(plan, info, sources, e), transposed=transposed)

    first = source_at(0)
    # Small matrices of a stack go together (one job, one read): cost follows the bytes, not
    # the number of matrices ([50000, 1, 1] is 50,000 one-element "experts").
    per_job = 1 if transposed else max(1, min(matrices, options.stack_bytes // max(rows * first.row_bytes(cols), 1)))
    for e in range(0, matrices, per_job):
        count = min(per_job, matrices - e)
        stack = tuple(source_at(e + k) for k in range(count)) if count > 1 else ()
        source = source_at(e)
        nbytes = rows * source.row_bytes(cols)
        if action == DEQUANTIZE:
            out_size = SAFETENSORS_DTYPES[plan.output_dtype(name)].itemsize
            jobs.append(DequantizeJob(name, source, str(dst), base + e * rows * cols * out_size,
                                      count * nbytes, rows, cols, out_dtype=plan.output_dtype(name), matrix=e,
                                      matrix_rows=rows, chunk_bytes=options.chunk_bytes, matrices=count,
                                      stack=stack, label=qw.name if qw is not None else name))
            continue
        outputs = tuple((s, offsets[s.name]) for s in plan.outputs[name] if s.data is None)
        codes = plan.spec(name, CODES)
        assert codes is not None
        gs = plan.global_scales.get(name)
        jobs.append(QuantizeJob(name, source, str(dst), base + e * codes.matrix_bytes,
                                count * nbytes, rows, cols,
                                scheme=plan.schemes[name], allow_nonfinite=options.allow_nonfinite,
                                layout=plan.layout.name if plan.layout else "", outputs=outputs, matrix=e,
                                matrix_rows=rows, chunk_bytes=options.chunk_bytes, backend=options.backend,
                                global_scale=None if gs is None else float(gs[e]), matrices=count, stack=stack,
                                stack_global_scales=() if gs is None or count == 1 else
                                tuple(float(g) for g in gs[e:e + count])))
    return jobs


def jobs_for_shard(plan: ConversionPlan, shard: OutShard, offsets: dict[str, int], dst: Path,
                   sources: dict[str, Path], options: RunOptions) -> list[Job]:
    """Byte copies for kept tensors and carried codes; constants; one job per 2-D matrix (per expert
    for 3-D) writing every tensor its layout declares."""
    jobs = []
    origin = plan.origin
    for entry in shard.entries:
        name = origin[entry.name]
        decision = plan.decisions[name]
        info = plan.tensors[name]
        action = decision.action
        spec = next((s for s in plan.outputs.get(name, []) if s.name == entry.name), None)
        if spec is not None and spec.data is not None:
            jobs.append(WriteJob(entry.name, Source("", 0, ""), str(dst), offsets[entry.name], len(spec.data),
                                 data=spec.data))
            continue
        if spec is not None and spec.role != CODES:
            continue  # written by its weight's jobs (it may share the name of a dropped source scale)
        if action == COPY and info.nbytes == 0:
            continue  # cost follows the data: an empty tensor is its header entry only, no job
        if action in (COPY, CARRY):
            source = Source(str(sources[plan.source_shard[name]]), info.start, info.dtype)
            jobs.append(CopyJob(name, source, str(dst), offsets[entry.name], info.nbytes))
        if action == CARRY:
            jobs += _carried_scale_jobs(plan, name, dst, offsets, sources)
        if action in (COPY, CARRY) or info.numel == 0:
            continue  # copied, or nothing to read or write (its scale grid is empty too)
        jobs += _matrix_jobs(plan, name, offsets[entry.name], dst, offsets, sources, options)
    split = [part for job in jobs for part in _split_rows(job, options.job_bytes)]
    return sorted(split, key=lambda job: job.dst_offset)  # file order: the hashed prefix grows


def _split_rows(job: Job, job_bytes: int) -> list[Job]:
    """Cut a large matrix into row ranges of whole tiles (source and target), so the workers share
    one big tensor too. One-scale (tensor) targets need the whole matrix's amax: kept whole."""
    quantize = isinstance(job, QuantizeJob) and job.scheme is not None
    if (not isinstance(job, RowsJob) or job.matrices > 1 or job.nbytes <= job_bytes or job.source.transposed
            or (quantize and job.scheme.granularity == "tensor")):
        return [job]
    step = job.source.tile_rows(job.rows, job.cols)
    if quantize:
        step = math.lcm(step, target_tile_rows(job.scheme, job.outputs, job.rows, job.cols))
    row_bytes = job.nbytes // job.rows
    step *= max(1, job_bytes // (row_bytes * step))
    out_row_bytes = job.out_row_bytes()
    parts = []
    for first in range(0, job.rows, step):
        rows = min(step, job.rows - first)
        parts.append(replace(job, dst_offset=job.dst_offset + first * out_row_bytes, nbytes=rows * row_bytes,
                             rows=rows, first_row=first))
    return parts
