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


# -- round 3 (#28, 2026-12-07 ~20:05 UTC; variants and rule fixed in bench/QUALITY.md before the run) ----

VARIANTS3 = ("r3-g-all", "r3-g-allhl", "r3-nb", "r3-g-all-nb", "r3-intz", "r3-g-all-intz")
GGUF_SUBBLOCK = 32  # GGUF's Q4_0 / Q4_1 / Q4_K sub-block
GRID_LEVELS = 16  # a 4-bit grid


def on_4bit_grid(x: np.ndarray) -> np.ndarray:
    """bool [n]: every 32-element sub-block of the group holds at most 16 distinct values (a 4-bit
    producer's grid, e.g. GGUF Q4_1 / Q4_K; original float weights hold ~32)."""
    n, m = x.shape
    sub = GGUF_SUBBLOCK if m % GGUF_SUBBLOCK == 0 else m
    s = np.sort(x.reshape(-1, sub), axis=1)
    distinct = 1 + (np.diff(s, axis=1) != 0).sum(1)
    return (distinct <= GRID_LEVELS).reshape(n, -1).all(1)


def neighbours(s: np.ndarray, z: np.ndarray, dtype, store) -> list:
    """The stored scales one step below and above s (same zero point)."""
    out = []
    stored = s.astype(dtype)
    bits = stored.view(np.uint16 if stored.itemsize == 2 else np.uint32)
    for step in (-1, 1):
        moved = (bits.astype(np.int64) + step).astype(bits.dtype).view(dtype).astype(np.float32)
        moved = np.where(np.isfinite(moved) & (moved > 0), moved, np.float32(np.nan))
        with np.errstate(invalid="ignore"):
            out.append((store(moved.astype(np.float64)), z))
    return out


def rounds_intz(x32, scale0, zero0, code_range, store, p, beta, kappa, iterations):
    """hqq._rounds with the zero point kept an integer inside the solve: after the joint fit z is
    rounded (clipped to the code range) and s re-fitted by least squares for that z."""
    qmin, qmax = (float(v) for v in code_range)
    x = x32.astype(np.float64)
    s = scale0.astype(np.float64)
    z = zero0.astype(np.float64)
    moving = np.ones(len(s), np.bool_)
    for _ in range(iterations):
        codes, target, _, z_j, fit = hqq.half_quadratic_step(x, s, z, (qmin, qmax), beta, p, moving)
        z_new = np.clip(np.rint(z_j), qmin, qmax)
        shifted = codes - z_new[:, None]
        num = np.einsum("ij,ij->i", shifted, target)
        den = np.einsum("ij,ij->i", shifted, shifted)
        ok = fit & (den > 0) & (num > 0)
        s_new = np.where(ok, num / np.where(ok, den, 1.0), s)
        z_new = np.where(ok, z_new, z)
        moving &= (np.abs(s_new - s) > hqq.FIXED_POINT * s) | (z_new != z)
        s, z = s_new, z_new
        beta *= kappa
        yield store(s), z.astype(np.float32)
        if not moving.any():
            return


