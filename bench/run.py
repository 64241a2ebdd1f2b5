"""One benchmark run: fp8conv against the plain torch script and llm-compressor, with ceilings.

    python bench/run.py                      # makes bench/data/llama-2g if missing, writes bench/RESULTS.md
    python bench/run.py --big                # also the single 4 GB shard checkpoint (peak RSS)

Every tool converts the same input, read from the page cache (each input is read once before
timing). Peak RSS is the largest sum of VmRSS over the tool's whole process tree, sampled every
20 ms from /proc. Never run in CI.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
OUT = HERE / "out"


def compile_bytecode(tree: Path) -> None:
    """Write the package's bytecode, as `pip install` does: a source checkout run with
    PYTHONDONTWRITEBYTECODE=1 would otherwise compile every changed module in every timed run."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(tree / "fp8conv")], check=True)


def tree_rss(pid: int) -> int:
    """Sum of VmRSS (bytes) of a process and all its descendants."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as fh:
                    stack.extend(int(c) for c in fh.read().split())
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
    return total


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, int]:
    """(wall seconds, peak tree RSS bytes) of a command; raises if it fails."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, **(env or {})})
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, tree_rss(proc.pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    _, err = proc.communicate()
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {err.decode()[-2000:]}")
    return wall, peak


def input_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def warm(path: Path) -> float:
    """Read every shard into a bounded buffer, then touch and free as many bytes of fresh memory as the
    input (warm_free_memory); returns page-cache read GB/s (second pass)."""
    buf = bytearray(64 << 20)
    for attempt in range(2):
        start, total = time.perf_counter(), 0
        for shard in sorted(path.glob("*.safetensors")):
            with open(shard, "rb", buffering=0) as fh:
                while n := fh.readinto(buf):
                    total += n
        elapsed = time.perf_counter() - start
    warm_free_memory(total)
    return total / elapsed / 1e9


def warm_free_memory(nbytes: int) -> None:
    """Touch nbytes of fresh memory and free it. In a VM that hands free memory back to its host (free page
    reporting, virtio-mem), the first touch of such memory costs ~10 us a page: on this project's 2-core VM a
    600 MB write took 2.0 s of system CPU after 20 s idle and 0.16 s right after 1 GiB had been touched and
    freed. A conversion writes its whole output into fresh page cache, so without this its time depended on
    how long the machine had been idle before it (up to ~2 s CPU on the 0.97 GB checkpoint), not on the code."""
    block = np.ones(max(nbytes, 1), np.uint8)
    del block


def memcpy_gbs() -> float:
    a = np.ones(1 << 30, np.uint8)
    b = np.empty_like(a)
    np.copyto(b, a)
    start = time.perf_counter()
    for _ in range(3):
        np.copyto(b, a)
    return 3 * a.nbytes / (time.perf_counter() - start) / 1e9


def write_seconds(size: int, folder: Path) -> float:
    """Seconds to write `size` bytes (64 MiB writes) into `folder` and fsync them, as a conversion's output does."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "write-ceiling.bin"
    block = np.random.default_rng(0).integers(0, 255, 64 << 20, dtype=np.uint8).tobytes()
    start = time.perf_counter()
    with open(target, "wb") as fh:
        written = 0
        while written < size:
            written += fh.write(block[: min(len(block), size - written)])
        fh.flush()
        os.fsync(fh.fileno())
    elapsed = time.perf_counter() - start
    target.unlink()
    return elapsed


def write_gbs(size: int) -> float:
    """Write `size` bytes to the output disk with fsync: GB/s."""
    return size / write_seconds(size, OUT) / 1e9


def ensure_checkpoint(name: str, args: list[str]) -> Path:
    path = DATA / name
    if not path.exists():
        subprocess.run([sys.executable, str(HERE / "make_checkpoint.py"), str(path), *args], check=True)
    return path


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    mem = next((int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal")), 0) / 2**20
    return f"{model}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, Python {platform.python_version()}, Linux {platform.release()}"


def versions() -> str:
    parts = []
    for pkg in ("numpy", "ml_dtypes", "safetensors", "torch", "llmcompressor", "compressed_tensors"):
        if importlib.util.find_spec(pkg) is not None:
            module = __import__(pkg)
            parts.append(f"{pkg} {getattr(module, '__version__', '?')}")
    return ", ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--big", action="store_true", help="also convert a single 4 GB shard (peak RSS)")
    parser.add_argument("--results", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument("--no-llmcompressor", action="store_true")
    parser.add_argument("--repeats", type=int, default=3, help="runs per row; the median is reported")
    args = parser.parse_args()
    src = ensure_checkpoint("llama-2g", [])
    size = input_bytes(src)
    rows: list[tuple[str, float, int]] = []
    read_gbs = warm(src)
    ceilings = {"memcpy": memcpy_gbs(), "page-cache read": read_gbs, "write+fsync (1.2 GB)": write_gbs(int(size * 0.63))}
    fp8conv = [sys.executable, "-m", "fp8conv", "quantize", str(src), "-q", "--overwrite"]
    compile_bytecode(HERE.parent)

    def run(label: str, cmd: list[str], env: dict | None = None) -> None:
        """REPEATS runs; the row reports the median wall time and the largest peak RSS."""
        walls, peaks = [], []
        for _ in range(args.repeats):
            shutil.rmtree(OUT / "x", ignore_errors=True)
            warm(src)
            wall, peak = timed(cmd, env)
            walls.append(wall)
            peaks.append(peak)
        wall = sorted(walls)[len(walls) // 2]
        spread = f" (runs: {', '.join(f'{w:.2f}' for w in walls)})" if len(walls) > 1 else ""
        rows.append((label + spread, wall, max(peaks)))
        print(f"{label}: {wall:.2f} s, {size / wall / 1e9:.2f} GB/s, peak RSS {max(peaks) / 2**20:.0f} MiB{spread}", flush=True)

    out = str(OUT / "x")
    run("fp8conv fp8_e4m3 block-128, --workers 2", [*fp8conv, "-o", out, "--workers", "2"])
    run("fp8conv fp8_e4m3 block-128, --workers 1", [*fp8conv, "-o", out, "--workers", "1"])
    run("fp8conv fp8_e4m3 block-128, --workers 2, numpy kernels (FP8CONV_BACKEND=numpy)",
        [*fp8conv, "-o", out, "--workers", "2"], {"FP8CONV_BACKEND": "numpy"})
    run("fp8conv fp8_e4m3 channel, --workers 2", [*fp8conv, "-o", out, "--workers", "2", "--granularity", "channel"])
    run("fp8conv int8 channel, --workers 2", [*fp8conv, "-o", out, "--workers", "2", "--format", "int8", "--granularity", "channel"])
    if importlib.util.find_spec("torch"):
        run("plain torch script (bench/torch_baseline.py), 2 threads", [sys.executable, str(HERE / "torch_baseline.py"), str(src), out])
    if importlib.util.find_spec("llmcompressor") and not args.no_llmcompressor:
        run("llm-compressor model_free_ptq FP8_BLOCK, max_workers=2", [sys.executable, str(HERE / "llmcompressor_baseline.py"), str(src), out, "2"])
    fp8_out = OUT / "fp8"
    subprocess.run([*fp8conv, "-o", str(fp8_out), "--workers", "2"], check=True)
    warm(fp8_out)
    shutil.rmtree(OUT / "x", ignore_errors=True)
    wall, peak = timed([sys.executable, "-m", "fp8conv", "dequantize", str(fp8_out), "-o", out, "-q", "--workers", "2"])
    rows.append(("fp8conv dequantize (FP8 block output -> bf16), --workers 2", wall, peak))
    print(f"dequantize: {wall:.2f} s, peak RSS {peak / 2**20:.0f} MiB", flush=True)
    big_rows = []
    if args.big:
        big = ensure_checkpoint("single-4g", ["--single-shard", "--layers", "11", "--vocab", "16000"])
        big_size = input_bytes(big)
        warm(big)
        shutil.rmtree(OUT / "x", ignore_errors=True)
        wall, peak = timed([sys.executable, "-m", "fp8conv", "quantize", str(big), "-o", out, "-q", "--overwrite", "--workers", "2"])
        big_rows.append((f"fp8conv block-128, one {big_size / 1e9:.1f} GB shard, --workers 2", wall, peak, big_size))
        print(big_rows[-1], flush=True)
    shutil.rmtree(OUT, ignore_errors=True)
    write_results(args.results, size, rows, ceilings, big_rows)


def write_results(path: Path, size: int, rows, ceilings, big_rows) -> None:
    head = rows[0][1]
    lines = [
        "# Benchmark results",
        "",
        f"Command: `python bench/run.py{' --big' if big_rows else ''}` (one invocation; every row from it; wall time is the"
        " median of the runs listed, peak RSS the largest).",
        f"Machine: {machine()}.",
        f"Packages: {versions()}.",
        f"Input: `bench/data/llama-2g` (bench/make_checkpoint.py defaults): {size / 1e9:.2f} GB of bf16 in 2 shards,"
        " hidden 4096, intermediate 11008, 4 layers, vocab 32000; read from the page cache.",
        "",
        "| tool | wall s | GB/s of input | peak RSS (MiB, process tree) | wall s / first row's |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for label, wall, peak in rows:
        speedup = "-" if "dequantize" in label else f"{wall / head:.1f}x"
        lines.append(f"| {label} | {wall:.2f} | {size / wall / 1e9:.2f} | {peak / 2**20:.0f} | {speedup} |")
    for label, wall, peak, big_size in big_rows:
        lines.append(f"| {label} | {wall:.2f} | {big_size / wall / 1e9:.2f} | {peak / 2**20:.0f} | - |")
    lines += ["", "GB/s is of the bf16 input size for every row (for dequantize: the bf16 size it writes back).",
              "", "Ceilings measured in the same run:", ""]
    lines += [f"- {name}: {value:.2f} GB/s" for name, value in ceilings.items()]
    kept = ""
    if path.exists() and "\n## Analysis" in path.read_text():
        kept = "\n## Analysis" + path.read_text().split("\n## Analysis", 1)[1]  # written by hand, kept
    path.write_text("\n".join(lines) + "\n" + kept)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
