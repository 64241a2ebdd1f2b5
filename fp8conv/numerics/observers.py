"""Scale observers: how the scale (and zero point) of each tile is chosen. Pure numpy, no I/O.

Tiles arrive as a float32 `(n_tiles, tile_elems)` view (zero padding contributes no error).

- `minmax` (the default everywhere): the scale comes from the tile's range, e.g. amax / qmax.
- `mse`: for each tile, among the documented candidates below, the scale (and zero point) whose
  reconstruction has the smallest error  sum(|dequant(quant(x)) - x|^P)  over the tile, P =
  `exponent_for(scheme)`: **P = 3 for INT4** (`INT4_EXPONENT`), **P = 4 for FP8 e4m3 with block
  granularity** (`FP8_BLOCK_EXPONENT`), P = 2 (the squared error) for every other grid scheme (FP8 e4m3
  channel / group, FP8 e5m2, INT8). INT4 and FP8 e4m3 block are therefore not squared-error searches (why: the
  measurements in bench/QUALITY.md, "Why the mse observer is built this way"); the report still shows the
  squared (RMS) error of the chosen and the min-max scales, which for those two can be larger than
  min-max's.
  Candidates are the min-max range shrunk by `factors` (`SHRINK_FACTORS`: 1.00, 0.99, ..., 0.90);
  each shrunk range goes through the same scale function as min-max, so the stored rounding of the
  scale (bf16, fp16, e4m3) is applied to every candidate before it is evaluated, and asymmetric
  schemes get the zero point of the shrunk range. Factor 1.0 comes first and is the min-max scale
  itself, so `mse` is never worse than min-max on its objective: a candidate replaces the best one
  only when its error is smaller by more than `MARGIN` (relative; errors are summed in float64 from
  exact float32 differences d, d^2 exact, |d|^3 = d^2 * |d| and d^4 = d^2 * d^2 rounded once, so this is
  far above their rounding). Ties keep the larger scale. Deterministic: the same input gives the same scales on every
  path and for any chunking into tiles.
  Why the shrink stops at 0.90: the same section of bench/QUALITY.md.
- Scales stored as powers of two (E8M0: MXFP4, MXFP8) keep the min-max exponent (`E8M0_FACTORS`,
  `E8M0_CODE_STEPS`), so `mse` writes min-max's scales there. One exponent up never lowers the squared
  error (min-max maps a group's amax below e2m1's 7 / e4m3's 448, and within that range the coarser
  grid is a subset of min-max's); one exponent down does in some groups, by clipping their largest
  elements (an MXFP4 amax lands on 7 .. 14, stored as 6), which raised MXFP4's KL on a development text
  (bench/QUALITY.md, same section).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Optional

import numpy as np

from ..accel import native
from ..formats import FORMATS, SCALE_FORMATS
from ..formats.fp8 import FP8_BLOCK_EXPONENT, FP8E4M3  # noqa: F401  (FP8_BLOCK_EXPONENT re-exported)
from ..formats.integer import INT4_EXPONENT  # noqa: F401  (re-exported)
from ..formats.fastcast import bf16_to_value_table, round_to_odd_bf16
from . import microscale as ms
from .microscale import e8m0_reciprocal
from .lanes import LANES, lane_sums
from .reconstruct import compiled_search_for, float_rounder, scheme_functions  # noqa: F401  (re-exported)

SHRINK_FACTORS: tuple[float, ...] = tuple(round(1.0 - k / 100, 2) for k in range(11))  # 1.00 ... 0.90
E8M0_FACTORS: tuple[float, ...] = (1.0,)  # the min-max exponent only (module docstring)
MARGIN = 2.0 ** -20
EXPONENTS = (2, 3, 4)  # the error exponents the search evaluates (module docstring)
# Elements per batch of tiles: the working set of one candidate stays in the CPU's L2 cache.
BATCH_ELEMENTS = 1 << 16

# params(lo, hi) -> (scale, zero point or None), float32 [n]; the scale already rounded as stored.
ParamsFn = Callable[[np.ndarray, np.ndarray], "tuple[np.ndarray, Optional[np.ndarray]]"]
# reconstruct(tiles, scale, zero, out): out[n, m] = dequant(quant(tiles)) in float32.
ReconstructFn = Callable[[np.ndarray, np.ndarray, "Optional[np.ndarray]", np.ndarray], None]


@dataclass
class Choice:
    """Per tile: chosen scale and zero point, index into the factors, the squared errors (float64) with
    it and with min-max, and the objective (sum |error|^exponent) with it and with min-max (the same
    arrays as the squared errors' when the exponent is 2)."""

    scale: np.ndarray
    zero: Optional[np.ndarray]
    factor_index: np.ndarray
    error: np.ndarray
    minmax_error: np.ndarray
    objective: Optional[np.ndarray] = None
    minmax_objective: Optional[np.ndarray] = None

    def __post_init__(self) -> None:
        if self.objective is None:
            self.objective, self.minmax_objective = self.error, self.minmax_error


def tile_range(tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-tile (min, max) of a float32 [n, m] array, as float32 [n] each."""
    return tiles.min(axis=1), tiles.max(axis=1)


class _Scratch:
    """Buffers for one batch of tiles, reused for every candidate."""

    def __init__(self, rows: int, cols: int) -> None:
        self.recon = np.empty((rows, cols), np.float32)
        self.wide = np.empty((rows, cols), np.float64)
        self.power = np.empty((rows, cols), np.float64)

    def errors(self, x: np.ndarray, reconstruct: "ReconstructFn", scale: np.ndarray,
               zero: Optional[np.ndarray], exponent: int) -> "tuple[np.ndarray, np.ndarray]":
        """float64 [n] each: per tile, the objective sum |d|^exponent and the squared error sum d^2,
        d = reconstruction - x.

        The float32 difference is exact here (Sterbenz: the reconstruction is within a factor of 2 of x
        or zero) and its square is exact in float64; |d|^3 is computed as d^2 * |d| and d^4 as d^2 * d^2
        (one float64 rounding per element), so the sums carry only float64 rounding."""
        n = x.shape[0]
        recon, wide = self.recon[:n], self.wide[:n]
        reconstruct(x, scale, zero, recon)
        np.subtract(recon, x, out=recon)
        np.copyto(wide, recon)
        if exponent == 2:
            np.square(wide, out=wide)
            squared = lane_sums(wide)
            return squared, squared
        power = self.power[:n]
        if exponent == 4:
            np.square(wide, out=wide)
            np.multiply(wide, wide, out=power)
            return lane_sums(power), lane_sums(wide)
        np.abs(wide, out=power)
        np.square(wide, out=wide)
        power *= wide
        return lane_sums(power), lane_sums(wide)


def minmax(tiles: np.ndarray, params: ParamsFn, reconstruct: ReconstructFn) -> Choice:
    """The min-max scale of every tile, with its error (for the report's comparison)."""
    return mse(tiles, params, reconstruct, factors=(1.0,))


def mse(tiles: np.ndarray, params: ParamsFn, reconstruct: ReconstructFn,
        factors: tuple[float, ...] = SHRINK_FACTORS, batch_elements: int = BATCH_ELEMENTS,
        compiled_search: "Optional[Callable[..., None]]" = None, exponent: int = 2) -> Choice:
    """Per tile of a float32 [n, m] array, the candidate scale with the smallest sum |error|^exponent
    (2: squared error; 3: `exponent_for` INT4; 4: `exponent_for` FP8 e4m3 block).

    `compiled_search` (`compiled_search_for`): the compiled evaluation of the same candidates, used
    when given; it returns the same choices and error sums as the numpy loop, bit for bit."""
    if not factors or factors[0] != 1.0:
        raise ValueError("the first factor must be 1.0 (the min-max scale)")
    if exponent not in EXPONENTS:
        raise ValueError(f"error exponent {exponent}: one of {EXPONENTS}")
    n, m = tiles.shape
    lo, hi = tile_range(tiles) if n else (np.zeros(0, np.float32), np.zeros(0, np.float32))
    if m % LANES:  # zero columns add no error (0 reconstructs as 0 with any scale and integer zero point)
        tiles = np.concatenate([tiles, np.zeros((n, LANES - m % LANES), np.float32)], axis=1)
        m = tiles.shape[1]
    scale, zero = params(lo, hi)
    scale = np.array(scale, np.float32)
    zero = None if zero is None else np.array(zero, np.float32)
    if compiled_search is not None and n:
        return _mse_compiled(tiles, lo, hi, params, factors, compiled_search, scale, zero, exponent)
    index = np.zeros(n, np.int32)
    error = np.zeros(n, np.float64)
    minmax_error = np.zeros(n, np.float64)
    objective = error if exponent == 2 else np.zeros(n, np.float64)
    minmax_objective = minmax_error if exponent == 2 else np.zeros(n, np.float64)
    batch = max(1, batch_elements // max(m, 1))
    work = _Scratch(min(batch, n), m)
    for t0 in range(0, n, batch):
        part = slice(t0, min(n, t0 + batch))
        x = tiles[part]
        best, best_sq = work.errors(x, reconstruct, scale[part], None if zero is None else zero[part], exponent)
        minmax_objective[part], minmax_error[part] = best, best_sq
        for k, factor in enumerate(factors[1:], start=1):
            f = np.float32(factor)
            cand_scale, cand_zero = params(lo[part] * f, hi[part] * f)
            err, sq = work.errors(x, reconstruct, cand_scale, cand_zero, exponent)
            better = err < best * (1.0 - MARGIN)
            if better.any():
                best = np.where(better, err, best)
                best_sq = np.where(better, sq, best_sq)
                index[part][better] = k
                scale[part][better] = cand_scale[better]
                if zero is not None:
                    zero[part][better] = cand_zero[better]
        objective[part], error[part] = best, best_sq
    return Choice(scale, zero, index, error, minmax_error, objective, minmax_objective)


def candidate_params(lo, hi, params, factors, scale, zero) -> "tuple[np.ndarray, np.ndarray]":
    """float32 [len(factors), n] scales and zero points (0 where symmetric) of every candidate, factor 1.0's
    (`scale`, `zero`) first."""
    n = scale.shape[0]
    cand_scales = np.empty((len(factors), n), np.float32)
    cand_zeros = np.zeros((len(factors), n), np.float32)
    cand_scales[0] = scale
    if zero is not None:
        cand_zeros[0] = zero
    for k, factor in enumerate(factors[1:], start=1):
        f = np.float32(factor)
        cand_scales[k], cand_zero = params(lo * f, hi * f)
        if cand_zero is not None:
            cand_zeros[k] = cand_zero
    return cand_scales, cand_zeros


def compiled_choice(cand_scales, cand_zeros, has_zero: bool, index, sums, exponent: int) -> Choice:
    """The Choice of the compiled search's index and sums (float64 [4, n]: objective, squared error; min-max's)."""
    n = index.shape[0]
    chosen = cand_scales[index, np.arange(n)]
    chosen_zero = cand_zeros[index, np.arange(n)] if has_zero else None
    if exponent == 2:
        return Choice(chosen, chosen_zero, index, sums[1], sums[3])
    return Choice(chosen, chosen_zero, index, sums[1], sums[3], sums[0], sums[2])


def _mse_compiled(tiles, lo, hi, params, factors, compiled_search, scale, zero, exponent) -> Choice:
    cand_scales, cand_zeros = candidate_params(lo, hi, params, factors, scale, zero)
    n = tiles.shape[0]
    index = np.zeros(n, np.int32)
    sums = np.zeros((4, n), np.float64)  # objective, squared error; min-max's objective, squared error
    compiled_search(np.ascontiguousarray(tiles), cand_scales, cand_zeros, zero is not None, MARGIN, exponent, index,
                    sums)
    return compiled_choice(cand_scales, cand_zeros, zero is not None, index, sums, exponent)


# -- a scheme's error exponent and candidates (its params and reconstruct: numerics/reconstruct.py) --

def exponent_for(scheme) -> int:
    """The error exponent of a scheme's search: INT4_EXPONENT for 4-bit integers, FP8_BLOCK_EXPONENT for
    FP8 e4m3 with block granularity (the one FP8 scheme measured), else 2 (squared error)."""
    return scheme.fmt.mse_exponent(scheme.granularity)


def factors_for(scheme) -> tuple[float, ...]:
    """The candidate set of a scheme: the min-max exponent for power-of-two (E8M0) scales, else SHRINK_FACTORS."""
    power_of_two = scheme.scale_format in SCALE_FORMATS and SCALE_FORMATS[scheme.scale_format].power_of_two
    return E8M0_FACTORS if power_of_two else SHRINK_FACTORS


def tiles_of(weight: np.ndarray, tile: tuple[int, int]) -> np.ndarray:
    """float32 [grid_rows * grid_cols, tile_rows * tile_cols]: tiles in row-major grid order, zero-padded."""
    rows, cols = weight.shape
    tr, tc = tile
    gr, gc = -(-rows // tr), -(-cols // tc)
    if tr == 1 and cols % tc == 0:  # channel, or groups that divide: a view, no copy
        return np.ascontiguousarray(weight, np.float32).reshape(rows * gc, tc)
    padded = np.zeros((gr * tr, gc * tc), np.float32)
    padded[:rows, :cols] = weight
    return padded.reshape(gr, tr, gc, tc).transpose(0, 2, 1, 3).reshape(gr * gc, tr * tc)


@dataclass
class GridChoice:
    """mse scales (and zero points) as 2-D grids, and the weight's squared error with them / with min-max."""

    scale: np.ndarray
    zero: Optional[np.ndarray]
    error: float
    minmax_error: float


def mse_grid(weight: np.ndarray, scheme, use_compiled: bool = False) -> GridChoice:
    """The mse choice for a finite float32 2-D weight under a resolved scheme.Scheme (block, channel or
    group granularity); the candidates evaluated by the compiled kernel when `use_compiled` (same result)."""
    rows, cols = weight.shape
    params, reconstruct = scheme_functions(scheme)
    search = compiled_search_for(scheme) if use_compiled else None
    choice = mse(tiles_of(weight, scheme.tile(rows, cols)), params, reconstruct, factors_for(scheme),
                 compiled_search=search, exponent=exponent_for(scheme))
    grid = scheme.scale_grid(rows, cols)
    zero = None if choice.zero is None else choice.zero.reshape(grid)
    return GridChoice(choice.scale.reshape(grid), zero, float(choice.error.sum()), float(choice.minmax_error.sum()))


# -- microscaled formats (NVFP4, MXFP4, MXFP8) -----------------------------------------------------
# Their scales are codes (e4m3 under a float32 global scale, or E8M0 exponents), so the candidates are
# codes next to the min-max one: the search runs on exactly what is stored, the e4m3 rounding of an
# NVFP4 group scale included. The global scale is the min-max one (compressed-tensors' rule) and is
# never changed. Steps are in code units; the codes of positive e4m3 values are ordered like the
# values (1 = 2^-9 ... 126 = 448), and so are E8M0's (0 = 2^-127 ... 254 = 2^127).
# NVFP4: two codes below min-max and six above (e4m3 steps are 1/16 to 1/8 of the value, so up to
# 1.375-1.75x): a group scale that maps the amax to 4 instead of 6 often reconstructs a group of 16
# better, since e2m1's top step (4 -> 6) is coarse. The range was fixed on weight error alone (the
# squared error of all-MiniLM-L6-v2's and random Gaussian / Student-t weights: codes -4 .. +8 gain
# nothing over -2 .. +6; -3, -4, +7, +8 are almost never chosen), never on a model's outputs.
NVFP4_CODE_STEPS: tuple[int, ...] = (0, -1, -2, 1, 2, 3, 4, 5, 6)
E8M0_CODE_STEPS: tuple[int, ...] = (0,)  # the min-max exponent only (module docstring: -1 raised KL)


@dataclass
class MicroChoice:
    """Per group (row-major [rows, cols / group]): the chosen scale codes and the squared errors (float64)."""

    codes: np.ndarray
    error: np.ndarray
    minmax_error: np.ndarray


def code_steps_for(scale_format: str) -> tuple[int, ...]:
    """The documented candidate steps of a microscaling scale format."""
    return NVFP4_CODE_STEPS if SCALE_FORMATS[scale_format].global_scale else E8M0_CODE_STEPS


def microscale_candidates(minmax_codes: np.ndarray, scale_format: str,
                          steps: Optional[tuple[int, ...]] = None) -> list[np.ndarray]:
    """uint8 codes of every candidate, in search order: min-max code + step (`steps`, first 0; default
    code_steps_for), clamped to the positive codes (a clamped candidate repeats an earlier one and never wins)."""
    low, high = SCALE_FORMATS[scale_format].code_limits
    wide = minmax_codes.astype(np.int32)
    steps = code_steps_for(scale_format) if steps is None else steps
    if steps[0] != 0:
        raise ValueError("the first step must be 0 (the min-max code)")
    return [np.clip(wide + step, low, high).astype(np.uint8) for step in steps]


@lru_cache(maxsize=None)
def _element_value_table(element: str) -> np.ndarray:
    """float32[65536]: the element value (e2m1 or e4m3) nearest to every bf16 pattern (RNE), indexed by
    the round-to-odd bf16 pattern of a float32 (fastcast.round_to_odd_bf16); e4m3 inputs clamped first."""

    if element == "e2m1":
        return np.take(ms.e2m1_values(), ms._bf16_to_e2m1())
    return bf16_to_value_table(FORMATS[FP8E4M3.name])


def microscale_divisors(codes: np.ndarray, scale_format: str, global_scale: Optional[float]) -> np.ndarray:
    """float32 value each group's elements are divided by, as the kernels compute it."""

    return SCALE_FORMATS[scale_format].values(codes, global_scale)


def microscale_errors(tiles: np.ndarray, codes: np.ndarray, scale_format: str, element: str,
                      global_scale: Optional[float]) -> np.ndarray:
    """float64 [n]: per group (float32 [n, group]), sum over its elements in order of (w' - w)^2.

    w' = element(w / d) * d with d the group's divisor; NVFP4 divides in float32 (as its kernel),
    MX multiplies by 2^(127 - code) (exact); e4m3 elements are clamped to +-448 first. Each difference
    is taken in float64 (exact) and squared there; the group's sum runs over its elements in order."""

    d = microscale_divisors(codes, scale_format, global_scale)
    if SCALE_FORMATS[scale_format].power_of_two:
        y = tiles * ms.e8m0_reciprocal(codes)[:, None]
    else:
        y = tiles / d[:, None]
    if element == "e4m3":
        np.clip(y, -ms.E4M3_MAX, ms.E4M3_MAX, out=y)
    recon = np.take(_element_value_table(element), round_to_odd_bf16(y))
    recon *= d[:, None]
    diff = recon.astype(np.float64)
    diff -= tiles
    diff *= diff
    total = diff[:, 0].copy()
    for j in range(1, diff.shape[1]):
        total += diff[:, j]
    return total


def mse_microscale(weight: np.ndarray, micro, minmax_codes: Optional[np.ndarray], global_scale: Optional[float] = None,
                   batch_elements: int = BATCH_ELEMENTS, use_compiled: bool = False,
                   steps: Optional[tuple[int, ...]] = None, minmax_rule: Optional[tuple] = None) -> Optional[MicroChoice]:
    """mse scale codes of a bf16 / fp16 / float32 [rows, cols] weight under a microscale.Microscale
    (`minmax_codes`: uint8 [rows, cols / group], what min-max stores; `global_scale`: NVFP4's, unchanged;
    `steps`: the candidate code steps, default code_steps_for). With `use_compiled`, the compiled kernel
    searches every group in one pass (native.micro_search; the same result, bit for bit). `minmax_codes` None
    (with use_compiled and native.micro_search's `minmax_rule`): the kernel makes them in the same pass; None
    where it cannot (NaN / Inf, no kernel), and the caller starts again from the codes."""
    group = micro.group
    element = micro.codec.short_name
    steps = code_steps_for(micro.scale_format) if steps is None else tuple(steps)
    shape = (weight.shape[0], weight.shape[1] // group) if minmax_codes is None else minmax_codes.shape
    if use_compiled and weight.size and native.source(weight) is not None:
        found = _mse_microscale_compiled(weight, micro, minmax_codes, global_scale, steps, minmax_rule)
        if found is not None:
            codes, error, minmax_error = found
            return MicroChoice(codes.reshape(shape), error.reshape(shape), minmax_error.reshape(shape))
    if minmax_codes is None:
        return None
    tiles = ms.load_float32(np.ascontiguousarray(weight)).reshape(-1, group)
    first = np.ascontiguousarray(minmax_codes, np.uint8).reshape(-1)
    n = tiles.shape[0]
    codes = first.copy()
    error = np.zeros(n, np.float64)
    minmax_error = np.zeros(n, np.float64)
    batch = max(1, batch_elements // group)
    for t0 in range(0, n, batch):
        part = slice(t0, min(n, t0 + batch))
        x = tiles[part]
        candidates = microscale_candidates(first[part], micro.scale_format, steps)
        best = microscale_errors(x, candidates[0], micro.scale_format, element, global_scale)
        minmax_error[part] = best
        chosen = codes[part]
        for cand in candidates[1:]:
            err = microscale_errors(x, cand, micro.scale_format, element, global_scale)
            better = err < best * (1.0 - MARGIN)
            best = np.where(better, err, best)
            chosen[better] = cand[better]
        error[part] = best
    return MicroChoice(codes.reshape(shape), error.reshape(shape), minmax_error.reshape(shape))


def _mse_microscale_compiled(weight, micro, minmax_codes, global_scale, steps, minmax_rule=None):
    """native.micro_search with the divisor of every scale code (microscale_divisors, the reference's own
    rule, evaluated once per code rather than per group); None where the weight holds NaN / Inf."""
    if steps[0] != 0:
        raise ValueError("the first step must be 0 (the min-max code)")
    every_code = np.arange(256, dtype=np.uint8)
    with np.errstate(invalid="ignore", over="ignore"):  # codes outside code_limits (NaN, negative) are never read
        divisors = microscale_divisors(every_code, micro.scale_format, global_scale)
    divide = not micro.scale.power_of_two
    reciprocals = divisors if divide else e8m0_reciprocal(every_code)
    return native.micro_search(weight, micro.group, minmax_codes, steps, micro.scale.code_limits, divisors,
                               reciprocals, divide, FORMATS[micro.element], MARGIN, minmax_rule)
