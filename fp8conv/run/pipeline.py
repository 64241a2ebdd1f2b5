"""The only module that combines checkpoint I/O with the kernels: runs a ConversionPlan."""
from __future__ import annotations

import errno
import gc
import os
import shutil
import signal
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator

from ..accel import native
from ..io.checkpoint import Checkpoint
from ..plan.records import ConversionPlan
from ..errors import EXIT_SIGHUP, EXIT_SIGINT, EXIT_SIGTERM, InputError, Interrupted, SchemeError
from ..io.hashing import PrefixHasher
from .cpus import available_cpus
from .jobs import close_handles, forget_handles, run_job
from .work import Job
from ..numerics.stats import ErrorStats
from ..io.outdir import Staging, Writeback, undone_on_failure
from .partition import (Partition, PartRecord, assign, check_against_plan, check_digest, collect, parts_dir,
                        read_record)
from ..plan.recipe import Recipe
from .runner import run_parallel
from .options import ConversionResult, Progress, QuantizeOptions, RunOptions  # noqa: F401  (API)
from .planning import make_dequantize_plan, make_plan, plan_recipe  # noqa: F401  (API)
from .keys import resume_key, run_key
from .shard_jobs import jobs_for_shard
from .finalize import finalize
from .global_scales import global_scales  # noqa: F401  (API: evaluate/probe.py)
from ..io.safetensors import build_header, sha256_of, write_at

INTERLEAVED_SHARDS = 4  # output shards converted (and hashed) side by side
WORKERS_PER_HASH = 2  # default_workers where the hashing is the limit
WORKER_NICENESS = 5  # below the parent, whose per-shard threads hash the output


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
            return finalize(checkpoint, plan, staging, files, stats, notes)
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
        result = finalize(checkpoint, plan, staging, files, stats, [])
    shutil.rmtree(area, ignore_errors=True)
    return replace(result, command=first.recipe.command, source=src)


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
    with undone_on_failure(staging.abort, lambda exc: f"cannot write {out}: {_os_reason(exc)}; partial output removed"):
        try:
            with _signals_raise():
                yield
                staging.commit()
        except KeyboardInterrupt:
            raise Interrupted("interrupted (SIGINT); partial output removed", EXIT_SIGINT) from None


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
        jobs_by_shard[shard.name] = jobs_for_shard(plan, shard, offsets, path, sources, options)
    return files, jobs_by_shard, hashers


def _merge_shard_stats(plan: ConversionPlan, jobs: list[tuple[str, Job]], job_stats: dict[int, ErrorStats],
                       stats: dict[str, ErrorStats], shard: str) -> dict[str, dict]:
    """Fold a finished shard's job statistics into `stats` and return the shard's tensors' stats as JSON.
    Merged in job order, never completion order, so float sums (and the report) are deterministic."""
    for index, (job_shard, job) in enumerate(jobs):
        if job_shard == shard and index in job_stats:
            stats.setdefault(job.name, ErrorStats()).merge(job_stats.pop(index))
    names = {e.name for s in plan.shards if s.name == shard for e in s.entries}
    return {name: stats[name].to_json() for name in sorted(names & stats.keys())}


def _convert(checkpoint: Checkpoint, plan: ConversionPlan, staging: Staging, options: RunOptions,
             progress: Progress, names: list[str]) -> tuple[dict[str, dict], dict[str, dict], list[str]]:
    """Write the shards `names` into the staging folder: ({shard: sha256 and bytes}, {tensor: error
    stats as JSON}, notes)."""
    sources = {shard.path.name: shard.path for shard in checkpoint.shards}
    plan.global_scales = global_scales(checkpoint, plan, options, _worker_init)
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
            shard_stats = _merge_shard_stats(plan, jobs, job_stats, stats, shard)
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


