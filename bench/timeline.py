"""Where a conversion's wall time goes: one run with timestamps on its phases (no profiler needed).

    python3 bench/timeline.py SRC OUT --workers 16

Prints, in seconds from process start: imports done, plan done, first job started, last job
finished, each shard hashed and fsynced, commit (final fsyncs + rename) done, exit; plus how busy
the workers were (sum of job time / (workers x job span)).
"""
from __future__ import annotations

import time

T0 = time.perf_counter()

import argparse  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

from fp8conv import outdir, pipeline  # noqa: E402

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
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="1 runs the jobs inline, 2 or more in forked workers")
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
    wrap(outdir.Staging, "mark_finished", "{1}: hashed", "{1}: fsynced + journaled")
    wrap(outdir.Staging, "commit", "commit start", "commit done (fsync all, rename)")
    wrap(pipeline, "_finalize", "all shards done; finalize start", None)
    checkpoint, plan = pipeline.make_plan(args.src, pipeline.QuantizeOptions())
    mark("plan done")
    pipeline.run_plan(checkpoint, plan, args.src, args.out, pipeline.RunOptions(args.workers, overwrite=True))
    mark("exit")
    spans = []
    for path in log_dir.iterdir():
        spans += [tuple(map(float, line.split())) for line in path.read_text().splitlines()]
    first, last = min(s[0] for s in spans), max(s[1] for s in spans)
    busy = sum(s[1] - s[0] for s in spans)
    events.extend([(first, "first job started"), (last, "last job finished")])
    for t, what in sorted(events):
        print(f"{t:7.2f}  {what}")
    print(f"jobs: {len(spans)} in {len({p.name for p in log_dir.iterdir()})} processes; worker busy "
          f"{busy / (args.workers * (last - first)):.0%} of {args.workers} x {last - first:.2f} s")


if __name__ == "__main__":
    main()
