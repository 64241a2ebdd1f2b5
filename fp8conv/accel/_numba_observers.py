"""numba-compiled candidate evaluation of the mse observer (imported lazily by observers.py when numba is
installed). Same arithmetic as observers.py's numpy path, element for element and in the same order:
float32 x / scale (+ zero), clamp to the code range, round (rint, or the FP8 grid by the bit rule of
observers.float_rounder), (- zero) * scale; the float32 difference squared in float64 (and, for the
exponent-3 objective, that square times |difference|; for exponent 4, that square squared) and summed in
eight lanes (column c -> lane c % 8,
sequential per lane), the lanes added 0..7. tests/test_observers.py
checks that both paths give the same choices and the same error sums, bit for bit.
"""
from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True, error_model="numpy")
def _tile_error(x, s, z, has_zero, lo, hi, is_float, drop, half, mask, smallest_normal, quantum, exponent, y, out):
    """(sum |error|^exponent, squared error) of one tile under one candidate (exponent 2, 3 or 4); `y`
    and `out` are float32 scratch rows of the tile's length (separate arrays, simple loops: LLVM
    vectorizes them)."""
    m = x.shape[0]
    one = np.uint32(1)
    for c in range(m):
        v = x[c] / s
        if has_zero:
            v = v + z
        y[c] = max(min(v, hi), lo)
    if is_float:
        y_bits, out_bits = y.view(np.uint32), out.view(np.uint32)
        for c in range(m):
            b = y_bits[c]
            out_bits[c] = (b + half + ((b >> drop) & one)) & mask
        for c in range(m):  # below the smallest normal the grid is uniform
            v = y[c]
            if abs(v) < smallest_normal:
                out[c] = np.rint(v / quantum) * quantum
    else:
        for c in range(m):
            out[c] = np.rint(y[c])
    for c in range(m):
        v = out[c]
        if has_zero:
            v = v - z
        out[c] = v * s - x[c]  # two roundings (no fused multiply-add without fastmath); the difference is exact
    # The same eight-lane sum as _numba_microscale._lane_sum, written here on purpose: numba's disk cache
    # is invalidated only by edits to the file holding a function, so calling another module's njit
    # function could run a stale cached copy of it after that module changes. Exponent 3: a second set of
    # lanes sums d^2 * |d|, exponent 4: d^2 * d^2 (observers._Scratch.errors: the same products, one rounding).
    cubic = exponent == 3
    quartic = exponent == 4
    l0 = l1 = l2 = l3 = l4 = l5 = l6 = l7 = 0.0
    c0 = c1 = c2 = c3 = c4 = c5 = c6 = c7 = 0.0
    for base in range(0, m, 8):
        a0, a1, a2, a3 = np.float64(out[base]), np.float64(out[base + 1]), np.float64(out[base + 2]), np.float64(out[base + 3])
        a4, a5, a6, a7 = np.float64(out[base + 4]), np.float64(out[base + 5]), np.float64(out[base + 6]), np.float64(out[base + 7])
        s0, s1, s2, s3, s4, s5, s6, s7 = a0 * a0, a1 * a1, a2 * a2, a3 * a3, a4 * a4, a5 * a5, a6 * a6, a7 * a7
        l0 += s0
        l1 += s1
        l2 += s2
        l3 += s3
        l4 += s4
        l5 += s5
        l6 += s6
        l7 += s7
        if cubic:
            c0 += abs(a0) * s0
            c1 += abs(a1) * s1
            c2 += abs(a2) * s2
            c3 += abs(a3) * s3
            c4 += abs(a4) * s4
            c5 += abs(a5) * s5
            c6 += abs(a6) * s6
            c7 += abs(a7) * s7
        elif quartic:
            c0 += s0 * s0
            c1 += s1 * s1
            c2 += s2 * s2
            c3 += s3 * s3
            c4 += s4 * s4
            c5 += s5 * s5
            c6 += s6 * s6
            c7 += s7 * s7
    squared = l0 + l1 + l2 + l3 + l4 + l5 + l6 + l7
    if cubic or quartic:
        return c0 + c1 + c2 + c3 + c4 + c5 + c6 + c7, squared
    return squared, squared


@njit(cache=True, nogil=True, error_model="numpy")
def search(tiles, scales, zeros, has_zero, lo, hi, is_float, drop, half, mask, smallest_normal, quantum, margin,
           exponent, index, sums):
    """tiles float32 [n, m] (m a multiple of 8); scales / zeros float32 [K, n], candidate 0 the min-max one;
    exponent 2, 3 or 4. Per tile: index of the candidate with the smallest sum |error|^exponent (a later one
    replaces the best only when smaller by more than the relative margin), and in sums float64 [4, n] its
    objective, its squared error, candidate 0's objective and candidate 0's squared error."""
    n, m = tiles.shape
    k_count = scales.shape[0]
    y = np.empty(m, np.float32)
    out = np.empty(m, np.float32)
    for i in range(n):
        x = tiles[i]
        best, best_sq = _tile_error(x, scales[0, i], zeros[0, i], has_zero, lo, hi, is_float, drop, half, mask,
                                    smallest_normal, quantum, exponent, y, out)
        sums[2, i] = best
        sums[3, i] = best_sq
        chosen = 0
        for k in range(1, k_count):
            err, sq = _tile_error(x, scales[k, i], zeros[k, i], has_zero, lo, hi, is_float, drop, half, mask,
                                  smallest_normal, quantum, exponent, y, out)
            if err < best * (1.0 - margin):
                best = err
                best_sq = sq
                chosen = k
        index[i] = chosen
        sums[0, i] = best
        sums[1, i] = best_sq


@njit(cache=True, nogil=True, error_model="numpy")
def search_microscale(tiles, divisors, reciprocals, divide, clamp, table, margin, index, error, minmax_error):
    """tiles float32 [n, group]; divisors / reciprocals float32 [K, n] of every candidate scale code
    (candidate 0 the min-max one); `table` float32[65536]: the element value of each round-to-odd bf16
    pattern. Per group: index of the candidate with the smallest squared error (a later one wins only
    when smaller by more than the relative margin), its error and candidate 0's; the arithmetic of
    observers.microscale_errors, element for element, each candidate's sum in element order (the
    candidates' sums advance together: independent chains the CPU overlaps)."""
    n, m = tiles.shape
    k_count = divisors.shape[0]
    acc = np.empty(k_count, np.float64)
    one = np.empty(1, np.float32)
    one_bits = one.view(np.uint32)
    for i in range(n):
        x = tiles[i]
        for k in range(k_count):
            acc[k] = 0.0
        for c in range(m):
            xc = x[c]
            for k in range(k_count):
                d = divisors[k, i]
                v = xc / d if divide else xc * reciprocals[k, i]
                if clamp > 0:
                    v = max(min(v, clamp), -clamp)
                one[0] = v
                b = one_bits[0]
                pattern = (b >> np.uint32(16)) | (((b & np.uint32(0xFFFF)) + np.uint32(0xFFFF)) >> np.uint32(16))
                diff = np.float64(table[pattern] * d) - np.float64(xc)
                acc[k] += diff * diff
        best = acc[0]
        minmax_error[i] = best
        chosen = 0
        for k in range(1, k_count):
            if acc[k] < best * (1.0 - margin):
                best = acc[k]
                chosen = k
        index[i] = chosen
        error[i] = best
