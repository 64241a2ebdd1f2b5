"""Kernels against the independent float64 reference in tests/reference.py, bit for bit."""
from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fp8conv import dequantize_tensor, quantize_tensor
from fp8conv.accel import native
from fp8conv.formats import FORMATS
from reference import QMAX, fixed_order_sum_of_squares, reference_quantize

FORMAT_NAMES = ["fp8_e4m3", "fp8_e5m2", "int8"]
BACKENDS = ["numpy", "native"]


def require(backend: str) -> str:
    """The backend name to pass to the kernels; the C extension is built by `pip install -e .` (its
    absence fails: tests/test_install.py covers the install without a compiler)."""
    if backend != "numpy" and not native.AVAILABLE:
        pytest.fail(f"the C extension is not built ({native.IMPORT_ERROR}): pip install -e .")
    return backend


GRANULARITIES = ["block", "channel", "group", "tensor"]


def heavy_tailed(rng, shape, dtype=np.float32):
    w = rng.standard_normal(shape).astype(np.float32) * 0.02
    w[..., rng.integers(0, shape[-1], size=2)] *= 20
    return w.astype(dtype)


def code_bits(codes: np.ndarray) -> np.ndarray:
    return codes.view(np.uint8) if codes.dtype.itemsize == 1 and codes.dtype != np.int8 else codes


def assert_matches_reference(w, fmt, granularity, block=(128, 128), group=128, backend="auto"):
    q = quantize_tensor(w, format=fmt, granularity=granularity, block_size=block, group_size=group,
                        backend=require(backend) if backend != "auto" else backend)
    ref_codes, ref_scales, ref_deq = reference_quantize(w, fmt, granularity, block, group)
    np.testing.assert_array_equal(q.scales, ref_scales, err_msg=f"scales differ ({fmt} {granularity})")
    got = code_bits(q.codes)
    if not np.array_equal(got, ref_codes):
        bad = np.argwhere(got != ref_codes)
        r, c = bad[0]
        tr, tc = {"block": block, "group": (1, group), "channel": (1, w.shape[1]), "tensor": w.shape}[granularity]
        pytest.fail(f"{len(bad)} codes differ ({fmt} {granularity}); first at [{r},{c}] in tile "
                    f"({r // tr},{c // tc}): got {got[r, c]}, expected {ref_codes[r, c]} for w={w[r, c]!r}")
    deq = dequantize_tensor(q.codes, q.scales, format=fmt, granularity=granularity, block_size=block, group_size=group)
    # w' = q * scale in float32: q and scale are exact, so it is the float64 product rounded once.
    np.testing.assert_array_equal(deq, ref_deq.astype(np.float32))
    return q


@pytest.mark.parametrize("path", BACKENDS)
@pytest.mark.parametrize("fmt", FORMAT_NAMES)
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("shape", [(256, 384), (200, 333), (1, 7), (130, 129)])
def test_matches_reference(path, fmt, granularity, shape):
    rng = np.random.default_rng([FORMAT_NAMES.index(fmt), GRANULARITIES.index(granularity), *shape])
    assert_matches_reference(heavy_tailed(rng, shape), fmt, granularity, block=(128, 128), group=32, backend=path)


@pytest.mark.parametrize("path", BACKENDS)
@pytest.mark.parametrize("fmt", FORMAT_NAMES)
@pytest.mark.parametrize("src_dtype", [ml_dtypes.bfloat16, np.float16, np.float32])
def test_source_dtypes(path, fmt, src_dtype):
    w = heavy_tailed(np.random.default_rng(1), (64, 96), src_dtype)
    assert_matches_reference(w, fmt, "block", block=(32, 32), backend=path)


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_all_zero_blocks_get_scale_one(fmt):
    w = np.zeros((64, 64), np.float32)
    w[32:, 32:] = np.linspace(-1, 1, 32 * 32).reshape(32, 32)
    q = assert_matches_reference(w, fmt, "block", block=(32, 32))
    assert q.scales[0, 0] == 1.0 and q.scales[0, 1] == 1.0 and q.scales[1, 0] == 1.0
    assert not code_bits(q.codes)[:32].any()


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_values_at_amax_map_to_qmax(fmt):
    w = np.array([[3.0, -3.0, 1.5, 0.0]], np.float32)
    q = quantize_tensor(w, format=fmt, granularity="channel")
    values = q.codes.astype(np.float64)  # int8 and FP8 codes alike cast to their values
    assert values[0, 0] == QMAX[fmt] and values[0, 1] == -QMAX[fmt]
    assert q.scales[0, 0] == np.float32(np.float32(3.0) / np.float32(QMAX[fmt]))


