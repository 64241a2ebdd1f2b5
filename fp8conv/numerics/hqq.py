"""HQQ-style data-free optimiser of the scale and zero point of asymmetric integer groups. Pure numpy, no I/O.

Half-Quadratic Quantization (Badri & Shaji, 2023) fits the quantization parameters of a group w (float
[n, m], one row a group) to a sparsity-promoting loss of the error instead of the squared error:

    minimise over (s, z, e):   phi(e) + beta / 2 * || e - (w - dq(q(w))) ||^2,   phi(e) = sum |e|^p, p < 1

with q(w) = clip(rint(w / s + z), qmin, qmax) and dq(c) = (c - z) * s. The split variable e carries the
large, sparse part of the error (the outliers), so the fit of (s, z) is not dragged by them. The
half-quadratic solver alternates two closed-form steps, and beta grows by kappa each round:

1. e-step (proximal operator of the lp norm, the paper's generalised soft-thresholding):
   e = sign(r) * max(|r| - |r|^(p-1) / beta, 0) with r = w - dq(q(w)).
2. (s, z)-step: the least-squares fit of the target t = w - e by the current codes c = q(w):
   t ~ s * (c - z). The paper updates z only (z = mean(c - t / s)); here s and z are fitted jointly
   (s = cov(c, t) / var(c), z = mean(c) - mean(t) / s; s unchanged where var(c) = 0 or the fit is not
   positive), which is the same step with one more free parameter.

Choices of this implementation (module constants, fixed on development models only, bench/QUALITY.md):
- r and e are measured in quantization steps (r / s), so the threshold |r|^(p-1) / beta does not depend
  on the weights' magnitude. (HQQ's reference code applies it to raw weights; with its beta = 10 and LLM
  weights ~1e-2 the threshold is ~0.4, larger than every error, and the e-step does nothing.)
- The iteration runs in float64 on continuous (s, z). After every round the candidate is projected
  onto what is stored (the scale rounded by the scheme's `store`, the zero point rounded to an integer
  in the code range) and evaluated with the kernels' own reconstruction (`reconstruct`); per group the
  candidate with the smallest squared error sum (w' - w)^2 is kept (a scale that cannot be stored, NaN from
  `store`, is never chosen), starting from the min-max scale and
  zero point, and a later candidate replaces it only when it is smaller by more than `margin`
  (relative). So the result is never worse than min-max in squared error, and the same input gives
  the same output for any batching of groups (every step is per row).
- Groups off a 4-bit grid also get clipping candidates (round 3 of bench/QUALITY.md's #28 protocol,
  chosen on development pairs only). A group is "on a 4-bit grid" when every 32-element sub-block of
  it (`GRID_SUBBLOCK`, GGUF's Q4_0 / Q4_1 / Q4_K sub-block; the whole group when its length is not a
  multiple of 32) holds at most 16 distinct values: a 4-bit producer already placed its levels and range
  ends, and clipping moved real grid points there (it raised KL on such a model), while original float
  weights hold ~32 distinct values per 32. Candidates, in the order they are tried (each replacing the best
  only when smaller by `margin`): min-max; for groups off a grid, the min-max rule applied to the range
  [min, max] shrunk by 0.99 .. 0.81 (`OFF_GRID_SHRINK`, llm-compressor's memoryless_mse factors; round 4,
  was 0.99 .. 0.90); the solver's rounds from
  min-max; for groups off a grid, the solver's rounds started again from the best of min-max and the
  shrunk ranges. Groups on a grid get exactly the min-max + rounds candidates of round 2.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from .observers import ParamsFn, tile_range

P_NORM = 0.7  # the paper's lp norm
BETA = 1.0  # initial beta (threshold in quantization steps: |r|^(p-1) / beta)
KAPPA = 1.01  # beta grows by this factor every round (the paper's default)
ITERATIONS = 20  # rounds of the solver (the paper's default)
FIXED_POINT = 1e-9  # relative change of s (absolute of z) below which a group's iteration has converged
MARGIN = 2.0 ** -20  # a candidate must lower the squared error by this much (relative) to replace the best
BATCH_ELEMENTS = 1 << 16
GRID_SUBBLOCK = 32  # GGUF's 4-bit sub-block (Q4_0, Q4_1, Q4_K)
GRID_LEVELS = 16  # at most this many distinct values per sub-block: on a 4-bit grid
# Groups off a 4-bit grid: the range shrunk by 0.99 .. 0.81 (llm-compressor's memoryless_mse factors, round 4).
OFF_GRID_SHRINK: tuple[float, ...] = tuple(round(1.0 - k / 100, 2) for k in range(1, 20))

# reconstruct(tiles, scale, zero, out): out = dequant(quant(tiles)) in float32, the kernels' arithmetic.
ReconstructFn = Callable[[np.ndarray, np.ndarray, Optional[np.ndarray], np.ndarray], None]
StoreFn = Callable[[np.ndarray], np.ndarray]  # float64 [n] scale -> float32 [n] scale as stored


@dataclass
class HQQChoice:
    """Per group: the chosen scale and zero point (float32), the squared error sums (float64) with them
    and with min-max, and the candidate that produced the choice (0: min-max; -1 .. -19: the range shrunk
    by 0.99 .. 0.81; 1 .. ITERATIONS: the solve's rounds from min-max; above: the second solve's)."""

    scale: np.ndarray
    zero: np.ndarray
    error: np.ndarray
    minmax_error: np.ndarray
    round: np.ndarray


def shrink_lp(r: np.ndarray, beta: float, p: float) -> np.ndarray:
    """The proximal operator of the lp quasi-norm (p < 1) used by HQQ: sign(r) max(|r| - |r|^(p-1)/beta, 0)."""
    a = np.abs(r)
    with np.errstate(divide="ignore"):
        threshold = np.power(a, p - 1.0) / beta
    return np.sign(r) * np.maximum(a - threshold, 0.0)


def squared_errors(tiles: np.ndarray, scale: np.ndarray, zero: np.ndarray, reconstruct: ReconstructFn,
                   out: np.ndarray) -> np.ndarray:
    """float64 [n]: per group, sum over its elements of (w' - w)^2, w' the kernels' reconstruction
    (`out`: float32 scratch of the tiles' shape); each difference exact in float32, squared in float64."""
    reconstruct(tiles, scale, zero, out)
    np.subtract(out, tiles, out=out)
    d = out.astype(np.float64)
    return np.einsum("ij,ij->i", d, d)


def on_4bit_grid(tiles: np.ndarray) -> np.ndarray:
    """bool [n]: per group (row of a float32 [n, m] array), whether every GRID_SUBBLOCK-element sub-block
    (the whole row when m is not a multiple of it) holds at most GRID_LEVELS distinct values."""
    n, m = tiles.shape
    sub = GRID_SUBBLOCK if m % GRID_SUBBLOCK == 0 else max(m, 1)
    ordered = np.sort(tiles.reshape(-1, sub), axis=1)
    distinct = 1 + np.count_nonzero(np.diff(ordered, axis=1), axis=1)
    return (distinct <= GRID_LEVELS).reshape(n, -1).all(axis=1)


def hqq(tiles: np.ndarray, scale: np.ndarray, zero: np.ndarray, code_range: tuple[float, float], store: StoreFn,
        reconstruct: ReconstructFn, params: Optional[ParamsFn] = None, p: float = P_NORM, beta: float = BETA,
        kappa: float = KAPPA, iterations: int = ITERATIONS, batch_elements: int = BATCH_ELEMENTS) -> HQQChoice:
    """HQQ (module docstring) over a float32 [n, m] array of groups, from the min-max float32 [n] scale
    and (integer-valued) zero point; `code_range` = (qmin, qmax) of the codes. `params`: the scheme's
    min-max rule (observers.ParamsFn); with it, groups off a 4-bit grid also get the clipping candidates
    (module docstring); without it every group gets min-max and the rounds only."""
    n, m = tiles.shape
    scale = np.array(scale, np.float32)
    zero = np.array(zero, np.float32)
    error = np.zeros(n, np.float64)
    minmax_error = np.zeros(n, np.float64)
    chosen_round = np.zeros(n, np.int32)
    batch = max(1, batch_elements // max(m, 1))
    out = np.empty((min(batch, n), m), np.float32)
    solve = (code_range, store, p, beta, kappa, iterations)
    for t0 in range(0, n, batch):
        part = np.arange(t0, min(n, t0 + batch))
        x = tiles[part]
        s_mm, z_mm = scale[part], zero[part]  # copies (fancy indexing)
        best = squared_errors(x, s_mm, z_mm, reconstruct, out[: len(part)])
        minmax_error[part] = best
        off = np.zeros(len(part), np.bool_) if params is None else ~on_4bit_grid(x)
        if off.any():
            lo, hi = tile_range(x[off])
            shrunk = (params(lo * np.float32(f), hi * np.float32(f)) for f in OFF_GRID_SHRINK)
            labels = range(-1, -len(OFF_GRID_SHRINK) - 1, -1)
            best[off] = _keep_better(x[off], part[off], shrunk, labels, best[off], scale, zero, chosen_round,
                                     reconstruct, out)
            restart = (scale[part[off]], zero[part[off]])
        best = _keep_better(x, part, _rounds(x, s_mm, z_mm, *solve), range(1, iterations + 1), best, scale, zero,
                            chosen_round, reconstruct, out)
        if off.any():
            best[off] = _keep_better(x[off], part[off], _rounds(x[off], *restart, *solve),
                                     range(iterations + 1, 2 * iterations + 1), best[off], scale, zero,
                                     chosen_round, reconstruct, out)
        error[part] = best
    return HQQChoice(scale, zero, error, minmax_error, chosen_round)


def _keep_better(x: np.ndarray, rows: np.ndarray, candidates, labels, best: np.ndarray, scale: np.ndarray,
                 zero: np.ndarray, chosen: np.ndarray, reconstruct: ReconstructFn, out: np.ndarray) -> np.ndarray:
    """Evaluate (scale, zero) candidates of the groups x (rows `rows` of the whole array) in order; where
    one's squared error is below `best` by more than MARGIN (relative) write it into scale / zero /
    chosen (its label) and return the updated best (float64 [len(rows)])."""
    best = best.copy()
    for label, (s_c, z_c) in zip(labels, candidates):
        with np.errstate(invalid="ignore"):
            err = squared_errors(x, np.asarray(s_c, np.float32), np.asarray(z_c, np.float32), reconstruct,
                                 out[: len(rows)])
        better = err < best * (1.0 - MARGIN)
        if better.any():
            best[better] = err[better]
            scale[rows[better]] = np.asarray(s_c, np.float32)[better]
            zero[rows[better]] = np.asarray(z_c, np.float32)[better]
            chosen[rows[better]] = label
    return best


def half_quadratic_step(x: np.ndarray, s: np.ndarray, z: np.ndarray, code_range: tuple[float, float], beta: float,
                        p: float, moving: np.ndarray):
    """One round of the solver on float64 groups x [n, g] at (s, z) [n]: the codes, the lp-shrunk target w_e, and
    the least-squares (s, z) fitting the codes to the target where that fit is defined (else s, z unchanged).
    Returns (codes, target, s_new, z_new, fit)."""
    codes = np.clip(np.rint(x / s[:, None] + z[:, None]), *code_range)
    steps = x / s[:, None] - (codes - z[:, None])  # the error in quantization steps
    target = x - shrink_lp(steps, beta, p) * s[:, None]
    c_mean = codes.mean(axis=1)
    t_mean = target.mean(axis=1)
    centred = codes - c_mean[:, None]
    var = np.einsum("ij,ij->i", centred, centred)
    cov = np.einsum("ij,ij->i", centred, target - t_mean[:, None])
    fit = (var > 0) & (cov > 0) & moving
    s_new = np.where(fit, cov / np.where(fit, var, 1.0), s)
    z_new = np.where(fit, c_mean - t_mean / s_new, z)
    return codes, target, s_new, z_new, fit


def _rounds(x32: np.ndarray, scale0: np.ndarray, zero0: np.ndarray, code_range: tuple[float, float],
            store: StoreFn, p: float, beta: float, kappa: float, iterations: int):
    """Yield each round's projected candidate (float32 stored scale, float32 integer zero point)."""
    qmin, qmax = (float(v) for v in code_range)
    x = x32.astype(np.float64)
    s = scale0.astype(np.float64)
    z = zero0.astype(np.float64)
    moving = np.ones(len(s), np.bool_)
    for _ in range(iterations):
        _, _, s_new, z_new, _ = half_quadratic_step(x, s, z, (qmin, qmax), beta, p, moving)
        # A group whose (s, z) no longer moves has reached its fixed point: it is frozen (per group, so
        # the result does not depend on which groups share a batch), and the batch ends when all are.
        moving &= (np.abs(s_new - s) > FIXED_POINT * s) | (np.abs(z_new - z) > FIXED_POINT)
        s, z = s_new, z_new
        beta *= kappa
        s_stored = store(s)
        z_stored = np.clip(np.rint(z), qmin, qmax).astype(np.float32)
        yield s_stored, z_stored
        if not moving.any():
            return
