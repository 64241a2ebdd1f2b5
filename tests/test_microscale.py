"""Microscaling kernels (fp8conv.microscale) against float64 references written here.

The references build every format from its definition: the e2m1 grid from its bit layout, RNE by
nearest-with-ties-to-even-code over that grid, E8M0 as 2^(code-127), and the compressed-tensors
scale formulas with their roundings spelled out step by step in float64 plus an explicit rounding
to bf16 / float32 / e4m3 after each step (ml_dtypes casts, not the product's bit tricks).
Failures say which element differs.
"""
from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fp8conv.numerics import microscale as ms

BF16 = np.dtype(ml_dtypes.bfloat16)
E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
RNG_SEED = 20261127
BACKENDS = pytest.mark.parametrize("compiled", [False, True], ids=["numpy", "native"])


# ---- references -----------------------------------------------------------------------------

def ref_e2m1_grid() -> list[float]:
    """Values of codes 0..15 from the layout s|ee|m, exponent bias 1, subnormal at e == 0."""
    out = []
    for code in range(16):
        s, e, m = code >> 3, (code >> 1) & 3, code & 1
        mag = m * 2.0 ** (1 - 1) * 0.5 if e == 0 else (1 + m / 2) * 2.0 ** (e - 1)
        out.append(-mag if s else mag)
    return out


GRID = ref_e2m1_grid()


def ref_e2m1_code(x: float) -> int:
    """Nearest e2m1 value, ties to the even code, saturating at +-6; +-0 -> code 0."""
    if x == 0:
        return 0
    mag = min(abs(x), 6.0)
    best = min(range(8), key=lambda c: (abs(GRID[c] - mag), c % 2))
    return best | (8 if x < 0 else 0)


def to_bf16(x) -> np.ndarray:
    return np.asarray(x, np.float64).astype(np.float32).astype(BF16).astype(np.float64)


def to_f32(x) -> np.ndarray:
    with np.errstate(over="ignore"):
        return np.asarray(x, np.float64).astype(np.float32).astype(np.float64)


def to_f16(x) -> np.ndarray:
    with np.errstate(over="ignore"):
        return np.asarray(x, np.float64).astype(np.float32).astype(np.float16).astype(np.float64)


ROUND = {BF16: to_bf16, np.dtype(np.float16): to_f16, np.dtype(np.float32): to_f32}


def ref_global_scale(amax: float, dtype) -> float:
    """generate_gparam: 2688 / amax as reciprocal(amax) * 2688 in the weight's dtype; fp16 overflow redone in f32."""
    rnd = ROUND[np.dtype(dtype)]
    amax_c = max(amax, 2.0**-14 if dtype == np.float16 else 2.0**-126)
    reciprocal = rnd(to_f32(1.0 / amax_c))
    gs = float(rnd(to_f32(reciprocal * 2688.0)))
    if not math.isfinite(gs) and dtype == np.float16:
        return ref_global_scale(amax, np.float32)
    return gs if math.isfinite(gs) else 1.0


def ref_group_scale(amax: float, gs: float, dtype) -> float:
    rnd = ROUND[np.dtype(dtype)]
    local = rnd(to_f32(amax / 6.0))
    scaled = min(float(to_f32(gs * local)), 448.0)
    value = float(np.float32(scaled).astype(E4M3).astype(np.float64))
    return 0.125 if value == 0 else value


def ref_e8m0_code(amax: float, emax: int) -> int:
    if amax == 0 or amax < 2.0**-126:
        return 0
    e = math.floor(math.log2(amax))
    if amax / 2.0**e >= 1.75:
        e += 1
    return int(min(max(127 + e - emax, 0), 254))


