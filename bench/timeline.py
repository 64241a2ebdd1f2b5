"""Where a conversion's wall time goes: one run with timestamps on its phases (no profiler needed).

    python3 bench/timeline.py SRC OUT --workers 16 [--format nvfp4]

Prints, in seconds from process start: imports done, plan done, first job started, last job
finished, each shard hashed and fsynced, commit (final fsyncs + rename) done, exit; plus how busy
the workers were (sum of job time / (workers x job span)), and the CPU seconds of the parent (all its threads)
and of the workers.
"""
from __future__ import annotations

import time

T0 = time.perf_counter()

import argparse  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import resource  # noqa: E402

from fp8conv.formats import MICROSCALE  # noqa: E402
from fp8conv.io import hashing, outdir  # noqa: E402
from fp8conv.plan.scheme import Scheme, default_granularity, microscale_scheme  # noqa: E402
from fp8conv.run import pipeline  # noqa: E402

events: list[tuple[float, str]] = []


def mark(what: str) -> None:
    events.append((time.perf_counter() - T0, what))


def wrap(owner, name: str, before: str | None, after: str | None) -> None:
    original = getattr(owner, name)

    def wrapped(*args, **kwargs):
        if before:
            mark(before.format(*args))
        result = original(*args, **kwargs)
        if after:
            mark(after.format(*args))
        return result

    setattr(owner, name, wrapped)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--workers", type=int, default=None,
                        help="1 runs the jobs inline, 2 or more in forked workers (default: fp8conv's default)")
    parser.add_argument("--format", default="fp8_e4m3", help="fp8conv quantize --format (its default scheme)")
    args = parser.parse_args()
    mark("imports done")
    log_dir = Path(tempfile.mkdtemp(prefix="fp8tl-"))
    original_job = pipeline.run_job

    def timed_job(job):  # runs in the workers (inherited through fork) or inline
        start = time.perf_counter()
        result = original_job(job)
        with open(log_dir / f"{os.getpid()}.txt", "a") as fh:
            fh.write(f"{start - T0} {time.perf_counter() - T0} {job.nbytes}\n")
        return result

    pipeline.run_job = timed_job  # what _execute runs, inline or in the forked workers
    writebacks: list[float] = []  # seconds of each writeback request (the parent's writeback thread)
    if hasattr(outdir, "start_writeback"):
        original_writeback = outdir.start_writeback

        def timed_writeback(fd, start, end):
            began = time.perf_counter()
            result = original_writeback(fd, start, end)
            writebacks.append(time.perf_counter() - began)
            return result

        outdir.start_writeback = timed_writeback
    hashing_time: dict[str, list[float]] = {}  # per shard: seconds hashing, seconds in fadvise, last end
    original_written = hashing.PrefixHasher.written

    def timed_written(self, start, end):
        began = time.perf_counter()
        original_written(self, start, end)
        ended = time.perf_counter()
        entry = hashing_time.setdefault(self.path.name, [0.0, 0.0, 0.0])
        entry[0] += ended - began
        entry[2] = ended - T0

    hashing.PrefixHasher.written = timed_written
    original_fadvise = os.posix_fadvise

    def timed_fadvise(fd, offset, length, advice):
        began = time.perf_counter()
        original_fadvise(fd, offset, length, advice)
        name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        hashing_time.setdefault(name, [0.0, 0.0, 0.0])[1] += time.perf_counter() - began

    hashing.os.posix_fadvise = timed_fadvise  # the parent's hashing threads only (workers do not call it)
    wrap(outdir.Staging, "mark_finished", "{1}: hashed", "{1}: fsynced + journaled")
    wrap(outdir.Staging, "commit", "commit start", "commit done (fsync all, rename)")
    wrap(pipeline, "finalize", "all shards done; finalize start", None)
    scheme = (microscale_scheme(args.format) if args.format in MICROSCALE
              else Scheme(format=args.format, granularity=default_granularity(args.format, None)))
    checkpoint, plan = pipeline.make_plan(args.src, pipeline.QuantizeOptions(scheme=scheme))
    mark("plan done")
    if args.workers is None:
        args.workers = pipeline.default_workers(len(plan.shards), hash_bound=pipeline.hash_bound(plan))
    pipeline.run_plan(checkpoint, plan, args.src, args.out, pipeline.RunOptions(args.workers, overwrite=True))
    mark("exit")
    spans = []
    for path in log_dir.iterdir():
        spans += [tuple(map(float, line.split())) for line in path.read_text().splitlines()]
    first, last = min(s[0] for s in spans), max(s[1] for s in spans)
    busy = sum(s[1] - s[0] for s in spans)
    events.extend([(first, "first job started"), (last, "last job finished"),
                   (-_process_age_at_t0(), "process started (from /proc, 10 ms ticks)")])
    events.extend((end, f"{name}: last range hashed") for name, (_, _, end) in hashing_time.items() if end)
    for t, what in sorted(events):
        print(f"{t:7.2f}  {what}")
    print(f"jobs: {len(spans)} in {len({p.name for p in log_dir.iterdir()})} "
          f"processes; worker busy {busy / (args.workers * (last - first)):.0%} of {args.workers} x {last - first:.2f} s; "
          f"job seconds per input GB {busy / (sum(s[2] for s in spans) / 1e9):.2f}")
    for name, (hashing_s, fadvise_s, _) in sorted(hashing_time.items()):
        print(f"{name}: {hashing_s:.2f} s in the hasher, of which {fadvise_s:.2f} s in posix_fadvise")
    own, workers = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    print(f"CPU s (user + sys): parent {own.ru_utime + own.ru_stime:.2f} ({own.ru_utime:.2f} + {own.ru_stime:.2f}), "
          f"workers {workers.ru_utime + workers.ru_stime:.2f} ({workers.ru_utime:.2f} + {workers.ru_stime:.2f})")
    if writebacks:
        print(f"writeback requests: {len(writebacks)}, {sum(writebacks):.2f} s in all, longest {max(writebacks):.3f} s")


def _process_age_at_t0() -> float:
    """Seconds between this process's start (as the kernel counts it) and T0."""
    ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return uptime - ticks / os.sysconf("SC_CLK_TCK") - (time.perf_counter() - T0)


if __name__ == "__main__":
    main()
