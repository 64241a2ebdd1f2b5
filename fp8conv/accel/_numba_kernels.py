"""numba-compiled kernels (imported lazily by compiled.py, so nothing loads numba until it is used).

How it is laid out for speed (the numerics are kernels.py's, bit for bit):

- A band of tile rows (at least ROW_GROUP rows) is processed in column spans of whole tiles (about
  SPAN_COLS columns) for the amax, and quantized in sub-spans of at most SPAN_COLS columns, so the
  band's slice of the source stays in L2 between the two passes and the row buffers stay in L1.
- Integer work is on 32-bit lanes: numba widens uint32 arithmetic to 64 bits (half the lanes per
  vector), so the bit-pattern operations go through the small intrinsics below, which keep the width.
- FP8 rounding is branch-free (_fp8_magnitude explains it), so the whole quantize + statistics loop of a
  row vectorises, with 512-bit vectors where the CPU has them (_wide_vectors).
- The float64 sums of squares of ROW_GROUP rows run together (_lane_squares): independent add chains
  instead of one chain per row waiting on the add latency; each row's additions keep their order.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

LANES = 8  # kernels.LANES, written out: numba's disk cache only notices edits to this file
ROW_GROUP = 4  # rows whose sums of squares run interleaved (8 independent float64 add chains)
SPAN_COLS = 2048  # columns per pass over a band (whole tiles; a bf16 band of 128 rows: 512 KiB)

_SIGN = np.uint32(0x80000000)
_ABS = np.uint32(0x7FFFFFFF)
_EXPONENT = np.uint32(0x7F800000)
_NONFINITE = np.uint32(0x7F800000)
_ZERO = np.float32(0)
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_SMALLEST_NORMAL = np.float32(np.finfo(np.float32).smallest_normal)
_SUBNORMAL_STEP = 2.0 ** -149


# ---- 32-bit integer operations that stay 32-bit (numba would widen them to int64) ----------------

def _u32_op(build):
    @intrinsic
    def op(typingctx, a, b):
        if a != types.uint32 or b != types.uint32:
            return None
        return types.uint32(a, b), lambda context, builder, sig, args: build(builder, *args)

    return op


_and = _u32_op(lambda b, x, y: b.and_(x, y))
_or = _u32_op(lambda b, x, y: b.or_(x, y))
_add = _u32_op(lambda b, x, y: b.add(x, y))
_sub = _u32_op(lambda b, x, y: b.sub(x, y))
_shl = _u32_op(lambda b, x, y: b.shl(x, y))
_shr = _u32_op(lambda b, x, y: b.lshr(x, y))
_max = _u32_op(lambda b, x, y: b.select(b.icmp_unsigned(">", x, y), x, y))


@intrinsic
def _bits(typingctx, x):
    """The float32 bit pattern of a float32, or of a bf16 given as its uint16 bits."""
    if x == types.float32:
        return types.uint32(x), lambda context, builder, sig, args: builder.bitcast(args[0], ir.IntType(32))
    if x == types.uint16:
        def widen(context, builder, sig, args):
            return builder.shl(builder.zext(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 16))

        return types.uint32(x), widen
    return None


@intrinsic
def _float(typingctx, x):
    """The float32 whose bit pattern is x."""
    if x != types.uint32:
        return None
    return types.float32(x), lambda context, builder, sig, args: builder.bitcast(args[0], ir.FloatType())


@intrinsic
def _count(typingctx, x):
    """A bool as 0 / 1 (uint32)."""
    if x != types.boolean:
        return None
    return types.uint32(x), lambda context, builder, sig, args: builder.zext(args[0], ir.IntType(32))


@intrinsic
def _low_byte(typingctx, x):
    """The low 8 bits of a uint32, or of the integer value of a float32 (|x| < 2**31)."""
    if x == types.uint32:
        return types.uint8(x), lambda context, builder, sig, args: builder.trunc(args[0], ir.IntType(8))
    if x == types.float32:
        def low(context, builder, sig, args):
            return builder.trunc(builder.fptosi(args[0], ir.IntType(32)), ir.IntType(8))

        return types.uint8(x), low
    return None


@intrinsic
def _wide_vectors(typingctx):
    """Let LLVM vectorise the calling function's loops with 512-bit vectors where the CPU has them (it
    prefers 256 bits on AVX-512 CPUs by default). "prefer-vector-width" is an LLVM function attribute
    that llvmlite's attribute list does not name, hence set.add past its check."""
    def codegen(context, builder, sig, args):
        set.add(builder.function.attributes, '"prefer-vector-width"="512"')
        return context.get_dummy_value()

    return types.void(), codegen


