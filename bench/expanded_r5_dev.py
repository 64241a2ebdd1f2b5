"""#28 nvfp4 round 5: `expanded`'s per-group error norm, candidate variants on the three models (not CI).

    PYTHONPATH=$PWD python3 bench/expanded_r5_dev.py --models minilm,smollm2,gemma3
    PYTHONPATH=$PWD python3 bench/quality.py run --split dev --schemes nvfp4 \
        --variants fp8conv:minmax,fp8conv:expanded#r4,llmc:nvfp4_expanded_mse,diag:r5-p2.5,diag:r5-p3,diag:r5-p4,diag:r5-p2.5w

Each variant (bench/QUALITY.md, "nvfp4 round 5") is the product's own numpy path of `--observer expanded`
(numerics/microscale_kernel.quantize_microscale, backend numpy: global scale from 1.25x the amax of the weight or
its fused set, min-max codes, the code search, the element encoding) with two things swapped for the run: the
per-group objective (observers.microscale_errors: sum |e|^P instead of sum e^2, e the float64 difference, summed
in element order) and the candidate code steps (expanded.steps_for). `p2` is the product unchanged and must
reproduce the cached `fp8conv:expanded#r4` tensors bit for bit. The tensors are dequantized as compressed-tensors
does and cached like bench/quality.py's conversions, as variants `diag:r5-NAME`.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import quality  # noqa: E402  (bench/quality.py: models, cache paths)
from expanded_global_dev import nvfp4_inputs, parse_args, same_tensors  # noqa: E402

from fp8conv.numerics import expanded, observers  # noqa: E402
from fp8conv.numerics import microscale as ms  # noqa: E402
from fp8conv.numerics.microscale_kernel import quantize_microscale  # noqa: E402

SHIPPED_STEPS = expanded.NVFP4_STEPS
WIDE_STEPS = (0, -1, -2, -3, -4, 1, 2, 3, 4, 5, 6, 7, 8, 9)
VARIANTS = {  # name: (error exponent, code steps)
    "p2": (2.0, SHIPPED_STEPS),
    "p2.5": (2.5, SHIPPED_STEPS),
    "p3": (3.0, SHIPPED_STEPS),
    "p4": (4.0, SHIPPED_STEPS),
    "p2.5w": (2.5, WIDE_STEPS),
}
_squared_errors = observers.microscale_errors


def power_errors(exponent: float):
    """observers.microscale_errors with sum |e|^exponent: e^2 (2), e^2 sqrt|e| (2.5), e^2 |e| (3), (e^2)^2 (4)."""

    def errors(tiles, codes, scale_format, element, global_scale):
        d = observers.microscale_divisors(codes, scale_format, global_scale)
        y = tiles / d[:, None]
        recon = np.take(observers._element_value_table(element), observers.round_to_odd_bf16(y))
        recon *= d[:, None]
        diff = recon.astype(np.float64)
        diff -= tiles
        sq = diff * diff
        if exponent == 2.5:
            sq *= np.sqrt(np.abs(diff))
        elif exponent == 3.0:
            sq *= np.abs(diff)
        elif exponent == 4.0:
            sq *= sq
        total = sq[:, 0].copy()
        for j in range(1, sq.shape[1]):
            total += sq[:, j]
        return total

    return errors


def main() -> None:
    args = parse_args("variants", VARIANTS)
    from safetensors.numpy import save_file

    for model in args.models.split(","):
        scheme, weights, partners = nvfp4_inputs(model)
        amax = {n: ms.tensor_amax(w) for n, w in weights.items()}
        cached = quality.conv_path(model, "nvfp4", "fp8conv:expanded#r4")
        for variant in args.variants.split(","):
            exponent, steps = VARIANTS[variant]
            observers.microscale_errors = power_errors(exponent)
            expanded.steps_for = lambda fmt, steps=steps: steps
            t0 = time.process_time()
            deq, sse = {}, 0.0
            for n, w in weights.items():
                top = max(amax[p] for p in partners.get(n, (n,)))
                g = ms.nvfp4_global_scale(expanded.global_maximum(top), w.dtype)
                q = quantize_microscale(w, scheme, g, n, backend="numpy")
                deq[n] = ms.dequantize_nvfp4(q.codes, q.scales, q.global_scale, np.float32)
                sse += float(((deq[n].astype(np.float64) - w.astype(np.float64)) ** 2).sum())
            seconds = time.process_time() - t0
            observers.microscale_errors = _squared_errors
            if variant == "p2" and cached.exists():
                print(f"{model}: r5-p2 reproduces the CLI's expanded#r4 tensors: {same_tensors(cached, deq)}",
                      flush=True)
                continue
            save_file(deq, str(quality.conv_path(model, "nvfp4", f"diag:r5-{variant}")),
                      metadata={"seconds": f"{seconds:.2f}"})
            print(json.dumps({"model": model, "variant": variant, "cpu_s": round(seconds, 1), "weight_sse": sse}),
                  flush=True)


if __name__ == "__main__":
    main()
