"""An independent float64 reference of the documented numerics, written from first principles.

It does not import fp8conv. FP8 grids are enumerated from the bit layout of each format (not from
ml_dtypes); rounding is to nearest with ties to the even code.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

QMAX = {"fp8_e4m3": 448.0, "fp8_e5m2": 57344.0, "int8": 127.0}
# (exponent bits, mantissa bits, bias, has_inf): e4m3fn has no Inf and uses S.1111.111 for NaN only.
LAYOUT = {"fp8_e4m3": (4, 3, 7, False), "fp8_e5m2": (5, 2, 15, True)}


def fp8_value(code: int, fmt: str) -> float:
    """Value of an FP8 code from its bits (NaN/Inf as float nan/inf)."""
    ebits, mbits, bias, has_inf = LAYOUT[fmt]
    sign = -1.0 if code & 0x80 else 1.0
    exp = (code >> mbits) & ((1 << ebits) - 1)
    man = code & ((1 << mbits) - 1)
    if has_inf and exp == (1 << ebits) - 1:
        return sign * math.inf if man == 0 else math.nan
    if not has_inf and exp == (1 << ebits) - 1 and man == (1 << mbits) - 1:
        return math.nan
    if exp == 0:
        return sign * man * 2.0 ** (1 - bias - mbits)
    return sign * (1 + man / (1 << mbits)) * 2.0 ** (exp - bias)


@lru_cache(maxsize=None)
def grid(fmt: str) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative finite values (ascending) and their codes (built once per format; read-only)."""
    pairs = sorted((fp8_value(c, fmt), c) for c in range(128) if math.isfinite(fp8_value(c, fmt)))
    return _frozen(np.array([v for v, _ in pairs])), _frozen(np.array([c for _, c in pairs]))


@lru_cache(maxsize=None)
def value_table(fmt: str) -> np.ndarray:
    """The value of each of the 256 codes (built once per format; read-only)."""
    return _frozen(np.array([fp8_value(c, fmt) for c in range(256)]))


def _frozen(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


def round_to_fp8(x: np.ndarray, fmt: str) -> np.ndarray:
    """Codes (uint8) of float64 values already within +-qmax, round to nearest, ties to even code."""
    values, codes = grid(fmt)
    mag = np.abs(x)
    hi = np.clip(np.searchsorted(values, mag), 1, len(values) - 1)
    lo = hi - 1
    d_lo, d_hi = mag - values[lo], values[hi] - mag
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (codes[hi] % 2 == 0))
    pick = np.where(pick_hi, hi, lo)
    pick = np.where(mag == values[hi], hi, pick)
    out = codes[pick].astype(np.uint8)
    return np.where(np.signbit(x), out | 0x80, out).astype(np.uint8)  # IEEE: -tiny rounds to -0


def tile_shape(granularity: str, rows: int, cols: int, block: tuple[int, int], group: int) -> tuple[int, int]:
    return {"block": block, "channel": (1, cols), "group": (1, group), "tensor": (rows, cols)}[granularity]


# Per scale format: (exponent of the smallest normal, exponent of the subnormal spacing, significand bits).
SCALE_GRID = {"float32": (-126, -149, 24), "bf16": (-126, -133, 8), "fp16": (-14, -24, 11)}
F32_OVERFLOW = 2.0 ** 128 - 2.0 ** 103  # exact products at or above this round to Inf in float32


def round_scale(value: np.float32, scale_dtype: str) -> np.float32:
    """A float32 scale rounded to its stored dtype (round to nearest even), as float32."""
    import ml_dtypes

    dtype = {"float32": np.float32, "bf16": ml_dtypes.bfloat16, "fp16": np.float16}[scale_dtype]
    return np.float32(np.array([value], np.float32).astype(dtype).astype(np.float32)[0])


def reference_stored_scale(quotient: np.float32, exact: float, reach: float, scale_dtype: str = "float32") -> np.float32:
    """A stored scale: the float32 quotient rounded to nearest even in its format; where that is below
    the format's smallest normal, the exact quotient rounded UP to a multiple of the format's
    subnormal spacing; then stepped down one unit at a time while reach * scale would round to Inf in
    float32. Inf (beyond the format, fp16) is returned as is: the kernels refuse it."""
    emin, esub, bits = SCALE_GRID[scale_dtype]
    scale = round_scale(np.float32(quotient), scale_dtype)
    if not math.isfinite(float(scale)):
        return scale
    if scale < 2.0 ** emin:
        scale = np.float32(math.ceil(exact * 2.0 ** -esub) * 2.0 ** esub)
    if float(scale) * reach >= F32_OVERFLOW:  # exact in float64: both have few bits
        # The largest value of the format below F32_OVERFLOW / reach, in one step (not one unit at a time);
        # the division rounds, so the rule itself then confirms it, stepping down a unit at most once or twice.
        scale = np.float32(largest_below(F32_OVERFLOW / reach, bits))
        while float(scale) * reach >= F32_OVERFLOW:
            scale = np.float32(float(scale) - _spacing_below(float(scale), bits))
    return scale


def _spacing_below(value: float, bits: int) -> float:
    """The distance from `value` (> 0, `bits` significant bits) to the next smaller such number: half
    as wide under a power of two."""
    mantissa, exponent = math.frexp(value)
    return 2.0 ** (exponent - bits - (mantissa == 0.5))