def choose3(x, scheme, params, reconstruct, store) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Round 3: per variant the chosen float32 (scale, zero) of every group of x (float32 [n, m])."""
    out = np.empty_like(x)
    lo, hi = observers.tile_range(x)
    s0, z0 = params(lo, hi)
    s0, z0 = np.array(s0, np.float32), np.array(z0, np.float32)
    solve = (scheme.code_range, store, hqq.P_NORM, hqq.BETA, hqq.KAPPA, hqq.ITERATIONS)
    c = {"mm": [(s0, z0)]}
    c["H"] = list(hqq._rounds(x, s0, z0, *solve))
    shrunk = [params(lo * np.float32(f), hi * np.float32(f)) for f in observers.SHRINK_FACTORS[1:]]
    c["L"] = [(np.array(s, np.float32), np.array(z, np.float32)) for s, z in shrunk]
    c["I"] = list(rounds_intz(x, s0, z0, *solve))
    dtype = scheme.scale_fmt.dtype
    c["N"] = [nb for s, z in c["mm"] + c["H"] for nb in neighbours(s, z, dtype, store)]
    score = {k: [objectives(x, s, z, reconstruct, out)[[0, 1]] for s, z in v] for k, v in c.items()}

    def select(pool, row):
        scale, zero = s0.copy(), z0.copy()
        best = score["mm"][0][row].copy()
        for key in pool:
            for (s, z), e in zip(c[key], score[key]):
                err = e[row]
                better = err < best * (1.0 - hqq.MARGIN)
                if better.any():
                    best = np.where(better, err, best)
                    scale[better], zero[better] = s[better], z[better]
        return scale, zero

    # hqq started from the best of min-max and the shrunk ranges (squared error)
    start = select(["L"], 0)
    c["HL"] = list(hqq._rounds(x, start[0], start[1], *solve))
    score["HL"] = [objectives(x, s, z, reconstruct, out)[[0, 1]] for s, z in c["HL"]]
    grid = on_4bit_grid(x)

    def by_grid(on, off):
        return tuple(np.where(grid, a, b) for a, b in zip(on, off))

    g_h, g_hn = select(["H"], 0), select(["H", "N"], 0)
    return {
        "r3-g-all": by_grid(g_h, select(["L", "H"], 0)),
        "r3-g-allhl": by_grid(g_h, select(["L", "H", "HL"], 0)),
        "r3-nb": g_hn,
        "r3-g-all-nb": by_grid(g_hn, select(["L", "H", "N"], 0)),
        "r3-intz": select(["I"], 0),
        "r3-g-all-intz": by_grid(select(["I"], 0), select(["L", "H", "I"], 0)),
    }, grid


# -- round 4 (#28, 2026-12-07 21:55 UTC; variants and rule fixed in bench/QUALITY.md before the run) ----

VARIANTS4 = ("r4-ls", "r4-ls24", "r4-g3", "r4-gls", "r4-ls24-g3")
LLMC_FACTORS = tuple(round(1.0 - k / 100, 2) for k in range(20))  # llm-compressor's mse: 1.00 .. 0.81


def objectives4(x, scale, zero, reconstruct, out) -> np.ndarray:
    """float64 [3, n]: per group sum d^2, |d|^2.4, |d|^3 (d = reconstruction - x, exact in float32)."""
    with np.errstate(invalid="ignore"):
        reconstruct(x, scale, zero, out[: len(x)])
    d = (out[: len(x)] - x).astype(np.float64)
    a = np.abs(d)
    d2 = d * d
    return np.stack([d2.sum(1), (d2 * np.power(a, 0.4)).sum(1), (d2 * a).sum(1)])


def choose4(x, scheme, params, reconstruct, store):
    """Round 4: per variant (and r3, to check against the CLI) the chosen float32 (scale, zero) of x [n, m]."""
    out = np.empty_like(x)
    lo, hi = observers.tile_range(x)
    s0, z0 = (np.array(v, np.float32) for v in params(lo, hi))
    solve = (scheme.code_range, store, hqq.P_NORM, hqq.BETA, hqq.KAPPA, hqq.ITERATIONS)
    ls_solve = (scheme.code_range, store, hqq.P_NORM, 0.0, hqq.KAPPA, hqq.ITERATIONS)  # beta 0: e = 0, least squares
    grid = on_4bit_grid(x)

    def scored(xs, cands):
        return [(np.asarray(s, np.float32), np.asarray(z, np.float32), objectives4(xs, np.asarray(s, np.float32),
                 np.asarray(z, np.float32), reconstruct, out)) for s, z in cands]

    def select(pools, row, start):
        scale, zero, best = start[0].copy(), start[1].copy(), start[2][row].copy()
        for pool in pools:
            for s, z, e in pool:
                better = e[row] < best * (1.0 - hqq.MARGIN)
                if better.any():
                    best = np.where(better, e[row], best)
                    scale[better], zero[better] = s[better], z[better]
        return scale, zero

    result = {}
    for part, sub in ((grid, "grid"), (~grid, "off")):
        if not part.any():
            continue
        xs, a, b, l_, h_ = x[part], s0[part], z0[part], lo[part], hi[part]
        mm = scored(xs, [(a, b)])[0]
        H = scored(xs, hqq._rounds(xs, a, b, *solve))
        if sub == "grid":
            LS = scored(xs, hqq._rounds(xs, a, b, *ls_solve))
            r3 = select([H], 0, mm)
            picks = {"r3": r3, "r4-ls": r3, "r4-ls24": r3, "r4-g3": select([H], 2, mm), "r4-gls": select([LS], 0, mm)}
            picks["r4-ls24-g3"] = picks["r4-g3"]
        else:
            L10 = scored(xs, (params(l_ * np.float32(f), h_ * np.float32(f)) for f in observers.SHRINK_FACTORS[1:]))
            L20 = scored(xs, (params(l_ * np.float32(f), h_ * np.float32(f)) for f in LLMC_FACTORS[1:]))
            HL = scored(xs, hqq._rounds(xs, *select([L10], 0, mm), *solve))
            HL20 = scored(xs, hqq._rounds(xs, *select([L20], 0, mm), *solve))
            r3 = select([L10, H, HL], 0, mm)
            picks = {"r3": r3, "r4-ls": select([L20, H, HL20], 0, mm), "r4-g3": r3, "r4-gls": r3}
            picks["r4-ls24"] = picks["r4-ls24-g3"] = select([L20, H, HL20], 1, mm)
        for name, (s, z) in picks.items():
            if name not in result:
                result[name] = (s0.copy(), z0.copy())
            result[name][0][part], result[name][1][part] = s, z
    return result, grid


def run_model(model: str, round3: bool = False, round4: bool = False) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file
    import torch

    names = quality.modules_of(model, SCHEME)
    variants = VARIANTS4 if round4 else VARIANTS3 if round3 else tuple(VARIANTS)
    prefix = "fp8conv:hqq-" if round3 or round4 else "fp8conv:hqq-dev-"
    todo = [v for v in variants if not quality.conv_path(model, SCHEME, f"{prefix}{v}").exists()]
    if not todo:
        return
    src = quality.MODELS[model]()
    recon = {v: {} for v in variants}
    check = {}
    if round4:  # r3 recomputed here must equal the CLI's cached hqq#r3 conversion value for value
        from safetensors.torch import load_file
        check = load_file(str(quality.conv_path(model, SCHEME, "fp8conv:hqq#r3")))
        r3_same = [0, 0]
    grid_groups = [0, 0]
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

                outs = {v: np.empty_like(tiles) for v in variants + (("r3",) if round4 else ())}
                batch = 4096
                for r0 in range(0, tiles.shape[0], batch):
                    x = tiles[r0 : r0 + batch]
                    if round4:
                        chosen, grid = choose4(x, scheme, params, reconstruct, store)
                        grid_groups[0] += int(grid.sum())
                        grid_groups[1] += len(grid)
                    elif round3:
                        chosen, grid = choose3(x, scheme, params, reconstruct, store)
                        grid_groups[0] += int(grid.sum())
                        grid_groups[1] += len(grid)
                    else:
                        chosen = choose(x, scheme, params, reconstruct, store)
                    for v, (s, z) in chosen.items():
                        reconstruct(x, s, z, outs[v][r0 : r0 + batch])
                for v in variants:
                    recon[v][name] = torch.from_numpy(outs[v].reshape(rows, cols).copy())
                if round4:
                    r3_same[0] += int(np.array_equal(outs["r3"].reshape(rows, cols), check[name].numpy()))
                    r3_same[1] += 1
                quality.log(f"{model} {name} done")
    if round4:
        quality.log(f"{model}: r3 recomputed equals the CLI's hqq#r3 on {r3_same[0]} of {r3_same[1]} tensors")
    if round3 or round4:
        quality.log(f"{model}: {grid_groups[0]} of {grid_groups[1]} groups on a 4-bit grid")
    for v in variants:
        dst = quality.conv_path(model, SCHEME, f"{prefix}{v}")
        dst.parent.mkdir(parents=True, exist_ok=True)
        save_file(recon[v], str(dst))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="smollm2,gemma3,minilm")
    parser.add_argument("--round3", action="store_true", help="the round-3 variants (VARIANTS3)")
    parser.add_argument("--round4", action="store_true", help="the round-4 variants (VARIANTS4)")
    args = parser.parse_args()
    for model in args.models.split(","):
        run_model(model, args.round3, args.round4)


if __name__ == "__main__":
    main()
