"""numba-compiled kernels (imported lazily by compiled.py, so nothing loads numba until it is used)."""
from __future__ import annotations

import numpy as np
from numba import njit

_SIGN = np.uint32(0x80000000)
_ABS = np.uint32(0x7FFFFFFF)
_NONFINITE = np.uint32(0x7F800000)
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_SMALLEST_NORMAL = np.float32(np.finfo(np.float32).smallest_normal)
_SUBNORMAL_STEP = 2.0 ** -149


@njit(cache=True, nogil=True, error_model="numpy")
def _load_row(src, r, is_bf16, row, row_bits):
    cols = row.shape[0]
    if is_bf16:
        for c in range(cols):
            row_bits[c] = np.uint32(src[r, c]) << np.uint32(16)
    else:
        for c in range(cols):
            row[c] = src[r, c]


@njit(cache=True, nogil=True, error_model="numpy")
def _band_amax_bits(src, start, stop, is_bf16, tile_cols, amax_bits):
    """Max of |x| per tile as float32 bit patterns (integer max: vectorises, and NaN/Inf show
    up as patterns >= 0x7F800000 instead of being dropped as a float max would).

    Tile loops are written as `base + i`: numba vectorises that form, not range(a, b)."""
    cols = src.shape[1]
    amax_bits[:] = 0
    for r in range(start, stop):
        for t in range(amax_bits.shape[0]):
            base = t * tile_cols
            m = amax_bits[t]
            if is_bf16:
                for i in range(min(tile_cols, cols - base)):
                    m = max(m, (np.uint32(src[r, base + i]) << np.uint32(16)) & _ABS)
            else:
                bits = src[r].view(np.uint32)
                for i in range(min(tile_cols, cols - base)):
                    m = max(m, bits[base + i] & _ABS)
            amax_bits[t] = m


@njit(cache=True, nogil=True, error_model="numpy")
def _expand(scale_row, tile_cols, expanded):
    """One scale per column, so the row loops below are plain vectorisable loops."""
    cols = expanded.shape[0]
    for t in range(scale_row.shape[0]):
        base = t * tile_cols
        s = scale_row[t]
        for i in range(min(tile_cols, cols - base)):
            expanded[base + i] = s


@njit(cache=True, nogil=True, error_model="numpy")
def round_fp8(q, y, codes, mbits, min_normal_bits, sub_step_inv, rebias):
    """FP8 codes and their float32 values for clamped q, rounding to nearest even."""
    qb = q.view(np.uint32)
    yb = y.view(np.uint32)
    shift = np.uint32(23 - mbits)
    half = np.uint32((1 << (23 - mbits - 1)) - 1)
    keep = np.uint32(0x7FFFFFFF & ~((1 << (23 - mbits)) - 1))
    for c in range(q.shape[0]):
        b = qb[c]
        mag = b & _ABS
        sign = b & _SIGN
        rounded = (mag + half + ((mag >> shift) & np.uint32(1))) & keep
        normal_code = ((rounded >> shift) - np.uint32(rebias)) & np.uint32(0x7F)
        # Below the smallest normal the step is fixed: round |q| / step to an integer.
        steps = np.rint(abs(q[c]) * sub_step_inv)
        sub_value = steps / sub_step_inv
        is_sub = mag < min_normal_bits
        y[c] = (-sub_value if sign else sub_value) if is_sub else y[c]
        yb[c] = yb[c] if is_sub else (rounded | sign)
        code = np.uint32(steps) if is_sub else normal_code
        codes[c] = np.uint8(code | (sign >> np.uint32(24)))


@njit(cache=True, nogil=True, error_model="numpy")
def _row_sums(row, y, err, scales, lanes):
    """sum w^2 and sum err^2 of a row in float64, in kernels.py's fixed order (column c in lane c % 8,
    each lane sequential, lanes combined 0..7), and the flushed-to-zero count."""
    cols = row.shape[0]
    flushed = 0
    lanes[:] = 0.0
    for c in range(cols):
        w = row[c]
        deq = y[c] * scales[c]
        e = w - deq
        err[c] = e
        flushed += (deq == 0) & (w != 0)
    for k in range(0, cols - cols % 8, 8):
        for lane in range(8):
            w64 = np.float64(row[k + lane])
            e64 = np.float64(err[k + lane])
            lanes[0, lane] += w64 * w64
            lanes[1, lane] += e64 * e64
    for c in range(cols - cols % 8, cols):
        w64 = np.float64(row[c])
        e64 = np.float64(err[c])
        lanes[0, c % 8] += w64 * w64
        lanes[1, c % 8] += e64 * e64
    sum_ref = lanes[0, 0]
    sum_err = lanes[1, 0]
    for lane in range(1, 8):
        sum_ref += lanes[0, lane]
        sum_err += lanes[1, lane]
    return sum_ref, sum_err, flushed


