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
