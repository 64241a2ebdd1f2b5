"""The scale rule of the integer and FP8 schemes: stored scale (and zero point) of each tile from its
range, rounded to the scale format, with both ends of the range made safe (see kernels.py). Shared by
the kernels and the mse observer, whose min-max candidate must be exactly the kernels' scale."""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from ..errors import InputError
from ..formats import SCALE_FORMATS
from ..io.untrusted import printable
from ..plan.scheme import Scheme


def _stored_scales(raw: np.ndarray, exact: np.ndarray, scheme: Scheme, zero: np.ndarray, name: str) -> np.ndarray:
    """Stored scales from float32 quotients `raw` (and the same quotients in float64, `exact`); 1.0 for
    all-zero tiles. Rounded to the scheme's scale format (nearest even), with the two ends of the
    range made safe for every scale format: where the stored value would fall below the format's
    smallest normal (2**-126 float32 / bf16, 2**-14 fp16) the exact quotient is rounded UP to the
    format's subnormal grid (2**-149 / 2**-133 / 2**-24), so a scale is never 0 and amax / scale <= D
    still holds (nearest-even there could drop it to 0, or by up to half its value); and it is capped
    so that every code times the scale stays finite in float32 (what loaders compute). A quotient
    beyond the format's largest value (fp16: 65504), or below its smallest step (bf16 / fp16), is
    refused: capping would saturate the tile, rounding up would decode it to 0."""
    scale, bad = range_end_scales(raw, exact, scheme, zero)
    if bad.any():
        exact = np.asarray(exact, np.float64)
        rounded = scheme.scale_fmt.round(np.asarray(raw, np.float32)[bad].reshape(-1)[:1])
        raise InputError(f"tensor {printable(name)}: a scale {float(exact[bad].flat[0]):.6g} is not representable as "
                         f"{scheme.scale_format} (it rounds to {float(rounded[0]):g}); use float32 scales")
    return scale


def range_end_scales(raw: np.ndarray, exact: np.ndarray, scheme: Scheme, zero: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rule of _stored_scales without refusing: (stored scales, mask of the tiles it refuses,
    whose scale is left undefined). Shared with the mse observer, whose min-max candidate must be
    exactly the kernels' scale."""
    sf = scheme.scale_fmt
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        scale = np.array(sf.round(raw), np.float32)
    exact = np.asarray(exact, np.float64)
    bad = ~np.isfinite(scale) & ~zero
    if sf.smallest_subnormal > _F32_SUBNORMAL:
        # Below a bf16 / fp16 scale's smallest step the whole tile would decode to 0: refused. (A
        # float32 scale of 2**-149 is on the data's own grid and keeps every value.)
        bad |= (exact < sf.smallest_subnormal) & ~zero
    tiny = (scale < sf.smallest_normal) & ~zero & ~bad
    if tiny.any():
        step = sf.smallest_subnormal
        scale[tiny] = (np.ceil(exact[tiny] / step) * step).astype(np.float32)
    np.minimum(scale, _scale_cap(scheme.scale_format, _reach(scheme)), out=scale)
    scale[zero] = np.float32(1.0)
    return scale, bad


_F32_SUBNORMAL = float(np.finfo(np.float32).smallest_subnormal)


def _reach(scheme: Scheme) -> float:
    """The largest |q - zp| a code can dequantize from: qmax (symmetric [-qmax, qmax]), -qmin (full
    range), qmax - qmin (asymmetric)."""
    lo, hi = scheme.code_range
    return float(hi - lo) if not scheme.symmetric else float(max(-lo, hi))


@lru_cache(maxsize=None)
def _scale_cap(scale_format: str, reach: float) -> np.float32:
    """The largest scale of the format whose product with `reach` is finite in float32 (an amax near
    the float32 maximum would otherwise dequantize to Inf)."""
    sf = SCALE_FORMATS[scale_format]
    import ml_dtypes  # here, not at import (formats/dtypes.py says why)

    top = min(float(np.finfo(np.float32).max) / reach, float(ml_dtypes.finfo(sf.dtype).max))
    cap = np.array([top], np.float64).astype(sf.dtype)
    bits = cap.view(np.dtype(f"u{sf.dtype.itemsize}"))
    with np.errstate(over="ignore"):
        while not np.isfinite(np.float32(cap[0]) * np.float32(reach)):
            bits -= 1  # the next smaller positive value of the format
    return np.float32(cap[0])


def symmetric_quotients(amax: np.ndarray, scheme: Scheme) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(amax / D in float32, the same in float64, all-zero tiles) of the symmetric rule."""
    amax = np.asarray(amax, np.float32)
    divisor = scheme.symmetric_divisor
    return (amax / np.float32(divisor)).astype(np.float32), amax.astype(np.float64) / divisor, amax == 0


def asymmetric_quotients(lo: np.ndarray, hi: np.ndarray, scheme: Scheme) -> tuple[np.ndarray, ...]:
    """(quotient in float32, in float64, all-zero tiles, lo0) of the asymmetric rule from each tile's
    min and max (float32): lo0 = min(lo, 0), hi0 = max(hi, 0), quotient (hi0 - lo0) / (qmax - qmin)."""
    fmt = scheme.fmt
    lo = np.minimum(lo, np.float32(0)).astype(np.float32)
    hi = np.maximum(hi, np.float32(0)).astype(np.float32)
    steps = fmt.qmax - fmt.qmin
    with np.errstate(over="ignore"):
        raw = ((hi - lo) / np.float32(steps)).astype(np.float32)
    exact = (hi.astype(np.float64) - lo.astype(np.float64)) / steps
    # hi - lo beyond the float32 range (|values| near its maximum on both sides): the float64 quotient.
    raw = np.where(np.isfinite(raw), raw, exact.astype(np.float32))
    return raw, exact, hi == lo, lo


def zero_points(lo0: np.ndarray, scale: np.ndarray, scheme: Scheme) -> np.ndarray:
    """Zero points as float32 integers: clip(rint(qmin - lo0 / scale), qmin, qmax)."""
    fmt = scheme.fmt
    return np.clip(np.rint(fmt.qmin32 - lo0 / scale), fmt.qmin32, fmt.qmax32).astype(np.float32)


def scale_from_amax(amax: np.ndarray, scheme: Scheme, name: str = "tensor") -> np.ndarray:
    """Symmetric stored scale = stored(amax / D) (see _stored_scales), and 1.0 where the tile is all zeros."""
    raw, exact, zero = symmetric_quotients(amax, scheme)
    return _stored_scales(raw, exact, scheme, zero, name)


def asymmetric_params(lo: np.ndarray, hi: np.ndarray, scheme: Scheme, name: str = "tensor") -> tuple[np.ndarray, np.ndarray]:
    """(stored scale, zero point as float32 integers) from each tile's min and max (float32)."""
    raw, exact, zero, lo0 = asymmetric_quotients(lo, hi, scheme)
    scale = _stored_scales(raw, exact, scheme, zero, name)
    return scale, zero_points(lo0, scale, scheme)
