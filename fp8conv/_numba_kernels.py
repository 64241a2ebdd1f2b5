"""numba-compiled kernels (imported lazily by compiled.py, so nothing loads numba until it is used)."""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

LANES = 8  # kernels.LANES, written out: numba's disk cache only notices edits to this file

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


@intrinsic
def _lane_squares(typingctx, a, b):
    """Per lane, float64 sums of a[c]^2 and of b[c]^2 in kernels.py's fixed order: column c in lane
    c % 8, each lane summed sequentially (a, b: contiguous float32, a length that is a multiple of 8).

    Written in LLVM IR because numba leaves eight scalar accumulators scalar (the SLP vectoriser does
    not take loop-carried sums): here each lane is one element of an <8 x double> accumulator, the
    same additions in the same order (no fast-math flags, so no FMA contraction or reassociation),
    eight at a time; a and b in one loop give the two independent add chains the latency needs."""
    for t in (a, b):
        if not (isinstance(t, types.Array) and t.ndim == 1 and t.dtype == types.float32 and t.layout == "C"):
            return None
    sig = types.UniTuple(types.float64, 2 * LANES)(a, b)

    def codegen(context, builder, signature, args):
        f32s, f64s = ir.VectorType(ir.FloatType(), LANES), ir.VectorType(ir.DoubleType(), LANES)
        arrays = [context.make_array(t)(context, builder, v) for t, v in zip(signature.args, args)]
        groups = builder.sdiv(builder.extract_value(arrays[0].shape, 0), ir.Constant(arrays[0].shape.type.element, LANES))
        bases = [builder.bitcast(x.data, f32s.as_pointer()) for x in arrays]
        sums = [cgutils.alloca_once_value(builder, ir.Constant(f64s, None)) for _ in arrays]
        with cgutils.for_range(builder, groups) as loop:
            for base, acc in zip(bases, sums):
                wide = builder.fpext(builder.load(builder.gep(base, [loop.index]), align=4), f64s)
                builder.store(builder.fadd(builder.load(acc), builder.fmul(wide, wide)), acc)
        lanes = [builder.extract_element(builder.load(acc), ir.Constant(ir.IntType(32), i))
                 for acc in sums for i in range(LANES)]
        return context.make_tuple(builder, signature.return_type, lanes)

    return sig, codegen


@njit(cache=True, nogil=True, error_model="numpy")
def _row_stats(row, y, err, scales, qmax_bits, stats, padded_row, padded_err):
    """Error statistics of w' = y * scale: sum w^2 and sum err^2 in float64 in kernels.py's fixed order
    (over the row and err buffers zero-padded to a multiple of 8: a padding column adds +0.0 to its
    lane, which changes nothing), flushed-to-zero count; max |err| and saturation on bit patterns."""
    cols = row.shape[0]
    err_bits = err.view(np.uint32)
    y_bits = y.view(np.uint32)
    flushed = 0
    for c in range(cols):
        w = row[c]
        deq = y[c] * scales[c]
        err[c] = w - deq
        flushed += (deq == 0) & (w != 0)
    max_err = np.uint32(0)
    saturated = 0
    for c in range(cols):
        max_err = max(max_err, err_bits[c] & _ABS)
        saturated += (y_bits[c] & _ABS) == qmax_bits
    s = _lane_squares(padded_row, padded_err)
    stats[0] += s[0] + s[1] + s[2] + s[3] + s[4] + s[5] + s[6] + s[7]
    stats[1] += s[8] + s[9] + s[10] + s[11] + s[12] + s[13] + s[14] + s[15]
    stats[2] = max(stats[2], np.float64(_bits_to_float(max_err)))
    stats[3] += saturated
    stats[4] += flushed


@njit(cache=True, nogil=True, error_model="numpy")
def _bits_to_float(bits):
    one = np.empty(1, np.uint32)
    one[0] = bits
    return one.view(np.float32)[0]


@njit(cache=True, nogil=True, error_model="numpy")
def quantize_chunk(src, is_bf16, tile_rows, tile_cols, fixed_scale, qmax, kind, codes, scales, stats, given):
    """Quantize src[rows, cols] (bf16 bits as uint16, or float32) into uint8 codes + scale grid.

    fixed_scale > 0 means one given scale (tensor granularity); given=True means `scales` already
    holds the grid (the mse observer's choice) and is only read. kind: 0 e4m3, 1 e5m2, 2 int8
    (compiled.KIND). Returns True when a band holds NaN/Inf or the kind is unknown: then nothing is
    valid and the caller takes the numpy path.
    """
    if kind < 0 or kind > 2:
        return True
    rows, cols = src.shape
    n_tiles = scales.shape[1]
    padded = -(-cols // LANES) * LANES
    padded_row = np.zeros(padded, np.float32)
    padded_err = np.zeros(padded, np.float32)
    row = padded_row[:cols]
    row_bits = row.view(np.uint32)
    q = np.empty(cols, np.float32)
    y = np.empty(cols, np.float32)
    err = padded_err[:cols]
    expanded = np.empty(cols, np.float32)
    amax_bits = np.empty(n_tiles, np.uint32)
    amax = amax_bits.view(np.float32)
    qmax_bits = _float_bits(qmax)
    cap = _scale_cap(qmax)
    for band in range(0, rows, tile_rows):
        stop = min(rows, band + tile_rows)
        grid_row = scales[band // tile_rows]
        _band_amax_bits(src, band, stop, is_bf16, tile_cols, amax_bits)
        for t in range(n_tiles):
            if amax_bits[t] >= _NONFINITE:
                return True
            if given:
                continue
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
            _row_stats(row, y, err, expanded, qmax_bits, stats, padded_row, padded_err)
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