@njit(cache=True, nogil=True, error_model="numpy")
def _row_stats(row, y, err, scales, qmax_bits, stats, lanes):
    """Error statistics of w' = y * scale; max |err| and saturation on bit patterns (vectorise)."""
    sum_ref, sum_err, flushed = _row_sums(row, y, err, scales, lanes)
    err_bits = err.view(np.uint32)
    y_bits = y.view(np.uint32)
    max_err = np.uint32(0)
    saturated = 0
    for c in range(row.shape[0]):
        max_err = max(max_err, err_bits[c] & _ABS)
        saturated += (y_bits[c] & _ABS) == qmax_bits
    stats[0] += sum_ref
    stats[1] += sum_err
    stats[2] = max(stats[2], np.float64(_bits_to_float(max_err)))
    stats[3] += saturated
    stats[4] += flushed


@njit(cache=True, nogil=True, error_model="numpy")
def _bits_to_float(bits):
    one = np.empty(1, np.uint32)
    one[0] = bits
    return one.view(np.float32)[0]


@njit(cache=True, nogil=True, error_model="numpy")
def quantize_chunk(src, is_bf16, tile_rows, tile_cols, fixed_scale, qmax, kind, codes, scales, stats):
    """Quantize src[rows, cols] (bf16 bits as uint16, or float32) into uint8 codes + scale grid.

    fixed_scale > 0 means one given scale (tensor granularity). kind: 0 e4m3, 1 e5m2, 2 int8
    (compiled.KIND). Returns True when a band holds NaN/Inf or the kind is unknown: then nothing is
    valid and the caller takes the numpy path.
    """
    if kind < 0 or kind > 2:
        return True
    rows, cols = src.shape
    n_tiles = scales.shape[1]
    row = np.empty(cols, np.float32)
    row_bits = row.view(np.uint32)
    q = np.empty(cols, np.float32)
    y = np.empty(cols, np.float32)
    err = np.empty(cols, np.float32)
    expanded = np.empty(cols, np.float32)
    amax_bits = np.empty(n_tiles, np.uint32)
    amax = amax_bits.view(np.float32)
    lanes = np.zeros((2, 8), np.float64)
    qmax_bits = _float_bits(qmax)
    cap = _scale_cap(qmax)
    for band in range(0, rows, tile_rows):
        stop = min(rows, band + tile_rows)
        grid_row = scales[band // tile_rows]
        _band_amax_bits(src, band, stop, is_bf16, tile_cols, amax_bits)
        for t in range(n_tiles):
            if amax_bits[t] >= _NONFINITE:
                return True
            if fixed_scale > 0:
                grid_row[t] = fixed_scale
            elif amax_bits[t] == 0:
                grid_row[t] = np.float32(1.0)
            else:
                grid_row[t] = _scale(amax[t], qmax, cap)
        _expand(grid_row, tile_cols, expanded)
        for r in range(band, stop):
            _load_row(src, r, is_bf16, row, row_bits)
            for c in range(cols):
                q[c] = min(max(row[c] / expanded[c], -qmax), qmax)
            if kind == 2:
                for c in range(cols):
                    y[c] = np.rint(q[c])
                    codes[r, c] = np.uint8(np.int32(y[c]) & 0xFF)
            elif kind == 0:
                round_fp8(q, y, codes[r], 3, np.uint32(0x3C800000), np.float32(512.0), (127 - 7) << 3)
            elif kind == 1:
                round_fp8(q, y, codes[r], 2, np.uint32(0x38800000), np.float32(65536.0), (127 - 15) << 2)
            _row_stats(row, y, err, expanded, qmax_bits, stats, lanes)
    return False


@njit(cache=True, nogil=True, error_model="numpy")
def _float_bits(value):
    one = np.empty(1, np.float32)
    one[0] = value
    return one.view(np.uint32)[0]


@njit(cache=True, nogil=True, error_model="numpy")
def _scale_cap(qmax):
    """kernels._scale_cap: the largest float32 scale with qmax * scale finite."""
    cap = np.float32(np.float64(_FLOAT32_MAX) / np.float64(qmax))
    while np.isinf(np.float32(cap * qmax)):
        cap = np.nextafter(cap, np.float32(0))
    return cap


@njit(cache=True, nogil=True, error_model="numpy")
def _scale(amax, qmax, cap):
    """kernels.scale_from_amax for one tile with amax > 0 (same two ends of the range)."""
    s = amax / qmax
    if s < _SMALLEST_NORMAL:
        s = np.float32(np.ceil(np.float64(amax) / _SUBNORMAL_STEP / np.float64(qmax)) * _SUBNORMAL_STEP)
    return min(s, cap)
