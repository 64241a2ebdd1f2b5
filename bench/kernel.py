"""CPU time per element of the quantize kernels alone (no I/O), best of N, on heavy-tailed bf16 weights.

    python bench/kernel.py                     # FP8 e4m3 block-128, the C kernel, 4096 x 11008
    python bench/kernel.py --scheme channel --format int8 --repeats 7
    python bench/kernel.py --backend numpy
    python bench/kernel.py --format nvfp4      # also mxfp4, mxfp8 (the global scale of NVFP4 outside the timing)

time.process_time (this process's CPU time, all threads) rather than wall time, so other work on a
shared machine matters less; the best of --repeats calls is reported. The first call is not timed. Never run in CI.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.append(str(HERE.parent))  # fp8conv from PYTHONPATH when set, else this checkout
from make_checkpoint import heavy_tailed  # noqa: E402

from fp8conv.formats.microscaled import MICROSCALE  # noqa: E402
from fp8conv.numerics import api, kernels, microscale  # noqa: E402
from fp8conv.plan.scheme import microscale_scheme  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=11008)
    parser.add_argument("--format", default="fp8_e4m3")
    parser.add_argument("--granularity", default="block")
    parser.add_argument("--backend", default="native")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chunk-mib", type=float, default=32,
                        help="quantize in row chunks of about this many MiB of source, as the pipeline reads them")
    args = parser.parse_args()
    weight = heavy_tailed(np.random.default_rng(0), (args.rows, args.cols))
    if args.format in MICROSCALE:  # nvfp4 / mxfp4 / mxfp8: their groups are fixed; --granularity is ignored
        scheme = microscale_scheme(args.format)
        tensor_scale = microscale.nvfp4_global_scale(microscale.tensor_amax(weight), weight.dtype) \
            if MICROSCALE[args.format].global_scale else None
    else:
        scheme, tensor_scale = api.make_scheme(args.format, args.granularity, 128, 128), None
    kernels.quantize_2d(weight[:128], scheme, tensor_scale, backend=args.backend)  # first call outside the timing
    step = min(args.rows, max(128, int(args.chunk_mib * 2**20) // (weight.shape[1] * weight.itemsize) // 128 * 128))
    best = float("inf")
    for _ in range(args.repeats):
        start = time.process_time()
        for r0 in range(0, weight.shape[0], step):
            kernels.quantize_2d(weight[r0 : r0 + step], scheme, tensor_scale, backend=args.backend)
        best = min(best, time.process_time() - start)
    print(f"{args.format} {scheme.granularity} {args.backend} {args.rows}x{args.cols}: "
          f"{best * 1e9 / weight.size:.3f} ns/element CPU (best of {args.repeats}, {best:.3f} s; chunks of {step} rows)")


if __name__ == "__main__":
    main()
