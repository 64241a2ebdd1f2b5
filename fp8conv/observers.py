"""Scale observers: how the scale (and zero point) of each tile is chosen. Pure numpy, no I/O.

Tiles arrive as a float32 `(n_tiles, tile_elems)` view (zero padding contributes no error).

- `minmax` (the default everywhere): the scale comes from the tile's range, e.g. amax / qmax.
- `mse`: for each tile, among the documented candidates below, the scale (and zero point) whose
  reconstruction has the smallest squared error  sum((dequant(quant(x)) - x)^2)  over the tile.
  Candidates are the min-max range shrunk by `factors` (`SHRINK_FACTORS`: 1.00, 0.99, ..., 0.80,
  the grid of llm-compressor's MSE observer with squared error); each shrunk range goes through the
  same scale function as min-max, so the stored rounding of the scale (bf16, fp16, e4m3, E8M0) is
  applied to every candidate before it is evaluated, and asymmetric schemes get the zero point of
  the shrunk range. Scales stored as powers of two use `E8M0_FACTORS` (the min-max exponent and
  +-1). Factor 1.0 comes first and is the min-max scale itself, so `mse` is never worse than
  min-max: a candidate replaces the best one only when its error is smaller by more than `MARGIN`
  (relative; errors are summed in float64 from exact float32 differences, so this is far above
  their rounding). Ties keep the larger scale. Deterministic: the same input gives the same
  scales on every path and for any chunking into tiles.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import ml_dtypes
import numpy as np

OBSERVERS = ("minmax", "mse")
SHRINK_FACTORS: tuple[float, ...] = tuple(round(1.0 - k / 100, 2) for k in range(21))
E8M0_FACTORS: tuple[float, ...] = (1.0, 0.5, 2.0)
MARGIN = 2.0 ** -20
# Elements per batch of tiles: the working set of one candidate stays in the CPU's L2 cache.
BATCH_ELEMENTS = 1 << 16

# params(lo, hi) -> (scale, zero point or None), float32 [n]; the scale already rounded as stored.
ParamsFn = Callable[[np.ndarray, np.ndarray], "tuple[np.ndarray, Optional[np.ndarray]]"]
# reconstruct(tiles, scale, zero, out): out[n, m] = dequant(quant(tiles)) in float32.
ReconstructFn = Callable[[np.ndarray, np.ndarray, "Optional[np.ndarray]", np.ndarray], None]


@dataclass
class Choice:
    """Per tile: chosen scale and zero point, index into the factors, and the squared errors (float64)."""

    scale: np.ndarray
    zero: Optional[np.ndarray]
    factor_index: np.ndarray
    error: np.ndarray
    minmax_error: np.ndarray


def tile_range(tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-tile (min, max) of a float32 [n, m] array, as float32 [n] each."""
    return tiles.min(axis=1), tiles.max(axis=1)


class _Scratch:
    """Buffers for one batch of tiles, reused for every candidate."""

    def __init__(self, rows: int, cols: int) -> None:
        self.recon = np.empty((rows, cols), np.float32)
        self.wide = np.empty((rows, cols), np.float64)

    def error(self, x: np.ndarray, reconstruct: "ReconstructFn", scale: np.ndarray,
              zero: Optional[np.ndarray]) -> np.ndarray:
        """float64 [n]: sum over each tile of (reconstruction - x)^2.

        The float32 difference is exact here (Sterbenz: the reconstruction is within a factor of 2 of x
        or zero) and its square is exact in float64, so the sums carry only float64 rounding."""
        n = x.shape[0]
        recon, wide = self.recon[:n], self.wide[:n]
        reconstruct(x, scale, zero, recon)
        np.subtract(recon, x, out=recon)
        np.copyto(wide, recon)
        return np.einsum("ij,ij->i", wide, wide)


def minmax(tiles: np.ndarray, params: ParamsFn, reconstruct: ReconstructFn) -> Choice:
    """The min-max scale of every tile, with its error (for the report's comparison)."""
    return mse(tiles, params, reconstruct, factors=(1.0,))


