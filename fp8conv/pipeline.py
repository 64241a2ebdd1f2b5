"""The only module that combines checkpoint I/O with the kernels: runs a ConversionPlan."""
from __future__ import annotations

import errno
import hashlib
import json
import math
import multiprocessing
import os
import shutil
import signal
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .checkpoint import CONFIG_NAME, INDEX_NAME, MANIFEST_NAME, REPORT_NAME, Checkpoint, open_checkpoint
from . import compiled
from .conversion import ConversionPlan, build_plan
from .errors import EXIT_SIGINT, EXIT_SIGTERM, FP8ConvError, InputError, Interrupted, OutputError
from .kernels import ErrorStats, NonFiniteError, amax_2d, quantize_2d, scale_from_amax
from .layouts import get_layout
from .hashing import PrefixHasher
from .outdir import Staging
from .plan import Matcher
from .report import build_manifest, build_report
from .safetensors_io import SAFETENSORS_DTYPES, TensorReader, build_header, printable, sha256_of, write_at
from .scheme import Scheme

CHUNK_BYTES = 32 << 20
COPY_BYTES = 16 << 20


@dataclass(frozen=True)
class QuantizeOptions:
    """Everything `fp8conv quantize` was asked to do, validated."""

    scheme: Scheme = field(default_factory=Scheme)
    layout: str = "compressed-tensors"
    ignore: tuple[str, ...] = ()
    include: tuple[str, ...] = ()
    workers: int = 1
    max_shard_size: int | None = None
    overwrite: bool = False
    resume: bool = False
    allow_nonfinite: bool = False


@dataclass(frozen=True)
class Job:
    """One unit of work: copy a byte range, or quantize the rows of one 2-D matrix."""

    kind: str
    name: str
    src_path: str
    dst_path: str
    src_offset: int
    dst_offset: int
    nbytes: int
    rows: int = 0
    cols: int = 0
    src_dtype: str = ""
    scale_offset: int = 0
    scheme: Scheme | None = None
    allow_nonfinite: bool = False

    def written_ranges(self) -> list[tuple[int, int]]:
        """The output byte ranges this job writes (codes and scales, or the copied bytes)."""
        if self.kind == "copy":
            return [(self.dst_offset, self.dst_offset + self.nbytes)]
        assert self.scheme is not None
        grid = self.scheme.scale_grid(self.rows, self.cols)
        scale_bytes = 4 if self.scheme.granularity == "tensor" else 4 * grid[0] * grid[1]
        return [(self.dst_offset, self.dst_offset + self.rows * self.cols),
                (self.scale_offset, self.scale_offset + scale_bytes)]


@dataclass
class QuantizeResult:
    plan: ConversionPlan
    report: dict
    out: Path
    config_updated: bool
    notes: list[str]


# ---- jobs (run in worker processes or inline) -------------------------------------------------

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


def _close_handles() -> None:
    for reader in _readers.values():
        reader.close()
    for fd in _writers.values():
        os.close(fd)
    _readers.clear()
    _writers.clear()


def run_job(job: Job) -> tuple[str, ErrorStats | None, int]:
    """Execute one job; returns (tensor name, error stats or None, source bytes processed)."""
    if job.kind == "copy":
        _copy_job(job)
        return job.name, None, job.nbytes
    return job.name, _quantize_job(job), job.nbytes


def _copy_job(job: Job) -> None:
    reader, fd = _reader(job.src_path), _writer(job.dst_path)
    buffer = np.empty(min(job.nbytes, COPY_BYTES), np.uint8)
    for start in range(0, job.nbytes, COPY_BYTES):
        part = buffer[: min(COPY_BYTES, job.nbytes - start)]
        reader.read_into(job.src_offset + start, part, job.name)
        write_at(fd, job.dst_offset + start, part)


