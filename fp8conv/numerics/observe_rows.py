"""The mse observer of tiles along a row (group, channel) by the compiled kernels, read straight from a bf16 / fp16 /
float32 weight: no float32 copy of the weight, ranges by native.tile_range, the search by native.mse_search; the
same GridChoice as observers.mse_grid, bit for bit."""
from __future__ import annotations

from functools import lru_cache
from typing import Optional

import numpy as np

from ..accel import native
from .observers import (MARGIN, GridChoice, candidate_params, compiled_choice, exponent_for, factors_for,
                        scheme_functions)

@lru_cache(maxsize=8)
def _amax_candidates(scheme, dtype_name: str) -> np.ndarray:
    """float32 [65536, len(factors_for(scheme))] (a tile's candidates in one cache line): the candidate scales
    (params of the range -a .. a shrunk by each factor, `candidate_params`) of a symmetric scheme's tile whose
    max |x| is a = the bf16 / fp16 value of each bit pattern (its magnitude; NaN / Inf patterns as 0: never looked
    up). params is elementwise, so a look-up is the tile's own candidates, bit for bit."""
    patterns = np.arange(1 << 16, dtype=np.uint32)
    if dtype_name == "bfloat16":
        values = (patterns << 16).view(np.float32)
    else:
        values = patterns.astype(np.uint16).view(np.float16).astype(np.float32)
    values = np.where(np.isfinite(values), np.abs(values), np.float32(0))
    params, _ = scheme_functions(scheme)
    scale, _ = params(-values, values)
    table = candidate_params(-values, values, params, factors_for(scheme), np.array(scale, np.float32), None)[0]
    return np.ascontiguousarray(table.T)


def mse_grid(weight: np.ndarray, scheme) -> Optional[GridChoice]:
    """observers.mse_grid of a 2-D bf16 / fp16 / float32 weight by the compiled kernels, read straight from the
    weight, for tiles along a row (group, channel): the ranges by native.tile_range, the candidates by observers'
    params, the search by native.mse_search (a 16-bit weight's symmetric tiles: ranges and candidates by max |x| in
    the kernel, from _amax_candidates). The same GridChoice, bit for bit (the ranges: observers.tile_range's values;
    the sign of a zero minimum never reaches a scale or zero point, docs/numerics.md). None where the tiles span
    rows, the dtype is another, or the weight holds NaN / Inf: observers.mse_grid then runs."""
    rows, cols = weight.shape
    tile = scheme.tile(rows, cols)
    if tile[0] != 1 or not weight.size or native.source(weight) is None:
        return None
    grid = scheme.scale_grid(rows, cols)
    n = grid[0] * grid[1]
    index = np.zeros(n, np.int32)
    sums = np.zeros((4, n), np.float64)
    exponent = exponent_for(scheme)
    if scheme.symmetric and weight.dtype.name in ("bfloat16", "float16"):
        # A 16-bit weight's max |x| is one of 65536 values: the candidates of every value, computed once by params,
        # and the kernel takes each tile's row of them (keys: its max |x| bit pattern), ranges and all.
        table = _amax_candidates(scheme, weight.dtype.name)
        keys = np.empty(n, np.uint16)
        if not native.mse_search(weight, tile[1], table, table, False, scheme.fmt, scheme.code_range, MARGIN,
                                 exponent, index, sums, keys):
            return None
        return GridChoice(table[keys, index].reshape(grid), None, float(sums[1].sum()), float(sums[3].sum()))
    ranges = native.tile_range(weight, tile, not scheme.symmetric)
    if ranges is None:
        return None
    lo, hi = ranges
    hi = hi.reshape(-1)
    lo = -hi if lo is None else lo.reshape(-1)  # symmetric: params reads max(-lo, hi) = max |x|
    params, _ = scheme_functions(scheme)
    scale, zero = params(lo, hi)
    cand_scales, cand_zeros = candidate_params(lo, hi, params, factors_for(scheme), scale, zero)
    if not native.mse_search(weight, tile[1], cand_scales, cand_zeros, zero is not None, scheme.fmt, scheme.code_range,
                             MARGIN, exponent, index, sums):
        return None
    choice = compiled_choice(cand_scales, cand_zeros, zero is not None, index, sums, exponent)
    zero = None if choice.zero is None else choice.zero.reshape(grid)
    return GridChoice(choice.scale.reshape(grid), zero, float(choice.error.sum()), float(choice.minmax_error.sum()))
