"""The mse observer on the microscaled formats (NVFP4, MXFP4, MXFP8) against a float64 brute force
written here: every documented candidate scale of a group is evaluated from the formats' definitions
(test_microscale.py's references), and the observer's choice must be the best one and never worse
than min-max. Both kernel paths write the same bytes; the NVFP4 global scale is the min-max one."""
from __future__ import annotations

from dataclasses import replace

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fp8conv.accel import native
from fp8conv.numerics import microscale as ms
from fp8conv.numerics.kernels import quantize_microscale
from fp8conv.plan.scheme import microscale_scheme
from test_microscale import BF16, GRID, ref_e2m1_code, ref_e8m0_code, ref_global_scale, ref_group_scale, to_f32

E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
# The documented candidate sets, restated: steps in stored-code units from the min-max code.
NVFP4_STEPS = [0, -1, -2, 1, 2, 3, 4, 5, 6]
E8M0_STEPS = [0]  # the min-max exponent only (observers.py: one down raised KL, one up never helps)
GROUP = {"nvfp4": 16, "mxfp4": 32, "mxfp8": 32}
MARGIN = 2.0 ** -20


def e4m3_positive_values() -> list[float]:
    """Values of the e4m3fn codes 1..126 from the bit layout s|eeee|mmm (bias 7, subnormals at e == 0)."""
    out = []
    for code in range(1, 127):
        e, m = code >> 3, code & 7
        out.append(m / 8 * 2.0 ** -6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7))
    return out


E4M3_VALUES = e4m3_positive_values()


def ref_e4m3(v: float) -> float:
    """Nearest e4m3 value (ties to even mantissa), v clamped to +-448 first."""
    v = min(max(v, -448.0), 448.0)
    return float(np.float64(v).astype(np.float32).astype(E4M3).astype(np.float64))


def group_error(group: np.ndarray, fmt: str, scale: float, gs: float | None) -> float:
    """Squared error of one group (float64 values of its float32 / bf16 elements) under one scale value
    (NVFP4: the e4m3 group scale, divided by the global scale in float32; MX: 2^(code - 127))."""
    total = 0.0
    if fmt == "nvfp4":
        eff = float(to_f32(scale / gs))
        for v in group:
            recon = float(to_f32(GRID[ref_e2m1_code(float(to_f32(v / eff)))] * eff))
            total += (recon - v) ** 2
        return total
    for v in group:
        q = GRID[ref_e2m1_code(v / scale)] if fmt == "mxfp4" else ref_e4m3(v / scale)
        total += (q * scale - v) ** 2
    return total


def candidates(group: np.ndarray, fmt: str, gs: float | None, dtype) -> list[float]:
    """Scale values of the documented candidates of one group, min-max first."""
    amax = float(np.abs(group).max())
    if fmt == "nvfp4":
        index = E4M3_VALUES.index(ref_group_scale(amax, gs, dtype))
        return [E4M3_VALUES[min(max(index + s, 0), 125)] for s in NVFP4_STEPS]
    code = ref_e8m0_code(amax, 2 if fmt == "mxfp4" else 8)
    return [2.0 ** (min(max(code + s, 0), 254) - 127) for s in E8M0_STEPS]


def stored_scale_values(q, fmt: str) -> np.ndarray:
    if fmt == "nvfp4":
        return np.asarray(q.scales, np.uint8).view(E4M3).astype(np.float64)
    return 2.0 ** (np.asarray(q.scales, np.float64) - 127)