def mse(tiles: np.ndarray, params: ParamsFn, reconstruct: ReconstructFn,
        factors: tuple[float, ...] = SHRINK_FACTORS, batch_elements: int = BATCH_ELEMENTS) -> Choice:
    """Per tile of a float32 [n, m] array, the candidate scale with the smallest squared error."""
    if not factors or factors[0] != 1.0:
        raise ValueError("the first factor must be 1.0 (the min-max scale)")
    n, m = tiles.shape
    lo, hi = tile_range(tiles) if n else (np.zeros(0, np.float32), np.zeros(0, np.float32))
    scale, zero = params(lo, hi)
    scale = np.array(scale, np.float32)
    zero = None if zero is None else np.array(zero, np.float32)
    index = np.zeros(n, np.int32)
    error = np.zeros(n, np.float64)
    minmax_error = np.zeros(n, np.float64)
    batch = max(1, batch_elements // max(m, 1))
    work = _Scratch(min(batch, n), m)
    for t0 in range(0, n, batch):
        part = slice(t0, min(n, t0 + batch))
        x = tiles[part]
        best = work.error(x, reconstruct, scale[part], None if zero is None else zero[part])
        minmax_error[part] = best
        for k, factor in enumerate(factors[1:], start=1):
            f = np.float32(factor)
            cand_scale, cand_zero = params(lo[part] * f, hi[part] * f)
            err = work.error(x, reconstruct, cand_scale, cand_zero)
            better = err < best * (1.0 - MARGIN)
            if better.any():
                best = np.where(better, err, best)
                index[part][better] = k
                scale[part][better] = cand_scale[better]
                if zero is not None:
                    zero[part][better] = cand_zero[better]
        error[part] = best
    return Choice(scale, zero, index, error, minmax_error)


# -- building blocks for `params` and `reconstruct` -------------------------------------------------

def round_scale(scale: np.ndarray, stored: str) -> np.ndarray:
    """float32 value of a scale after rounding to its stored format (nearest even; E8M0 up to a power of 2)."""
    scale = np.asarray(scale, np.float32)
    if stored == "float32":
        return scale.copy()
    if stored == "bf16":
        return scale.astype(ml_dtypes.bfloat16).astype(np.float32)
    if stored == "fp16":
        return np.minimum(scale, np.float32(np.finfo(np.float16).max)).astype(np.float16).astype(np.float32)
    if stored == "e4m3":
        top = np.float32(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)
        return np.minimum(scale, top).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    if stored == "e8m0":
        # The smallest power of two >= scale: frexp gives scale = m * 2^e with m in [0.5, 1).
        mant, exp = np.frexp(scale)
        exp = np.where(mant == 0.5, exp - 1, exp)
        return np.ldexp(np.float32(1.0), exp).astype(np.float32)
    raise ValueError(f"unknown stored scale format {stored!r}")


def symmetric_params(qmax: float, stored: str = "float32") -> ParamsFn:
    """scale = max(|lo|, |hi|) / qmax rounded as stored, 1.0 for an all-zero tile; no zero point."""
    qmax32 = np.float32(qmax)

    def params(lo: np.ndarray, hi: np.ndarray):
        amax = np.maximum(-lo, hi)
        scale = round_scale(amax / qmax32, stored)
        scale[(amax == 0) | (scale == 0)] = np.float32(1.0)
        return scale, None

    return params


def asymmetric_params(qmin: int, qmax: int, stored: str = "float32") -> ParamsFn:
    """scale = (max(hi, 0) - min(lo, 0)) / (qmax - qmin) rounded as stored (1.0 for all-zero tiles),
    zero = clip(round(qmin - min(lo, 0) / scale), qmin, qmax)."""
    steps = np.float32(qmax - qmin)

    def params(lo: np.ndarray, hi: np.ndarray):
        lo0 = np.minimum(lo, np.float32(0))
        span = np.maximum(hi, np.float32(0)) - lo0
        scale = round_scale(span / steps, stored)
        scale[(span == 0) | (scale == 0)] = np.float32(1.0)
        zero = np.clip(np.rint(np.float32(qmin) - lo0 / scale), qmin, qmax).astype(np.float32)
        return scale, zero

    return params


def int_reconstruct(qmin: int, qmax: int) -> ReconstructFn:
    """(clip(rint(x / scale) + zero, qmin, qmax) - zero) * scale, in float32."""
    lo, hi = np.float32(qmin), np.float32(qmax)

    def reconstruct(x, scale, zero, out):
        # Scales repeated to the tile shape: numpy broadcasts short rows slowly.
        full = np.repeat(scale, x.shape[1]).reshape(x.shape)
        np.divide(x, full, out=out)
        np.rint(out, out=out)
        if zero is not None:
            zfull = np.repeat(zero, x.shape[1]).reshape(x.shape)
            out += zfull
        np.minimum(out, hi, out=out)
        np.maximum(out, lo, out=out)
        if zero is not None:
            out -= zfull
        out *= full

    return reconstruct


def float_reconstruct(encode_decode: Callable[[np.ndarray], None]) -> ReconstructFn:
    """decode(encode(x / scale)) * scale, where `encode_decode(values)` rounds float32 values in
    place to the element format's grid (saturating at its largest finite value)."""

    def reconstruct(x, scale, zero, out):
        full = np.repeat(scale, x.shape[1]).reshape(x.shape)
        np.divide(x, full, out=out)
        encode_decode(out)
        out *= full

    return reconstruct


def fp8_round(fmt) -> Callable[[np.ndarray], None]:
    """In-place float32 -> nearest FP8 value of `fmt` (a formats.QuantFormat), saturating at +-qmax:
    the same clamp and cast as the quantize kernel."""
    from .fastcast import cast_clamped_to_fp8, code_to_float_table

    table = code_to_float_table(fmt)

    def encode_decode(values: np.ndarray) -> None:
        np.minimum(values, fmt.qmax32, out=values)
        np.maximum(values, -fmt.qmax32, out=values)
        codes = np.empty(values.shape, np.uint8)
        cast_clamped_to_fp8(values, fmt, codes)
        np.take(table, codes, out=values)

    return encode_decode
