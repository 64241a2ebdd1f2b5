"""Cost of the mse observer against min-max quantization of the same weight (target: mse <= 3x).

    PYTHONPATH=$PWD python3 bench/observer_cost.py [--rows 2048] [--cols 2048] [--repeats 5]

For each scheme: the CPU time (time.process_time: this process, one thread; robust on a shared,
loaded machine, unlike wall time) of `kernels.quantize_2d` with min-max scales (scales + codes + error
statistics; the numpy path and, where numba runs the scheme, the compiled path) and with the mse
observer (backend "auto": its candidates evaluated by numba when installed, then the quantization with
those scales; "mse numpy": the numpy reference search). Median of `--repeats` runs. End-to-end
times are in bench/QUALITY.md.
"""
from __future__ import annotations

import argparse
import time

from dataclasses import replace

import ml_dtypes
import numpy as np

from fp8conv import compiled, kernels
from fp8conv.scheme import Scheme, microscale_scheme


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--cols", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
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
    print(f"weight {args.rows}x{args.cols} bf16, student-t(5); median of {args.repeats}; numba available: {compiled.AVAILABLE}")
    print("| scheme | minmax numpy s | minmax numba s | mse numpy s | mse s | mse / minmax numpy | mse / minmax numba |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for scheme in cases:
        mse_scheme = replace(scheme, observer="mse")
        t_np = median_time(lambda: kernels.quantize_2d(w, scheme, backend="numpy"), args.repeats)
        fast = compiled.AVAILABLE and (compiled.supports(scheme) or bool(scheme.microscale))
        t_nb = median_time(lambda: kernels.quantize_2d(w, scheme, backend="numba"), args.repeats) if fast else float("nan")
        t_mse_np = median_time(lambda: kernels.quantize_2d(w, mse_scheme, backend="numpy"), args.repeats)
        kernels.quantize_2d(w[:64, :128], mse_scheme)  # numba compiles or loads its cache outside the timing
        t_mse = median_time(lambda: kernels.quantize_2d(w, mse_scheme), args.repeats)
        print(f"| {scheme.describe()} | {t_np:.3f} | {t_nb:.3f} | {t_mse_np:.3f} | {t_mse:.3f} | {t_mse / t_np:.1f}x "
              f"| {t_mse / t_nb:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