@pytest.mark.parametrize("path", BACKENDS)
@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
def test_subnormal_results(path, fmt):
    # Values 2^-12 .. 2^-1 of the amax land in the format's subnormal range after scaling.
    w = np.concatenate([[1.0], 2.0 ** -np.arange(1, 24), -(2.0 ** -np.arange(1, 24))]).astype(np.float32)[None, :]
    assert_matches_reference(w, fmt, "tensor", backend=path)


def test_3d_experts_one_grid_per_expert():
    w = heavy_tailed(np.random.default_rng(2), (3, 130, 70))
    q = quantize_tensor(w, format="fp8_e4m3", granularity="block", block_size=64)
    assert q.scales.shape == (3, 3, 2)
    for e in range(3):
        ref_codes, ref_scales, _ = reference_quantize(w[e], "fp8_e4m3", "block", (64, 64))
        np.testing.assert_array_equal(q.scales[e], ref_scales)
        np.testing.assert_array_equal(code_bits(q.codes[e]), ref_codes)


def test_scale_grid_shapes():
    w = np.ones((300, 200), np.float32)
    assert quantize_tensor(w, granularity="block", block_size=(128, 64)).scales.shape == (3, 4)
    assert quantize_tensor(w, granularity="channel").scales.shape == (300, 1)
    assert quantize_tensor(w, granularity="group", group_size=32).scales.shape == (300, 7)
    assert quantize_tensor(w, granularity="tensor").scales.shape == (1, 1)


@pytest.mark.parametrize("path", BACKENDS)
def test_error_stats_match_direct_computation(path):
    w = heavy_tailed(np.random.default_rng(3), (150, 260))
    q = quantize_tensor(w, granularity="block", block_size=64, backend=require(path))
    deq = dequantize_tensor(q.codes, q.scales, granularity="block", block_size=64).astype(np.float64)
    err = w.astype(np.float64) - deq
    assert q.stats.sum_sq_err == pytest.approx((err ** 2).sum(), rel=1e-4)
    assert q.stats.sum_sq_ref == pytest.approx((w.astype(np.float64) ** 2).sum(), rel=1e-4)
    assert q.stats.max_abs_err == pytest.approx(np.abs(err).max(), rel=1e-6)
    assert q.stats.saturated == int((np.abs(q.codes.astype(np.float32)) == 448).sum())
    assert q.stats.flushed_to_zero == int(((deq == 0) & (w != 0)).sum())


@settings(max_examples=60, deadline=None)
@given(
    fmt=st.sampled_from(FORMAT_NAMES),
    granularity=st.sampled_from(GRANULARITIES),
    rows=st.integers(1, 40),
    cols=st.integers(1, 40),
    block=st.tuples(st.integers(1, 17), st.integers(1, 17)),
    group=st.integers(1, 17),
    log_scale=st.integers(-30, 30),
    seed=st.integers(0, 2**16),
    path=st.sampled_from(BACKENDS),
)
def test_property_matches_reference(fmt, granularity, rows, cols, block, group, log_scale, seed, path):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rows, cols)) * 2.0 ** log_scale).astype(np.float32)
    w[rng.random((rows, cols)) < 0.1] = 0
    assert_matches_reference(w, fmt, granularity, block, group, backend=path)


@pytest.mark.parametrize("path", BACKENDS)
@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_nonfinite_refused_with_counts(path, fmt):
    from fp8conv.errors import InputError

    w = np.ones((4, 4), np.float32)
    w[0, 0], w[1, 1], w[2, 2] = np.nan, np.inf, -np.inf
    with pytest.raises(InputError, match="1 NaN and 2 Inf"):
        quantize_tensor(w, format=fmt, backend=require(path))


