"""INT4 / INT8 weight-only kernels and packing against references written in the tests.

The float64 reference (tests/reference.py, no fp8conv import) follows README's integer numerics
step by step; the packing reference below reads each code back bit by bit from the int32 words,
as compressed-tensors' pack_to_int32 lays them out.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fp8conv import dequantize_tensor, quantize_tensor
from fp8conv.errors import SchemeError
from fp8conv.formats import FORMATS, SCALE_FORMATS
from reference import int_range, reference_quantize_int, reference_stored_scale

BITS = {"int4": 4, "int8": 8}
SEEDS = {"int4": 11, "int8": 12}


def heavy_tailed(rng, shape):
    w = rng.standard_normal(shape).astype(np.float32) * 0.02
    w[..., rng.integers(0, shape[-1], size=2)] *= 20
    return w


def check(w, fmt, granularity, group=128, symmetric=True, scale_format="float32"):
    q = quantize_tensor(w, format=fmt, granularity=granularity, group_size=group, symmetric=symmetric,
                        activations="none", scale_format=scale_format)
    codes, scales, zps, deq = reference_quantize_int(w, BITS[fmt], granularity, group, symmetric, scale_format)
    np.testing.assert_array_equal(q.scales, scales, err_msg="scales")
    if not symmetric:
        np.testing.assert_array_equal(q.zero_points, zps, err_msg="zero points")
    if not np.array_equal(q.codes, codes):
        r, c = np.argwhere(q.codes != codes)[0]
        pytest.fail(f"codes differ first at [{r},{c}]: got {q.codes[r, c]}, expected {codes[r, c]} for w={w[r, c]!r}")
    ours = dequantize_tensor(q.codes, q.scales, format=fmt, granularity=granularity, group_size=group,
                             zero_points=q.zero_points, activations="none")
    # (q - zp) * scale in float32: q - zp is exact and the product is the float64 one rounded once.
    np.testing.assert_array_equal(ours, deq.astype(np.float32))
    return q


@pytest.mark.parametrize("fmt", ["int4", "int8"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity,group", [("channel", 128), ("group", 32), ("group", 128)])
@pytest.mark.parametrize("shape", [(64, 256), (13, 96), (1, 7), (130, 129)])
@pytest.mark.parametrize("scale_format", ["float32", "bf16"])
def test_matches_reference(fmt, symmetric, granularity, group, shape, scale_format):
    rng = np.random.default_rng([SEEDS[fmt], shape[0], shape[1], group, int(symmetric)])
    check(heavy_tailed(rng, shape), fmt, granularity, group, symmetric, scale_format)


@pytest.mark.parametrize("src_dtype", [ml_dtypes.bfloat16, np.float16, np.float32])
@pytest.mark.parametrize("symmetric", [True, False])
def test_source_dtypes(src_dtype, symmetric):
    w = heavy_tailed(np.random.default_rng(3), (24, 64)).astype(src_dtype)
    check(w.astype(np.float32), "int4", "group", 32, symmetric, "bf16")
    q = quantize_tensor(w, format="int4", granularity="group", group_size=32, symmetric=symmetric, scale_format="bf16")
    ref = reference_quantize_int(w.astype(np.float32), 4, "group", 32, symmetric, "bf16")
    np.testing.assert_array_equal(q.codes, ref[0])


@pytest.mark.parametrize("fmt", ["int4", "int8"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_all_zero_groups(fmt, symmetric):
    w = np.zeros((4, 64), np.float32)
    w[2:, 32:] = np.linspace(-1, 0.5, 64).reshape(2, 32)
    q = check(w, fmt, "group", 32, symmetric)
    assert (q.scales[:2] == 1).all() and (q.scales[2:, 0] == 1).all()
    if not symmetric:
        qmin = int_range(BITS[fmt])[0]
        assert (q.zero_points[:2] == qmin).all()  # rint(qmin - 0 / 1): decodes to exactly 0
    deq = dequantize_tensor(q.codes, q.scales, format=fmt, granularity="group", group_size=32, zero_points=q.zero_points)
    assert not deq[:2].any() and not deq[2:, :32].any()


@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_plus_minus_amax(fmt):
    qmin, qmax = int_range(BITS[fmt])
    w = np.array([[3.0, -3.0, 1.5, 0.0], [-3.0, 1.0, 0.0, 0.0]], np.float32)
    q = check(w, fmt, "channel")
    # amax / scale = (qmax - qmin) / 2 = qmax + 0.5: +amax clips to qmax, -amax rounds (half to even) to qmin.
    assert q.codes[0, 0] == qmax and q.codes[0, 1] == qmin and q.codes[1, 0] == qmin
    asym = check(w, fmt, "channel", symmetric=False)
    deq = dequantize_tensor(asym.codes, asym.scales, format=fmt, granularity="channel", zero_points=asym.zero_points)
    # The zero point is rounded too, so the ends are within half a step (not exact).
    assert asym.codes[0, 1] == qmin and asym.codes[0, 0] == qmax
    assert (np.abs(deq - w) <= asym.scales / 2 + 1e-6).all()  # float32 products of values near 3


def test_w8a8_int8_keeps_its_restricted_range():
    q = quantize_tensor(np.array([[-3.0, 3.0]], np.float32), format="int8", granularity="channel")
    assert q.codes.tolist() == [[-127, 127]] and q.scales[0, 0] == np.float32(np.float32(3) / np.float32(127))


def test_scale_is_rounded_before_dividing():
    w = np.array([[0.3, -0.2, 0.1, 0.05]], np.float32)
    q = quantize_tensor(w, format="int4", granularity="channel", scale_format="bf16")
    bf16 = np.float32(np.array([np.float32(0.3) / np.float32(7.5)], np.float32).astype(ml_dtypes.bfloat16)[0])
    assert q.scales[0, 0] == bf16
    assert q.codes.tolist() == [np.clip(np.round((w[0] / bf16).astype(np.float64)), -8, 7).astype(int).tolist()]


def test_int4_refuses_dynamic_activations_and_float_asymmetric():
    with pytest.raises(SchemeError, match="weight-only"):
        quantize_tensor(np.ones((2, 2), np.float32), format="int4", granularity="channel", activations="dynamic")
    with pytest.raises(SchemeError, match="integer formats"):
        quantize_tensor(np.ones((2, 2), np.float32), format="fp8_e4m3", granularity="channel", symmetric=False)
    with pytest.raises(SchemeError, match="unknown backend"):
        quantize_tensor(np.ones((2, 2), np.float32), format="int4", granularity="channel", backend="numba")


def bit_reference_unpack(words: np.ndarray, bits: int, cols: int) -> np.ndarray:
    """Code j of a row is bits [j*bits, (j+1)*bits) of the row's int32 words, little end first, minus 2^(bits-1)."""
    out = np.zeros((words.shape[0], cols), np.int64)
    for r in range(words.shape[0]):
        for j in range(cols):
            word = int(words[r, (j * bits) // 32]) & 0xFFFFFFFF
            out[r, j] = ((word >> ((j * bits) % 32)) & ((1 << bits) - 1)) - (1 << (bits - 1))
    return out


@pytest.mark.parametrize("fmt", ["int4", "int8"])
@pytest.mark.parametrize("cols", [1, 7, 8, 9, 33, 64])
def test_packing_against_bit_reference(fmt, cols):
    bits = BITS[fmt]
    qmin, qmax = int_range(bits)
    codes = np.random.default_rng([bits, cols]).integers(qmin, qmax + 1, size=(5, cols)).astype(np.int8)
    codes[0, 0], codes[-1, -1] = qmin, qmax
    words = FORMATS[fmt].pack_int32(codes)
    assert words.dtype == np.int32 and words.shape == (5, -(-cols * bits // 32))
    np.testing.assert_array_equal(bit_reference_unpack(words, bits, cols), codes)
    pad = words.shape[1] * 32 // bits - cols  # padding fields hold 0 (code qmin), as pack_to_int32's zero padding
    if pad:
        last = words[:, -1].view(np.uint32)
        assert not (last >> np.uint32(32 - pad * bits) if pad * bits < 32 else last).any()


@settings(max_examples=80, deadline=None)
@given(fmt=st.sampled_from(["int4", "int8"]), rows=st.integers(1, 9), cols=st.integers(1, 70), seed=st.integers(0, 2**16))
def test_pack_round_trip(fmt, rows, cols, seed):
    qmin, qmax = int_range(BITS[fmt])
    codes = np.random.default_rng(seed).integers(qmin, qmax + 1, size=(rows, cols)).astype(np.int8)
    fmt_obj = FORMATS[fmt]
    np.testing.assert_array_equal(fmt_obj.unpack_int32(fmt_obj.pack_int32(codes), cols), codes)


@settings(max_examples=60, deadline=None)
@given(
    fmt=st.sampled_from(["int4", "int8"]),
    symmetric=st.booleans(),
    granularity=st.sampled_from(["channel", "group"]),
    rows=st.integers(1, 20),
    cols=st.integers(1, 40),
    group=st.integers(1, 17),
    log_scale=st.integers(-20, 20),
    offset=st.floats(-2, 2),
    seed=st.integers(0, 2**16),
    scale_format=st.sampled_from(["float32", "bf16"]),
)
def test_property_matches_reference(fmt, symmetric, granularity, rows, cols, group, log_scale, offset, seed, scale_format):
    rng = np.random.default_rng(seed)
    w = ((rng.standard_normal((rows, cols)) + offset) * 2.0 ** log_scale).astype(np.float32)
    w[rng.random((rows, cols)) < 0.1] = 0
    check(w, fmt, granularity, group, symmetric, scale_format)


def test_scale_formats_round_to_nearest_even():
    values = np.random.default_rng(4).standard_normal(10_000).astype(np.float32)
    np.testing.assert_array_equal(SCALE_FORMATS["bf16"].round(values), values.astype(ml_dtypes.bfloat16).astype(np.float32))
    np.testing.assert_array_equal(SCALE_FORMATS["fp16"].round(values), values.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(SCALE_FORMATS["float32"].round(values), values)


def test_fp16_scale_that_underflows_is_refused():
    from fp8conv.errors import InputError

    with pytest.raises(InputError, match="not representable as fp16"):
        quantize_tensor(np.full((1, 4), 1e-12, np.float32), format="int4", granularity="channel", scale_format="fp16")


# ---- the two ends of the float32 range (issue #16) for weight-only scales and bf16 / fp16 stored scales ----

F32_MAX = float(np.finfo(np.float32).max)
EXTREME_ROWS = {
    "subnormal quotient": np.array([[1e-37, -3e-38, 4e-36, 1e-39]], np.float32),
    "bf16-subnormal quotient": np.array([[3e-38, -1e-38, 2e-39, 0.0]], np.float32),
    "f32 max both sides": np.array([[F32_MAX, -F32_MAX, 1.0, 3e38]], np.float32),
    "f32 max one side": np.array([[F32_MAX, 2e38, 1.0, 0.0]], np.float32),
}


@pytest.mark.parametrize("fmt", ["int4", "int8"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("scale_format", ["float32", "bf16"])
@pytest.mark.parametrize("case", sorted(EXTREME_ROWS))
def test_extreme_rows_scales_positive_and_every_code_finite(fmt, symmetric, scale_format, case):
    """Never 0 (rounded up onto the scale format's subnormal grid), never a code that dequantizes
    to Inf (capped), bit for bit against the reference; the statistics stay finite."""
    w = EXTREME_ROWS[case]
    q = check(w, fmt, "channel", 128, symmetric, scale_format)
    assert (q.scales > 0).all() and np.isfinite(q.scales).all()
    lo, hi = int_range(BITS[fmt])
    reach = (hi - lo) if not symmetric else -lo
    assert np.isfinite(q.scales.astype(np.float32) * np.float32(reach)).all()
    stats = q.stats
    assert all(np.isfinite(v) for v in (stats.sum_sq_ref, stats.sum_sq_err, stats.max_abs_err))


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int8"])
def test_bf16_scale_at_the_top_of_the_range_is_capped_finite(fmt):
    """bf16 scales: nearest even could round amax / qmax up past the largest scale whose qmax * scale
    is finite in float32; the cap is the largest bf16 below that."""
    w = np.array([[F32_MAX, -1.0]], np.float32)
    q = quantize_tensor(w, format=fmt, granularity="channel", scale_format="bf16", backend="numpy")
    scale = np.float32(q.scales[0, 0])
    assert np.float32(scale).astype(ml_dtypes.bfloat16).astype(np.float32) == scale
    qmax = float(FORMATS[fmt].qmax)
    assert np.isfinite(np.float32(scale) * np.float32(qmax))
    quotient = np.float32(np.float32(F32_MAX) / np.float32(qmax))
    assert scale == reference_stored_scale(quotient, F32_MAX / qmax, qmax, "bf16")


def test_fp16_scale_in_its_subnormal_range_is_rounded_up():
    """fp16 scales below 2**-14 lie on the 2**-24 grid: rounded up there, so amax / scale <= 7.5."""
    w = np.array([[1e-6, -3e-7, 0.0, 5e-7]], np.float32)
    q = quantize_tensor(w, format="int4", granularity="channel", scale_format="fp16", activations="none")
    scale = float(q.scales[0, 0])
    exact = float(np.float32(1e-6)) / 7.5
    assert scale == np.ceil(exact * 2.0 ** 24) * 2.0 ** -24 and scale >= exact
    assert int(np.abs(q.codes).max()) <= 8
