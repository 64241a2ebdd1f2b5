"""The `expanded` observer: NVFP4 / MXFP4 group scales searched above the group's range as well as below
(range expansion). Pure numpy candidate sets; the search itself is observers.mse_microscale.

An FP4 (e2m1) element has the values 0, 0.5, 1, 1.5, 2, 3, 4, 6: min-max maps a group's amax onto 6, where
the grid's top step (4 -> 6) is coarse. A larger scale maps the amax below 6 and can reconstruct the
whole group better; a smaller one clips the group's largest elements. Per group, among the candidates
below, the stored scale code with the smallest squared error sum (w' - w)^2 over the group is kept; the
min-max code comes first and a candidate replaces the best only when it is smaller by more than
observers.MARGIN (relative), so the result is never worse than min-max in squared error. The candidates
are the stored codes themselves, so the e4m3 rounding of an NVFP4 group scale is part of the search.

- NVFP4: e4m3 codes min-max -3 .. +7 (`NVFP4_STEPS`). Positive e4m3 codes are ordered like their values,
  8 codes to an octave in the normal range, so +7 codes is about 1.8x the min-max scale and -3 about
  0.78x: the range llm-compressor's `nvfp4_expanded_mse` searches (1.8x down to 0.8x of the group range)
  on the stored grid. The global scale stays compressed-tensors' min-max one, so a group whose
  expanded scale would pass e4m3's 448 is capped there (the candidate repeats an earlier one).
- MXFP4: E8M0 exponents min-max +1 and -1 (`MXFP4_STEPS`): a power-of-two scale has no finer steps. The
  scheme refuses `expanded` for MXFP4: on the decoder evaluation pairs of bench/QUALITY.md it was worse
  than min-max (+1.9% .. +15.6%), on MiniLM better; the function stays for the bench.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from . import observers

NVFP4_STEPS: tuple[int, ...] = (0, -1, -2, -3, 1, 2, 3, 4, 5, 6, 7)
MXFP4_STEPS: tuple[int, ...] = (0, 1, -1)


def steps_for(scale_format: str) -> tuple[int, ...]:
    """The candidate code steps of a microscaling scale format (first 0, the min-max code)."""
    return NVFP4_STEPS if scale_format == "e4m3_global" else MXFP4_STEPS


def expanded_microscale(weight: np.ndarray, micro, minmax_codes: np.ndarray, global_scale: Optional[float] = None,
                        use_compiled: bool = False) -> "observers.MicroChoice":
    """The expanded choice of scale codes for a bf16 / fp16 / float32 [rows, cols] weight under a microscale.Microscale
    (`minmax_codes`: uint8 [rows, cols / group]; `global_scale`: NVFP4's, unchanged)."""
    return observers.mse_microscale(weight, micro, minmax_codes, global_scale, use_compiled=use_compiled,
                                    steps=steps_for(micro.scale_format))


# ---- the global scale of `expanded` (NVFP4) ------------------------------------------------------------
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
    """float64 [n]: per group (float64 [n, group]) the searched maximum t = amax * factor that minimises
    sum |w' - w|^exponent over the group, w' = sign(w) * e2m1(|w| / s) * s with s = t / 6 unrounded (nearest
    e2m1 value, ties to the smaller magnitude, clipped at 6); the first (largest) t of equal errors; 0 for
    an all-zero group."""
    groups = np.abs(np.asarray(groups, np.float64))
    amax = groups.max(axis=1)
    best_t = np.zeros(len(groups))
    best_err = np.full(len(groups), np.inf)
    live = amax > 0
    x, a = groups[live], amax[live]
    bt, be = best_t[live], best_err[live]
    for factor in search_factors():
        t = a * factor
        s = t / 6.0
        y = np.minimum(x / s[:, None], 6.0)
        d = _E2M1[np.searchsorted(_E2M1_MIDPOINTS, y, side="left")] * s[:, None] - x
        e = d * d if exponent == 2.0 else np.abs(d) ** exponent
        err = e[:, 0].copy()
        for j in range(1, e.shape[1]):  # in element order (the compiled kernel's order)
            err += e[:, j]
        better = err < be
        bt, be = np.where(better, t, bt), np.where(better, err, be)
    best_t[live] = bt
    return best_t


def searched_maximum(weight: np.ndarray, group: int = 16, exponent: float = 2.0, batch: int = 4096) -> float:
    """float64: the largest searched group maximum (group_searched_maxima) of a bf16 / fp16 / float32 [rows, cols]
    weight. Only groups whose amax * 1.8 exceeds the largest found so far can raise it, so groups are searched
    in order of decreasing amax and the rest skipped: the result is the maximum over every group."""
    if weight.size == 0:
        return 0.0
    tiles = np.ascontiguousarray(weight).reshape(-1, group)
    amax = np.abs(tiles).max(axis=1).astype(np.float64)
    top = amax * search_factors()[0]
    order = np.argsort(-amax, kind="stable")
    found, start, size = 0.0, 0, 16
    while start < len(order):
        idx = order[start : start + size]
        idx = idx[top[idx] > found]
        if not len(idx):
            break
        found = max(found, float(group_searched_maxima(tiles[idx].astype(np.float64), exponent).max()))
        start, size = start + size, min(size * 4, batch)
    return found