def test_qmax_table():
    assert {name: f.qmax for name, f in FORMATS.items() if name in QMAX} == QMAX and FORMATS["int4"].qmax == 7


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("shape", [(300, 2000), (37, 1500), (5, 9), (70, 4101)])
def test_backends_give_identical_statistics(fmt, granularity, shape):
    """Codes, scales and every error statistic (float sums included) are the same on both paths."""
    w = heavy_tailed(np.random.default_rng([FORMAT_NAMES.index(fmt), *shape]), shape)
    a = quantize_tensor(w, format=fmt, granularity=granularity, block_size=(64, 128), group_size=32, backend="numpy")
    for path in BACKENDS[1:]:
        b = quantize_tensor(w, format=fmt, granularity=granularity, block_size=(64, 128), group_size=32,
                            backend=require(path))
        np.testing.assert_array_equal(code_bits(a.codes), code_bits(b.codes), err_msg=path)
        np.testing.assert_array_equal(a.scales, b.scales, err_msg=path)
        assert a.stats == b.stats, path


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16, np.float32])
@pytest.mark.parametrize("cols", [1, 7, 8, 9, 17, 130, 4099])
def test_sums_of_squares_follow_the_fixed_order(dtype, cols):
    """Both backends' sum w^2 and sum err^2 are the fixed-order float64 sums, bit for bit, for every
    source dtype and widths that are not a multiple of the eight lanes (the compiled kernel pads; 4099
    columns: it works in column spans, each row's lanes continue from one span to the next)."""
    # Each row: one large value in lane 0, the rest ~2**-26.5 times as large, so their squares sit near
    # the last bit of the row's sum: adding them in any other order rounds differently.
    w = np.random.default_rng(cols).uniform(0.5, 2.0, (70, cols)) * 16 * 2.0 ** -26.5
    w[:, 0] = 16
    w = w.astype(np.float32).astype(dtype)
    for path in BACKENDS:
        q = quantize_tensor(w, format="fp8_e4m3", granularity="block", block_size=(64, 128), backend=require(path))
        deq = dequantize_tensor(q.codes, q.scales, format="fp8_e4m3", granularity="block", block_size=(64, 128))
        w32 = w.astype(np.float32)
        assert q.stats.sum_sq_ref == fixed_order_sum_of_squares(w32), path
        assert q.stats.sum_sq_err == fixed_order_sum_of_squares(w32 - deq), path


# ---- the two ends of the float32 range (issue #16) ------------------------------------------------

F32_MAX = float(np.finfo(np.float32).max)
EXTREME_TILES = {
    "all subnormal": np.array([[1e-45, -3e-45, 1e-42, 5e-40], [0, 2e-44, -7e-45, 1e-39]], np.float32),
    "subnormal quotient": np.array([[1e-37, -3e-38, 4e-36, 1e-45]], np.float32),
    "bf16 near its max": np.array([[3.3e38, -1e38, 2.5e38, 1.0]], np.float32).astype(ml_dtypes.bfloat16),
    "f32 max": np.array([[F32_MAX, -F32_MAX, 1.0, 3e38]], np.float32),
}


@pytest.mark.parametrize("path", BACKENDS)
@pytest.mark.parametrize("fmt", FORMAT_NAMES)
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("case", sorted(EXTREME_TILES))
def test_extreme_tiles_match_reference_with_positive_scales_and_finite_stats(path, fmt, granularity, case):
    w = EXTREME_TILES[case]
    q = assert_matches_reference(w.astype(np.float32), fmt, granularity, (2, 2), 2, backend=path)
    q_native = quantize_tensor(w, format=fmt, granularity=granularity, block_size=(2, 2), group_size=2,
                               backend=require(path))
    assert (q.scales > 0).all() and np.isfinite(q.scales).all()
    np.testing.assert_array_equal(q_native.scales, q.scales)
    stats = q_native.stats
    assert all(math.isfinite(v) for v in (stats.sum_sq_ref, stats.sum_sq_err, stats.max_abs_err))
    w64 = w.astype(np.float64)
    deq = dequantize_tensor(q.codes, q.scales, format=fmt, granularity=granularity, block_size=(2, 2), group_size=2)
    assert stats.sum_sq_ref == pytest.approx(float((w64 ** 2).sum()), rel=1e-12)
    # max |w - w'| is taken over the float32 differences: the exact largest one rounded once to float32.
    assert stats.max_abs_err == float(np.float32(np.abs(w64 - deq.astype(np.float64)).max()))


@settings(max_examples=300, deadline=None)
@given(fmt=st.sampled_from(FORMAT_NAMES), granularity=st.sampled_from(GRANULARITIES),
       log_scale=st.integers(-170, 140), seed=st.integers(0, 2**16))
def test_both_paths_agree_over_the_whole_float32_range(fmt, granularity, log_scale, seed):
    """Codes and scales bit-identical to each other and to the reference; statistics identical
    (float64 sums in one fixed order on both paths)."""
    rng = np.random.default_rng(seed)
    w = np.clip(rng.standard_normal((5, 9)) * 2.0 ** log_scale, -F32_MAX, F32_MAX).astype(np.float32)
    results = []
    for path in BACKENDS:
        results.append(assert_matches_reference(w, fmt, granularity, (2, 4), 4, backend=path))
    slow, *fast = results
    for q in fast:
        np.testing.assert_array_equal(q.scales, slow.scales)
        assert (q.scales > 0).all() and np.isfinite(q.scales).all()
        assert q.stats == slow.stats
