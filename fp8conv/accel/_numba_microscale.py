"""numba-compiled microscaling kernels (imported lazily by microscale.py when numba is installed).

Same numerics as microscale.py's numpy path, element for element: float32 division (NVFP4) or
multiplication by a power of two (MX), then the bf16 round-to-odd index into the same code tables.
tests/test_microscale.py runs both paths against the float64 reference.
"""
from __future__ import annotations

import numpy as np
from numba import njit

_ABS = np.uint32(0x7FFFFFFF)


@njit(cache=True, nogil=True, error_model="numpy")
def _load_row(src, r, is_bf16, row, row_bits):
    if is_bf16:
        for c in range(row.shape[0]):
            row_bits[c] = np.uint32(src[r, c]) << np.uint32(16)
    else:
        for c in range(row.shape[0]):
            row[c] = src[r, c]


@njit(cache=True, nogil=True, error_model="numpy")
def group_amax(src, is_bf16, group, out):
    """out[r, g] = max |src[r, g*group:(g+1)*group]| (float32 bits by integer max: NaN stays visible)."""
    rows, cols = src.shape
    out_bits = out.view(np.uint32)
    for r in range(rows):
        for g in range(cols // group):
            base = g * group
            m = np.uint32(0)
            if is_bf16:
                for i in range(group):
                    m = max(m, (np.uint32(src[r, base + i]) << np.uint32(16)) & _ABS)
            else:
                bits = src[r].view(np.uint32)
                for i in range(group):
                    m = max(m, bits[base + i] & _ABS)
            out_bits[r, g] = m


@njit(cache=True, nogil=True, error_model="numpy")
def _scaled_row(row, group, factor_row, divide, y):
    cols = row.shape[0]
    for g in range(cols // group):
        base = g * group
        f = factor_row[g]
        if divide:
            for i in range(group):
                y[base + i] = row[base + i] / f
        else:
            for i in range(group):
                y[base + i] = row[base + i] * f


@njit(cache=True, nogil=True, error_model="numpy")
def _odd_index(y_bits, c):
    b = y_bits[c]
    return (b >> np.uint32(16)) | (((b & np.uint32(0xFFFF)) + np.uint32(0xFFFF)) >> np.uint32(16))


@njit(cache=True, nogil=True, error_model="numpy")
def encode_e2m1(src, is_bf16, group, factor, divide, table, out):
    """out[r, k] = code(2k) | code(2k+1) << 4, code = table[round_to_odd_bf16(x / or * factor)]."""
    rows, cols = src.shape
    row = np.empty(cols, np.float32)
    row_bits = row.view(np.uint32)
    y = np.empty(cols, np.float32)
    y_bits = y.view(np.uint32)
    for r in range(rows):
        _load_row(src, r, is_bf16, row, row_bits)
        _scaled_row(row, group, factor[r], divide, y)
        for k in range(cols // 2):
            low = table[_odd_index(y_bits, 2 * k)]
            high = table[_odd_index(y_bits, 2 * k + 1)]
            out[r, k] = low | (high << np.uint8(4))


@njit(cache=True, nogil=True, error_model="numpy")
def encode_e4m3(src, is_bf16, group, factor, qmax, table, out):
    """out[r, c] = table[round_to_odd_bf16(clamp(x * factor, +-qmax))] (e4m3 codes)."""
    rows, cols = src.shape
    row = np.empty(cols, np.float32)
    row_bits = row.view(np.uint32)
    y = np.empty(cols, np.float32)
    y_bits = y.view(np.uint32)
    for r in range(rows):
        _load_row(src, r, is_bf16, row, row_bits)
        _scaled_row(row, group, factor[r], False, y)
        for c in range(cols):
            y[c] = min(max(y[c], -qmax), qmax)
        for c in range(cols):
            out[r, c] = table[_odd_index(y_bits, c)]


@njit(cache=True, nogil=True, error_model="numpy")
def _lane_sum(v):
    """sum of float64(v[c])^2 with column c in lane c % 8 (sequential per lane), lanes added 0..7."""
    l0 = l1 = l2 = l3 = l4 = l5 = l6 = l7 = 0.0
    for base in range(0, v.shape[0], 8):
        a0, a1, a2, a3 = np.float64(v[base]), np.float64(v[base + 1]), np.float64(v[base + 2]), np.float64(v[base + 3])
        a4, a5, a6, a7 = np.float64(v[base + 4]), np.float64(v[base + 5]), np.float64(v[base + 6]), np.float64(v[base + 7])
        l0 += a0 * a0
        l1 += a1 * a1
        l2 += a2 * a2
        l3 += a3 * a3
        l4 += a4 * a4
        l5 += a5 * a5
        l6 += a6 * a6
        l7 += a7 * a7
    return l0 + l1 + l2 + l3 + l4 + l5 + l6 + l7


@njit(cache=True, nogil=True, error_model="numpy")
def error_stats(src, is_bf16, group, codes, packed, code_values, divisor, qmax, stats):
    """Error statistics of w' = code value * divisor against src, in the fixed order of kernels._RowSums:
    per row eight float64 lanes (column c -> lane c % 8) summed in column order, the lanes added 0..7,
    the rows added in order into stats[0] (sum w^2) and stats[1] (sum err^2); stats[2] max |err|,
    stats[3] codes at +-qmax, stats[4] flushed to zero. `codes` are packed e2m1 pairs when `packed`;
    columns are a multiple of 8 (groups of 16 / 32)."""
    rows, cols = src.shape
    row = np.empty(cols, np.float32)
    row_bits = row.view(np.uint32)
    value = np.empty(cols, np.float32)
    deq = np.empty(cols, np.float32)
    err = np.empty(cols, np.float32)
    err_bits = err.view(np.uint32)
    max_bits = np.uint32(0)
    saturated = 0
    flushed = 0
    for r in range(rows):
        _load_row(src, r, is_bf16, row, row_bits)
        if packed:
            for k in range(cols // 2):
                byte = codes[r, k]
                value[2 * k] = code_values[byte & np.uint8(0xF)]
                value[2 * k + 1] = code_values[byte >> np.uint8(4)]
        else:
            for c in range(cols):
                value[c] = code_values[codes[r, c]]
        for g in range(cols // group):
            base = g * group
            f = divisor[r, g]
            for i in range(group):
                deq[base + i] = value[base + i] * f
        for c in range(cols):
            err[c] = row[c] - deq[c]
        for c in range(cols):
            max_bits = max(max_bits, err_bits[c] & _ABS)
            saturated += abs(value[c]) >= qmax
            flushed += (deq[c] == 0) & (row[c] != 0)
        stats[0] += _lane_sum(row)
        stats[1] += _lane_sum(err)
    stats[2] = max(stats[2], np.float64(err_bits_to_float(max_bits)))
    stats[3] += saturated
    stats[4] += flushed


@njit(cache=True, nogil=True, error_model="numpy")
def err_bits_to_float(bits):
    one = np.empty(1, np.uint32)
    one[0] = bits
    return one.view(np.float32)[0]
