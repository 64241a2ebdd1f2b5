"""Scaling on one big machine: fp8conv --workers 1..16 against the write+fsync ceiling, in one run.

    python3 bench/scaling.py bench/SCALING.md                 # makes bench/data/llama-6g if missing
    python3 bench/scaling.py out.md --workers 1 4 16 --repeats 1
    python3 bench/scaling.py out.md --compare /path/to/other/checkout   # also time another fp8conv tree

Input: a ~6.2 GB bf16 Llama-shaped checkpoint in 2 shards (bench/make_checkpoint.py, 16 layers),
read from the page cache (read once before each timing). Output: FP8 e4m3 block-128, ~3.4 GB,
fsynced (fp8conv always does). The package's bytecode is written first, as an installed package
has it. Each row is the whole process (start-up,
hashing, fsync, rename); wall time is the median of --repeats runs, peak RSS the largest sum of
VmRSS over the process tree. The ceiling is writing the same number of bytes with one write+fsync
stream to the same disk. Needs only the repository (its C extension built: `python3 setup.py
build_ext --inplace`) and its runtime dependencies (numpy, ml_dtypes, safetensors, click, tqdm); about
4-6 minutes on 16 cores.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import compile_bytecode, input_bytes, machine, timed, versions, warm, write_seconds  # noqa: E402  (bench/run.py helpers)

DATA = HERE / "data"
OUT = HERE / "out"
REPO = HERE.parent


def ensure_checkpoint(layers: int) -> Path:
    """bench/data/llama-6g (16 layers; other --layers: a smaller one, for trying the script)."""
    path = DATA / ("llama-6g" if layers == 16 else f"llama-{layers}-layers")
    if not (path / "config.json").exists():
        shutil.rmtree(path, ignore_errors=True)
        subprocess.run([sys.executable, str(HERE / "make_checkpoint.py"), str(path), "--layers", str(layers),
                        "--shard-bytes", str(layers * 0.2e9)], check=True)
    return path


def write_ceiling(size: int, folder: Path) -> float:
    """Seconds to write `size` bytes (64 MiB writes) and fsync them, into `folder`."""
    return write_seconds(size, folder)


def output_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="markdown file the table is written to")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out-dir", type=Path, default=OUT,
                        help="where outputs go (e.g. /dev/shm: takes the disk out, shows CPU-side limits)")
    parser.add_argument("--layers", type=int, default=16, help="16: the ~6.2 GB checkpoint; fewer to try the script")
    parser.add_argument("--compare", type=Path, default=None,
                        help="another checkout whose fp8conv is timed too (at the largest --workers)")
    args = parser.parse_args()
    started = time.perf_counter()
    src = ensure_checkpoint(args.layers)
    size = input_bytes(src)
    out = args.out_dir / "fp8conv-scaling-out"

    def run(label: str, tree: Path, workers: int | None, repeats: int, env: dict | None = None
            ) -> tuple[str, float, int, list]:
        cmd = [sys.executable, "-m", "fp8conv", "quantize", str(src), "-o", str(out), "-q", "--overwrite"]
        cmd += ["--workers", str(workers)] if workers is not None else []
        walls, peaks = [], []
        for _ in range(repeats):
            shutil.rmtree(out, ignore_errors=True)
            warm(src)
            wall, peak = timed(cmd, {"PYTHONPATH": str(tree), **(env or {})})
            walls.append(wall)
            peaks.append(peak)
        wall = sorted(walls)[len(walls) // 2]
        print(f"{label}: {wall:.2f} s (runs {', '.join(f'{w:.2f}' for w in walls)}), "
              f"peak RSS {max(peaks) / 2**20:.0f} MiB", flush=True)
        return label, wall, max(peaks), walls

    # One untimed run: writes this tree's bytecode and gives the output size.
    compile_bytecode(REPO)
    run("warm-up", REPO, max(args.workers), 1)
    out_size = output_bytes(out)
    ceiling = write_ceiling(out_size, args.out_dir)
    print(f"write+fsync of {out_size / 1e9:.2f} GB: {ceiling:.2f} s", flush=True)
    rows = [run(f"fp8conv --workers {w}", REPO, w, args.repeats) for w in args.workers]
    sys.path.insert(0, str(REPO))
    from fp8conv.run import pipeline  # noqa: E402  (this tree's default for this checkpoint: 2 shards, FP8 min-max)

    default = pipeline.default_workers(2, hash_bound=True)
    rows.append(run(f"fp8conv, --workers not given (the default here: {default})", REPO, None, args.repeats))
    if args.compare is not None:
        compile_bytecode(args.compare)
        run("warm-up (compared tree)", args.compare, max(args.workers), 1)
        rows.append(run(f"fp8conv of {args.compare} --workers {max(args.workers)}", args.compare,
                        max(args.workers), args.repeats))
    shutil.rmtree(out, ignore_errors=True)
    table = render(src, rows, size, out_size, ceiling, args.repeats, time.perf_counter() - started,
                   args.out_dir)
    args.results.write_text(table)
    print(table)
    print(f"wrote {args.results}")


def render(src: Path, rows, size: int, out_size: int, ceiling: float, repeats: int, total: float,
           out_dir: Path) -> str:
    base = rows[0][1]
    lines = [
        f"Command: `python3 bench/scaling.py` ({total / 60:.1f} min in all; wall time = median of {repeats} runs, "
        "whole process, input in the page cache, output fsynced).",
        f"Machine: {machine()}.",
        f"Packages: {versions()}.",
        f"Input: `{src.relative_to(REPO)}` ({size / 1e9:.2f} GB bf16, 2 shards, hidden 4096) -> FP8 e4m3 "
        f"block-128, {out_size / 1e9:.2f} GB.",
        f"Output in {out_dir}. Write ceiling, same run: write+fsync of {out_size / 1e9:.2f} GB in {ceiling:.2f} s "
        f"({out_size / ceiling / 1e9:.2f} GB/s).",
        "",
        "| run | wall s | GB/s of input | speed-up vs first row | x write ceiling | peak RSS (MiB, process tree) | runs |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for label, wall, peak, walls in rows:
        lines.append(f"| {label} | {wall:.2f} | {size / wall / 1e9:.2f} | {base / wall:.2f}x | {wall / ceiling:.2f} | "
                     f"{peak / 2**20:.0f} | {', '.join(f'{w:.2f}' for w in walls)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