# ---- FP8 rounding ---------------------------------------------------------------------------------

@njit(cache=True, nogil=True, error_model="numpy")
def _fp8_magnitude(a, magic_shift, magic_floor, code_shift, code_offset):
    """(value, code) of float32 a in [0, qmax] rounded to nearest even in an FP8 format (code without
    the sign bit).

    One float addition does the rounding: with M = 2**(e + 23 - mbits) for a in [2**e, 2**(e+1)),
    a + M rounds to a multiple of ulp(M) = 2**(e - mbits), the format's step there (nearest even, as
    float32 additions round); below the smallest normal M stays at magic_floor, whose ulp is the
    subnormal step. (a + M) - M is exact, and bits(a + M) - bits(M) counts steps above M: the
    mantissa with its implicit bit for a normal, the code itself for a subnormal. With bits(M) =
    (E + rebias) << 23 (E: the code's exponent field), E << mbits = (bits(M) >> (23 - mbits)) -
    (rebias << mbits): code_shift and code_offset. No branch: the loop around it vectorises."""
    magic = _max(_add(_and(_bits(a), _EXPONENT), magic_shift), magic_floor)
    big = a + _float(magic)
    code = _sub(_add(_sub(_bits(big), magic), _shr(magic, code_shift)), code_offset)
    return big - _float(magic), code


# (magic_shift, magic_floor, code_shift, code_offset) of _fp8_magnitude
_E4M3 = (np.uint32(20 << 23), np.uint32(0x46800000), np.uint32(20), np.uint32((127 + 20 - 6) << 3))  # floor 2**14
_E5M2 = (np.uint32(21 << 23), np.uint32(0x43000000), np.uint32(21), np.uint32((127 + 21 - 14) << 2))  # floor 2**7


@njit(cache=True, nogil=True, error_model="numpy")
def round_fp8(q, y, codes, mbits):
    """FP8 codes and their float32 values of clamped float32 q (mbits 3: e4m3, 2: e5m2)."""
    p = _E4M3 if mbits == 3 else _E5M2
    for c in range(q.shape[0]):
        b = _bits(q[c])
        value, code = _fp8_magnitude(_float(_and(b, _ABS)), p[0], p[1], p[2], p[3])
        y[c] = _float(_or(_bits(value), _and(b, _SIGN)))
        codes[c] = _low_byte(_or(code, _and(_shr(b, np.uint32(24)), np.uint32(0x80))))


# ---- one row segment ------------------------------------------------------------------------------

@njit(cache=True, nogil=True, error_model="numpy")
def _fp8_row(src, r, at, n, scale, qmax, qmax_bits, out, w, err, magic_shift, magic_floor, code_shift, code_offset):
    """_quantize_row for an FP8 format, on magnitudes: |w| / scale rounds to the magnitude of w / scale's
    code (division and rounding are symmetric), the sign bit is w's; the statistics see |w| and
    |w| - |w'| = -(w - w') for negative w: the same squares, maximum, saturation and flushes."""
    _wide_vectors()
    saturated = np.uint32(0)
    flushed = np.uint32(0)
    max_err = np.uint32(0)
    for i in range(n):
        b = _bits(src[r, at + np.uint64(i)])
        a = _float(_and(b, _ABS))
        w[i] = a
        s = scale[i]
        y, code = _fp8_magnitude(min(a / s, qmax), magic_shift, magic_floor, code_shift, code_offset)
        out[at + np.uint64(i)] = _low_byte(_or(code, _and(_shr(b, np.uint32(24)), np.uint32(0x80))))
        deq = y * s
        e = a - deq
        err[i] = e
        flushed = _add(flushed, _count((deq == _ZERO) & (a != _ZERO)))
        max_err = _max(max_err, _and(_bits(e), _ABS))
        saturated = _add(saturated, _count(_bits(y) == qmax_bits))
    return saturated, flushed, max_err