def _quantize_job(job: Job) -> ErrorStats:
    scheme = job.scheme
    assert scheme is not None
    reader, fd = _reader(job.src_path), _writer(job.dst_path)
    dtype = SAFETENSORS_DTYPES[job.src_dtype]
    tile_rows, _ = scheme.tile(job.rows, job.cols)
    whole = scheme.granularity == "tensor"
    row_bytes = job.cols * dtype.itemsize
    chunk_rows = max(1, CHUNK_BYTES // max(row_bytes, 1))
    if not whole:
        chunk_rows = max(tile_rows, chunk_rows // tile_rows * tile_rows)
    grid_cols = scheme.scale_grid(job.rows, job.cols)[1]

    def chunks() -> Iterator[tuple[int, np.ndarray]]:
        for r0 in range(0, job.rows, chunk_rows):
            rows = min(chunk_rows, job.rows - r0)
            yield r0, reader.read_array(job.src_offset + r0 * row_bytes, (rows, job.cols), dtype, job.name)

    tensor_scale = None
    if whole:
        tensor_scale = _whole_tensor_scale(job, chunks, scheme)
        write_at(fd, job.scale_offset, np.array([tensor_scale], np.float32))
    stats = ErrorStats()
    try:
        for r0, chunk in chunks():
            q = quantize_2d(chunk, scheme, tensor_scale, job.allow_nonfinite, job.name)
            write_at(fd, job.dst_offset + r0 * job.cols, q.codes)
            if not whole:
                write_at(fd, job.scale_offset + (r0 // tile_rows) * grid_cols * 4, q.scales)
            stats.merge(q.stats)
    except NonFiniteError:
        raise _count_nonfinite(job, chunks) from None
    return stats


def _whole_tensor_scale(job: Job, chunks: Callable, scheme: Scheme) -> np.float32:
    amax = np.float32(0)
    for _, chunk in chunks():
        amax = np.maximum(amax, amax_2d(chunk))
    if not np.isfinite(amax):
        if not job.allow_nonfinite:
            raise _count_nonfinite(job, chunks)
        amax = np.float32(0)
        for _, chunk in chunks():
            values = chunk.astype(np.float32)
            finite = np.abs(values[np.isfinite(values)])
            amax = np.maximum(amax, np.float32(finite.max(initial=0)))
    return scale_from_amax(np.array([amax], np.float32), scheme.fmt)[0]


def _count_nonfinite(job: Job, chunks: Callable) -> InputError:
    nan = inf = 0
    for _, chunk in chunks():
        values = chunk.astype(np.float32)
        nan += int(np.isnan(values).sum())
        inf += int(np.isinf(values).sum())
    return InputError(
        f"tensor {printable(job.name)} holds {nan} NaN and {inf} Inf values; refusing to quantize it "
        "(--allow-nonfinite maps NaN to 0 and Inf to +-qmax)"
    )


# ---- planning jobs ------------------------------------------------------------------------------


def _jobs_for_shard(plan: ConversionPlan, shard, offsets: dict[str, int], dst: Path, options: QuantizeOptions,
                    sources: dict[str, Path]) -> list[Job]:
    """Copy jobs for kept tensors; one quantize job per 2-D matrix (per expert for 3-D)."""
    jobs = []
    for entry in shard.entries:
        decision = plan.decisions.get(entry.name)
        if decision is None:
            continue  # a scale tensor: written by its weight's jobs
        info = plan.tensors[entry.name]
        src = str(sources[plan.source_shard[entry.name]])
        if not decision.quantized:
            jobs.append(Job("copy", entry.name, src, str(dst), info.start, offsets[entry.name], info.nbytes))
            continue
        *lead, rows, cols = info.shape
        experts = math.prod(lead)
        grid = plan.scheme.scale_grid(rows, cols)
        scale_per_matrix = 1 if plan.scheme.granularity == "tensor" else grid[0] * grid[1]
        itemsize = info.np_dtype.itemsize
        for e in range(experts):
            jobs.append(
                Job(
                    "quantize", entry.name, src, str(dst),
                    src_offset=info.start + e * rows * cols * itemsize,
                    dst_offset=offsets[entry.name] + e * rows * cols,
                    nbytes=rows * cols * itemsize,
                    rows=rows, cols=cols, src_dtype=info.dtype,
                    scale_offset=offsets[plan.scale_of[entry.name]] + e * scale_per_matrix * 4,
                    scheme=plan.scheme, allow_nonfinite=options.allow_nonfinite,
                )
            )
    return sorted(jobs, key=lambda job: job.dst_offset)  # file order: the hashed prefix grows


# ---- running ------------------------------------------------------------------------------------


def make_plan(source: Path, options: QuantizeOptions) -> tuple[Checkpoint, ConversionPlan]:
    checkpoint = open_checkpoint(source)
    plan = build_plan(
        checkpoint,
        options.scheme,
        get_layout(options.layout),
        Matcher(options.ignore, "--ignore"),
        Matcher(options.include, "--include"),
        options.max_shard_size,
    )
    return checkpoint, plan


def _run_key(checkpoint: Checkpoint, options: QuantizeOptions) -> str:
    """Identifies a run for --resume: same source headers and sizes, same options."""
    relevant = (options.scheme, options.layout, options.ignore, options.include, options.max_shard_size,
                options.allow_nonfinite)  # not --workers: output bytes never depend on it
    digest = hashlib.sha256(repr(relevant).encode())
    for shard in checkpoint.shards:
        stat = shard.path.stat()
        digest.update(f"{shard.path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


@contextmanager
def _signals_raise() -> Iterator[None]:
    """Turn SIGTERM into an exception so temporaries are removed (SIGINT already raises)."""

    def on_term(signum, frame):
        raise Interrupted("terminated (SIGTERM); partial output removed", EXIT_SIGTERM)

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _worker_init() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _readers.clear()
    _writers.clear()
    compiled.preload(skip_scipy=True)


def _execute(jobs: list[tuple[str, Job]], workers: int, on_result: Callable[[int, tuple], None],
             on_shard_done: Callable[[str], None]) -> None:
    """Run every job (inline or in a fork pool); call back per result and when a shard is complete."""
    remaining: dict[str, int] = {}
    for shard, _ in jobs:
        remaining[shard] = remaining.get(shard, 0) + 1
    # Shard by shard and in file order, so each shard's written prefix grows and is hashed
    # while later tensors convert.
    order = list(range(len(jobs)))

    def finished(index: int, result: tuple) -> None:
        on_result(index, result)
        shard = jobs[index][0]
        remaining[shard] -= 1
        if remaining[shard] == 0:
            on_shard_done(shard)

    if workers <= 1 or len(jobs) <= 1:
        try:
            for i in order:
                finished(i, run_job(jobs[i][1]))
        finally:
            _close_handles()
        return
    ctx = multiprocessing.get_context("fork")
    pool = ctx.Pool(workers, initializer=_worker_init)
    try:
        for i, result in pool.imap_unordered(_indexed_job, [(i, jobs[i][1]) for i in order], chunksize=1):
            finished(i, result)
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()


def _indexed_job(item: tuple[int, Job]) -> tuple[int, tuple]:
    index, job = item
    return index, run_job(job)


def quantize_checkpoint(source: Path, out: Path, options: QuantizeOptions,
                        progress: Callable[[int], None] | None = None) -> QuantizeResult:
    """Convert SRC into OUT atomically; raises FP8ConvError subclasses with one-line messages."""
    checkpoint, plan = make_plan(source, options)
    staging = Staging(out, source, options.overwrite, options.resume, _run_key(checkpoint, options))
    staging.prepare()
    try:
        with _signals_raise():
            result = _convert(checkpoint, plan, staging, options, progress or (lambda n: None))
            staging.commit()
        return result
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


def _prepare_shards(plan: ConversionPlan, staging: Staging, options: QuantizeOptions, sources: dict[str, Path],
                    progress: Callable[[int], None]) -> tuple[dict[str, dict], dict[str, list[Job]], dict[str, PrefixHasher]]:
    """Reuse shards a resumed run finished (sha256-checked); lay out the header of every other one."""
    files: dict[str, dict] = {}
    jobs_by_shard: dict[str, list[Job]] = {}
    hashers: dict[str, PrefixHasher] = {}
    for shard in plan.shards:
        path = staging.path(shard.name)
        recorded = staging.finished.pop(shard.name, None)
        if recorded and path.is_file() and sha256_of(path) == recorded:
            staging.finished[shard.name] = recorded
            files[shard.name] = {"sha256": recorded, "bytes": path.stat().st_size}
            progress(sum(plan.tensors[e.name].nbytes for e in shard.entries if e.name in plan.tensors))
            continue
        for entry in shard.entries:
            staging.stats.pop(entry.name, None)
        header, offsets = build_header(shard.entries)
        with open(path, "wb") as fh:
            fh.write(header)
            fh.truncate(len(header) + shard.nbytes)
        hashers[shard.name] = PrefixHasher(path, len(header) + shard.nbytes)
        hashers[shard.name].written(0, len(header))
        jobs_by_shard[shard.name] = _jobs_for_shard(plan, shard, offsets, path, options, sources)
    return files, jobs_by_shard, hashers


def _convert(checkpoint: Checkpoint, plan: ConversionPlan, staging: Staging, options: QuantizeOptions,
             progress: Callable[[int], None]) -> QuantizeResult:
    sources = {shard.path.name: shard.path for shard in checkpoint.shards}
    files, jobs_by_shard, hashers = _prepare_shards(plan, staging, options, sources, progress)
    reused = len(files)
    jobs = [(shard, job) for shard, shard_jobs in jobs_by_shard.items() for job in shard_jobs]
    job_stats: dict[int, ErrorStats] = {}
    stats: dict[str, ErrorStats] = {name: ErrorStats.from_json(d) for name, d in staging.stats.items()}

    def finish_shard(shard: str, shard_stats: dict) -> None:
        digest = hashers[shard].hexdigest()
        files[shard] = {"sha256": digest, "bytes": hashers[shard].size}
        staging.mark_finished(shard, digest, shard_stats)

    # Hashing (of each shard's completed prefix), fsync and journaling run on one helper thread
    # (they release the GIL) while the workers convert; one thread keeps them in order.
    with ThreadPoolExecutor(max_workers=1) as finisher:
        pending = []

        def on_result(index: int, result: tuple) -> None:
            _, partial, nbytes = result
            if partial is not None:
                job_stats[index] = partial
            shard, job = jobs[index]
            for start, end in job.written_ranges():
                pending.append(finisher.submit(hashers[shard].written, start, end))
            progress(nbytes)

        def on_shard_done(shard: str) -> None:
            # Merge in job order, never completion order, so float sums (and the report) are deterministic.
            for index, (job_shard, job) in enumerate(jobs):
                if job_shard == shard and index in job_stats:
                    stats.setdefault(job.name, ErrorStats()).merge(job_stats.pop(index))
            names = {e.name for s in plan.shards if s.name == shard for e in s.entries}
            shard_stats = {name: stats[name].to_json() for name in sorted(names & stats.keys())}
            pending.append(finisher.submit(finish_shard, shard, shard_stats))

        for shard, shard_jobs in jobs_by_shard.items():
            if not shard_jobs:
                on_shard_done(shard)
        _execute(jobs, options.workers, on_result, on_shard_done)
        for future in pending:
            future.result()
    for name, decision in plan.decisions.items():
        if decision.quantized:
            stats.setdefault(name, ErrorStats())
    notes = [f"resumed: reused {reused} finished shard(s), sha256-checked"] if reused else []
    _write_index(plan, staging, files, checkpoint)
    config_updated = _write_config(plan, checkpoint, staging, notes)
    _copy_extras(checkpoint, staging)
    report = build_report(plan, stats)
    _write_json(staging.path(REPORT_NAME), report)
    for path in sorted(staging.tmp.iterdir()):
        if path.name not in files and path.name != "fp8conv.journal.json":
            files[path.name] = {"sha256": sha256_of(path), "bytes": path.stat().st_size}
    _write_json(staging.path(MANIFEST_NAME), build_manifest(plan, files))
    return QuantizeResult(plan, report, staging.out, config_updated, notes)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", encoding="utf-8")


def _write_index(plan: ConversionPlan, staging: Staging, files: dict, checkpoint: Checkpoint) -> None:
    if len(plan.shards) == 1 and checkpoint.index is None:
        return
    index = {
        "metadata": {"total_size": sum(s.nbytes for s in plan.shards)},
        "weight_map": dict(sorted(plan.shard_of_output.items())),
    }
    _write_json(staging.path(INDEX_NAME), index)


def _write_config(plan: ConversionPlan, checkpoint: Checkpoint, staging: Staging, notes: list[str]) -> bool:
    try:
        config = checkpoint.read_json(CONFIG_NAME)
    except InputError as exc:
        notes.append(f"{exc}; config.json copied unchanged, quantization_config NOT written")
        return False
    if config is None:
        notes.append("source has no config.json; quantization_config NOT written (engines need it)")
        return False
    config["quantization_config"] = plan.layout.quantization_config(plan.scheme, plan.unquantized_modules)
    _write_json(staging.path(CONFIG_NAME), config)
    return True


def _copy_extras(checkpoint: Checkpoint, staging: Staging) -> None:
    """Tokenizer, generation config, README...: real files in OUT even when SRC holds links."""
    for path in checkpoint.extra_files:
        target = staging.path(path.name)
        if path.name in (MANIFEST_NAME, REPORT_NAME) or target.exists():
            continue
        shutil.copyfile(path, target)