def check_choices(x: np.ndarray, chosen: np.ndarray, fmt: str, gs, dtype, candidates_of) -> tuple[float, float]:
    """Brute force over every group: the chosen scale is one of candidates_of(group, fmt, gs, dtype) (min-max
    first), never worse than min-max and within 2^-18 of the best candidate. Returns (sum of the chosen
    squared errors, sum of min-max's)."""
    group = GROUP[fmt]
    total = total_minmax = 0.0
    for r in range(x.shape[0]):
        for g in range(x.shape[1] // group):
            values = x[r, g * group:(g + 1) * group]
            cands = candidates_of(values, fmt, gs, dtype)
            errs = [group_error(values, fmt, s, gs) for s in cands]
            where = f"{fmt} row {r} group {g}"
            assert chosen[r, g] in cands, f"{where}: scale {chosen[r, g]} is not a candidate {cands}"
            err = errs[cands.index(chosen[r, g])]
            assert err <= errs[0], f"{where}: {err} worse than min-max {errs[0]}"
            assert err <= min(errs) * (1 + 2.0 ** -18), f"{where}: {err} vs best {min(errs)}"
            total += err
            total_minmax += errs[0]
    return total, total_minmax


def require(backend: str) -> str:
    if backend == "native" and not native.AVAILABLE:
        pytest.fail(f"the C extension is not built ({native.IMPORT_ERROR}): pip install -e .")
    return backend


BACKENDS = ["numpy", "native"]


def check(w: np.ndarray, fmt: str, backend: str = "numpy"):
    """Quantize with mse on `backend` and compare every group's choice with the brute force; returns the result."""
    require(backend)
    scheme = replace(microscale_scheme(fmt), observer="mse")
    x = w.astype(np.float64)
    gs = ref_global_scale(float(np.abs(x).max(initial=0)), w.dtype) if fmt == "nvfp4" else None
    q = quantize_microscale(w, scheme, None if gs is None else np.float32(gs), backend=backend)
    total, total_minmax = check_choices(x, stored_scale_values(q, fmt), fmt, gs, w.dtype, candidates)
    assert q.stats.minmax_sum_sq_err == pytest.approx(total_minmax, rel=1e-9, abs=1e-300)
    assert q.stats.observed_sum_sq_err == pytest.approx(total, rel=1e-9, abs=1e-300)
    assert q.stats.sum_sq_err == pytest.approx(total, rel=1e-9, abs=1e-300)
    if gs is not None:
        assert q.global_scale == np.float32(gs)  # the min-max rule of compressed-tensors, unchanged
    return q


def heavy(rows: int, cols: int, seed: int, dtype=BF16, df: float = 3.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_t(df, size=(rows, cols)) * 0.02).astype(np.float32).astype(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4", "mxfp8"])
@pytest.mark.parametrize("dtype", [BF16, np.dtype(np.float32), np.dtype(np.float16)])
def test_mse_is_the_brute_force_best_and_never_worse_than_minmax(fmt, dtype, backend):
    w = heavy(6, 96, 3, dtype)
    w[0, :32] = 0  # an all-zero group keeps its min-max scale (every candidate gives 0)
    w[1, :16] = (np.array(GRID) * 0.01).astype(dtype)  # on the e2m1 grid
    q = check(w, fmt, backend)
    minmax = quantize_microscale(w, microscale_scheme(fmt), q.global_scale, backend="numpy")
    assert q.scales[0, 0] == minmax.scales[0, 0]
    if fmt == "nvfp4":  # some groups must gain on heavy-tailed weights
        assert q.stats.sum_sq_err < minmax.stats.sum_sq_err * 0.99
    else:  # E8M0: the min-max exponent, the same bytes
        assert q.scales.tobytes() == minmax.scales.tobytes() and q.codes.tobytes() == minmax.codes.tobytes()


@settings(max_examples=25, deadline=None)
@given(fmt=st.sampled_from(["nvfp4", "mxfp4", "mxfp8"]), seed=st.integers(0, 2**31),
       df=st.sampled_from([1.5, 3.0, 30.0]), log_scale=st.floats(-12, 4), outliers=st.integers(0, 4),
       backend=st.sampled_from(BACKENDS))
def test_property_random_and_heavy_tailed_groups(fmt, seed, df, log_scale, outliers, backend):
    rng = np.random.default_rng(seed)
    w = (rng.standard_t(df, size=(3, 64)) * 10.0 ** log_scale).astype(np.float32)
    w.flat[rng.integers(0, w.size, outliers)] *= 40
    check(w.astype(BF16), fmt, backend)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4", "mxfp8"])
@pytest.mark.parametrize("rows, cols", [(1, 32), (1, 512), (1, 1056), (1, 2048), (63, 32), (5, 416), (37, 96)])
def test_native_search_on_ragged_blocks_of_groups(fmt, rows, cols):
    """The compiled search takes groups in chunks of 32: group counts below, at, just above and far from a
    multiple of 32 (2 .. 222 groups), with all-zero groups, a group of one outlier and a group of subnormal
    scales among heavy-tailed ones, against the brute force; the numpy path gives the same bytes."""
    w = heavy(rows, cols, rows * cols, np.dtype(np.float32), df=2.0)
    w.reshape(-1)[:32] = 0
    if w.size >= 128:
        w.reshape(-1)[64:96] = 0
        w.reshape(-1)[96] = 50.0
        w.reshape(-1)[100:128] *= 1e-7
    q = check(w.astype(BF16), fmt, "native")
    ref = check(w.astype(BF16), fmt, "numpy")
    assert q.scales.tobytes() == ref.scales.tobytes() and q.codes.tobytes() == ref.codes.tobytes()
    assert q.stats == ref.stats


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4", "mxfp8"])
def test_group_on_the_minmax_grid_keeps_the_minmax_scale(fmt):
    """A group that min-max reconstructs exactly has error 0: no candidate can be better."""
    group = GROUP[fmt]
    if fmt == "mxfp8":
        row = np.array([448, -448, 1, 0.5, -3, 2.5, 0.015625] * 5)[:group] * 2.0 ** -8
    else:
        row = np.resize(np.array(GRID), group) * (2.0 ** -7 if fmt == "mxfp4" else 1.0)
    w = np.tile(row.astype(np.float32), (2, 2))
    q = check(w, fmt)
    assert q.stats.observed_sum_sq_err == 0
    minmax = quantize_microscale(w, microscale_scheme(fmt), q.global_scale, backend="numpy")
    assert q.scales.tobytes() == minmax.scales.tobytes()


def test_mxfp4_keeps_the_minmax_exponent_even_where_clipping_lowers_the_squared_error():
    """31 elements of 0.06 and one of 1.0. Min-max: exponent 2^-2, the 0.06 flush to 0 (0.24 < 0.25), error
    31 * 0.06^2 = 0.1116. One exponent down (2^-3) would clip the 1.0 to 0.75 for a total of 0.0627, but
    E8M0 scales keep the min-max exponent (documented: clipping the largest elements raised KL)."""
    w = np.full((1, 32), 0.06, np.float32)
    w[0, 5] = 1.0
    q = check(w, "mxfp4")
    minmax = quantize_microscale(w, microscale_scheme("mxfp4"), None, backend="numpy")
    assert int(q.scales[0, 0]) == int(minmax.scales[0, 0]) == 127 - 2
    assert q.stats.minmax_sum_sq_err == pytest.approx(31 * (0.06 - 0.0) ** 2, rel=1e-6)
    assert q.stats.observed_sum_sq_err == q.stats.minmax_sum_sq_err
    down = group_error(w[0].astype(np.float64), "mxfp4", 2.0 ** -3, None)
    assert down == pytest.approx(31 * (0.0625 - 0.06) ** 2 + 0.25 ** 2, rel=1e-6) and down < q.stats.minmax_sum_sq_err


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), df=st.sampled_from([1.5, 3.0, 30.0]), log_scale=st.floats(-12, 4),
       fmt=st.sampled_from(["mxfp4", "mxfp8"]))
