"""Every format, whole process, one or more fp8conv trees side by side (before / after a change), in one run.

    python3 bench/formats.py --tree before=/path/old --tree after=. --cores 0,1 --workers 2 \
        --checkpoint bench/data/llama-1g --make "--layers 2 --vocab 16000 --shard-bytes 0.35e9" --out t.md

Each row: `fp8conv quantize` of the checkpoint (read once from the page cache before each timing, and as much
fresh memory touched and freed: run.warm), the trees taking turns run by run, wall time median of --repeats
(and the median CPU seconds, user + sys of the process and its workers), pinned to --cores with taskset;
--workers N or "default" (fp8conv picks). With --cold, one more run per tree and scheme comes first with empty
caches: the package's bytecode removed and, for a tree that has numba, an empty
NUMBA_CACHE_DIR (a source checkout's first run). With --bytecode, each tree's bytecode is compiled before its
timed runs, as pip install leaves it (without it, a run under PYTHONDONTWRITEBYTECODE=1, as on the device
hosts, compiles every fp8conv module it imports, every time). With --ceiling, the write+fsync time of the
largest output (64 MiB writes, one stream, the same disk). With --llmc N, llm-compressor's `model_free_ptq`
(its preset for the scheme, max_workers = --workers, the same cores and ignore list; median of N) runs beside
fp8conv in the same process tree and the table gives the ratio; LLMC_PYTHONPATH, if set, is its PYTHONPATH.
Never run in CI.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import input_bytes, timed, warm, write_seconds  # noqa: E402  (bench/run.py helpers)

SCHEMES = {
    "FP8 e4m3 block 128": [],
    "FP8 e4m3 channel": ["--granularity", "channel"],
    "FP8 e5m2 block 128": ["--format", "fp8_e5m2", "--layout", "fp8conv"],
    "INT8 channel (W8A8)": ["--format", "int8", "--granularity", "channel"],
    "INT4 group 128 (W4A16)": ["--format", "int4"],
    "INT4 group 128 asymmetric": ["--format", "int4", "--asymmetric"],
    "INT8 group 128 weight-only asymmetric": ["--format", "int8", "--granularity", "group", "--activations", "none",
                                              "--asymmetric"],
    "NVFP4": ["--format", "nvfp4"],
    "MXFP4": ["--format", "mxfp4"],
    "MXFP8": ["--format", "mxfp8"],
    "FP8 e4m3 block 128 --observer mse": ["--observer", "mse"],
    "INT4 group 128 --observer mse": ["--format", "int4", "--observer", "mse"],
    "NVFP4 --observer mse": ["--format", "nvfp4", "--observer", "mse"],
    "NVFP4 --observer expanded": ["--format", "nvfp4", "--observer", "expanded"],
    "MXFP4 --observer mse": ["--format", "mxfp4", "--observer", "mse"],
}


# llm-compressor's model_free_ptq preset of the same scheme (its weights match ours: tests/test_llmc_interop*.py)
LLMC = {
    "FP8 e4m3 block 128": "FP8_BLOCK",
    "FP8 e4m3 channel": "FP8_DYNAMIC",
    "INT8 channel (W8A8)": "W8A8",
    "INT4 group 128 (W4A16)": "W4A16",
    "INT4 group 128 asymmetric": "W4A16_ASYM",
    "NVFP4": "NVFP4A16",
    "MXFP4": "MXFP4A16",
    "MXFP8": "MXFP8A16",
}
LLMC_IGNORE = ["lm_head", "re:.*embed_tokens$", "re:.*mlp.gate$"]


def llmc_seconds(scheme: str, checkpoint: Path, out: Path, pin: list[str], workers: int, repeats: int) -> float:
    """Median wall seconds of llm-compressor's model_free_ptq for `scheme` (page cache warm, whole process)."""
    code = ("import sys; from llmcompressor import model_free_ptq; "
            f"model_free_ptq(model_stub=sys.argv[1], save_directory=sys.argv[2], scheme={LLMC[scheme]!r}, "
            f"ignore={LLMC_IGNORE!r}, max_workers={workers}, device='cpu')")
    env = {"PYTHONPATH": os.environ["LLMC_PYTHONPATH"]} if os.environ.get("LLMC_PYTHONPATH") else {}
    walls = []
    for _ in range(repeats):
        shutil.rmtree(out, ignore_errors=True)
        warm(checkpoint)
        walls.append(timed([*pin, sys.executable, "-c", code, str(checkpoint), str(out)], env)[0])
    shutil.rmtree(out, ignore_errors=True)
    return sorted(walls)[len(walls) // 2]


def first_run(scheme: str, name: str, tree: str, cmd: list[str], env: dict, checkpoint: Path,
              out: Path) -> float | None:
    """Wall seconds of one run with empty caches: the tree's bytecode removed and an empty NUMBA_CACHE_DIR."""
    with tempfile.TemporaryDirectory(prefix="cold-") as cache:
        for pycache in Path(tree, "fp8conv").rglob("__pycache__"):
            shutil.rmtree(pycache)
        shutil.rmtree(out, ignore_errors=True)
        warm(checkpoint)
        try:
            return timed(cmd, {**env, "NUMBA_CACHE_DIR": cache})[0]
        except RuntimeError as exc:
            print(f"{scheme} / {name}: {str(exc)[-300:]}", flush=True)
            return None


def output_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", action="append", required=True, help="NAME=PATH of an fp8conv checkout")
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--make", default="", help="bench/make_checkpoint.py arguments when the checkpoint is missing")
    parser.add_argument("--cores", default="", help="taskset -c list (empty: all)")
    parser.add_argument("--workers", default="2")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--schemes", nargs="*", default=list(SCHEMES))
    parser.add_argument("--cold", action="store_true")
    parser.add_argument("--bytecode", action="store_true",
                        help="compile each tree's bytecode before its timed runs (what pip install does); without it, "
                             "a run under PYTHONDONTWRITEBYTECODE=1 compiles every module it imports")
    parser.add_argument("--ceiling", action="store_true")
    parser.add_argument("--llmc", type=int, default=0, metavar="N",
                        help="also time llm-compressor's model_free_ptq, median of N runs, and print the ratio")
    parser.add_argument("--env", action="append", default=[], help="NAME:VAR=VALUE: extra environment for one tree")
    parser.add_argument("--out", type=Path, required=True, help="markdown table (and .json beside it)")
    parser.add_argument("--scratch", type=Path, default=HERE / "out")
    args = parser.parse_args()
    if not (args.checkpoint / "config.json").exists():
        subprocess.run([sys.executable, str(HERE / "make_checkpoint.py"), str(args.checkpoint), *args.make.split()],
                       check=True)
    trees = {name: str(Path(path).resolve()) for name, path in (t.split("=", 1) for t in args.tree)}
    # `python -m fp8conv` puts the working directory first on sys.path, before PYTHONPATH: run every command
    # from the scratch folder, or a checkout in the working directory is what each tree's row would time.
    args.checkpoint, args.out, args.scratch = args.checkpoint.resolve(), args.out.resolve(), args.scratch.resolve()
    args.scratch.mkdir(parents=True, exist_ok=True)
    os.chdir(args.scratch)
    extra: dict[str, dict] = {}
    for item in args.env:
        name, assignment = item.split(":", 1)
        key, value = assignment.split("=", 1)
        extra.setdefault(name, {})[key] = value
    size = input_bytes(args.checkpoint)
    out = args.scratch / "x"
    pin = ["taskset", "-c", args.cores] if args.cores else []
    workers = [] if args.workers == "default" else ["--workers", args.workers]
    results: dict = {"input_bytes": size, "cores": args.cores or "all", "workers": args.workers, "rows": {}}
    largest = 0
    for scheme in args.schemes:
        row = results["rows"].setdefault(scheme, {})
        commands = {}
        for name, tree in trees.items():
            env = {"PYTHONPATH": str(Path(tree).resolve()), **extra.get(name, {})}
            commands[name] = ([*pin, sys.executable, "-m", "fp8conv", "quantize", str(args.checkpoint), "-o", str(out),
                               "-q", "--overwrite", *workers, *SCHEMES[scheme]], env)
            if args.cold:
                row[f"{name} first run"] = first_run(scheme, name, tree, *commands[name], args.checkpoint, out)
            if args.bytecode:  # as pip install leaves it, also under PYTHONDONTWRITEBYTECODE=1
                subprocess.run([sys.executable, "-m", "compileall", "-q", str(Path(tree, "fp8conv"))], check=True,
                               stdout=subprocess.DEVNULL)
        # The trees take turns run by run (the order reversed every other round): a machine whose load or memory
        # state drifts during the scheme's runs then shifts every tree alike, not the trees run last.
        walls: dict[str, list[float]] = {name: [] for name in trees}
        cpus: dict[str, list[float]] = {name: [] for name in trees}
        failed: set[str] = set()
        for round_ in range(args.repeats):
            for name in (list(trees) if round_ % 2 == 0 else list(trees)[::-1]):
                if name in failed:
                    continue
                shutil.rmtree(out, ignore_errors=True)
                warm(args.checkpoint)
                try:
                    before = resource.getrusage(resource.RUSAGE_CHILDREN)
                    walls[name].append(timed(*commands[name])[0])
                    after = resource.getrusage(resource.RUSAGE_CHILDREN)
                    cpus[name].append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
                    largest = max(largest, output_bytes(out))
                except RuntimeError as exc:
                    print(f"{scheme} / {name}: {str(exc)[-300:]}", flush=True)
                    failed.add(name)
        for name in trees:
            w, c = walls[name], cpus[name]
            row[name] = sorted(w)[len(w) // 2] if w else None
            row[f"{name} runs"] = w
            row[f"{name} cpu"] = sorted(c)[len(c) // 2] if c else None
            print(f"{scheme} / {name}: {row[name]} {w} {row.get(f'{name} first run', '')} cpu {c}", flush=True)
        if args.llmc and scheme in LLMC:
            n = int(args.workers) if args.workers != "default" else len(os.sched_getaffinity(0))
            try:
                row["llm-compressor"] = llmc_seconds(scheme, args.checkpoint, out, pin, n, args.llmc)
            except RuntimeError as exc:
                print(f"{scheme} / llm-compressor: {str(exc)[-300:]}", flush=True)
            print(f"{scheme} / llm-compressor: {row.get('llm-compressor')}", flush=True)
    if args.ceiling and largest:
        results["write_ceiling_s"] = write_seconds(largest, args.scratch)
        results["write_ceiling_bytes"] = largest
    shutil.rmtree(out, ignore_errors=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    lines = [f"Input {size / 1e9:.2f} GB bf16; cores {results['cores']}; --workers {args.workers}; median of "
             f"{args.repeats} (s, whole process).", ""]
    names = list(trees)
    head = ("| scheme | " + " | ".join(names) + (" | " + " | ".join(f"{n} first run" for n in names) if args.cold else "")
            + " | " + " | ".join(f"{n} CPU s" for n in names)
            + (f" | llm-compressor | llm-compressor / {names[-1]}" if args.llmc else ""))
    lines += [head + " |", "|---|" + "---:|" * (len(names) * (3 if args.cold else 2) + (2 if args.llmc else 0))]
    for scheme, row in results["rows"].items():
        cells = [f"{row[n]:.2f}" if row.get(n) else "-" for n in names]
        if args.cold:
            cells += [f"{row[n + ' first run']:.2f}" if row.get(n + " first run") else "-" for n in names]
        cells += [f"{row[n + ' cpu']:.2f}" if row.get(n + " cpu") else "-" for n in names]
        if args.llmc:
            theirs, ours = row.get("llm-compressor"), row.get(names[-1])
            cells += [f"{theirs:.2f}" if theirs else "-", f"{theirs / ours:.1f}x" if theirs and ours else "-"]
        lines.append(f"| {scheme} | " + " | ".join(cells) + " |")
    if "write_ceiling_s" in results:
        lines += ["", f"write+fsync ceiling of the largest output ({largest / 1e9:.2f} GB): "
                      f"{results['write_ceiling_s']:.2f} s"]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
