"""Where a conversion's CPU time goes: one FP8 block-128 conversion run inline (--workers 1), profiled.

    python3 bench/cpu_profile.py bench/data/llama-2g /tmp/out

The jobs run on the main thread under cProfile with a per-thread CPU clock (time.thread_time), so
waiting and other processes' load count for nothing; the parent's helper threads (sha256 of the
written prefix, fsync, journal) are the process's CPU time minus the main thread's. Page faults on
fresh buffers are charged to whatever touches the buffer first (the read, or the kernel). Prints
CPU seconds by item, and ns per quantized element for the kernel. Never run in CI.
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import shutil
import time
from pathlib import Path

from fp8conv.run import pipeline

ITEMS = {  # (file suffix, function name) -> item
    ("~", "<built-in method fp8conv.accel._native.quantize>"): "C kernel (native.quantize)",
    ("~", "<built-in method fp8conv.accel._native.tile_range>"): "C tile ranges (native.tile_range)",
    ("~", "<method 'readinto' of '_io.FileIO' objects>"): "read (readinto: copy from page cache, page faults)",
    ("~", "<built-in method posix.pwrite>"): "write (pwrite: copy into page cache)",
    ("~", "<built-in method numpy.empty>"): "numpy.empty",
    ("~", "<built-in method posix.fsync>"): "fsync",
}
OTHER = "other Python and numpy on the main thread"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--chunk-mib", type=float, default=None, help="RunOptions.chunk_bytes (default: the pipeline's)")
    parser.add_argument("--top", action="store_true", help="also print the 15 functions with the most CPU time")
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    checkpoint, plan = pipeline.make_plan(args.src, pipeline.QuantizeOptions())
    from fp8conv.accel import native

    elements = 0
    kernel = native.quantize

    def counted(src, *rest):
        nonlocal elements
        elements += src.size
        return kernel(src, *rest)

    native.quantize = counted
    options = pipeline.RunOptions(1, overwrite=True)
    if args.chunk_mib:
        options = pipeline.RunOptions(1, overwrite=True, chunk_bytes=int(args.chunk_mib * 2**20))
    profiler = cProfile.Profile(time.thread_time)
    process0, main0, wall0 = time.process_time(), time.thread_time(), time.perf_counter()
    profiler.enable()
    pipeline.run_plan(checkpoint, plan, args.src, args.out, options)
    profiler.disable()
    process, main_thread, wall = time.process_time() - process0, time.thread_time() - main0, time.perf_counter() - wall0
    stats = pstats.Stats(profiler)
    totals: dict[str, float] = {}
    for (filename, _, name), (_, _, tottime, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        item = next((label for (suffix, fn), label in ITEMS.items() if fn == name and filename.endswith(suffix)), None)
        totals[item or OTHER] = totals.get(item or OTHER, 0.0) + tottime
    print(f"wall {wall:.2f} s; CPU: process {process:.2f} s = main thread {main_thread:.2f} s + helper threads "
          f"(hashing, fsync, journal) {process - main_thread:.2f} s")
    for label, seconds in sorted(totals.items(), key=lambda kv: -kv[1]):
        if seconds >= 0.005:
            print(f"  {label:55s} {seconds:6.2f} s")
    if args.top:
        stats.sort_stats("tottime").print_stats(15)
    seconds = totals.get("C kernel (native.quantize)", 0.0)
    print(f"kernel: {elements / 1e6:.0f} M elements, {seconds * 1e9 / max(elements, 1):.3f} ns per element")


if __name__ == "__main__":
    main()