def ref_nvfp4(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """(codes [rows, cols], group scale values [rows, cols/16], global scale) in float64 steps."""
    x = w.astype(np.float64)
    gs = ref_global_scale(float(np.abs(x).max(initial=0)), w.dtype)
    rows, cols = x.shape
    scales = np.zeros((rows, cols // 16))
    codes = np.zeros((rows, cols), np.uint8)
    for r in range(rows):
        for g in range(cols // 16):
            group = x[r, g * 16:(g + 1) * 16]
            s = ref_group_scale(float(np.abs(group).max()), gs, w.dtype)
            scales[r, g] = s
            eff = to_f32(s / gs)
            for j, v in enumerate(group):
                codes[r, g * 16 + j] = ref_e2m1_code(float(to_f32(v / eff)) if v != 0 else 0.0)
    return codes, scales, gs


def ref_mx(w: np.ndarray, emax: int) -> tuple[np.ndarray, np.ndarray]:
    """(element values [rows, cols] (e2m1 codes when emax == 2, e4m3 values when 8), E8M0 codes)."""
    x = w.astype(np.float64)
    rows, cols = x.shape
    codes = np.zeros((rows, cols // 32), np.uint8)
    elems = np.zeros((rows, cols), np.uint8 if emax == 2 else np.float64)
    for r in range(rows):
        for g in range(cols // 32):
            group = x[r, g * 32:(g + 1) * 32]
            code = ref_e8m0_code(float(np.abs(group).max()), emax)
            codes[r, g] = code
            scaled = group / 2.0 ** (code - 127)
            for j, v in enumerate(scaled):
                if emax == 2:
                    elems[r, g * 32 + j] = ref_e2m1_code(v)
                else:
                    elems[r, g * 32 + j] = float(np.float32(np.clip(v, -448, 448)).astype(E4M3).astype(np.float64))
    return elems, codes


def ref_unpack(packed: np.ndarray) -> np.ndarray:
    rows, half = packed.shape
    out = np.zeros((rows, half * 2), np.uint8)
    for r in range(rows):
        for k in range(half):
            out[r, 2 * k] = packed[r, k] & 0xF
            out[r, 2 * k + 1] = packed[r, k] >> 4
    return out


def assert_same(actual: np.ndarray, expected: np.ndarray, what: str) -> None:
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    bad = np.argwhere(~((actual == expected) | (np.isnan(actual.astype(np.float64)) & np.isnan(expected.astype(np.float64)))))
    assert bad.size == 0, (f"{what}: {len(bad)} differ, first at {tuple(bad[0])}: "
                           f"{actual[tuple(bad[0])]} != {expected[tuple(bad[0])]}")


def weights(rows: int, cols: int, dtype=BF16, seed: int = 0, scale: float = 0.02) -> np.ndarray:
    rng = np.random.default_rng(RNG_SEED + seed)
    return (rng.standard_normal((rows, cols)) * scale).astype(np.float32).astype(dtype)


# ---- e2m1 ---------------------------------------------------------------------------------------

def test_e2m1_grid_from_bit_layout():
    assert_same(ms.e2m1_values(), np.array(GRID, np.float32), "e2m1 values")
    assert sorted(set(abs(v) for v in GRID)) == [0, 0.5, 1, 1.5, 2, 3, 4, 6]


def test_all_16_e2m1_codes_round_trip():
    codes = np.arange(16, dtype=np.uint8)
    back = ms.e2m1_encode(ms.e2m1_decode(codes))
    # -0 (code 8) encodes as +0 (code 0), as compressed-tensors' cast does; every other code is itself.
    assert_same(back, np.where(codes == 8, 0, codes).astype(np.uint8), "encode(decode(code))")
    assert_same(ms.e2m1_decode(back), ms.e2m1_decode(codes), "values")


def test_e2m1_encode_every_bf16_pattern_matches_reference():
    values = np.arange(1 << 16, dtype=np.uint16).view(BF16).astype(np.float32)
    finite = np.isfinite(values)
    expected = np.array([ref_e2m1_code(float(v)) for v in values[finite]], np.uint8)
    assert_same(ms.e2m1_encode(values[finite]), expected, "e2m1 of bf16 patterns")


def test_e2m1_encode_ties_and_neighbours_in_float32():
    mids = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 7.0, 1e30]
    values = []
    for m in mids:
        m32 = np.float32(m)
        values += [m32, np.nextafter(m32, np.float32(0)), np.nextafter(m32, np.float32(np.inf))]
    values = np.array(values + [-v for v in values] + [np.float32(np.inf), np.float32(-np.inf), 1e-45, -1e-45], np.float32)
    expected = np.array([ref_e2m1_code(float(v)) for v in values], np.uint8)
    assert_same(ms.e2m1_encode(values), expected, "e2m1 at ties")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-20, 20, width=32), min_size=1, max_size=64))
def test_e2m1_encode_hypothesis(values):
    values = np.array(values, np.float32)
    expected = np.array([ref_e2m1_code(float(v)) for v in values], np.uint8)
    assert_same(ms.e2m1_encode(values), expected, "e2m1")


def test_pack_unpack_nibbles_against_bit_reference():
    rng = np.random.default_rng(RNG_SEED)
    codes = rng.integers(0, 16, size=(5, 34), dtype=np.uint8)
    packed = ms.pack_nibbles(codes)
    expected = np.array([[codes[r, 2 * k] | (codes[r, 2 * k + 1] << 4) for k in range(17)] for r in range(5)], np.uint8)
    assert_same(packed, expected, "packed bytes")
    assert_same(ms.unpack_nibbles(packed), codes, "unpacked codes")
    every_byte = np.arange(256, dtype=np.uint8).reshape(1, 256)
    assert_same(ms.unpack_nibbles(every_byte), ref_unpack(every_byte), "unpack of all 256 bytes")
    assert_same(ms.pack_nibbles(ms.unpack_nibbles(every_byte)), every_byte, "pack(unpack(byte))")
    pairs = ms.unpack_e2m1_values(every_byte)
    assert_same(pairs, np.array(GRID, np.float32)[ref_unpack(every_byte)], "e2m1 values of all bytes")
    with pytest.raises(ValueError, match="odd"):
        ms.pack_nibbles(np.zeros((2, 3), np.uint8))


# ---- E8M0 ---------------------------------------------------------------------------------------

def test_all_256_e8m0_codes_round_trip():
    codes = np.arange(256, dtype=np.uint8)
    values = ms.e8m0_decode(codes)
    expected = np.array([2.0 ** (c - 127) if c < 255 else np.nan for c in range(256)], np.float64)
    assert_same(values.astype(np.float64), expected, "E8M0 values")
    assert_same(ms.e8m0_encode(values), codes, "encode(decode(code))")
    recip = ms.e8m0_reciprocal(codes[:255]).astype(np.float64)
    assert_same(recip, 1.0 / expected[:255], "E8M0 reciprocals")


@pytest.mark.parametrize("emax", [2, 8])
def test_e8m0_exponent_choice(emax):
    amax = []
    for e in range(-140, 128):
        for sig in (1.0, 1.5, np.nextafter(np.float32(1.75), np.float32(0)) / 1.0, 1.75, 1.9999):
            value = np.float32(sig) * np.float32(2.0) ** np.float32(e) if e > -127 else np.float32(sig * 2.0**e)
            amax.append(value)
    amax = np.array(amax + [0.0, 6.0, 448.0, 7.0, 1.5 * 2**-130], np.float32)
    amax = amax[np.isfinite(amax)]
    expected = np.array([ref_e8m0_code(float(a), emax) for a in amax], np.uint8)
    assert_same(ms.e8m0_from_amax(amax, emax), expected, f"E8M0 codes (emax {emax})")


def test_e8m0_rounds_up_at_seven_quarters():
    # 1.75 * 2^e rounds the scale up (element max 6 = 1.5 * 4 would clip it), just below does not.
    below = np.nextafter(np.float32(7.0), np.float32(0))
    assert ms.e8m0_from_amax(np.array([below, 7.0, 4.0, 6.0], np.float32), 2).tolist() == [127, 128, 127, 127]


# ---- NVFP4 --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [BF16, np.dtype(np.float32), np.dtype(np.float16)])
def test_nvfp4_global_scale_every_bf16_amax(dtype):
    amax = np.arange(0, 0x7F80, 7, dtype=np.uint16).view(BF16).astype(np.float32)
    got = np.array([ms.nvfp4_global_scale(a, dtype) for a in amax], np.float32)
    expected = np.array([ref_global_scale(float(a), dtype) for a in amax], np.float32)
    assert_same(got, expected, "global scale")
    if dtype == np.float16:
        small = float(np.float32(0.001))  # 2688 / 0.001 overflows fp16: redone in float32, not 1.0
        assert ms.nvfp4_global_scale(small, dtype) == np.float32(ref_global_scale(small, np.float32)) != 1.0
    else:
        assert ms.nvfp4_global_scale(0.0, dtype) == np.float32(1.0)


def test_nvfp4_global_scale_double_bf16_rounding_is_kept():
    # bf16(bf16(1/a) * 2688) differs from bf16(2688/a) for some a; torch computes the former.
    amax = np.arange(0x3C00, 0x4100, dtype=np.uint16).view(BF16).astype(np.float64)
    single = to_bf16(to_f32(2688.0 / amax))
    double = np.array([ref_global_scale(a, BF16) for a in amax])
    assert (single != double).any()
    got = np.array([ms.nvfp4_global_scale(a, BF16) for a in amax], np.float64)
    assert_same(got, double, "global scale")


def test_nvfp4_group_scales_incl_subnormal_and_zero():
    gs = np.float32(ref_global_scale(1.0, BF16))
    # gs * amax / 6 spans zero, e4m3 subnormals (< 2^-6), normals and the 448 clamp.
    amax = np.array([0, 1e-7, 2.0**-12, 2.0**-9 * 6 / float(gs), 2.0**-7 * 6 / float(gs), 0.01, 0.3, 1.0, 1.01],
                    np.float32).astype(BF16).astype(np.float32)
    codes = ms.nvfp4_group_scales(amax, gs, BF16)
    expected = np.array([ref_group_scale(float(a), float(gs), BF16) for a in amax], np.float64)
    assert_same(ms.e4m3_decode(codes).astype(np.float64), expected, "group scales")
    assert ms.e4m3_decode(codes)[0] == 0.125
    values = ms.e4m3_decode(codes)
    assert ((values > 0) & (values < 2.0**-6)).any(), "no subnormal e4m3 scale exercised"


@BACKENDS
@pytest.mark.parametrize("dtype", [BF16, np.dtype(np.float32), np.dtype(np.float16)])
@pytest.mark.parametrize("rows,cols", [(3, 16), (7, 48), (1, 64)])
def test_quantize_nvfp4_matches_reference(dtype, rows, cols, compiled):
    w = weights(rows, cols, dtype, seed=rows * cols)
    w[0, :16] = 0  # an all-zero group
    if rows > 1:
        w[1, 3] = np.abs(w.astype(np.float32)).max() * 4  # a saturating tensor amax
    codes, scales, gs = ref_nvfp4(w)
    packed, scale_codes = ms.quantize_nvfp4(w, ms.nvfp4_global_scale(ms.tensor_amax(w), w.dtype), compiled)
    assert np.float32(gs) == ms.nvfp4_global_scale(ms.tensor_amax(w), w.dtype)
    assert_same(ms.e4m3_decode(scale_codes).astype(np.float64), scales, "group scales")
    assert_same(ms.unpack_nibbles(packed), codes, "e2m1 codes")


@BACKENDS
def test_quantize_nvfp4_all_zero_tensor(compiled):
    w = np.zeros((2, 32), BF16)
    gs = ms.nvfp4_global_scale(ms.tensor_amax(w), BF16)
    packed, scales = ms.quantize_nvfp4(w, gs, compiled)
    assert gs == 1.0 and (packed == 0).all() and (ms.e4m3_decode(scales) == 0.125).all()


@BACKENDS
def test_quantize_nvfp4_saturation_points(compiled):
    # A group whose amax maps to exactly 6: elements at +-amax, +-amax * 5/6 (tie 5 -> 4) and just above.
    amax = np.float32(3.0)
    row = np.array([amax, -amax, amax * 5 / 6, -amax * 5 / 6, amax * 0.5833, amax / 12, -amax / 12] + [0] * 9, np.float32)
    w = row.reshape(1, 16)
    codes, _, gs = ref_nvfp4(w)
    packed, _ = ms.quantize_nvfp4(w, ms.nvfp4_global_scale(ms.tensor_amax(w), w.dtype), compiled)
    assert_same(ms.unpack_nibbles(packed), codes, "codes")
    assert ms.unpack_nibbles(packed)[0, :2].tolist() == [7, 15]


def test_dequantize_nvfp4_reference():
    w = weights(4, 32, BF16, seed=5)
    gs = ms.nvfp4_global_scale(ms.tensor_amax(w), BF16)
    packed, scales = ms.quantize_nvfp4(w, gs)
    codes = ms.unpack_nibbles(packed)
    eff = to_f32(ms.e4m3_decode(scales).astype(np.float64) / float(gs))
    expected = to_bf16(to_f32(np.array(GRID)[codes] * np.repeat(eff, 16, axis=1)))
    assert_same(ms.dequantize_nvfp4(packed, scales, gs).astype(np.float64), expected, "dequantized bf16")
    expected32 = to_f32(np.array(GRID)[codes] * np.repeat(eff, 16, axis=1))
    assert_same(ms.dequantize_nvfp4(packed, scales, gs, np.float32).astype(np.float64), expected32, "dequantized f32")


# ---- MX -----------------------------------------------------------------------------------------

@BACKENDS
@pytest.mark.parametrize("element,emax", [("e2m1", 2), ("e4m3", 8)])
@pytest.mark.parametrize("dtype", [BF16, np.dtype(np.float32), np.dtype(np.float16)])
def test_quantize_mx_matches_reference(element, emax, dtype, compiled):
    w = weights(5, 96, dtype, seed=emax)
    w[0, :32] = 0
    w[1, :32] = np.float32(7.0)  # significand 1.75: the exponent rounds up
    w[2, 32:64] = np.float32(1e-30) if dtype != np.float16 else np.float32(1e-7)
    elems, codes = ref_mx(w, emax)
    out, scales = ms.quantize_mx(w, element, compiled)
    assert_same(scales, codes, "E8M0 codes")
    if element == "e2m1":
        assert_same(ms.unpack_nibbles(out), elems, "e2m1 codes")
    else:
        assert_same(ms.e4m3_decode(out).astype(np.float64), elems, "e4m3 values")


@pytest.mark.parametrize("element", ["e2m1", "e4m3"])
def test_dequantize_mx_reference(element):
    w = weights(3, 64, BF16, seed=9)
    out, scales = ms.quantize_mx(w, element)
    values = np.array(GRID)[ms.unpack_nibbles(out)] if element == "e2m1" else ms.e4m3_decode(out).astype(np.float64)
    expected = values * np.repeat(2.0 ** (scales.astype(np.float64) - 127), 32, axis=1)
    assert_same(ms.dequantize_mx(out, scales, element, np.float32).astype(np.float64), expected, "f32")
    assert_same(ms.dequantize_mx(out, scales, element).astype(np.float64), to_bf16(expected), "bf16")


@BACKENDS
@pytest.mark.parametrize("dtype", [BF16, np.dtype(np.float32), np.dtype(np.float16)])
def test_group_amax_and_tensor_amax(dtype, compiled):
    w = weights(3, 64, dtype, seed=2)
    x = w.astype(np.float64)
    got = ms.weight_group_amax(w, 16, compiled).astype(np.float64)
    assert_same(got, np.abs(x).reshape(3, 4, 16).max(axis=2), "group amax")
    assert float(ms.tensor_amax(w)) == np.abs(x).max()
    w[1, 5] = np.nan
    assert np.isnan(ms.tensor_amax(w)) and np.isnan(ms.weight_group_amax(w, 32, compiled)[1, 0])
    with pytest.raises(ValueError, match="do not divide"):
        ms.group_amax(np.zeros((2, 24), BF16), 16)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4", "mxfp8"])
@pytest.mark.parametrize("dtype", [BF16, np.dtype(np.float32), np.dtype(np.float16)])
def test_backends_give_identical_codes_scales_and_statistics(fmt, dtype):
    from fp8conv.numerics.kernels import quantize_microscale
    from fp8conv.plan.scheme import microscale_scheme

    scheme = microscale_scheme(fmt)
    w = weights(37, 96, dtype, seed=11, scale=0.3)
    w[3, :40] = 0
    gs = ms.nvfp4_global_scale(ms.tensor_amax(w), w.dtype) if fmt == "nvfp4" else None
    a = quantize_microscale(w, scheme, gs, backend="numpy")
    b = quantize_microscale(w, scheme, gs, backend="native")
    assert a.codes.tobytes() == b.codes.tobytes() and a.scales.tobytes() == b.scales.tobytes()
    assert a.stats == b.stats
    # and the statistics are those of the dequantized weights, in float64
    if fmt == "mxfp8":
        deq = ms.dequantize_mx(a.codes.view(np.uint8), a.scales, "e4m3", np.float32)
    elif fmt == "mxfp4":
        deq = ms.dequantize_mx(a.codes, a.scales, "e2m1", np.float32)
    else:
        deq = ms.dequantize_nvfp4(a.codes, a.scales, gs, np.float32)
    x = w.astype(np.float64)
    err = x - deq.astype(np.float64)
    assert a.stats.sum_sq_ref == pytest.approx((x ** 2).sum(), rel=1e-12)
    assert a.stats.sum_sq_err == pytest.approx((err ** 2).sum(), rel=1e-12)
    assert a.stats.max_abs_err == np.abs(err).max()
    assert a.stats.flushed_to_zero == int(((deq == 0) & (x != 0)).sum())


@pytest.mark.unit
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4", "mxfp8"])
def test_one_pass_kernel_over_many_rows_and_a_late_nan(fmt):
    """The compiled one-pass encode + statistics kernel (what a native conversion runs): many rows, each
    row's codes and statistics made together, against the float64 reference; a NaN in the last row
    (after rows already written) is reported as None, for the numpy path to refuse."""
    from fp8conv.accel import native
    from fp8conv.numerics.kernels import quantize_microscale
    from fp8conv.numerics.microscale_kernel import _code_values
    from fp8conv.plan.scheme import microscale_scheme

    if not native.AVAILABLE:
        pytest.fail(f"the C extension is not built ({native.IMPORT_ERROR}): pip install -e .")
    scheme = microscale_scheme(fmt)
    w = weights(160, 128, BF16, seed=29, scale=0.3)
    w[7] = (w[7].astype(np.float32) * 1e4).astype(BF16)  # a row of large values beside small ones
    w[9, :64] = 0
    w[11, ::3] = np.float32(1e-6)  # flushed to zero next to large group members
    w[11, 1] = np.float32(50.0)
    gs = ms.nvfp4_global_scale(ms.tensor_amax(w), w.dtype) if fmt == "nvfp4" else None
    q = quantize_microscale(w, scheme, gs, backend="native")
    x = w.astype(np.float64)
    if fmt == "nvfp4":
        codes, scales, _ = ref_nvfp4(w)
        assert_same(ref_unpack(q.codes), codes, "e2m1 codes")
        values = np.array(GRID)[codes]
        deq = (values * np.repeat(to_f32(scales / gs), 16, axis=1)).astype(np.float32)
    else:
        elems, scale_codes = ref_mx(w, 2 if fmt == "mxfp4" else 8)
        values = np.array(GRID)[elems] if fmt == "mxfp4" else elems
        got = ref_unpack(q.codes) if fmt == "mxfp4" else q.codes.astype(np.float64)
        assert_same(got, elems, "element codes")
        deq = (values * np.repeat(2.0 ** (scale_codes.astype(np.float64) - 127), 32, axis=1)).astype(np.float32)
    err = x - deq.astype(np.float64)
    assert q.stats.sum_sq_ref == pytest.approx((x ** 2).sum(), rel=1e-12)
    assert q.stats.sum_sq_err == pytest.approx((err ** 2).sum(), rel=1e-12)
    assert q.stats.max_abs_err == np.abs(err).max()
    assert q.stats.flushed_to_zero == int(((deq == 0) & (x != 0)).sum()) > 0
    assert q.stats.saturated == int((np.abs(values) >= float(scheme.fmt.qmax)).sum())
    bad = w.copy()
    bad[-1, 5] = np.nan
    factor = np.ones((160, 128 // scheme.group_size), np.float32)
    assert native.micro_encode_stats(bad, scheme.group_size, factor, True, scheme.fmt, _code_values(scheme),
                                     factor) is None


def test_microscale_scale_formats_declare_their_range_ends():
    """The range-end attributes every scale format carries (the kernels' rule for float32 / bf16 / fp16
    scales reads them) describe the microscale codes too: E8M0 code 0 is 2**-127 (no zero scale, no
    subnormals), e4m3 steps by 2**-9 below its normal 2**-6; and the largest finite amax never
    reaches E8M0's NaN code 255."""
    from fp8conv.formats import SCALE_FORMATS

    e8m0, e4m3 = SCALE_FORMATS["e8m0"], SCALE_FORMATS["e4m3_global"]
    assert float(e8m0.smallest_normal) == e8m0.smallest_subnormal == 2.0**-127
    assert float(ms.e8m0_decode(np.array([0], np.uint8))[0]) == 2.0**-127
    assert (float(e4m3.smallest_normal), e4m3.smallest_subnormal) == (2.0**-6, 2.0**-9)
    assert float(ms.e4m3_decode(np.array([1], np.uint8))[0]) == 2.0**-9
    top = np.array([np.finfo(np.float32).max], np.float32)
    for emax in (2, 8):
        code = int(ms.e8m0_from_amax(top, emax)[0])
        assert code == 128 + 127 - emax <= 254  # 2**128 after rounding up at 1.75, less emax


def special_weight(dtype, fmt: str, seed: int) -> np.ndarray:
    """[12, 128] values that reach every branch of the element encoders: exact ties between grid points (power-of-
    two MX scales keep them exact), saturation, subnormal sources, signed zeros next to nonzeros, tiny members of
    large groups (flushed to zero), all-zero groups, and heavy-tailed random rows."""
    rng = np.random.default_rng(RNG_SEED + seed)
    w = (rng.standard_normal((12, 128)) * 0.02).astype(np.float32)
    w[0, ::17] *= 40.0
    ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0] if fmt != "mxfp8" else [1.0625, 1.1875, 3.25, 17.0, 88.0, 0.0068359375, 232.0]
    top = 6.0 if fmt != "mxfp8" else 256.0
    for r, k in ((1, 0), (2, -5), (3, 7)):
        tied = np.array([top] + ties + [-t for t in ties] + [0.0, -0.0] * 9, np.float32)[:32] * np.float32(2.0**k)
        w[r, :32] = tied
        w[r, 32:64] = -tied[::-1]
    w[4, :32] = np.float32(6.5)  # above the grid's top after the scale: saturates
    w[4, 32:48] = np.float32(-1e-41 if dtype != np.float16 else -3e-8)  # subnormal sources
    w[5, :64] = 0
    w[5, 64:96] = -0.0
    w[5, 96] = np.float32(1e-3)
    w[6, ::5] = np.float32(1e-7)  # flushed next to a large member of the same group
    w[6, 1::32] = np.float32(30.0)
    return w.astype(dtype)


@pytest.mark.unit
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4", "mxfp8"])
@pytest.mark.parametrize("dtype", [BF16, np.dtype(np.float32), np.dtype(np.float16)])
def test_one_pass_kernel_on_ties_saturation_subnormals_and_zeros(fmt, dtype):
    """The vectorised one-pass kernel (AVX2 where the CPU has it) and the numpy reference against the float64
    reference on every special value class (scales and codes), the statistics equal between backends, also from
    the encode + statistics kernel alone; NaN / Inf in the last row of an fp16 / float32 / bf16 source is reported (None)."""
    from fp8conv.accel import native
    from fp8conv.errors import InputError
    from fp8conv.numerics.kernels import quantize_microscale
    from fp8conv.numerics.microscale_kernel import _code_values
    from fp8conv.plan.scheme import microscale_scheme

    if not native.AVAILABLE:
        pytest.fail(f"the C extension is not built ({native.IMPORT_ERROR}): pip install -e .")
    scheme = microscale_scheme(fmt)
    w = special_weight(dtype, fmt, seed=len(fmt) + dtype.itemsize)
    gs = ms.nvfp4_global_scale(ms.tensor_amax(w), w.dtype) if fmt == "nvfp4" else None
    a = quantize_microscale(w, scheme, gs, backend="numpy")
    b = quantize_microscale(w, scheme, gs, backend="native")
    if fmt == "nvfp4":
        codes, _, _ = ref_nvfp4(w)
        got_a, got_b = ref_unpack(a.codes), ref_unpack(b.codes)
    else:
        codes, _ = ref_mx(w, 2 if fmt == "mxfp4" else 8)
        unpack = ref_unpack if fmt == "mxfp4" else (lambda c: ms.e4m3_decode(c.view(np.uint8)).astype(np.float64))
        got_a, got_b = unpack(a.codes), unpack(b.codes)
    assert_same(got_a, codes, "numpy codes")
    assert_same(got_b, codes, "native codes")
    assert a.codes.tobytes() == b.codes.tobytes() and a.scales.tobytes() == b.scales.tobytes()
    assert a.stats == b.stats, f"statistics differ: numpy {a.stats} native {b.stats}"
    assert a.stats.saturated > 0 and a.stats.flushed_to_zero > 0
    if fmt == "nvfp4":  # e4m3 scales: subnormal ones, and zero ones stored as 0.125
        assert (a.scales.view(np.uint8) < 8).any() and (ms.e4m3_decode(a.scales) == 0.125).any()
    # the encode + statistics kernel alone (what the observers' scales go through), from the numpy scale codes
    if fmt == "nvfp4":
        divisor = (ms.e4m3_decode(a.scales) / np.float32(gs)).astype(np.float32)
        factor, divide = divisor, True
    else:
        divisor, factor, divide = ms.e8m0_decode(a.scales), ms.e8m0_reciprocal(a.scales), False
    codes, raw = native.micro_encode_stats(w, scheme.group_size, factor, divide, scheme.fmt, _code_values(scheme),
                                           divisor)
    assert codes.tobytes() == a.codes.tobytes()
    assert raw.tolist() == [a.stats.sum_sq_ref, a.stats.sum_sq_err, a.stats.max_abs_err, a.stats.saturated,
                            a.stats.flushed_to_zero]
    for bad_value in (np.inf, -np.inf, np.nan):
        bad = w.copy()
        bad[-1, 77] = bad_value
        factor = np.ones((12, 128 // scheme.group_size), np.float32)
        assert native.micro_encode_stats(bad, scheme.group_size, factor, fmt == "nvfp4", scheme.fmt,
                                         _code_values(scheme), factor) is None, f"{bad_value} not reported"
        with pytest.raises(InputError, match="NaN|Inf"):
            quantize_microscale(bad, scheme, gs, backend="native")


@pytest.mark.unit
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("dtype", [BF16, np.dtype(np.float32), np.dtype(np.float16)])
def test_compiled_scales_over_dense_group_amax(fmt, dtype):
    """The one-pass kernel's scale rule (NVFP4: e4m3(min(gs * arith(amax / 6), 448)), zero -> 0.125, in the
    weight's dtype; MX: E8M0 from the amax's bits) on ~4,000 groups whose amax walks the dtype's grid over 30
    binades, against the float64 reference (each rounding spelled out) and the numpy backend."""
    from fp8conv.accel import native
    from fp8conv.formats import FORMATS
    from fp8conv.numerics.kernels import quantize_microscale
    from fp8conv.plan.scheme import microscale_scheme

    if not native.AVAILABLE:
        pytest.fail(f"the C extension is not built ({native.IMPORT_ERROR}): pip install -e .")
    scheme = microscale_scheme(fmt)
    rng = np.random.default_rng(RNG_SEED + 31)
    amax = np.unique(ROUND[dtype](2.0 ** rng.uniform(-14 if dtype == np.float16 else -24, 15.9, 4096)))
    amax = amax[np.isfinite(amax) & (amax > 0)]
    group = scheme.group_size
    members = ROUND[dtype](amax[:, None] * rng.uniform(-1, 1, (amax.size, group - 1)))
    w = np.concatenate([amax[:, None] * np.where(rng.random((amax.size, 1)) < 0.5, -1, 1), members], axis=1)
    w = w.astype(np.float32).astype(dtype)
    x = np.abs(w.astype(np.float64)).max(axis=1)
    if fmt == "nvfp4":
        gs = ms.nvfp4_global_scale(ms.tensor_amax(w), w.dtype)
        local = ROUND[dtype](to_f32(x / 6.0))
        scaled = np.minimum(to_f32(float(gs) * local), 448.0)
        expected = scaled.astype(np.float32).astype(E4M3).astype(np.float64)
        expected = np.where(expected == 0, 0.125, expected)
        decode = lambda s: ms.e4m3_decode(s).astype(np.float64)[:, 0]  # noqa: E731
    else:
        gs = None
        expected = np.array([ref_e8m0_code(float(a), 2) for a in x], np.float64)
        decode = lambda s: s.astype(np.float64)[:, 0]  # noqa: E731
    a = quantize_microscale(w, scheme, gs, backend="numpy")
    b = quantize_microscale(w, scheme, gs, backend="native")
    assert_same(decode(b.scales), expected, "native scales")
    assert_same(decode(a.scales), expected, "numpy scales")
    assert a.codes.tobytes() == b.codes.tobytes() and a.stats == b.stats
    # the scale codes alone (the observers' starting point), and NaN reported
    args = (scheme.group_size, scheme.fmt, gs, FORMATS["fp8_e4m3"], ms.NVFP4_ZERO_GROUP_SCALE, 2)
    assert native.micro_scales(w, *args).tobytes() == a.scales.tobytes()
    bad = w.copy()
    bad[-1, 1] = np.nan
    assert native.micro_scales(bad, *args) is None


@pytest.mark.unit
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4", "mxfp8"])
@pytest.mark.parametrize("dtype", [BF16, np.dtype(np.float32), np.dtype(np.float16)])
def test_row_pieces_carry_the_statistics_of_the_whole(fmt, dtype):
    """The one-pass kernel over row pieces in order (kernels.quantize_rows_into, what a conversion runs on pieces
    of a chunk) gives the codes, scale codes and statistics of the numpy path on the whole chunk, to the last bit;
    a piece holding Inf is handed back (None)."""
    from fp8conv.accel import native
    from fp8conv.numerics.kernels import quantize_microscale, quantize_rows_into, stats_of
    from fp8conv.plan.scheme import microscale_scheme

    if not native.AVAILABLE:
        pytest.fail(f"the C extension is not built ({native.IMPORT_ERROR}): pip install -e .")
    scheme = microscale_scheme(fmt)
    w = special_weight(dtype, fmt, seed=7 + dtype.itemsize)
    gs = ms.nvfp4_global_scale(ms.tensor_amax(w), w.dtype) if fmt == "nvfp4" else None
    whole = quantize_microscale(w, scheme, gs, backend="numpy")
    carried = np.zeros(5)
    pieces = [quantize_rows_into(w[r:r + 5], scheme, gs, carried) for r in range(0, 12, 5)]
    assert np.concatenate([p.codes for p in pieces]).tobytes() == whole.codes.tobytes()
    assert np.concatenate([p.scales for p in pieces]).tobytes() == whole.scales.tobytes()
    assert stats_of(w.size, carried) == whole.stats
    bad = w.copy()
    bad[6, 3] = np.inf
    assert quantize_rows_into(bad[5:10], scheme, gs, np.zeros(5)) is None
