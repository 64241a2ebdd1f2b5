"""Cost of the mse observer against min-max quantization of the same weight (target: mse <= 3x).

    PYTHONPATH=$PWD python3 bench/observer_cost.py [--rows 2048] [--cols 2048] [--repeats 5]

For each scheme: the time of `kernels.quantize_2d` (min-max scales + codes + error statistics, the
numpy path and, when numba is installed, the compiled path) and the time of `observers.mse` over the
same tiles (the scale search alone, numpy). Median of `--repeats` runs, one process, one thread.
"""
from __future__ import annotations

import argparse
import time

import ml_dtypes
import numpy as np

from fp8conv import compiled, kernels, observers
from fp8conv.formats import FORMATS
from fp8conv.scheme import Scheme


def tiles_of(w: np.ndarray, tile: tuple[int, int]) -> np.ndarray:
    rows, cols = w.shape
    tr, tc = tile
    pr, pc = -(-rows // tr) * tr, -(-cols // tc) * tc
    padded = np.zeros((pr, pc), np.float32)
    padded[:rows, :cols] = w
    return np.ascontiguousarray(padded.reshape(pr // tr, tr, pc // tc, tc).transpose(0, 2, 1, 3)).reshape(-1, tr * tc)


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--cols", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    w = (rng.standard_t(5, size=(args.rows, args.cols)) * 0.02).astype(ml_dtypes.bfloat16)
    w32 = w.astype(np.float32)
    cases = [
        ("fp8_e4m3 block 128", Scheme("fp8_e4m3", "block", (128, 128)),
         observers.symmetric_params(448.0), observers.float_reconstruct(observers.fp8_round(FORMATS["fp8_e4m3"]))),
        ("int8 channel", Scheme("int8", "channel"),
         observers.symmetric_params(127.0), observers.int_reconstruct(-127, 127)),
        ("int8 group 64 (int4 stand-in: same tiles, int4 search)", Scheme("int8", "group", group_size=64),
         observers.symmetric_params(7.0, "bf16"), observers.int_reconstruct(-8, 7)),
    ]
    print(f"weight {args.rows}x{args.cols} bf16, student-t(5); median of {args.repeats}; numba available: {compiled.AVAILABLE}")
    print("| scheme | minmax numpy s | minmax numba s | mse search s | mse / minmax numpy | mse / minmax numba |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for label, scheme, params, reconstruct in cases:
        available = compiled.AVAILABLE
        compiled.AVAILABLE = False
        t_np = median_time(lambda: kernels.quantize_2d(w, scheme), args.repeats)
        compiled.AVAILABLE = available
        t_nb = median_time(lambda: kernels.quantize_2d(w, scheme), args.repeats) if available else float("nan")
        tiles = tiles_of(w32, scheme.tile(*w.shape))
        t_mse = median_time(lambda: observers.mse(tiles, params, reconstruct), args.repeats)
        print(f"| {label} | {t_np:.3f} | {t_nb:.3f} | {t_mse:.3f} | {t_mse / t_np:.1f}x | {t_mse / t_nb:.1f}x |")


if __name__ == "__main__":
    main()
