"""Development harness for the mse observer's candidate sets (not CI, not the evaluation).

Evaluates observer variants on SmolLM2-135M in one process: the source model's next-token
log-probs on a DEVELOPMENT text are computed once; each variant's dequantized weights
(dequant(quant(w)) with the variant's scales, the observer's own reconstruction, which is the
kernels' arithmetic) are swapped into a float32 copy of the model and KL(source || variant) per
token is measured as in bench/quality.py. Used to choose candidate sets without looking at the
evaluation text (GPL-3):

    PYTHONPATH=$PWD python3 bench/observer_dev.py --text /usr/share/common-licenses/LGPL-2.1 \
        --variants int4:minmax,int4:shipped,...

A variant is scheme:name (see variant_recon). Experiments (bench/QUALITY.md, fourth round):
`+gP` after the name weights input column j's squared error by |gamma_j|^P, gamma the weight of the
RMSNorm before q/k/v_proj (input_layernorm) or gate/up_proj (post_attention_layernorm); o_proj and
down_proj stay unweighted. `nvfp4:` = NVFP4 with the shipped code steps and the global scale shared by
q/k/v and by gate/up (as fp8conv writes it), `nvfp4u:` the same with a per-tensor global scale.
Fifth round (INT4 group 64): `int4:fineN` = factors 1.000, 0.995, ..., 1 - N/100 (step 0.005);
`int4:bfN` = every bf16 scale from the stored 1 - N/100 shrink up to the min-max scale (each storable
value once, in descending order); `int4:lsN` = shrinkN, then per tile two least-squares refits of the
scale for the tile's codes (s = <w, q> / <q, q>, not below the stored 1 - N/100 shrink, rounded to
bf16, codes re-rounded), each kept only where it lowers the squared error; `int4:lsnN` = the same, but
both bf16 neighbours of the refit are tried. `@p` applies to fine / bf too. `llmc:minmax` /
`%M` (a smaller scale must lower the error by M%) and `~b` (each tile's error rounded to bf16
before it is compared, strict improvement: llm-compressor's CPU arithmetic) apply to shrink / fine.
`llmc:mse` = llm-compressor's INT4 group-64 output (its `memoryless_mse` for mse; data-free, so
quantized once, dequantized by `fp8conv dequantize --dtype fp32` and cached under
bench/out/observer_dev/), loaded instead of a reconstruction. Sixth round: `llmc-fp8:minmax` /
`llmc-fp8:mse` = the same for llm-compressor's FP8_BLOCK (e4m3, 128x128 blocks), to compare with
`fp8:minmax`, `fp8:shrink10` (the shipped FP8 mse) and `fp8:shrink10@pP`.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from fp8conv.numerics import observers  # noqa: E402
from fp8conv.numerics import microscale as ms  # noqa: E402
from fp8conv.numerics.kernels import _resolved  # noqa: E402
from fp8conv.plan.scheme import Scheme, microscale_scheme  # noqa: E402

SCHEMES = {
    "int4": lambda: Scheme(format="int4", granularity="group", group_size=64, scale_format="source"),
    "fp8": lambda: Scheme(format="fp8_e4m3", granularity="block", block_size=(128, 128)),
    "int8": lambda: Scheme(format="int8", granularity="channel"),
}
SHRINK = observers.SHRINK_FACTORS


def _lp_error(p: float, bf16_sum: bool = False):
    def errors(self, x, reconstruct, scale, zero, exponent):  # replaces observers._Scratch.errors
        import ml_dtypes

        n = x.shape[0]
        recon = self.recon[:n]
        reconstruct(x, scale, zero, recon)
        d = np.abs(recon.astype(np.float64) - x)
        e = (d ** p).sum(axis=1)
        # ~b: the tile's error rounded to bf16 before the comparison (llm-compressor's CPU path sums in bf16)
        e = e.astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float64) if bf16_sum else e
        return e, e
    return errors


def grid_recon(weight: np.ndarray, scheme, factors, p: float | None, margin: float = 0.0,
               bf16_sum: bool = False) -> np.ndarray:
    """float32 dequant(quant(weight)) with the observer's choice among `factors` (objective |d|^p;
    `margin`: relative improvement a smaller scale must bring, at least MARGIN)."""
    import ml_dtypes

    scheme = _resolved(scheme, np.dtype(ml_dtypes.bfloat16))
    rows, cols = weight.shape
    tr, tc = scheme.tile(rows, cols)
    params, reconstruct = observers.scheme_functions(scheme)
    tiles = observers.tiles_of(weight, (tr, tc))
    saved, saved_margin = observers._Scratch.errors, observers.MARGIN
    if p is not None or bf16_sum:
        observers._Scratch.errors = _lp_error(2.0 if p is None else p, bf16_sum)
    observers.MARGIN = max(margin, saved_margin) if not bf16_sum else 0.0
    try:
        choice = observers.mse(tiles, params, reconstruct, tuple(factors))
    finally:
        observers._Scratch.errors, observers.MARGIN = saved, saved_margin
    out = np.empty_like(tiles)
    for t0 in range(0, tiles.shape[0], 4096):
        part = slice(t0, t0 + 4096)
        reconstruct(tiles[part], choice.scale[part], None if choice.zero is None else choice.zero[part], out[part])
    gr, gc = -(-rows // tr), -(-cols // tc)
    full = out.reshape(gr, gc, tr, tc).transpose(0, 2, 1, 3).reshape(gr * tr, gc * tc)
    return np.ascontiguousarray(full[:rows, :cols])


def mx_recon(weight: np.ndarray, steps, p: float | None, element: str = "e2m1", margin: float = 0.0) -> np.ndarray:
    """MXFP4 (group 32, E8M0): the choice among min-max exponent + steps, objective |d|^p (2 if None)."""
    group = 32
    tiles = weight.reshape(-1, group)
    amax = np.abs(tiles).max(axis=1)
    first = ms.e8m0_from_amax(amax, ms.EMAX_E2M1 if element == "e2m1" else ms.EMAX_E4M3)
    table = observers._element_value_table(element)
    from fp8conv.formats.fastcast import round_to_odd_bf16

    def recon_of(codes):
        y = tiles * ms.e8m0_reciprocal(codes)[:, None]
        if element == "e4m3":
            y = np.clip(y, -ms.E4M3_MAX, ms.E4M3_MAX)
        return np.take(table, round_to_odd_bf16(y)) * ms.e8m0_decode(codes)[:, None]

    def err(r):
        d = np.abs(r.astype(np.float64) - tiles)
        return (d ** (p or 2.0)).sum(axis=1)

    best_codes = first.copy()
    best = err(recon_of(first))
    rounded_up = amax * ms.e8m0_reciprocal(first) < (4 if element == "e2m1" else 256)  # min-max leaves e2m1's 6 unused
    for step in steps:
        cand = np.clip(first.astype(np.int32) + (step if step != "rup" else -1), 0, 254).astype(np.uint8)
        if step == "rup":
            cand = np.where(rounded_up, cand, first)
        e = err(recon_of(cand))
        better = e < best * (1.0 - max(margin, observers.MARGIN))
        best = np.where(better, e, best)
        best_codes[better] = cand[better]
    return recon_of(best_codes).reshape(weight.shape).astype(np.float32)


def weighted_grid_recon(weight: np.ndarray, scheme, factors, column_weight: np.ndarray) -> np.ndarray:
    """float32 dequant(quant(weight)) choosing per tile among `factors` the scale with the least
    sum_j column_weight[j] * (w'_ij - w_ij)^2 (column j of the weight = input feature j)."""
    import ml_dtypes

    scheme = _resolved(scheme, np.dtype(ml_dtypes.bfloat16))
    rows, cols = weight.shape
    tr, tc = scheme.tile(rows, cols)
    params, reconstruct = observers.scheme_functions(scheme)
    tiles = observers.tiles_of(weight, (tr, tc))
    wt = observers.tiles_of(np.broadcast_to(column_weight.astype(np.float32)[None, :], weight.shape), (tr, tc))
    wt = wt.astype(np.float64)
    lo, hi = observers.tile_range(tiles)
    recon = np.empty_like(tiles)

    def err(scale, zero):
        reconstruct(tiles, scale, zero, recon)
        d = recon.astype(np.float64) - tiles
        return (wt * d * d).sum(axis=1)

    scale, zero = params(lo, hi)
    scale = np.array(scale, np.float32)
    zero = None if zero is None else np.array(zero, np.float32)
    best = err(scale, zero)
    for factor in factors[1:]:
        f = np.float32(factor)
        cs, cz = params(lo * f, hi * f)
        e = err(cs, cz)
        better = e < best * (1.0 - observers.MARGIN)
        best = np.where(better, e, best)
        scale[better] = cs[better]
        if zero is not None:
            zero[better] = cz[better]
    reconstruct(tiles, scale, zero, recon)
    gr, gc = -(-rows // tr), -(-cols // tc)
    full = recon.reshape(gr, gc, tr, tc).transpose(0, 2, 1, 3).reshape(gr * tr, gc * tc)
    return np.ascontiguousarray(full[:rows, :cols])


def nvfp4_recon(weight: np.ndarray, steps, column_weight: np.ndarray | None, amax: float | None = None) -> np.ndarray:
    """NVFP4 (group 16, e4m3 group scales under the min-max global scale of `amax`, the largest |w| over the
    weight's fused partners, default its own): per group the code among min-max + steps with the least
    (column-weighted) squared error."""
    import ml_dtypes
    from fp8conv.formats.fastcast import round_to_odd_bf16

    group = 16
    bf16 = np.dtype(ml_dtypes.bfloat16)
    gs = ms.nvfp4_global_scale(float(ms.tensor_amax(weight)) if amax is None else amax, bf16)
    first = ms.nvfp4_group_scales(ms.group_amax(weight, group), gs, bf16).reshape(-1)
    tiles = weight.reshape(-1, group)
    cw = np.ones(weight.shape[1], np.float64) if column_weight is None else column_weight.astype(np.float64)
    wt = np.broadcast_to(cw[None, :], weight.shape).reshape(-1, group)
    table = observers._element_value_table("e2m1")

    def recon_of(codes):
        d = observers.microscale_divisors(codes, "e4m3_global", gs)
        return np.take(table, round_to_odd_bf16(tiles / d[:, None])) * d[:, None]

    def err(codes):
        diff = recon_of(codes).astype(np.float64) - tiles
        return (wt * diff * diff).sum(axis=1)

    low, high = observers._CODE_LIMITS["e4m3_global"]
    best_codes = first.copy()
    best = err(first)
    for step in steps:
        cand = np.clip(first.astype(np.int32) + step, low, high).astype(np.uint8)
        e = err(cand)
        better = e < best * (1.0 - observers.MARGIN)
        best = np.where(better, e, best)
        best_codes[better] = cand[better]
    return recon_of(best_codes).reshape(weight.shape).astype(np.float32)


def _int4_setup(weight: np.ndarray):
    import ml_dtypes

    scheme = _resolved(SCHEMES["int4"](), np.dtype(ml_dtypes.bfloat16))
    rows, cols = weight.shape
    tile = scheme.tile(rows, cols)
    params, reconstruct = observers.scheme_functions(scheme)
    return scheme, tile, params, reconstruct, observers.tiles_of(weight, tile)


def _untile(recon: np.ndarray, shape, tile) -> np.ndarray:
    rows, cols = shape
    tr, tc = tile
    gr, gc = -(-rows // tr), -(-cols // tc)
    full = recon.reshape(gr, gc, tr, tc).transpose(0, 2, 1, 3).reshape(gr * tr, gc * tc)
    return np.ascontiguousarray(full[:rows, :cols])


def _tile_err(tiles, reconstruct, scale, p: float | None):
    recon = np.empty_like(tiles)
    reconstruct(tiles, scale, None, recon)
    d = np.abs(recon.astype(np.float64) - tiles)
    return d * d if p is None else d ** p, recon


def candidates_recon(weight: np.ndarray, cands: np.ndarray, p: float | None) -> np.ndarray:
    """INT4 group 64: per tile the candidate scale (float32 [K, n], row 0 = min-max, already stored
    values) with the least sum |d|^p (2 if None); a later one wins only when smaller by MARGIN."""
    scheme, tile, params, reconstruct, tiles = _int4_setup(weight)
    best = _tile_err(tiles, reconstruct, cands[0], p)[0].sum(axis=1)
    scale = cands[0].copy()
    for k in range(1, cands.shape[0]):
        e = _tile_err(tiles, reconstruct, cands[k], p)[0].sum(axis=1)
        better = e < best * (1.0 - observers.MARGIN)
        best = np.where(better, e, best)
        scale[better] = cands[k][better]
    recon = np.empty_like(tiles)
    reconstruct(tiles, scale, None, recon)
    return _untile(recon, weight.shape, tile)


def bf16_candidates(weight: np.ndarray, floor_factor: float) -> np.ndarray:
    """float32 [K, n]: the min-max scale, then every smaller bf16 value down to the stored shrink by
    floor_factor (rows past the floor repeat the min-max scale, which never wins)."""
    scheme, tile, params, reconstruct, tiles = _int4_setup(weight)
    lo, hi = observers.tile_range(tiles)
    smm = params(lo, hi)[0].astype(np.float32)
    floor = params(lo * np.float32(floor_factor), hi * np.float32(floor_factor))[0].astype(np.float32)
    bits = smm.view(np.uint32) >> np.uint32(16)
    rows = [smm]
    for k in range(1, 40):
        c = ((bits - np.uint32(k)) << np.uint32(16)).view(np.float32)
        rows.append(np.where((c >= floor) & (smm > 0), c, smm))
    return np.stack(rows)


def ls_recon(weight: np.ndarray, k: int, iterations: int, neighbours: bool) -> np.ndarray:
    """shrinkK's choice, then least-squares refits of each tile's scale for its codes (see docstring)."""
    import ml_dtypes

    scheme, tile, params, reconstruct, tiles = _int4_setup(weight)
    factors = tuple(round(1.0 - i / 100, 2) for i in range(k + 1))
    choice = observers.mse(tiles, params, reconstruct, factors)
    lo, hi = observers.tile_range(tiles)
    floor = params(lo * np.float32(factors[-1]), hi * np.float32(factors[-1]))[0].astype(np.float32)
    scale = choice.scale.astype(np.float32).copy()
    best = _tile_err(tiles, reconstruct, scale, None)[0].sum(axis=1)
    code_lo, code_hi = (np.float32(v) for v in scheme.code_range)
    for _ in range(iterations):
        q = np.clip(np.rint(tiles / scale[:, None]), code_lo, code_hi).astype(np.float64)
        num = (q * tiles.astype(np.float64)).sum(axis=1)
        den = (q * q).sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            ls = np.where(den > 0, num / np.where(den > 0, den, 1.0), scale)
        ls = np.maximum(ls, floor.astype(np.float64)).astype(np.float32)
        rounded = ls.astype(ml_dtypes.bfloat16).astype(np.float32)
        cands = [rounded]
        if neighbours:
            b = ls.view(np.uint32) >> np.uint32(16)
            down = (b << np.uint32(16)).view(np.float32)  # truncation: the bf16 value at or below
            up = ((b + np.uint32(1)) << np.uint32(16)).view(np.float32)
            cands = [np.maximum(down, floor), up]
        for c in cands:
            c = np.where(hi - lo > 0, c, scale)
            e = _tile_err(tiles, reconstruct, c, None)[0].sum(axis=1)
            better = e < best * (1.0 - observers.MARGIN)
            best = np.where(better, e, best)
            scale = np.where(better, c, scale)
    recon = np.empty_like(tiles)
    reconstruct(tiles, scale, None, recon)
    return _untile(recon, weight.shape, tile)


_LOADED: dict[str, dict] = {}


LLMC_SCHEMES = {"llmc": "int4-group", "llmc-fp8": "fp8-block"}  # variant prefix -> bench/quality.py scheme


def llmc_weights(observer: str, src: Path, scheme: str = "int4-group") -> dict:
    """llm-compressor's output for `scheme` (bench/quality.py's name: int4-group = INT4 group 64,
    fp8-block = FP8_BLOCK, e4m3 128x128) dequantized to float32, built once per (scheme, observer) and cached."""
    key = f"{scheme}-{observer}"
    if key in _LOADED:
        return _LOADED[key]
    import quality
    from safetensors.numpy import load_file

    base = ROOT / "bench" / "out" / "observer_dev"
    qdir, ddir = base / f"llmc-{key}", base / f"llmc-{key}-deq"
    if not (ddir / "model.safetensors").exists():
        probe = base / f"modules-probe-{scheme}"
        quality.fp8conv_quantize(src, probe, scheme, "minmax")
        modules = quality.quantized_modules(probe)
        t0 = time.time()
        quality.llmc_quantize(src, qdir, scheme, observer, modules)
        print(f"llm-compressor {scheme} {observer}: {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
        quality.dequantize(qdir, ddir)
    _LOADED[key] = load_file(str(ddir / "model.safetensors"))
    return _LOADED[key]


def variant_recon(spec: str, weight: np.ndarray, gamma: np.ndarray | None = None,
                  amax: float | None = None) -> np.ndarray:
    """`gamma`: the preceding RMSNorm's weight of this Linear's input (None: no known norm).
    Suffix +gP weights input column j's squared error by |gamma_j|^P (unweighted where gamma is None)."""
    scheme_name, name = spec.split(":")
    column_weight = None
    if "+g" in name:
        name, ptext = name.split("+g")
        if gamma is not None:
            column_weight = np.abs(gamma.astype(np.float64)) ** float(ptext)
    if scheme_name in ("nvfp4", "nvfp4u"):  # nvfp4: global scale shared by q/k/v and gate/up; nvfp4u: per tensor
        steps = {"minmax": (), "shipped": observers.NVFP4_CODE_STEPS[1:]}[name]
        return nvfp4_recon(weight, steps, column_weight, amax if scheme_name == "nvfp4" else None)
    p = None
    if "@p" in name:
        name, ptext = name.split("@p")
        p = float(ptext)
    margin = 0.0
    if "%" in name:
        name, mtext = name.split("%")
        margin = float(mtext) / 100
    bf16_sum = name.endswith("~b")
    name = name.removesuffix("~b")
    if scheme_name in ("mx", "mx8"):
        steps = {"minmax": (), "shipped": (-1, 1), "up": (1,), "up2": (1, 2), "rup": ("rup",), "rupup": ("rup", 1)}[name]
        return mx_recon(weight, steps, p, "e2m1" if scheme_name == "mx" else "e4m3", margin)
    if scheme_name == "int4" and name.startswith(("fine", "bf", "lsn", "ls")):
        if name.startswith("fine"):  # fineN: 1.000, 0.995, ..., 1 - N/100
            k = int(name[4:])
            factors = tuple(round(1.0 - i / 200, 3) for i in range(2 * k + 1))
            return grid_recon(weight, SCHEMES["int4"](), factors, p, margin, bf16_sum)
        if name.startswith("bf"):
            return candidates_recon(weight, bf16_candidates(weight, round(1.0 - int(name[2:]) / 100, 2)), p)
        if name.startswith("lsn"):
            return ls_recon(weight, int(name[3:]), 2, True)
        return ls_recon(weight, int(name[2:]), 2, False)
    scheme = SCHEMES[scheme_name]()
    if name == "minmax":
        factors = (1.0,)
    elif name == "shipped":
        factors = SHRINK
    elif name.startswith("shrink"):  # shrinkN: 1.00 .. 1-N/100
        k = int(name[6:])
        factors = tuple(round(1.0 - i / 100, 2) for i in range(k + 1))
    elif name.startswith("exp"):  # expK_N: shrink to N, plus expansion up to 1+K/100 by 0.01
        a, b = name[3:].split("_")
        factors = tuple(round(1.0 - i / 100, 2) for i in range(int(b) + 1)) + tuple(
            round(1.0 + i / 100, 2) for i in range(1, int(a) + 1))
    elif name.startswith("int4q"):  # qmax-aware: also amax/7 (7.5/7) and shrink to N
        k = int(name[5:])
        factors = tuple(round(1.0 - i / 100, 2) for i in range(k + 1)) + (7.5 / 7,)
    else:
        raise SystemExit(f"unknown variant {spec}")
    if column_weight is not None:
        return weighted_grid_recon(weight, scheme, factors, column_weight)
    return grid_recon(weight, scheme, factors, p, margin, bf16_sum)


def main() -> None:
    import torch
    from quality import DecoderEval, smollm2_source

    parser = argparse.ArgumentParser()
    parser.add_argument("--text", type=Path, required=True)
    parser.add_argument("--variants", required=True)
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "out" / "observer_dev.json")
    args = parser.parse_args()
    if args.text.resolve() == Path("/usr/share/common-licenses/GPL-3").resolve():
        raise SystemExit("GPL-3 is the evaluation text: develop on another one")
    torch.set_num_threads(2)
    src = smollm2_source()
    ev = DecoderEval(src, args.text)
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    params = {n: p for n, p in ev.model.named_parameters() if n.endswith(".weight") and n.split(".")[-2] in targets}
    source = {n: p.detach().clone() for n, p in params.items()}
    modules = {n[: -len(".weight")] for n in params}
    named = dict(ev.model.named_parameters())
    norm_of = {"q_proj": "input_layernorm", "k_proj": "input_layernorm", "v_proj": "input_layernorm",
               "gate_proj": "post_attention_layernorm", "up_proj": "post_attention_layernorm"}

    def gamma_of(name):  # model.layers.N.self_attn.q_proj.weight -> model.layers.N.input_layernorm.weight
        parts = name.split(".")
        if parts[-2] not in norm_of:
            return None
        return named[".".join(parts[:3] + [norm_of[parts[-2]], "weight"])].detach().float().numpy()

    fused_amax = {}  # fp8conv fuses the NVFP4 global scale of q/k/v and of gate/up (one amax per set)
    for n in params:
        parts = n.split(".")
        key = (".".join(parts[:4]), norm_of.get(parts[-2], parts[-2]))
        fused_amax[key] = max(fused_amax.get(key, 0.0), float(source[n].abs().max()))

    def amax_of(name):
        parts = name.split(".")
        return fused_amax[(".".join(parts[:4]), norm_of.get(parts[-2], parts[-2]))]
    results = json.loads(args.json.read_text()) if args.json.exists() else []
    for spec in args.variants.split(","):
        t0 = time.time()
        prefix, name = spec.split(":")
        loaded = llmc_weights(name, src, LLMC_SCHEMES[prefix]) if prefix in LLMC_SCHEMES else None
        for n, p in params.items():
            if loaded is not None:
                p.data.copy_(torch.from_numpy(loaded[n]))
                continue
            w = source[n].numpy()
            p.data.copy_(torch.from_numpy(variant_recon(spec, w, gamma_of(n), amax_of(n))))
        tq = time.time() - t0
        metrics = _evaluate(ev, modules, source)
        row = {"text": args.text.name, "variant": spec, "quantize_s": round(tq, 1), **metrics}
        print(json.dumps(row), flush=True)
        results.append(row)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
        for n, p in params.items():
            p.data.copy_(source[n])


def _evaluate(ev, modules, source) -> dict:
    import torch

    kl = nll = agree = count = 0.0
    for window, ref in zip(ev.windows, ev.ref_logp):
        logp = ev._logp(ev.model, window)
        kl += float((ref.exp() * (ref - logp)).sum(dtype=torch.float64))
        nll -= float(logp.gather(1, window[1:, None]).sum(dtype=torch.float64))
        agree += float((ref.argmax(-1) == logp.argmax(-1)).sum())
        count += ref.shape[0]
    num = den = 0.0
    for name, param in ev.model.named_parameters():
        if name in source:
            w = source[name].double()
            num += float(((param.detach().double() - w) ** 2).sum())
            den += float((w ** 2).sum())
    return {"kl": kl / count, "ppl": float(np.exp(nll / count)), "top1": agree / count,
            "weight_rel_rms": (num / den) ** 0.5}


if __name__ == "__main__":
    main()