def test_one_exponent_up_never_lowers_the_squared_error(seed, df, log_scale, fmt):
    """Why +1 is not a candidate: for every group, the coarser grid's error is at least min-max's."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_t(df, size=(4, 32)) * 10.0 ** log_scale).astype(np.float32).astype(BF16)
    x = w.astype(np.float64)
    for row in x:
        code = ref_e8m0_code(float(np.abs(row).max()), 2 if fmt == "mxfp4" else 8)
        if code >= 254:
            continue
        at = group_error(row, fmt, 2.0 ** (code - 127), None)
        assert group_error(row, fmt, 2.0 ** (code + 1 - 127), None) >= at, (fmt, row)


def test_nvfp4_group_whose_amax_belongs_on_four_gets_a_larger_scale():
    """A second group of 256 fixes the global scale at 2688 / 256 = 10.5 (its group scale is 448). The
    first group holds k * 9 / 10.5 for k = 4, 3, 2, 1: min-max maps its amax to 6 (e4m3 scale 6), where 3
    and 1 fall between grid points (4.5, 1.5 is on it; 4.5 -> 4); the candidate five codes up (e4m3 9,
    1.5x) maps every element onto the grid (4, 3, 2, 1)."""
    eff = np.float32(9) / np.float32(10.5)
    w = np.full((1, 32), 256.0, np.float32)
    w[0, :16] = np.resize(np.array([4, -3, 2, 1], np.float32), 16) * eff
    q = check(w, "nvfp4")
    assert q.global_scale == np.float32(10.5)
    minmax = quantize_microscale(w, microscale_scheme("nvfp4"), q.global_scale, backend="numpy")
    scale_values = ms.e4m3_decode(q.scales)[0].tolist()
    assert ms.e4m3_decode(minmax.scales)[0].tolist() == [6.0, 448.0]
    assert scale_values == [9.0, 448.0]
    assert q.stats.observed_sum_sq_err < q.stats.minmax_sum_sq_err * 0.01


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4", "mxfp8"])
@pytest.mark.parametrize("dtype", [BF16, np.dtype(np.float32), np.dtype(np.float16)])
def test_both_kernel_paths_write_the_same_bytes(fmt, dtype):
    if not native.AVAILABLE:
        pytest.fail(f"the C extension is not built ({native.IMPORT_ERROR}): pip install -e .")
    scheme = replace(microscale_scheme(fmt), observer="mse")
    w = heavy(37, 128, 5, dtype)
    gs = ms.nvfp4_global_scale(ms.tensor_amax(w), w.dtype) if fmt == "nvfp4" else None
    a = quantize_microscale(w, scheme, gs, backend="numpy")
    b = quantize_microscale(w, scheme, gs, backend="native")
    assert a.codes.tobytes() == b.codes.tobytes() and a.scales.tobytes() == b.scales.tobytes()
    assert a.stats == b.stats


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4", "mxfp8"])
@pytest.mark.parametrize("dtype", [BF16, np.dtype(np.float32), np.dtype(np.float16)])
def test_search_that_makes_its_own_minmax_codes_is_the_search_from_them(fmt, dtype):
    """native.micro_search with `minmax_rule` (the min-max codes made in the search's pass) gives the codes and
    errors of micro_scales' codes searched from (53 groups: a ragged last chunk; zero, tiny and huge groups);
    both refuse a weight with NaN."""
    from fp8conv.formats import FORMATS
    from fp8conv.numerics import microscale_kernel as mk, observers

    require("native")
    micro = ms.MICROSCALE[fmt]
    w = heavy(1, 53 * micro.group, 11, np.dtype(np.float32), df=2.0)
    w[0, :micro.group] = 0
    w[0, micro.group:2 * micro.group] *= 1e-6
    w[0, 2 * micro.group] = 3e4
    w = w.astype(dtype)
    gs = ms.nvfp4_global_scale(ms.tensor_amax(w), w.dtype) if micro.global_scale else None
    rule = (gs, FORMATS["fp8_e4m3"], ms.NVFP4_ZERO_GROUP_SCALE, mk._emax(micro))
    first = native.micro_scales(w, micro.group, FORMATS[micro.element], *rule)
    steps = observers.code_steps_for(micro.scale_format)
    stepwise = observers.mse_microscale(w, micro, first, gs, use_compiled=True, steps=steps)
    fused = observers.mse_microscale(w, micro, None, gs, use_compiled=True, steps=steps, minmax_rule=rule)
    assert fused.codes.tobytes() == stepwise.codes.tobytes()
    assert fused.error.tobytes() == stepwise.error.tobytes()
    assert fused.minmax_error.tobytes() == stepwise.minmax_error.tobytes()
    w[0, 5 * micro.group + 3] = np.nan
    assert observers.mse_microscale(w, micro, None, gs, use_compiled=True, steps=steps, minmax_rule=rule) is None


def test_micro_search_refuses_missing_or_mismatched_start_codes():
    """native.micro_search needs the min-max codes of every group or the rule that makes them: neither, or codes
    for another number of groups, is a ValueError naming what is wrong, not a read past a buffer."""
    from fp8conv.formats import FORMATS

    require("native")
    micro = ms.MICROSCALE["mxfp4"]
    w = heavy(2, 4 * micro.group, 3, np.dtype(np.float32))
    args = ((0,), (0, 254), np.ones(256, np.float32), np.ones(256, np.float32), True, FORMATS[micro.element], 0.0)
    with pytest.raises(ValueError, match="neither the min-max codes nor the rule"):
        native.micro_search(w, micro.group, None, *args)
    with pytest.raises(ValueError, match="do not form the 5 groups of 32"):
        native.micro_search(w, micro.group, np.zeros(5, np.uint8), *args)


def test_nvfp4_candidates_cover_subnormal_and_top_codes():
    """Steps are clamped to the positive e4m3 codes 1..126: a group at the tensor amax (code 126, 448) only
    shrinks, a group whose scale is an e4m3 subnormal only grows down to code 1."""
    from fp8conv.numerics import observers

    codes = observers.microscale_candidates(np.array([126, 1, 60], np.uint8), "e4m3_global")
    got = np.stack(codes)
    assert got[:, 0].tolist() == [126, 125, 124, 126, 126, 126, 126, 126, 126]
    assert got[:, 1].tolist() == [1, 1, 1, 2, 3, 4, 5, 6, 7]
    assert got[:, 2].tolist() == [60 + s for s in NVFP4_STEPS]
    e8 = np.stack(observers.microscale_candidates(np.array([0, 254, 100], np.uint8), "e8m0"))
    assert e8.T.tolist() == [[0], [254], [100]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_group_scales_and_large_outliers(backend):
    w = heavy(4, 64, 9, np.dtype(np.float32))
    w[0] *= 1e-6  # NVFP4 group scales in the e4m3 subnormals, MX exponents far below 127
    w[1, 3] = 30.0
    for fmt in ("nvfp4", "mxfp4", "mxfp8"):
        check(w, fmt, backend)


def test_scheme_names_the_observer():
    from fp8conv.report.text import _describe

    scheme = replace(microscale_scheme("nvfp4"), observer="mse")
    assert scheme.describe().endswith("weight-only, mse observer")
    assert _describe(scheme.to_json()) == scheme.describe()
    assert "observer" not in microscale_scheme("nvfp4").describe()
