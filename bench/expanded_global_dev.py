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
from fp8conv.numerics import microscale as ms  # noqa: E402
from fp8conv.numerics.microscale_kernel import quantize_microscale  # noqa: E402
from fp8conv.plan.fusion import fused_sets  # noqa: E402
from fp8conv.plan.scheme import Scheme, microscale_scheme  # noqa: E402

# llm-compressor's nvfp4_expanded_mse range: group maxima 1.8x down to 0.81x of the group's amax, 200 steps
# to the whole range, 111 of them searched.
EXPANSION = 1.8
SEARCH_GRID = 200
SEARCH_STEPS = 111
_E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
_E2M1_MIDPOINTS = (_E2M1[1:] + _E2M1[:-1]) / 2


def search_factors() -> np.ndarray:
    """float64 [111]: the searched group maxima as multiples of the group amax, 1.8 * (1 - i / 200), i = 0 .. 110."""
    return np.array([EXPANSION * (1.0 - i / SEARCH_GRID) for i in range(SEARCH_STEPS)])


def group_searched_maxima(groups: np.ndarray, exponent: float = 2.0) -> np.ndarray:
    """float64 [n]: per group (float64 [n, group]) the searched maximum t = amax * factor (search_factors) that
    minimises sum |w' - w|^exponent over the group, w' = sign(w) * e2m1(|w| / s) * s with s = t / 6 unrounded
    (nearest e2m1 value, ties to the smaller magnitude, clipped at 6), the sum in element order; the first
    (largest) t of equal errors; 0 for an all-zero group."""
    x = np.abs(np.asarray(groups, np.float64))
    t = x.max(axis=1)[:, None] * search_factors()[None, :]  # [n, 111]
    with np.errstate(divide="ignore", invalid="ignore"):  # an all-zero group: t = 0, its result is 0 anyway
        s = t / 6.0
        y = np.minimum(x[:, None, :] / s[:, :, None], 6.0)
        d = _E2M1[np.searchsorted(_E2M1_MIDPOINTS, y, side="left")] * s[:, :, None] - x[:, None, :]
    e = d * d if exponent == 2.0 else np.abs(d) ** exponent
    err = e[:, :, 0].copy()
    for j in range(1, e.shape[2]):  # in element order (the compiled kernel's order)
        err += e[:, :, j]
    best = np.argmin(np.where(np.isnan(err), np.inf, err), axis=1)  # the first of equal errors
    return t[np.arange(len(t)), best]


def searched_maximum(weight: np.ndarray, group: int = 16, exponent: float = 2.0,
                     use_compiled: bool | None = None) -> float:
    """float64: the largest searched group maximum (group_searched_maxima) of a bf16 / fp16 / float32 [rows, cols]
    weight with finite values. A group's searched maximum is at most its amax * 1.8, so only groups above the
    largest found so far can raise it: the group with the largest amax is searched first, then the others
    that could still raise it, in order of decreasing amax; the result is the maximum over every group."""
    if weight.size == 0:
        return 0.0
    tiles = np.ascontiguousarray(weight).reshape(-1, group)
    amax = ms.weight_group_amax(np.ascontiguousarray(weight).reshape(-1, weight.shape[-1]), group,
                                use_compiled).reshape(-1).astype(np.float64)
    top = amax * search_factors()[0]
    first = int(np.argmax(amax))
    found = float(group_searched_maxima(tiles[first : first + 1].astype(np.float64), exponent)[0])
    rest = np.flatnonzero(top > found)
    rest = rest[np.argsort(-amax[rest], kind="stable")]
    start, size = 0, 64
    while start < len(rest):
        idx = rest[start : start + size]
        idx = idx[top[idx] > found]
        if not len(idx):
            break
        found = max(found, float(group_searched_maxima(tiles[idx].astype(np.float64), exponent).max()))
        start, size = start + size, min(size * 4, 512)
    return found


RULES = {
    "amax": lambda w: float(ms.tensor_amax(w)),
    "sse": lambda w: searched_maximum(w, 16, 2.0),
    "p24": lambda w: searched_maximum(w, 16, 2.4),
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


def nvfp4_inputs(model: str) -> tuple[Scheme, dict, dict]:
    """The expanded NVFP4 scheme, `model`'s NVFP4 weights (source dtype) and each weight's fused partners."""
    names = quality.modules_of(model, "nvfp4")
    partners = {n: g for g in fused_sets(names) for n in g}
    return Scheme(**{**microscale_scheme("nvfp4").__dict__, "observer": "expanded"}), load_source(model, names), partners


def same_tensors(cached: Path, deq: dict) -> bool:
    """Whether the cached conversion holds exactly `deq`'s float32 bits."""
    from safetensors.numpy import load_file

    ref = load_file(str(cached))
    return all(np.array_equal(ref[n].view(np.uint32), deq[n].view(np.uint32)) for n in deq)


def parse_args(option: str, choices) -> argparse.Namespace:
    """--models and --`option`, comma lists (default: the three models, every one of `choices`)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="minilm,smollm2,gemma3")
    parser.add_argument(f"--{option}", default=",".join(choices))
    return parser.parse_args()


def main() -> None:
    args = parse_args("rules", RULES)
    for model in args.models.split(","):
        scheme, weights, partners = nvfp4_inputs(model)
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
            from safetensors.numpy import save_file

            if rule == "amax" and cached.exists():
                print(f"{model}: gx-amax reproduces the CLI's expanded tensors: {same_tensors(cached, deq)}", flush=True)
            save_file(deq, str(dst), metadata={"seconds": f"{seconds_rule:.2f}"})
            src_sse = {n: float(((deq[n].astype(np.float64) - w.astype(np.float64)) ** 2).sum()) for n, w in weights.items()}
            print(json.dumps({"model": model, "rule": rule, "rule_cpu_s": round(seconds_rule, 2),
                              "weight_sse": sum(src_sse.values()),
                              "global_ratio_median": float(np.median(ratio)), "global_ratio_max": max(ratio)}),
                  flush=True)



if __name__ == "__main__":
    main()