@njit(cache=True, nogil=True, error_model="numpy")
def _int8_row(src, r, at, n, scale, qmax, qmax_bits, out, w, err):
    """_quantize_row for int8: y = rint(clamp(w / scale)), its low byte the code."""
    _wide_vectors()
    saturated = np.uint32(0)
    flushed = np.uint32(0)
    max_err = np.uint32(0)
    for i in range(n):
        x = _float(_bits(src[r, at + np.uint64(i)]))
        w[i] = x
        s = scale[i]
        y = np.rint(min(max(x / s, -qmax), qmax))
        out[at + np.uint64(i)] = _low_byte(y)
        deq = y * s
        e = x - deq
        err[i] = e
        flushed = _add(flushed, _count((deq == _ZERO) & (x != _ZERO)))
        max_err = _max(max_err, _and(_bits(e), _ABS))
        saturated = _add(saturated, _count(_and(_bits(y), _ABS) == qmax_bits))
    return saturated, flushed, max_err


@njit(cache=True, nogil=True, error_model="numpy")
def _quantize_row(src, r, c0, n, scale, qmax, kind, qmax_bits, codes, w, err):
    """Columns [c0, c0 + n) of row r: codes, and the source values and errors w - y * scale (float32)
    into w[:n] and err[:n] for the sums of squares (padded with zeros to a multiple of 8). Returns
    (saturated, flushed to zero, max |err| as bits) of the segment."""
    at = np.uint64(c0)  # unsigned indices: no negative-index wraparound, so the loops stay contiguous
    out = codes[r]
    if kind == 0:
        e = _E4M3
        result = _fp8_row(src, r, at, n, scale, qmax, qmax_bits, out, w, err, e[0], e[1], e[2], e[3])
    elif kind == 1:
        e = _E5M2
        result = _fp8_row(src, r, at, n, scale, qmax, qmax_bits, out, w, err, e[0], e[1], e[2], e[3])
    else:
        result = _int8_row(src, r, at, n, scale, qmax, qmax_bits, out, w, err)
    for i in range(n, -(-n // LANES) * LANES):
        w[i] = _ZERO  # the sums' padding: +0.0 changes no lane
        err[i] = _ZERO
    return result


@intrinsic
def _lane_squares(typingctx, w, err, n_groups, acc, first):
    """For each of the ROW_GROUP rows k of w and err (float32 [ROW_GROUP, >= 8 * n_groups], C order):
    acc[k, l] += w[k, c]^2 and acc[k, 8 + l] += err[k, c]^2 for columns c = 8 * g + l, g = 0 ..
    n_groups - 1, in that order, in float64: kernels.py's fixed order (column c in lane c % 8, each
    lane summed sequentially), continued from the values already in acc[first + k] (float64 [rows, 16]).

    Written in LLVM IR because numba leaves eight scalar accumulators scalar (the SLP vectoriser does
    not take loop-carried sums): each lane is one element of an <8 x double> accumulator, the same
    additions in the same order, eight at a time, and the 2 * ROW_GROUP accumulators are independent
    chains, so the adds overlap instead of waiting on each other's latency. fma(x, x, a) is exactly
    a + x * x: the square of a float32 is exact in float64, so the fused add rounds the same sum once."""
    for t in (w, err):
        if not (isinstance(t, types.Array) and t.ndim == 2 and t.dtype == types.float32 and t.layout == "C"):
            return None
    if not (isinstance(acc, types.Array) and acc.ndim == 2 and acc.dtype == types.float64 and acc.layout == "C"):
        return None
    if n_groups != types.intp or first != types.intp:
        return None
    sig = types.void(w, err, n_groups, acc, first)

    def codegen(context, builder, signature, args):
        f32s, f64s = ir.VectorType(ir.FloatType(), LANES), ir.VectorType(ir.DoubleType(), LANES)
        w_arr, e_arr, groups, acc_arr, first = args
        arrays = [context.make_array(signature.args[i])(context, builder, v) for i, v in ((0, w_arr), (1, e_arr))]
        accs = context.make_array(signature.args[3])(context, builder, acc_arr)
        row_groups = [builder.sdiv(builder.extract_value(a.shape, 1), ir.Constant(a.shape.type.element, LANES))
                      for a in arrays]  # row stride in vectors of 8
        bases = [builder.bitcast(a.data, f32s.as_pointer()) for a in arrays]
        acc_base = builder.bitcast(accs.data, f64s.as_pointer())
        intp = groups.type
        slots = []  # (source base, row stride, row, accumulator pointer in acc, alloca)
        for k in range(ROW_GROUP):
            for which in range(2):
                where = builder.gep(acc_base, [builder.add(builder.mul(first, ir.Constant(intp, 2)),
                                                           ir.Constant(intp, 2 * k + which))])
                slots.append((bases[which], row_groups[which], k, where,
                              cgutils.alloca_once_value(builder, builder.load(where, align=8))))
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(f64s, [f64s] * 3), f"llvm.fma.v{LANES}f64")
        with cgutils.for_range(builder, groups) as loop:
            for base, stride, k, _, slot in slots:
                offset = builder.add(builder.mul(stride, ir.Constant(intp, k)), loop.index)
                wide = builder.fpext(builder.load(builder.gep(base, [offset]), align=4), f64s)
                builder.store(builder.call(fma, [wide, wide, builder.load(slot)]), slot)
        for _, _, _, where, slot in slots:
            builder.store(builder.load(slot), where, align=8)
        return context.get_dummy_value()

    return sig, codegen


# ---- the chunk ------------------------------------------------------------------------------------

@njit(cache=True, nogil=True, error_model="numpy")
def _span_amax_bits(src, start, stop, c0, n, tile_cols, colmax, amax_bits, t0):
    """Max of |x| over rows [start, stop) per tile of columns [c0, c0 + n) (tiles start at c0), as float32
    bit patterns into amax_bits[t0 ...] (integer max: NaN/Inf show up as patterns >= 0x7F800000 instead
    of being dropped as a float max would). Several rows: column maxima first (a plain vectorised loop
    per row), then per tile; one row: per tile directly."""
    at = np.uint64(c0)  # unsigned indices: no negative-index wraparound, so the loops stay contiguous
    if stop - start == 1:
        t = t0
        base = 0
        while base < n:  # while loops, here and below: a range with a variable step could raise
            m = np.uint32(0)
            first = at + np.uint64(base)
            for i in range(min(tile_cols, n - base)):
                m = _max(m, _and(_bits(src[start, first + np.uint64(i)]), _ABS))
            amax_bits[t] = m
            t += 1
            base += tile_cols
        return
    for i in range(n):
        colmax[i] = np.uint32(0)
    for r in range(start, stop):
        for i in range(n):
            colmax[i] = _max(colmax[i], _and(_bits(src[r, at + np.uint64(i)]), _ABS))
    t = t0
    base = 0
    while base < n:
        m = np.uint32(0)
        for i in range(min(tile_cols, n - base)):
            m = _max(m, colmax[base + i])
        amax_bits[t] = m
        t += 1
        base += tile_cols


@njit(cache=True, nogil=True, error_model="numpy")
def _fill_scales(amax_bits, t0, t1, fixed_scale, given, qmax, cap, grid_row):
    """Scales of tiles [t0, t1) into grid_row (min-max from amax; or the fixed scale; given: already
    there). Returns True when a tile holds NaN/Inf."""
    for t in range(t0, t1):
        if amax_bits[t] >= _NONFINITE:
            return True
        if given:
            continue
        if fixed_scale > 0:
            grid_row[t] = fixed_scale
        elif amax_bits[t] == 0:
            grid_row[t] = np.float32(1.0)
        else:
            grid_row[t] = _scale(_float(amax_bits[t]), qmax, cap)
    return False


@njit(cache=True, nogil=True, error_model="numpy")
def _expand(grid_row, c0, tile_cols, n, expanded):
    """The scale of every column in [c0, c0 + n), so the row loops are plain loops."""
    i = 0
    while i < n:
        t = (c0 + i) // tile_cols
        s = grid_row[t]
        end = min(n, (t + 1) * tile_cols - c0)
        for j in range(end - i):
            expanded[i + j] = s
        i = end


@njit(cache=True, nogil=True, error_model="numpy")
def _layout(cols, tile_rows, tile_cols):
    """How quantize_chunk walks a chunk of `cols` columns, and the sizes of its scratch arrays:
    (span, step, band_rows, bands_per, padded, acc_rows, colmax_len)."""
    # Spans of whole tiles; a span that does not start on a multiple of the eight lanes would shift
    # every later column's lane, so tiles whose width is no multiple of 8 take the whole row.
    span = cols  # amax spans: whole tiles
    if tile_cols % LANES == 0 and tile_cols < cols:
        span = max(1, SPAN_COLS // tile_cols) * tile_cols
    step = min(span, SPAN_COLS)  # quantize sub-spans: a multiple of 8 columns, from a span start that is one
    band_rows = -(-ROW_GROUP // tile_rows) * tile_rows  # whole tile rows, at least ROW_GROUP rows
    bands_per = band_rows // tile_rows
    padded = -(-min(step, cols) // LANES) * LANES
    acc_rows = -(-band_rows // ROW_GROUP) * ROW_GROUP
    colmax_len = -(-min(span, cols) // LANES) * LANES
    return span, step, band_rows, bands_per, padded, acc_rows, colmax_len


@njit(cache=True, nogil=True, error_model="numpy")
def quantize_chunk(src, is_bf16, tile_rows, tile_cols, fixed_scale, qmax, kind, codes, scales, stats, given):
    """Quantize src[rows, cols] (bf16 bits as uint16, or float32; is_bf16 says which, as the dtype does)
    into uint8 codes + scale grid.

    fixed_scale > 0 means one given scale (tensor granularity); given=True means `scales` already
    holds the grid (the mse observer's choice) and is only read. kind: 0 e4m3, 1 e5m2, 2 int8
    (compiled.KIND). Returns True when a band holds NaN/Inf or the kind is unknown: then nothing is
    valid and the caller takes the numpy path. (Allocates its scratch arrays: native_entry, the
    ahead-compiled entry, is this with the scratch given.)
    """
    span, step, band_rows, bands_per, padded, acc_rows, colmax_len = _layout(src.shape[1], tile_rows, tile_cols)
    return _quantize_into(src, tile_rows, tile_cols, fixed_scale, qmax, kind, codes, scales, stats, given,
                          np.zeros((ROW_GROUP, padded), np.float32), np.zeros((ROW_GROUP, padded), np.float32),
                          np.zeros((acc_rows, 2 * LANES)), np.empty((bands_per, padded), np.float32),
                          np.empty(colmax_len, np.uint32), np.empty(scales.shape[1], np.uint32))


@njit(cache=True, nogil=True, error_model="numpy")
def _quantize_into(src, tile_rows, tile_cols, fixed_scale, qmax, kind, codes, scales, stats, given,
                   w, err, acc, expanded, colmax, amax_bits):
    """quantize_chunk with its scratch arrays given (shapes from _layout; contents need not be set)."""
    if kind < 0 or kind > 2:
        return True
    rows, cols = src.shape
    span, step, band_rows, bands_per, padded, acc_rows, colmax_len = _layout(cols, tile_rows, tile_cols)
    qmax_bits = _bits(qmax)
    cap = _scale_cap(qmax)
    saturated = 0
    flushed = 0
    max_err = np.uint32(0)
    band = 0
    while band < rows:  # while loops: a range with a variable step could raise (the compiled entry raises nothing)
        stop = min(rows, band + band_rows)
        acc[:] = 0
        c0 = 0
        while c0 < cols:
            n = min(span, cols - c0)
            t0 = c0 // tile_cols
            t1 = t0 + -(-n // tile_cols)
            for b in range(bands_per):
                r0 = band + b * tile_rows
                if r0 >= stop:
                    break
                _span_amax_bits(src, r0, min(stop, r0 + tile_rows), c0, n, tile_cols, colmax, amax_bits, t0)
                if _fill_scales(amax_bits, t0, t1, fixed_scale, given, qmax, cap, scales[r0 // tile_rows]):
                    return True
            s0 = c0
            while s0 < c0 + n:
                m = min(step, c0 + n - s0)
                for b in range(bands_per):
                    r0 = band + b * tile_rows
                    if r0 >= stop:
                        break
                    _expand(scales[r0 // tile_rows], s0, tile_cols, m, expanded[b])
                groups = -(-m // LANES)
                for g0 in range(band, stop, ROW_GROUP):
                    for k in range(ROW_GROUP):
                        r = g0 + k
                        if r >= stop:
                            w[k, :] = 0  # a missing row adds squares of zeros to an accumulator nobody reads
                            err[k, :] = 0
                            continue
                        sat, flush, big = _quantize_row(src, r, s0, m, expanded[(r - band) // tile_rows], qmax, kind,
                                                        qmax_bits, codes, w[k], err[k])
                        saturated += sat
                        flushed += flush
                        max_err = _max(max_err, big)
                    _lane_squares(w, err, groups, acc, g0 - band)
                s0 += step
            c0 += span
        for i in range(stop - band):
            a = acc[i]
            stats[0] += a[0] + a[1] + a[2] + a[3] + a[4] + a[5] + a[6] + a[7]
            stats[1] += a[8] + a[9] + a[10] + a[11] + a[12] + a[13] + a[14] + a[15]
        band += band_rows
    stats[2] = max(stats[2], np.float64(_float(max_err)))
    stats[3] += saturated
    stats[4] += flushed
    return False


@njit(cache=True, nogil=True, error_model="numpy")
def _scale_cap(qmax):
    """kernels._scale_cap: the largest float32 scale with qmax * scale finite (one float32 step toward
    zero is the bit pattern minus one for a positive finite float32)."""
    cap = np.float32(np.float64(_FLOAT32_MAX) / np.float64(qmax))
    while np.isinf(np.float32(cap * qmax)):
        cap = _float(_sub(_bits(cap), np.uint32(1)))
    return cap


@njit(cache=True, nogil=True, error_model="numpy")
def _scale(amax, qmax, cap):
    """kernels.scale_from_amax for one tile with amax > 0 (same two ends of the range)."""
    s = amax / qmax
    if s < _SMALLEST_NORMAL:
        s = np.float32(np.ceil(np.float64(amax) / _SUBNORMAL_STEP / np.float64(qmax)) * _SUBNORMAL_STEP)
    return min(s, cap)


# ---- the ahead-compiled entry (aot.py) -----------------------------------------------------------

@intrinsic
def _advance(typingctx, ptr, n):
    """ptr + n elements (a typed pointer)."""
    if not isinstance(ptr, types.CPointer) or n != types.int64:
        return None
    return ptr(ptr, n), lambda context, builder, sig, args: builder.gep(args[0], [args[1]])


NATIVE_OK, NATIVE_NONFINITE, NATIVE_SCRATCH, NATIVE_ARGUMENTS = 0, 1, 2, 3


def native_signature():
    """native_entry's C signature (aot._ARGS is its ctypes twin: tests/test_aot.py compares them)."""
    i64, f32 = types.int64, types.float32
    return types.int32(types.voidptr, i64, i64, i64, i64, i64, f32, f32, i64, types.CPointer(types.uint8),
                       types.CPointer(f32), i64, i64, types.CPointer(types.float64), i64,
                       types.CPointer(types.float64), i64, types.CPointer(f32), i64,
                       types.CPointer(types.uint32), i64, types.CPointer(i64))


def native_entry(bf16: bool):
    """quantize_chunk for one source type (bf16 bits, or float32) as a C function over raw pointers
    (compiled here, on demand: a cfunc compiles when it is defined; one type, so a first run compiles
    only what it needs), with its scratch given by the caller, so the machine code calls nothing outside
    itself (no allocator, no exception machinery) and aot.py can cache and load it without numba.

    int32 entry(src, is_bf16, rows, cols, tile_rows, tile_cols, fixed_scale, qmax, kind, codes, scales,
                grid_rows, n_tiles, stats, given, f64, n_f64, f32, n_f32, u32, n_u32, need):
    src: rows x cols of uint16 (bf16 bits; is_bf16 = 1) or float32, C order; codes: rows x cols uint8;
    scales: grid_rows x n_tiles float32; stats: float64[5]; f64 / f32 / u32: scratch of n_* elements.
    Returns NATIVE_OK, NATIVE_NONFINITE (quantize_chunk's True), NATIVE_SCRATCH (the scratch is too
    small: need[0..2] then holds the element counts it needs) or NATIVE_ARGUMENTS (shapes that do not
    fit together, or is_bf16 not this entry's type; nothing written)."""
    from numba import carray, cfunc

    source_type = np.uint16 if bf16 else np.float32

    @cfunc(native_signature(), nogil=True, error_model="numpy")
    def entry(src, is_bf16, rows, cols, tile_rows, tile_cols, fixed_scale, qmax, kind, codes, scales,
              grid_rows, n_tiles, stats, given, f64, n_f64, f32, n_f32, u32, n_u32, need):
        if (rows < 0 or (is_bf16 != 0) != bf16 or cols < 0 or tile_rows < 1 or tile_cols < 1
                or grid_rows < -(-rows // tile_rows) or n_tiles < -(-cols // tile_cols)):
            return NATIVE_ARGUMENTS
        span, step, band_rows, bands_per, padded, acc_rows, colmax_len = _layout(cols, tile_rows, tile_cols)
        wants_f64 = acc_rows * 2 * LANES
        wants_f32 = (2 * ROW_GROUP + bands_per) * padded
        wants_u32 = colmax_len + n_tiles
        if n_f64 < wants_f64 or n_f32 < wants_f32 or n_u32 < wants_u32:
            out = carray(need, (3,))
            out[0] = wants_f64
            out[1] = wants_f32
            out[2] = wants_u32
            return NATIVE_SCRATCH
        w = carray(f32, (ROW_GROUP, padded))
        err = carray(_advance(f32, ROW_GROUP * padded), (ROW_GROUP, padded))
        expanded = carray(_advance(f32, 2 * ROW_GROUP * padded), (bands_per, padded))
        acc = carray(f64, (acc_rows, 2 * LANES))
        colmax = carray(u32, (colmax_len,))
        amax_bits = carray(_advance(u32, colmax_len), (n_tiles,))
        out_codes = carray(codes, (rows, cols))
        grid = carray(scales, (grid_rows, n_tiles))
        sums = carray(stats, (5,))
        nonfinite = _quantize_into(carray(src, (rows, cols), source_type), tile_rows, tile_cols, fixed_scale,
                                   qmax, kind, out_codes, grid, sums, given != 0, w, err, acc, expanded, colmax,
                                   amax_bits)
        return NATIVE_NONFINITE if nonfinite else NATIVE_OK

    return entry
