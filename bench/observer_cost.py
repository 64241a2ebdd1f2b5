"""Cost of the mse / expanded observers against min-max quantization of the same weights (target: <= 2x).

    PYTHONPATH=$PWD python3 bench/observer_cost.py [--rows 2048] [--cols 2048] [--repeats 5]
    PYTHONPATH=$PWD python3 bench/observer_cost.py --checkpoint DIR [--workers 2] [--repeats 3]
    PYTHONPATH=$PWD python3 bench/observer_cost.py --search --rows 1024 --cols 4096 --repeats 20

For each scheme: the CPU time (time.process_time: this process, one thread; robust on a shared,
loaded machine, unlike wall time) of `kernels.quantize_2d` with min-max scales (scales + codes + error
statistics; the numpy path and the compiled path) and with the mse
observer (backend "auto": its candidates evaluated by the C kernels where built, then the quantization with
those scales; "mse numpy": the numpy reference search). Median of `--repeats` runs.

With --checkpoint: whole `fp8conv quantize` runs of that checkpoint per scheme and observer (min-max, mse,
expanded for NVFP4; `--schemes`, `--observers`; mse is refused for FP8 block / INT4 / INT8 since #28), and
the CPU time (user + system) of the child process and its workers, plus the wall time.

    PYTHONPATH=$PWD python3 bench/observer_cost.py --checkpoint bench/data/smollm2-135m-bf16 --workers 1 --repeats 3
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dataclasses import replace

import ml_dtypes
import numpy as np

from fp8conv.accel import native
from fp8conv.numerics import kernels
from fp8conv.plan.scheme import Scheme, microscale_scheme


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return float(np.median(times))


CLI_SCHEMES = {
    "fp8-block": ["--format", "fp8_e4m3", "--granularity", "block"],
    "int8-channel": ["--format", "int8", "--granularity", "channel"],
    "int4-group64": ["--format", "int4", "--granularity", "group", "--group-size", "64"],
    "nvfp4": ["--format", "nvfp4"],
    "mxfp4": ["--format", "mxfp4"],
    "mxfp8": ["--format", "mxfp8"],
}


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def whole_runs(src: Path, workers: int, repeats: int, schemes: list[str], observers: list[str]) -> None:
    """Whole conversions per scheme and observer (an observer a scheme refuses is left out), interleaved."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    print(f"checkpoint {src}, --workers {workers}, median of {repeats}; load average before: {os.getloadavg()}")
    print("| scheme | observer | CPU s (user + sys) | / minmax CPU | wall s |")
    print("| --- | --- | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as tmp:
        for name in schemes:
            allowed = [o for o in observers if o in ("minmax", "mse") or (o == "expanded" and name == "nvfp4")]
            cpu: dict[str, list[float]] = {o: [] for o in allowed}
            wall: dict[str, list[float]] = {o: [] for o in allowed}
            for _ in range(repeats):
                for observer in allowed:
                    cmd = [sys.executable, "-m", "fp8conv", "quantize", str(src), "-o", f"{tmp}/{name}-{observer}",
                           "--overwrite", "-q", "--workers", str(workers), "--observer", observer, *CLI_SCHEMES[name]]
                    c0, t0 = children_cpu(), time.perf_counter()
                    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
                    wall[observer].append(time.perf_counter() - t0)
                    cpu[observer].append(children_cpu() - c0)
            c, w = {k: float(np.median(v)) for k, v in cpu.items()}, {k: float(np.median(v)) for k, v in wall.items()}
            for observer in allowed:
                ratio = f"{c[observer] / c['minmax']:.2f}x" if "minmax" in c else "-"
                print(f"| {name} | {observer} | {c[observer]:.2f} | {ratio} | {w[observer]:.2f} |", flush=True)
    print(f"load average after: {os.getloadavg()}")


def search_runs(rows: int, cols: int, repeats: int) -> None:
    """CPU ms of the NVFP4 scale-code search alone (observers.mse_microscale) on both backends: expanded's 11
    candidates, mse's 9 and the min-max code alone (the fixed cost: loading, transposing, one candidate)."""
    from fp8conv.formats import MICROSCALE
    from fp8conv.numerics import expanded, observers
    from fp8conv.numerics import microscale as ms

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((rows, cols)) * 0.02).astype(ml_dtypes.bfloat16)
    micro = MICROSCALE["nvfp4"]
    gs = ms.nvfp4_global_scale(ms.tensor_amax(w), w.dtype)
    first = ms.nvfp4_group_scales(ms.weight_group_amax(w, 16), gs, w.dtype)
    print(f"NVFP4 search of {rows}x{cols} bf16 (Gaussian), CPU ms, median of {repeats}")
    print("| backend | 11 candidates (expanded) | 9 (mse) | 1 (min-max code) |")
    print("| --- | ---: | ---: | ---: |")
    for backend, compiled in (("native", True), ("numpy", False)):
        if compiled and not native.AVAILABLE:
            continue
        times = [median_time(lambda: observers.mse_microscale(w, micro, first, gs, use_compiled=compiled, steps=steps),
                             repeats) * 1e3 for steps in (expanded.NVFP4_STEPS, observers.NVFP4_CODE_STEPS, (0,))]
        print(f"| {backend} | " + " | ".join(f"{t:.1f}" for t in times) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--cols", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--checkpoint", type=Path, help="time whole conversions of this checkpoint instead")
    parser.add_argument("--search", action="store_true", help="time the NVFP4 scale-code search alone instead")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--schemes", default="nvfp4,mxfp4,mxfp8", help=f"with --checkpoint: of {','.join(CLI_SCHEMES)}")
    parser.add_argument("--observers", default="minmax,mse,expanded", help="with --checkpoint (expanded: nvfp4 only)")
    args = parser.parse_args()
    if args.search:
        return search_runs(args.rows, args.cols, args.repeats)
    if args.checkpoint:
        return whole_runs(args.checkpoint, args.workers, args.repeats, args.schemes.split(","), args.observers.split(","))
    rng = np.random.default_rng(0)
    w = (rng.standard_t(5, size=(args.rows, args.cols)) * 0.02).astype(ml_dtypes.bfloat16)
    cases = [
        Scheme("fp8_e4m3", "block"),
        Scheme("int8", "channel"),
        Scheme("int4", "group", group_size=64, scale_format="bf16"),
        Scheme("int4", "group", group_size=64, symmetric=False, scale_format="bf16"),
        microscale_scheme("nvfp4"),
        microscale_scheme("mxfp4"),
        microscale_scheme("mxfp8"),
    ]
    print(f"weight {args.rows}x{args.cols} bf16, student-t(5); median of {args.repeats}; C kernels built: {native.AVAILABLE}")
    print("| scheme | minmax numpy s | minmax native s | mse numpy s | mse s | mse / minmax numpy | mse / minmax native |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for scheme in cases:
        mse_scheme = replace(scheme, observer="mse")
        t_np = median_time(lambda: kernels.quantize_2d(w, scheme, backend="numpy"), args.repeats)
        fast = native.AVAILABLE
        t_nb = median_time(lambda: kernels.quantize_2d(w, scheme, backend="native"), args.repeats) if fast else float("nan")
        t_mse_np = median_time(lambda: kernels.quantize_2d(w, mse_scheme, backend="numpy"), args.repeats)
        kernels.quantize_2d(w[:64, :128], mse_scheme)  # first call outside the timing
        t_mse = median_time(lambda: kernels.quantize_2d(w, mse_scheme), args.repeats)
        print(f"| {scheme.describe()} | {t_np:.3f} | {t_nb:.3f} | {t_mse_np:.3f} | {t_mse:.3f} | {t_mse / t_np:.1f}x "
              f"| {t_mse / t_nb:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
