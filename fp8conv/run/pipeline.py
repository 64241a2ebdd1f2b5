"""The only module that combines checkpoint I/O with the kernels: runs a ConversionPlan."""
from __future__ import annotations

import errno
import gc
import hashlib
import json
import math
import os
import shutil
import signal
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..accel import native
from ..report import html_page as html_report
from ..io.checkpoint import CARD_NAME, CONFIG_NAME, INDEX_NAME, MANIFEST_NAME, REPORT_HTML_NAME, REPORT_NAME, Checkpoint, open_checkpoint
from ..plan.conversion import build_dequantize_plan, build_plan
from ..plan.records import ConversionPlan, OutShard
from ..errors import EXIT_SIGHUP, EXIT_SIGINT, EXIT_SIGTERM, InputError, Interrupted, OutputError, SchemeError
from ..formats import SAFETENSORS_DTYPES
from ..plan.fusion import fused_sets
from ..io.hashing import PrefixHasher
from .cpus import available_cpus
from ..io.sidefiles import carry, not_carried_warning
from .jobs import (CopyJob, DequantizeJob, Job, QuantizeJob, RowsJob, Source, WriteJob, close_handles, forget_handles,
                   run_job, target_tile_rows)
from ..numerics.kernels import count_nonfinite, microscale_nonfinite_error
from ..numerics.stats import ErrorStats
from ..numerics.microscale import nvfp4_global_scale, tensor_amax
from ..layouts import DEFAULT_LAYOUT, CODES, GLOBAL_SCALE, SCALE, ZERO_POINT, get_layout
from ..io.outdir import JOURNAL_NAME, Staging, Writeback
from .partition import (Partition, PartRecord, assign, check_against_plan, check_digest, collect, parts_dir,
                        read_record)
from ..plan.decisions import CARRY, COPY, DEQUANTIZE, Matcher
from ..layouts.read import Readers, matrix_chunks
from .reading import dequantized_chunks, source_of
from ..plan.recipe import DEQUANTIZE as DEQUANTIZE_COMMAND
from ..plan.recipe import Recipe
from ..report.manifest import build_manifest, build_report
from .runner import run_parallel
from ..io.safetensors import READ_CHUNK_BYTES, TensorInfo, build_header, sha256_of, write_at
from ..io.untrusted import printable
from ..plan.scheme import Scheme

Progress = Callable[[int], None]
JOB_BYTES = 64 << 20  # larger matrices are split into row ranges shared by the workers
INTERLEAVED_SHARDS = 4  # output shards converted (and hashed) side by side
WORKERS_PER_HASH = 2  # default_workers where the hashing is the limit
WORKER_NICENESS = 5  # below the parent, whose per-shard threads hash the output
STACK_BYTES = 16 << 20  # smaller matrices of a 3-D stack are grouped into jobs of about this size


