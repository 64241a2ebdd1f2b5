"""Development round for the INT4 asymmetric hqq observer (#28; not CI): principled variants, one pass.

    PYTHONPATH=$PWD python3 bench/hqq_dev.py --models smollm2,gemma3,minilm
    PYTHONPATH=$PWD python3 bench/quality.py run --split dev --schemes int4-asym --variants fp8conv:hqq-dev-p2,...

For every tensor that fp8conv quantizes (INT4, groups of 64, asymmetric, bf16 / float32 scale as the CLI
stores it) the candidates (scale, zero point) of each group are generated once, evaluated with the kernels'
reconstruction (numerics/reconstruct.py), and each variant keeps, per group, the candidate with the
smallest sum |error|^p among its candidate set; the first candidate is min-max and a later one replaces
the best only when smaller by more than hqq.MARGIN (relative), so every variant is never worse than
min-max on its own objective. The dequantized float32 tensors are written where bench/quality.py caches
conversions (variant `fp8conv:hqq-dev-NAME`), so the harness evaluates them like any other.

Candidate sets (fixed before any development run):
- `hqq` (= shipped): min-max + the 20 rounds of numerics/hqq.py from min-max.
- `all`: min-max + the min-max range shrunk by 0.99 .. 0.90 (observers.SHRINK_FACTORS, the mse observer's
  candidates) + the same 20 hqq rounds.
Objectives: p = 2 (squared error, shipped), 3, 4. Variants: hqq-p2 (shipped), hqq-p3, hqq-p4, all-p2,
all-p3, all-p4. Not tried, for the 2 shared cores: more rounds (on a SmolLM2 tensor the stored candidate of
<0.1% of the groups changes per round after round 10, so rounds 21-60 cannot move much) and a second hqq
run started from the best shrunk range.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402

from fp8conv.numerics import hqq, observers  # noqa: E402
from fp8conv.numerics.scales import range_end_scales  # noqa: E402
from fp8conv.plan.scheme import Scheme  # noqa: E402

VARIANTS = {  # name: (candidate set, exponent)
    "hqq-p2": ("hqq", 2), "hqq-p3": ("hqq", 3), "hqq-p4": ("hqq", 4),
    "all-p2": ("all", 2), "all-p3": ("all", 3), "all-p4": ("all", 4),
}
SCHEME = "int4-asym"


def objectives(x: np.ndarray, scale, zero, reconstruct, out) -> np.ndarray:
    """float64 [3, n]: per group sum d^2, |d|^3, d^4 (d = reconstruction - x, exact in float32)."""
    with np.errstate(invalid="ignore"):
        reconstruct(x, scale, zero, out)
    np.subtract(out, x, out=out)
    d = out.astype(np.float64)
    d2 = d * d
    return np.stack([np.einsum("ij,ij->i", d, d), (d2 * np.abs(d)).sum(1), (d2 * d2).sum(1)])


def choose(x, scheme, params, reconstruct, store) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per variant, the chosen float32 (scale, zero) of every group of x (float32 [n, 64])."""
    out = np.empty_like(x)
    lo, hi = observers.tile_range(x)
    s0, z0 = params(lo, hi)
    s0, z0 = np.array(s0, np.float32), np.array(z0, np.float32)
    cands = {"mm": [(s0, z0)]}
    cands["a"] = list(hqq._rounds(x, s0, z0, scheme.code_range, store, hqq.P_NORM, hqq.BETA, hqq.KAPPA,
                                  hqq.ITERATIONS))
    shrunk = [params(lo * np.float32(f), hi * np.float32(f)) for f in observers.SHRINK_FACTORS[1:]]
    cands["shrink"] = [(np.array(s, np.float32), np.array(z, np.float32)) for s, z in shrunk]
    scores = {key: [objectives(x, s, z, reconstruct, out) for s, z in lst] for key, lst in cands.items()}
    rounds = [("a", r) for r in range(len(cands["a"]))]
    sets = {"hqq": [("mm", 0)] + rounds,
            "all": [("mm", 0)] + [("shrink", k) for k in range(len(cands["shrink"]))] + rounds}
    result = {}
    for name, (cset, p) in VARIANTS.items():
        row = {2: 0, 3: 1, 4: 2}[p]
        scale, zero = s0.copy(), z0.copy()
        best = scores["mm"][0][row].copy()
        for key, r in sets[cset][1:]:
            err = scores[key][r][row]
            better = err < best * (1.0 - hqq.MARGIN)
            if better.any():
                best = np.where(better, err, best)
                scale[better] = cands[key][r][0][better]
                zero[better] = cands[key][r][1][better]
        result[name] = (scale, zero)
    return result


def run_model(model: str) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file
    import torch

    names = quality.modules_of(model, SCHEME)
    todo = [v for v in VARIANTS if not quality.conv_path(model, SCHEME, f"fp8conv:hqq-dev-{v}").exists()]
    if not todo:
        return
    src = quality.MODELS[model]()
    recon = {v: {} for v in VARIANTS}
    files = sorted(Path(src).glob("*.safetensors"))
    for shard in files:
        with safe_open(shard, "pt") as f:
            for name in sorted(set(f.keys()) & set(names)):
                t = f.get_tensor(name)
                tag = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}[t.dtype]
                scheme = Scheme(format="int4", granularity="group", group_size=64, symmetric=False,
                                activations="none", scale_format="source", observer="hqq").for_source(tag)
                w = t.float().numpy()
                rows, cols = w.shape
                params, reconstruct = observers.scheme_functions(scheme)
                tiles = observers.tiles_of(w, scheme.tile(rows, cols))

                def store(raw, scheme=scheme):
                    with np.errstate(over="ignore"):
                        stored, bad = range_end_scales(raw.astype(np.float32), raw, scheme,
                                                       np.zeros(raw.shape, np.bool_))
                    return np.where(bad, np.float32(np.nan), stored).astype(np.float32)

                outs = {v: np.empty_like(tiles) for v in VARIANTS}
                batch = 4096
                for r0 in range(0, tiles.shape[0], batch):
                    x = tiles[r0 : r0 + batch]
                    for v, (s, z) in choose(x, scheme, params, reconstruct, store).items():
                        reconstruct(x, s, z, outs[v][r0 : r0 + batch])
                for v in VARIANTS:
                    recon[v][name] = torch.from_numpy(outs[v].reshape(rows, cols).copy())
                quality.log(f"{model} {name} done")
    for v in VARIANTS:
        dst = quality.conv_path(model, SCHEME, f"fp8conv:hqq-dev-{v}")
        dst.parent.mkdir(parents=True, exist_ok=True)
        save_file(recon[v], str(dst))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="smollm2,gemma3,minilm")
    args = parser.parse_args()
    for model in args.models.split(","):
        run_model(model)


if __name__ == "__main__":
    main()
