"""#28 nvfp4 round 4: the global scale of `expanded`, candidate rules on the three models (not CI).

    PYTHONPATH=$PWD python3 bench/expanded_global_dev.py --models minilm,smollm2,gemma3
    PYTHONPATH=$PWD python3 bench/quality.py run --split dev --schemes nvfp4 \
        --variants fp8conv:minmax,fp8conv:expanded,diag:gx-amax,diag:gx-sse,diag:gx-p24,diag:gx-r1.25,diag:gx-head7

Each rule (bench/QUALITY.md, "nvfp4 round 4") gives every quantized weight a searched maximum M; the global
scale is compressed-tensors' rule on M, `nvfp4_global_scale(float32(M), dtype)`, shared by a fused set (the
largest M of its members, as llm-compressor and the product share the amax). The group codes are then the
product's own `expanded` search (numerics/microscale_kernel.quantize_microscale) under that global scale, and
the tensor is dequantized as compressed-tensors does. `gx-amax` is today's product and must reproduce the CLI's
cached `fp8conv:expanded` tensors exactly (checked where cached). Results are cached like bench/quality.py's
conversions, as variants `diag:gx-RULE`.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import quality  # noqa: E402  (bench/quality.py: models, cache paths)

from fp8conv.formats.dtypes import bf16  # noqa: E402
from fp8conv.numerics import expanded  # noqa: E402
from fp8conv.numerics import microscale as ms  # noqa: E402
from fp8conv.numerics.microscale_kernel import quantize_microscale  # noqa: E402
from fp8conv.plan.fusion import fused_sets  # noqa: E402
from fp8conv.plan.scheme import Scheme, microscale_scheme  # noqa: E402

RULES = {
    "amax": lambda w: float(ms.tensor_amax(w)),
    "sse": lambda w: expanded.searched_maximum(w, 16, 2.0),
    "p24": lambda w: expanded.searched_maximum(w, 16, 2.4),
    "r1.25": lambda w: float(ms.tensor_amax(w)) * 1.25,
    "head7": lambda w: float(ms.tensor_amax(w)) * 448 / 240,
}


def load_source(model: str, names: list[str]) -> dict[str, np.ndarray]:
    """The source weights in their own dtype (bf16 as ml_dtypes' bfloat16)."""
    import torch
    from safetensors import safe_open

    src = quality.MODELS[model]()
    out = {}
    for shard in sorted(src.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            for k in f.keys():
                if k in names:
                    t = f.get_tensor(k)
                    out[k] = t.view(torch.int16).numpy().view(bf16()) if t.dtype == torch.bfloat16 else t.numpy()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="minilm,smollm2,gemma3")
    parser.add_argument("--rules", default=",".join(RULES))
    args = parser.parse_args()
    scheme = Scheme(**{**microscale_scheme("nvfp4").__dict__, "observer": "expanded"})
    for model in args.models.split(","):
        names = quality.modules_of(model, "nvfp4")
        weights = load_source(model, names)
        partners = {n: g for g in fused_sets(names) for n in g}
        cached = quality.conv_path(model, "nvfp4", "fp8conv:expanded")
        for rule in args.rules.split(","):
            dst = quality.conv_path(model, "nvfp4", f"diag:gx-{rule}")
            t0 = time.process_time()
            maxima = {n: RULES[rule](w) for n, w in weights.items()}
            seconds_rule = time.process_time() - t0
            deq, ratio = {}, []
            for n, w in weights.items():
                m = max(maxima[p] for p in partners.get(n, (n,)))
                g = ms.nvfp4_global_scale(np.float32(m), w.dtype)
                ratio.append(float(ms.nvfp4_global_scale(ms.tensor_amax(w), w.dtype) / g))
                q = quantize_microscale(w, scheme, g, n)
                deq[n] = ms.dequantize_nvfp4(q.codes, q.scales, q.global_scale, np.float32)
            from safetensors.numpy import load_file, save_file

            if rule == "amax" and cached.exists():
                ref = load_file(str(cached))
                same = all(np.array_equal(ref[n].view(np.uint32), deq[n].view(np.uint32)) for n in deq)
                print(f"{model}: gx-amax reproduces the CLI's expanded tensors: {same}", flush=True)
            save_file(deq, str(dst), metadata={"seconds": f"{seconds_rule:.2f}"})
            src_sse = {n: float(((deq[n].astype(np.float64) - w.astype(np.float64)) ** 2).sum()) for n, w in weights.items()}
            print(json.dumps({"model": model, "rule": rule, "rule_cpu_s": round(seconds_rule, 2),
                              "weight_sse": sum(src_sse.values()),
                              "global_ratio_median": float(np.median(ratio)), "global_ratio_max": max(ratio)}),
                  flush=True)


if __name__ == "__main__":
    main()