def largest_below(cap: float, bits: int) -> float:
    """The largest number with `bits` significant bits strictly below `cap` (> 0, normal range)."""
    step = _spacing_below(cap, bits)
    return (math.ceil(cap / step) - 1) * step


def reference_scale(amax: float, qmax: float) -> np.float32:
    """amax / qmax divided in float32, stored as float32 (reference_stored_scale: never 0, qmax *
    scale finite)."""
    return reference_stored_scale(np.float32(np.float32(amax) / np.float32(qmax)), float(amax) / qmax, qmax)


def reference_quantize(w: np.ndarray, fmt: str, granularity: str, block=(128, 128), group=128):
    """(codes as uint8 bit patterns / int8, float32 scale grid, float64 dequantized) of a 2-D array."""
    w64 = np.asarray(w, dtype=np.float64)
    rows, cols = w64.shape
    tr, tc = tile_shape(granularity, rows, cols, block, group)
    gr, gc = -(-rows // tr), -(-cols // tc)
    scales = np.ones((gr, gc), np.float32)
    codes = np.zeros((rows, cols), np.uint8 if fmt != "int8" else np.int8)
    deq = np.zeros((rows, cols))
    qmax = QMAX[fmt]
    for i in range(gr):
        for j in range(gc):
            tile = w64[i * tr:(i + 1) * tr, j * tc:(j + 1) * tc]
            amax = np.abs(tile).max() if tile.size else 0.0
            scale = np.float32(1.0) if amax == 0 else reference_scale(amax, qmax)
            scales[i, j] = scale
            # The documented division is float32; the rounding to the format is done here in float64.
            x = np.clip((tile.astype(np.float32) / scale).astype(np.float64), -qmax, qmax)
            if fmt == "int8":
                q = np.round(x)  # numpy rounds half to even
                codes[i * tr:(i + 1) * tr, j * tc:(j + 1) * tc] = q.astype(np.int8)
                qv = q
            else:
                c = round_to_fp8(x, fmt)
                codes[i * tr:(i + 1) * tr, j * tc:(j + 1) * tc] = c
                qv = value_table(fmt)[c]
            deq[i * tr:(i + 1) * tr, j * tc:(j + 1) * tc] = qv * float(scale)
    return codes, scales, deq


def int_range(bits: int) -> tuple[int, int]:
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def reference_quantize_int(w: np.ndarray, bits: int, granularity: str, group: int = 128, symmetric: bool = True,
                           scale_dtype: str = "float32"):
    """(int8 codes, float32 scale grid, zero-point grid or None, float64 dequantized) of an integer
    weight-only scheme over the full code range, following README's numerics step by step:
    symmetric scale = stored(amax / ((qmax - qmin) / 2)) (stored: reference_stored_scale); asymmetric scale = stored((max(0, max) -
    min(0, min)) / (qmax - qmin)) and zp = clip(rint(qmin - min / scale)); q = rint(clip(w / scale + zp)).
    Every arithmetic step is a float32 operation; rounding is half to even."""
    qmin, qmax = int_range(bits)
    w32 = np.asarray(w, np.float32)
    rows, cols = w32.shape
    tc = cols if granularity == "channel" else group
    gc = -(-cols // tc)
    scales = np.ones((rows, gc), np.float32)
    zps = None if symmetric else np.zeros((rows, gc), np.int8)
    codes = np.zeros((rows, cols), np.int8)
    deq = np.zeros((rows, cols))
    for i in range(rows):
        for j in range(gc):
            tile = w32[i, j * tc:(j + 1) * tc]
            if symmetric:
                amax = np.float32(np.abs(tile).max())
                half = (qmax - qmin) / 2
                scale = reference_stored_scale(np.float32(amax / np.float32(half)), float(amax) / half, -qmin,
                                               scale_dtype) if amax else np.float32(1)
                zp = np.float32(0)
            else:
                lo, hi = np.float32(min(0.0, tile.min())), np.float32(max(0.0, tile.max()))
                steps = qmax - qmin
                exact = (float(hi) - float(lo)) / steps
                with np.errstate(over="ignore"):
                    quotient = np.float32((hi - lo) / np.float32(steps))
                if not math.isfinite(float(quotient)):  # hi - lo beyond float32: the exact quotient, once rounded
                    quotient = np.float32(exact)
                scale = reference_stored_scale(quotient, exact, steps, scale_dtype) if hi != lo else np.float32(1)
                zp = np.float32(min(max(np.round(np.float32(qmin) - np.float32(lo / scale)), qmin), qmax))
                zps[i, j] = int(zp)
            scales[i, j] = scale
            x = (tile / scale).astype(np.float32)
            x = (x + zp).astype(np.float32)
            q = np.clip(np.round(x.astype(np.float64)), qmin, qmax)
            codes[i, j * tc:(j + 1) * tc] = q.astype(np.int8)
            deq[i, j * tc:(j + 1) * tc] = (q - float(zp)) * float(scale)
    return codes, scales, zps, deq


def fixed_order_sum_of_squares(values: np.ndarray) -> float:
    """The report's float64 sum of squares, order spelled out: per row eight lanes (column c in lane
    c % 8), each lane summed in column order, the lanes added 0..7, the rows added in order."""
    total = 0.0
    for row in np.asarray(values, np.float64):
        lanes = [0.0] * 8
        for c, v in enumerate(row.tolist()):
            lanes[c % 8] += v * v
        per_row = lanes[0]
        for lane in lanes[1:]:
            per_row += lane
        total += per_row
    return total