def default_workers(shards: int, cpus: int | None = None, hash_bound: bool = False) -> int:
    """--workers when not given. A shard's sha256 is one sequential stream on a parent thread (up to
    INTERLEAVED_SHARDS shards are hashed side by side), and the run cannot end before the last
    shard's hash does.

    hash_bound (the compiled kernel converts every tensor to FP8 / INT8 with min-max scales, `hash_bound()`): a
    worker then writes about 0.57 GB/s of output and a hash stream reads about 1.2 GB/s, so
    WORKERS_PER_HASH workers per shard hashed at a time keep the hashing fed, and more only contend
    for the page cache and the disk (16 cores, 2 shards, five runs on four machines: 4 workers
    0.91-1.01x the write ceiling against 1.05-1.31x for 12; bench/RESULTS.md). Otherwise (4-bit
    formats, the mse observer, the numpy path: the CPU is the limit): every CPU but two per shard
    hashed at a time, never fewer than half the CPUs. Never more than the CPUs, never fewer than 2
    where there are 2. cpus: those this process may use (affinity mask, cgroup quota: cpus.py)."""
    cpus = cpus or available_cpus()
    hashing = min(INTERLEAVED_SHARDS, max(shards, 1))
    if hash_bound:
        return max(min(cpus, 2), min(cpus, WORKERS_PER_HASH * hashing))
    return max(min(cpus, 2), cpus // 2, cpus - 2 * hashing)


def hash_bound(plan: ConversionPlan) -> bool:
    """Whether every tensor `plan` quantizes goes through the compiled kernel to 8-bit symmetric codes
    over [-qmax, qmax] with float32 min-max scales: the schemes whose rate the hash-bound rule of
    default_workers was measured on (FP8 / INT8; bench/RESULTS.md)."""
    schemes = set(plan.schemes.values()) or ({plan.scheme} if plan.scheme is not None else set())
    return bool(schemes) and native.use_native() and all(
        s.fmt.bits == 8 and s.symmetric and not s.full_range and s.scale_format == "float32"
        and s.microscale is None and s.observer == "minmax" for s in schemes)


@dataclass(frozen=True)
class RunOptions:
    """How to run a plan: parallelism, what to do with an existing output, and the memory knobs
    (rows are read in chunks of about chunk_bytes; matrices over job_bytes are split into row-range
    jobs that workers share). The tensors' bytes depend on none of them. The report's float64
    error sums are merged chunk by chunk and job by job, so their last bits depend on chunk_bytes
    and job_bytes (module constants, not CLI options: every run, any --workers or --partition, uses
    the same ones); workers and backend change nothing."""

    workers: int = 1
    overwrite: bool = False
    resume: bool = False
    allow_nonfinite: bool = False
    chunk_bytes: int = READ_CHUNK_BYTES
    job_bytes: int = JOB_BYTES
    stack_bytes: int = STACK_BYTES  # smaller matrices of a 3-D stack are grouped into jobs of about this size
    backend: str = "auto"  # kernels: auto (FP8CONV_BACKEND, else native where built), numpy or native


@dataclass(frozen=True)
class QuantizeOptions:
    """Everything `fp8conv quantize` was asked to do, validated: what to produce, and how to run."""

    scheme: Scheme = field(default_factory=Scheme)
    layout: str = DEFAULT_LAYOUT
    ignore: tuple[str, ...] = ()
    include: tuple[str, ...] = ()
    max_shard_size: int | None = None
    run: RunOptions = field(default_factory=RunOptions)
    tp: int = 1
    engines: tuple[str, ...] = ()  # engines whose load constraints refuse the conversion (others warn)
    schemes: tuple[tuple[str, Scheme], ...] = ()  # --scheme PATTERN=SPEC overrides, first match wins


@dataclass
class ConversionResult:
    """A finished OUT (report set), or a finished part of a partitioned run (part and shards set)."""

    plan: ConversionPlan
    report: dict
    out: Path
    config_updated: bool
    notes: list[str]
    part: Partition | None = None
    shards: list[str] = field(default_factory=list)


# ---- planning -----------------------------------------------------------------------------------


def recipe_of(options: QuantizeOptions) -> Recipe:
    return Recipe(scheme=options.scheme, layout=options.layout, ignore=tuple(options.ignore),
                  include=tuple(options.include), allow_nonfinite=options.run.allow_nonfinite,
                  max_shard_size=options.max_shard_size, tp=options.tp, engines=tuple(options.engines),
                  schemes=tuple(options.schemes))


def plan_recipe(source: Path, recipe: Recipe) -> tuple[Checkpoint, ConversionPlan]:
    """Open SRC and decide every tensor and output byte range for the recipe (reads headers only)."""
    checkpoint = open_checkpoint(source)
    _refuse_reserved(checkpoint)
    if recipe.command == DEQUANTIZE_COMMAND:
        plan = build_dequantize_plan(checkpoint, recipe.out_dtype, recipe.max_shard_size)
        plan.warnings += _skipped_warnings(checkpoint)
        return checkpoint, plan
    plan = build_plan(checkpoint, recipe.scheme, get_layout(recipe.layout), Matcher(recipe.ignore, "--ignore"),
                      Matcher(recipe.include, "--include"), recipe.max_shard_size, recipe.tp, recipe.engines,
                      tuple((Matcher((pattern,), "--scheme"), scheme) for pattern, scheme in recipe.schemes))
    if recipe.note:
        plan.warnings.insert(0, recipe.note)
    if not plan.layout.engine_loadable:
        plan.warnings.append(f"--layout {recipe.layout} is fp8conv's own layout: no inference engine loads it")
    plan.warnings += _skipped_warnings(checkpoint)
    return checkpoint, plan


def _refuse_reserved(checkpoint: Checkpoint) -> None:
    """A side file named like our journal would be silently dropped from the output."""
    for path in checkpoint.extra_files:
        if path.name == JOURNAL_NAME:
            raise InputError(f"{printable(str(path))}: a source file named like fp8conv's own journal would be lost; "
                             "rename or remove it (is SRC an interrupted run's staging folder?)")


def _skipped_warnings(checkpoint: Checkpoint) -> list[str]:
    return not_carried_warning(checkpoint.root, checkpoint.skipped)


def make_plan(source: Path, options: QuantizeOptions) -> tuple[Checkpoint, ConversionPlan]:
    return plan_recipe(source, recipe_of(options))


def make_dequantize_plan(source: Path, out_dtype: str, max_shard_size: int | None = None) -> tuple[Checkpoint, ConversionPlan]:
    return plan_recipe(source, Recipe(DEQUANTIZE_COMMAND, out_dtype=out_dtype, max_shard_size=max_shard_size))


def _source_of(plan: ConversionPlan, info: TensorInfo, sources: dict[str, Path], matrix: int) -> Source:
    """Where matrix `matrix` of a tensor is stored (codes + scale grid + zero points when quantized in the source)."""
    qw = plan.source_quant.get(info.name)
    if qw is None:
        *_, rows, cols = info.shape
        path = str(sources[plan.source_shard[info.name]])
        return Source(path, info.start + matrix * rows * cols * info.np_dtype.itemsize, info.dtype)
    return source_of(qw, lambda name: sources[plan.source_shard[name]], matrix)


def _jobs_for_shard(plan: ConversionPlan, shard: OutShard, offsets: dict[str, int], dst: Path,
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
        if action in (COPY, CARRY):
            continue
        if info.numel == 0:
            continue  # nothing to read or write (its scale grid is empty too)
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
                jobs.append(DequantizeJob(name, source, str(dst), offsets[entry.name] + e * rows * cols * out_size,
                                          count * nbytes, rows, cols, out_dtype=plan.output_dtype(name), matrix=e,
                                          matrix_rows=rows, chunk_bytes=options.chunk_bytes, matrices=count,
                                          stack=stack, label=qw.name if qw is not None else name))
                continue
            outputs = tuple((s, offsets[s.name]) for s in plan.outputs[name] if s.data is None)
            codes = plan.spec(name, CODES)
            assert codes is not None
            gs = plan.global_scales.get(name)
            jobs.append(QuantizeJob(name, source, str(dst), offsets[entry.name] + e * codes.matrix_bytes,
                                    count * nbytes, rows, cols,
                                    scheme=plan.schemes[name], allow_nonfinite=options.allow_nonfinite,
                                    layout=plan.layout.name if plan.layout else "", outputs=outputs, matrix=e,
                                    matrix_rows=rows, chunk_bytes=options.chunk_bytes, backend=options.backend,
                                    global_scale=None if gs is None else float(gs[e]), matrices=count, stack=stack,
                                    stack_global_scales=() if gs is None or count == 1 else
                                    tuple(float(g) for g in gs[e:e + count])))
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


def run_key(checkpoint: Checkpoint, plan: ConversionPlan, allow_nonfinite: bool) -> str:
    """Identifies a run (for --resume, and the parts of a partitioned run): the source's shard
    names, sizes and headers, the decisions and the output layout.

    Nothing that differs between hosts sharing SRC and OUT (no mtimes, hostnames or absolute
    paths), and not --workers: the output bytes never depend on it."""
    digest = hashlib.sha256()
    for shard in checkpoint.shards:
        tensors = sorted((i.name, i.dtype, i.shape, i.start, i.end) for i in shard.tensors.values())
        digest.update(repr((shard.path.name, shard.file_size, sorted(shard.metadata.items()), tensors)).encode())
    layout = plan.layout.name if plan.layout else None
    described = [repr(plan.scheme), sorted((n, repr(s)) for n, s in plan.schemes.items()), layout, plan.out_dtype,
                 allow_nonfinite, plan.warnings,
                 sorted((n, d.action, d.reason) for n, d in plan.decisions.items()),
                 [(s.name, [(e.name, e.dtype, e.shape) for e in s.entries]) for s in plan.shards]]
    digest.update(repr(described).encode())
    return digest.hexdigest()


def resume_key(checkpoint: Checkpoint, key: str) -> str:
    """The key a staging journal is resumed under: the run's key plus, for each source file, what
    this host sees of it beyond its name and bytes: mtime, inode and ctime. The ctime cannot be set
    back by a user (restoring an edited file's mtime sets it), so an in-place edit since the
    interrupted run starts over instead of mixing old and new shards. Local only: a part's record
    and `merge` compare the host-independent run key (another host's copy of SRC is a different
    inode; there a resumed part just starts over)."""
    digest = hashlib.sha256(key.encode())
    for shard in checkpoint.shards:
        info = shard.path.stat()
        digest.update(f"{shard.path.name}:{info.st_size}:{info.st_mtime_ns}:{info.st_ino}:{info.st_ctime_ns}:".encode())
    return digest.hexdigest()


# ---- running ------------------------------------------------------------------------------------


@contextmanager
def _signals_raise() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into an exception so temporaries are removed (SIGINT already raises)."""

    def on_signal(signum, frame):
        name, code = ("SIGHUP", EXIT_SIGHUP) if signum == signal.SIGHUP else ("SIGTERM", EXIT_SIGTERM)
        raise Interrupted(f"terminated ({name}); partial output removed", code)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _worker_init() -> None:
    # With a worker per core, the parent's hashing threads (sha256 cannot be split within a file)
    # would share cores with busy workers and finish last: the serial stage. Lower priority
    # workers let the hashing keep pace; the workers still get every cycle the parent leaves.
    os.nice(WORKER_NICENESS)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    forget_handles()
    # The objects of every import so far live as long as the worker: out of the collector's generations,
    # each collection no longer walks them all.
    gc.freeze()


def _worker_job(job: Job) -> tuple:
    """A job in a worker (the compiled kernels are an extension module: imported with fp8conv, nothing
    to load)."""
    return run_job(job)


def _execute(jobs: list[tuple[str, Job]], workers: int, on_result: Callable[[int, tuple], None],
             on_shard_done: Callable[[str], None]) -> None:
    """Run every job (inline or in a fork pool), in file order shard by shard, so each shard's
    written prefix grows and is hashed while later tensors convert."""
    remaining: dict[str, int] = {}
    for shard, _ in jobs:
        remaining[shard] = remaining.get(shard, 0) + 1

    def finished(index: int, result: tuple) -> None:
        on_result(index, result)
        shard = jobs[index][0]
        remaining[shard] -= 1
        if remaining[shard] == 0:
            on_shard_done(shard)

    if workers <= 1 or len(jobs) <= 1:
        try:
            for i, (_, job) in enumerate(jobs):
                finished(i, run_job(job))
        finally:
            close_handles()
        return
    run_parallel(_worker_job, [job for _, job in jobs], workers, finished, initializer=_worker_init)


def quantize_checkpoint(source: Path, out: Path, options: QuantizeOptions, progress: Progress | None = None) -> ConversionResult:
    """Convert SRC into OUT atomically; raises FP8ConvError subclasses with one-line messages."""
    checkpoint, plan = make_plan(source, options)
    return run_plan(checkpoint, plan, source, out, options.run, progress)


def run_plan(checkpoint: Checkpoint, plan: ConversionPlan, source: Path, out: Path, options: RunOptions,
             progress: Progress | None = None, partition: Partition | None = None,
             recipe: Recipe | None = None) -> ConversionResult:
    """Write the plan's output atomically: either no OUT, or a complete one. With a partition, write
    that part's shards into OUT's parts area instead (also atomically); `recipe` is recorded there."""
    refuse_flagged(plan)
    key = run_key(checkpoint, plan, options.allow_nonfinite)
    progress = progress or (lambda n: None)
    if partition is None:
        staging = Staging(out, source, options.overwrite, options.resume, resume_key(checkpoint, key),
                          checkpoint.files)
        with _staged(staging, out):
            files, stats, notes = _convert(checkpoint, plan, staging, options, progress, shards_to_write(plan))
            return _finalize(checkpoint, plan, staging, files, stats, notes)
    assert recipe is not None
    return _run_part(checkpoint, plan, source, out, options, progress, partition, recipe, key)


def shards_to_write(plan: ConversionPlan, partition: Partition | None = None) -> list[str]:
    """The output shards a run writes: all, or a partition's."""
    if partition is None:
        return [s.name for s in plan.shards]
    return assign(plan.shards, partition.count)[partition.index - 1]


def refuse_flagged(plan: ConversionPlan) -> None:
    """A real run refuses what the dry run flags, before the first byte."""
    if plan.refusals:
        raise SchemeError(f"refused before writing anything: {plan.refusals[0]}"
                          + (f" (and {len(plan.refusals) - 1} more; --dry-run lists them)" if len(plan.refusals) > 1 else ""))


def _run_part(checkpoint: Checkpoint, plan: ConversionPlan, source: Path, out: Path, options: RunOptions,
              progress: Progress, partition: Partition, recipe: Recipe, key: str) -> ConversionResult:
    """Part I of N: its whole shards into the parts area; a finished part of the same run is kept."""
    shards = shards_to_write(plan, partition)
    folder = parts_dir(out) / partition.name
    Staging(out, source, options.overwrite, True, "").check()  # refuse a non-empty OUT before any work
    if folder.is_dir() and not options.overwrite:
        try:
            done = read_record(folder)
        except InputError:
            done = None
        if done is not None and done.run_key == key and done.partition == partition:
            progress(sum(plan.tensors[e.name].nbytes for s in plan.shards if s.name in shards
                         for e in s.entries if e.name in plan.tensors))
            return ConversionResult(plan, {}, out, False, [f"part {partition.label} was already finished"],
                                    partition, shards)
    staging = Staging(folder, source, options.overwrite, options.resume, resume_key(checkpoint, key),
                      checkpoint.files)
    with _staged(staging, folder):
        files, stats, notes = _convert(checkpoint, plan, staging, options, progress, shards)
        record = PartRecord(folder, partition, key, recipe, os.path.abspath(source), files, stats)
        record.write(staging.tmp)
        return ConversionResult(plan, {}, out, False, notes, partition, shards)


def merge_parts(out: Path, source: Path | None = None, overwrite: bool = False) -> ConversionResult:
    """Check that all N parts of a run are present and belong together, then write index, config,
    manifest and report and move OUT into place atomically (the shards are hard-linked, not copied)."""
    area = parts_dir(out)
    records = collect(area)
    first = records[0]
    src = Path(source) if source is not None else Path(first.source)
    checkpoint, plan = plan_recipe(src, first.recipe)
    key = run_key(checkpoint, plan, first.recipe.allow_nonfinite)
    if key != first.run_key:
        raise InputError(f"{src} is not the source the parts in {area} were converted from (or it changed since)")
    check_against_plan(records, plan.shards)
    staging = Staging(out, src, overwrite, True, key, checkpoint.files)
    with _staged(staging, out):
        files: dict[str, dict] = {}
        stats: dict[str, dict] = {}
        for record in records:
            for name, meta in record.files.items():
                _link(record.folder / name, staging.path(name))
                check_digest(record, name, staging.path(name))  # the bytes linked are the bytes the part hashed
                files[name] = meta
            stats.update(record.stats)
        result = _finalize(checkpoint, plan, staging, files, stats, [])
    shutil.rmtree(area, ignore_errors=True)
    return result


def _link(source: Path, target: Path) -> None:
    """Put a part's shard into the merged output without copying its bytes (copy where links fail)."""
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


@contextmanager
def _staged(staging: Staging, out: Path) -> Iterator[None]:
    """prepare(), the body, commit(); on any failure the staging folder is removed and the error
    becomes one line (a killed process leaves it, journaled, for --resume)."""
    staging.prepare()
    try:
        with _signals_raise():
            yield
            staging.commit()
    except KeyboardInterrupt:
        staging.abort()
        raise Interrupted("interrupted (SIGINT); partial output removed", EXIT_SIGINT) from None
    except OSError as exc:
        staging.abort()
        raise OutputError(f"cannot write {out}: {_os_reason(exc)}; partial output removed") from None
    except BaseException:
        staging.abort()
        raise


def _os_reason(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return "no space left on device"
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return "the target is read-only or not writable"
    return exc.strerror or str(exc)


def _prepare_shards(plan: ConversionPlan, staging: Staging, options: RunOptions, sources: dict[str, Path],
                    progress: Progress, names: list[str], writeback: Writeback
                    ) -> tuple[dict[str, dict], dict[str, list[Job]], dict[str, PrefixHasher]]:
    """Reuse shards a resumed run finished (sha256-checked); lay out the header of every other one."""
    files: dict[str, dict] = {}
    jobs_by_shard: dict[str, list[Job]] = {}
    hashers: dict[str, PrefixHasher] = {}
    for shard in plan.shards:
        if shard.name not in names:
            continue
        path = staging.path(shard.name)
        recorded = staging.finished.pop(shard.name, None)
        if recorded and sha256_of(path) == recorded:
            staging.finished[shard.name] = recorded
            files[shard.name] = {"sha256": recorded, "bytes": path.stat().st_size}
            progress(sum(plan.tensors[e.name].nbytes for e in shard.entries if e.name in plan.tensors))
            continue
        for entry in shard.entries:
            staging.stats.pop(entry.name, None)
        header, offsets = build_header(shard.entries)
        fd = staging.create(shard.name)
        try:
            write_at(fd, 0, header)
            os.ftruncate(fd, len(header) + shard.nbytes)
        finally:
            os.close(fd)
        hashers[shard.name] = PrefixHasher(path, len(header) + shard.nbytes, writeback.hashed)
        hashers[shard.name].written(0, len(header))
        jobs_by_shard[shard.name] = _jobs_for_shard(plan, shard, offsets, path, sources, options)
    return files, jobs_by_shard, hashers


def _global_scales(checkpoint: Checkpoint, plan: ConversionPlan, options: RunOptions) -> dict[str, list[np.float32]]:
    """NVFP4 global scales, one per matrix, computed before any job from the amax of the whole tensor,
    or of all partners of a fused set (q/k/v, gate/up, w1/w3) wherever their shards are."""
    names = [n for n, s in plan.schemes.items() if s.global_scale and plan.decisions[n].action != CARRY]
    if not names:
        return {}
    amax: dict[str, list[np.float32]] = {}
    with Readers(checkpoint) as readers:

        def chunks(name: str):
            qw = plan.source_quant.get(name)
            if qw is not None:
                return dequantized_chunks(readers, qw, options.chunk_bytes)
            return matrix_chunks(readers, plan.tensors[name], 1, options.chunk_bytes)

        for name in names:
            qw = plan.source_quant.get(name)
            per = [np.float32(0)] * math.prod((qw.shape if qw is not None else plan.tensors[name].shape)[:-2])
            for e, _, rows in chunks(name):
                per[e] = np.maximum(per[e], tensor_amax(rows))
            if not all(np.isfinite(a) for a in per):
                raise microscale_nonfinite_error(name, plan.schemes[name].microscale, *count_nonfinite(rows for _, _, rows in chunks(name)))
            amax[name] = per
    # The arithmetic dtype is the weight's as the kernel sees it: the source dtype, or float32 when dequantized.
    arith = {n: SAFETENSORS_DTYPES["F32" if n in plan.source_quant else plan.tensors[n].dtype] for n in names}
    scales = {n: [nvfp4_global_scale(a, arith[n]) for a in per] for n, per in amax.items()}
    logical = {plan.source_quant[n].name if n in plan.source_quant else n: n for n in names if len(amax[n]) == 1}
    for group in fused_sets(list(logical)):
        members = [logical[m] for m in group]
        shared = nvfp4_global_scale(max(amax[n][0] for n in members), arith[members[0]])
        for n in members:
            scales[n] = [shared]
    return scales


def _convert(checkpoint: Checkpoint, plan: ConversionPlan, staging: Staging, options: RunOptions,
             progress: Progress, names: list[str]) -> tuple[dict[str, dict], dict[str, dict], list[str]]:
    """Write the shards `names` into the staging folder: ({shard: sha256 and bytes}, {tensor: error
    stats as JSON}, notes)."""
    sources = {shard.path.name: shard.path for shard in checkpoint.shards}
    plan.global_scales = _global_scales(checkpoint, plan, options)
    writeback = Writeback()
    try:
        files, jobs_by_shard, hashers = _prepare_shards(plan, staging, options, sources, progress, names, writeback)
    except BaseException:
        writeback.close()
        raise
    reused = len(files)
    jobs = _interleave(jobs_by_shard, {s.name: hashers[s.name].size for s in plan.shards if s.name in hashers})
    job_stats: dict[int, ErrorStats] = {}
    stats: dict[str, ErrorStats] = {name: ErrorStats.from_json(d) for name, d in staging.stats.items()}

    def finish_shard(shard: str, shard_stats: dict) -> None:
        digest = hashers[shard].hexdigest()
        files[shard] = {"sha256": digest, "bytes": hashers[shard].size}
        staging.mark_finished(shard, digest, shard_stats)

    # Each shard's hashing (of its completed prefix), fsync and journaling run on a helper thread
    # of its own (they release the GIL) while the workers convert: shards hash in parallel, and
    # one thread per shard keeps that shard's steps in order.
    finishers = {shard: ThreadPoolExecutor(max_workers=1) for shard in jobs_by_shard}
    pending = []
    try:
        def on_result(index: int, result: tuple) -> None:
            _, partial, nbytes = result
            if partial is not None:
                job_stats[index] = partial
            shard, job = jobs[index]
            for start, end in job.written_ranges():
                writeback.written(hashers[shard].path, start, end)
                pending.append(finishers[shard].submit(hashers[shard].written, start, end))
            progress(nbytes)

        def on_shard_done(shard: str) -> None:
            # Merge in job order, never completion order, so float sums (and the report) are deterministic.
            for index, (job_shard, job) in enumerate(jobs):
                if job_shard == shard and index in job_stats:
                    stats.setdefault(job.name, ErrorStats()).merge(job_stats.pop(index))
            names = {e.name for s in plan.shards if s.name == shard for e in s.entries}
            shard_stats = {name: stats[name].to_json() for name in sorted(names & stats.keys())}
            pending.append(finishers[shard].submit(finish_shard, shard, shard_stats))
            finishers[shard].shutdown(wait=False)  # its thread ends once the shard is journaled

        for shard, shard_jobs in jobs_by_shard.items():
            if not shard_jobs:
                on_shard_done(shard)
        _execute(jobs, options.workers, on_result, on_shard_done)
        writeback.close()  # what it has not started yet, the shards' fsyncs write
        for future in pending:
            future.result()
    finally:
        writeback.close()
        for finisher in finishers.values():
            finisher.shutdown(wait=True, cancel_futures=True)
    notes = staging.notes + ([f"resumed: reused {reused} finished shard(s), sha256-checked"] if reused else [])
    return files, {name: stats[name].to_json() for name in sorted(stats)}, notes


def _interleave(jobs_by_shard: dict[str, list[Job]], sizes: dict[str, int]) -> list[tuple[str, Job]]:
    """All jobs, in waves of INTERLEAVED_SHARDS shards whose file orders are interleaved by relative
    position: the shards of a wave hash in parallel (each on its own thread) and the workers spread
    their writes over their files; a wave's shards finish (and are journaled, for --resume) before
    the next wave starts. Within a wave, jobs that run no kernel (byte copies, constants) come first:
    in the first wave they are written while the workers load the compiled kernel. Deterministic;
    within a shard, otherwise file order (statistics merge in this order)."""
    names = list(jobs_by_shard)
    wave = {name: i // INTERLEAVED_SHARDS for i, name in enumerate(names)}
    order = {name: i for i, name in enumerate(names)}
    jobs = [(shard, job) for shard, shard_jobs in jobs_by_shard.items() for job in shard_jobs]
    return sorted(jobs, key=lambda item: (wave[item[0]], not item[1].kernel_free,
                                          item[1].dst_offset / sizes[item[0]], order[item[0]], item[1].dst_offset))


def _finalize(checkpoint: Checkpoint, plan: ConversionPlan, staging: Staging, files: dict[str, dict],
              stats_json: dict[str, dict], notes: list[str]) -> ConversionResult:
    """With every shard in the staging folder: index, config, extra files, report, then the
    manifest of them all. A whole run and `merge` both end here, so their bytes are the same."""
    stats = {name: ErrorStats.from_json(d) for name, d in stats_json.items()}
    for name, decision in plan.decisions.items():
        if decision.quantized:
            stats.setdefault(name, ErrorStats(elements=plan.tensors[name].numel))
    files = dict(files)
    _write_index(plan, staging, checkpoint)
    config_updated = _write_config(plan, checkpoint, staging, notes)
    _copy_extras(checkpoint, staging)
    report = build_report(plan, stats)
    _write_long_json(staging.path(REPORT_NAME), report)
    staging.path(REPORT_HTML_NAME).write_text(html_report.render_conversion(report), encoding="utf-8")
    for path in sorted(p for p in staging.tmp.rglob("*") if p.is_file() and not p.is_symlink()):
        rel = path.relative_to(staging.tmp).as_posix()
        if rel not in files and rel != JOURNAL_NAME:
            files[rel] = {"sha256": sha256_of(path), "bytes": path.stat().st_size}
    _write_long_json(staging.path(MANIFEST_NAME), build_manifest(plan, files))
    return ConversionResult(plan, report, staging.out, config_updated, notes)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", encoding="utf-8")


def _write_long_json(path: Path, data: dict) -> None:
    """As _write_json for the two outer levels (the same bytes when nothing is nested deeper), each value
    below them on one line: json's indenting encoder is pure Python (~10 s for a million tensors'
    manifest rows), its compact one is C."""
    path.write_text(_outer_indented(data) + "\n", encoding="utf-8")


def _outer_indented(data: object, depth: int = 0) -> str:
    def leaf(value: object) -> str:
        return json.dumps(value, allow_nan=False, separators=(", ", ": "))

    if depth >= 2 or not isinstance(data, (dict, list)) or not data:
        return leaf(data) if isinstance(data, (dict, list)) and data else json.dumps(data, allow_nan=False)
    pad, inner = "  " * depth, "  " * (depth + 1)
    if isinstance(data, dict):
        items = [f"{inner}{json.dumps(k)}: {_outer_indented(v, depth + 1)}" for k, v in data.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    return "[\n" + ",\n".join(f"{inner}{_outer_indented(v, depth + 1)}" for v in data) + "\n" + pad + "]"


def _write_index(plan: ConversionPlan, staging: Staging, checkpoint: Checkpoint) -> None:
    if len(plan.shards) == 1 and checkpoint.index is None:
        return
    index = {
        "metadata": {"total_size": sum(s.nbytes for s in plan.shards)},
        "weight_map": dict(sorted(plan.shard_of_output.items())),
    }
    _write_long_json(staging.path(INDEX_NAME), index)


def _write_config(plan: ConversionPlan, checkpoint: Checkpoint, staging: Staging, notes: list[str]) -> bool:
    """config.json gains the layout's quantization_config (quantize) or loses it (dequantize)."""
    what = "quantization_config NOT written" if plan.layout else "quantization_config NOT removed"
    try:
        config = checkpoint.read_json(CONFIG_NAME)
    except InputError as exc:
        notes.append(f"{exc}; config.json copied unchanged, {what}")
        return False
    if config is None:
        notes.append(f"source has no config.json; {what} (engines need it)")
        return False
    if plan.layout is None:
        config.pop("quantization_config", None)
        config.pop("compression_config", None)
    else:
        assert plan.scheme is not None
        config["quantization_config"] = plan.layout.quantization_config(plan.scheme, plan.unquantized_modules,
                                                                        plan.scheme_groups)
    _write_json(staging.path(CONFIG_NAME), config)
    return True


def _copy_extras(checkpoint: Checkpoint, staging: Staging) -> None:
    """Tokenizer, generation config, subfolders...: real files in OUT even when SRC holds links. README.md is
    the model card's (fp8conv.report.card merges SRC's into it after the run)."""
    carry(checkpoint.root, checkpoint.extra_files, staging.path, (MANIFEST_NAME, REPORT_NAME, REPORT_HTML_NAME, CARD_NAME))
