"""Conformance: every registered element format x granularity x symmetric / asymmetric x backend against the
float64 reference written here and in tests/reference.py, bit for bit: codes, scales, zero points, global
scales and every error statistic (the fixed-order float64 sums included), on weights built to hit ties,
saturation, subnormal values and scales, all-zero tiles, ragged edges and odd row counts; and the
NaN / Inf policy (refused, or mapped under --allow-nonfinite) the same on both backends.

The scheme matrix is read from the registries (formats.FORMATS, microscale.MICROSCALE): a new format
is covered once it registers. The numpy backend is the reference implementation; the native one is the
C extension (fp8conv/accel/_native.c).
"""
from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest

from fp8conv.accel import native
from fp8conv.errors import SchemeError
from fp8conv.formats import FORMATS
from fp8conv.numerics.kernels import NonFiniteError, quantize_2d
from fp8conv.numerics.microscale import MICROSCALE
from fp8conv.plan.scheme import GRANULARITIES, Scheme, microscale_scheme
from reference import fixed_order_sum_of_squares, fp8_value, reference_stored_scale, round_to_fp8
from test_microscale import GRID, ref_mx, ref_nvfp4, ref_unpack

BF16 = np.dtype(ml_dtypes.bfloat16)
BLOCK = (4, 16)
GROUP = 16
BACKENDS = ["numpy", "native"]
SOURCES = [BF16, np.dtype(np.float16), np.dtype(np.float32)]


def registered_schemes() -> list[Scheme]:
    """Every valid (format, granularity, symmetry, activations) of the registry, and the microscaled formats."""
    out = []
    for name, fmt in FORMATS.items():
        for granularity in GRANULARITIES:
            for symmetric in (True, False):
                for activations in ("dynamic", "none"):
                    try:
                        scheme = Scheme(name, granularity, block_size=BLOCK, group_size=GROUP, symmetric=symmetric,
                                        activations=activations)
                        scheme.microscale
                    except SchemeError:
                        continue
                    out.append(scheme)
    return out + [microscale_scheme(m) for m in MICROSCALE]


SCHEMES = registered_schemes()


def require(backend: str) -> str:
    if backend == "native" and not native.AVAILABLE:
        pytest.fail(f"the C extension is not built ({native.IMPORT_ERROR}): pip install -e .")
    return backend


# ---- the float64 reference ------------------------------------------------------------------------

def element_values(scheme: Scheme, codes: np.ndarray) -> np.ndarray:
    """float64 value of each code (FP8 from its bit layout, integers as themselves, e2m1 from the grid)."""
    if scheme.format in ("fp8_e4m3", "fp8_e5m2"):
        table = np.array([fp8_value(c, scheme.format) for c in range(256)])
        return table[codes.view(np.uint8)]
    if scheme.format == "fp4_e2m1":
        return np.array(GRID)[codes]
    return codes.astype(np.float64)


def reference_grid(w32: np.ndarray, scheme: Scheme):
    """(codes, scale grid float32, zero-point grid or None, float32 dequantized) of a min-max scheme."""
    rows, cols = w32.shape
    tr, tc = scheme.tile(rows, cols)
    gr, gc = -(-rows // tr), -(-cols // tc)
    fmt = scheme.fmt
    lo_code, hi_code = scheme.code_range
    full = scheme.full_range
    scales = np.ones((gr, gc), np.float32)
    zps = None if scheme.symmetric else np.zeros((gr, gc), np.int8)
    codes = np.zeros((rows, cols), np.uint8 if fmt.is_float else np.int8)
    deq = np.zeros((rows, cols), np.float32)
    for i in range(gr):
        for j in range(gc):
            part = (slice(i * tr, (i + 1) * tr), slice(j * tc, (j + 1) * tc))
            tile = w32[part]
            zp = 0.0
            if scheme.symmetric:
                amax = float(np.abs(tile).max())
                divisor = (hi_code - lo_code) / 2 if full else hi_code
                reach = max(-lo_code, hi_code)
                scale = np.float32(1) if amax == 0 else reference_stored_scale(
                    np.float32(np.float32(amax) / np.float32(divisor)), amax / divisor, reach)
            else:
                lo, hi = np.float32(min(0.0, tile.min())), np.float32(max(0.0, tile.max()))
                steps = fmt.qmax - fmt.qmin
                scale = np.float32(1) if hi == lo else reference_stored_scale(
                    np.float32((hi - lo) / np.float32(steps)), (float(hi) - float(lo)) / steps, steps)
                zp = float(min(max(np.round(np.float32(fmt.qmin) - np.float32(lo / scale)), fmt.qmin), fmt.qmax))
                zps[i, j] = int(zp)
            scales[i, j] = scale
            x = (tile / scale).astype(np.float32)
            if not scheme.symmetric:  # (-0 + 0 is +0: symmetric codes keep the sign of a zero)
                x = (x + np.float32(zp)).astype(np.float32)
            x = x.astype(np.float64)
            x = np.clip(x, lo_code, hi_code)
            if fmt.is_float:
                c = round_to_fp8(x, scheme.format)
                codes[part] = c
                value = element_values(scheme, c)
            else:
                codes[part] = np.round(x).astype(np.int8)  # half to even
                value = codes[part].astype(np.float64)  # the code's value (an integer code has no -0)
            deq[part] = ((value - zp) * float(scale)).astype(np.float32)
    return codes, scales, zps, deq


def reference_stats(w32: np.ndarray, deq: np.ndarray, saturated: int) -> dict:
    err = (w32 - deq).astype(np.float32)
    return {"elements": w32.size, "sum_sq_ref": fixed_order_sum_of_squares(w32),
            "sum_sq_err": fixed_order_sum_of_squares(err),
            "max_abs_err": float(np.abs(err).max(initial=0)), "saturated": saturated,
            "flushed_to_zero": int(((deq == 0) & (w32 != 0)).sum()), "nonfinite": 0}


def reference_microscale(w: np.ndarray, scheme: Scheme):
    """(element codes unpacked, scale codes as stored, global scale or None, float32 dequantized, saturated)."""
    micro = MICROSCALE[scheme.microscale]
    if micro.global_scale:
        codes, scale_values, gs = ref_nvfp4(w)
        divisor = (scale_values / gs).astype(np.float32)
        values = np.array(GRID)[codes]
        scale_codes = scale_values.astype(np.float32).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    else:
        elems, scale_codes = ref_mx(w, 2 if micro.packed else 8)
        divisor = 2.0 ** (scale_codes.astype(np.float64) - 127)
        values = np.array(GRID)[elems] if micro.packed else elems
        codes, gs = elems, None
    deq = (values * np.repeat(divisor.astype(np.float64), micro.group, axis=1)).astype(np.float32)
    return codes, scale_codes, gs, deq, int((np.abs(values) >= scheme.fmt.qmax).sum())


# ---- the weights ----------------------------------------------------------------------------------

def tie_tile(scheme: Scheme, n: int, rng) -> np.ndarray:
    """n values of a tile whose scale is exactly 1, on the midpoints of the code grid (ties) and its ends."""
    lo, hi = scheme.code_range
    if scheme.fmt.is_float:
        grid = np.unique(np.abs([fp8_value(c, scheme.format) for c in range(256)
                                 if math.isfinite(fp8_value(c, scheme.format))]))
        grid = grid[grid <= hi]
        mids = (grid[:-1] + grid[1:]) / 2
    else:
        mids = np.arange(lo, hi) + 0.5
    values = rng.choice(mids, size=n) * rng.choice([-1.0, 1.0], size=n) if scheme.fmt.is_float else rng.choice(mids, n)
    if scheme.symmetric:  # amax = the divisor: scale 1
        values[0] = (hi - lo) / 2 if scheme.full_range else hi
    else:  # range [qmin, qmax]: scale 1, zero point 0
        values[0], values[1] = lo, hi
    return values


def edge_weight(scheme: Scheme, dtype: np.dtype, seed: int) -> np.ndarray:
    """Odd rows, ragged last tiles (microscale: whole groups), heavy tails, an all-zero tile, tiny and
    subnormal values beside large ones, tiles of subnormal amax, tie values at scale 1, exact saturation."""
    rng = np.random.default_rng(seed)
    micro = scheme.microscale is not None
    rows, cols = (13, 96) if micro else (13, 70)
    w = rng.standard_t(3, size=(rows, cols)) * rng.choice([1e-3, 0.05, 2.0], size=(rows, 1))
    tr, tc = (1, MICROSCALE[scheme.microscale].group) if micro else scheme.tile(rows, cols)
    tr, tc = min(tr, rows), min(tc, cols)
    tiny = 2.0 ** -30 if dtype != np.float16 else 2.0 ** -20  # subnormal in fp16
    if scheme.granularity != "tensor":
        w[:tr, :tc] = 0  # an all-zero tile
        w[-1, -tc:] = rng.standard_normal(tc) * tiny  # a tile of tiny values (subnormal scales)
    w[rows // 2, :: 5] = rng.standard_normal(len(range(0, cols, 5))) * 1e-6  # small values beside large: FP8 subnormals
    if not micro and scheme.granularity in ("channel", "group"):
        w[3, :tc] = tie_tile(scheme, tc, rng)  # ties at scale 1
    if micro and not MICROSCALE[scheme.microscale].global_scale:
        mids = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]) if scheme.fmt.bits == 4 else \
            np.array([1.0625, 17.0, 2.0 ** -9 * 1.5, 3.25, 208.0])
        w[3, :tc] = rng.choice(mids, tc) * rng.choice([-1.0, 1.0], tc)
        w[3, 0] = 6.0 if scheme.fmt.bits == 4 else 256.0  # E8M0 scale exactly 1
    return w.astype(np.float32).astype(dtype)


def check_against_reference(q, w: np.ndarray, scheme: Scheme) -> None:
    w32 = w.astype(np.float32)
    if scheme.microscale:
        codes, scale_codes, gs, deq, saturated = reference_microscale(w, scheme)
        got = ref_unpack(q.codes) if scheme.fmt.bits == 4 else q.codes.view(np.uint8)
        want = codes if scheme.fmt.bits == 4 else codes.astype(np.float32).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
        assert_same(got, want, "codes")
        assert_same(np.asarray(q.scales).view(np.uint8), scale_codes, "scale codes")
        assert (gs is None) == (q.global_scale is None) and (gs is None or np.float32(gs) == q.global_scale)
    else:
        codes, scales, zps, deq = reference_grid(w32, scheme)
        assert_same(q.codes.view(np.uint8) if scheme.fmt.is_float else q.codes, codes, "codes")
        assert_same(q.scales.reshape(scales.shape), scales, "scales")
        if zps is None:
            assert q.zero_points is None
        else:
            assert_same(q.zero_points, zps, "zero points")
        lo, hi = scheme.code_range
        values = element_values(scheme, codes)
        saturated = int(((values <= lo) | (values >= hi)).sum())
    want = reference_stats(w32, deq, saturated)
    got = q.stats.to_json()
    for key, value in want.items():
        assert got[key] == value, f"{key}: {got[key]!r}, reference {value!r}"


def assert_same(got: np.ndarray, want: np.ndarray, what: str) -> None:
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape}, reference {want.shape}"
    bad = np.argwhere(got != want)
    assert bad.size == 0, f"{what}: {len(bad)} differ, first at {tuple(bad[0])}: {got[tuple(bad[0])]!r} vs {want[tuple(bad[0])]!r}"


# ---- the tests ------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", SOURCES, ids=lambda d: d.name)
@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.describe())
def test_every_scheme_matches_the_float64_reference(scheme, dtype, backend):
    w = edge_weight(scheme, dtype, seed=len(scheme.describe()))
    q = quantize_2d(w, scheme, backend=require(backend))
    check_against_reference(q, w, scheme)


@pytest.mark.parametrize("scheme", [s for s in SCHEMES if s.granularity != "tensor"], ids=lambda s: s.describe())
def test_mse_observer_gives_the_same_bytes_on_both_backends(scheme):
    """The observer's choice has its own reference (tests/test_observers.py); here both backends agree on it."""
    from dataclasses import replace

    mse = replace(scheme, observer="mse")
    w = edge_weight(scheme, BF16, seed=3)
    a, b = quantize_2d(w, mse, backend="numpy"), quantize_2d(w, mse, backend=require("native"))
    for field in ("codes", "scales", "zero_points", "global_scale"):
        x, y = getattr(a, field), getattr(b, field)
        assert (x is None and y is None) or np.asarray(x).tobytes() == np.asarray(y).tobytes(), field
    assert a.stats == b.stats


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.describe())
def test_nonfinite_policy_is_the_same_on_both_backends(scheme):
    """NaN / Inf are refused by default; where a mapping exists (--allow-nonfinite: NaN -> 0, +-Inf -> the
    ends of the code range; microscaled formats have none) both backends apply it identically."""
    w = edge_weight(scheme, np.dtype(np.float32), seed=5)
    w[2, 3], w[4, 5], w[6, 7] = np.nan, np.inf, -np.inf
    for backend in BACKENDS:
        with pytest.raises(NonFiniteError, match="1 NaN and 2 Inf"):
            quantize_2d(w, scheme, backend=require(backend))
    if scheme.microscale:
        return
    a, b = (quantize_2d(w, scheme, allow_nonfinite=True, backend=require(x)) for x in BACKENDS)
    assert a.codes.tobytes() == b.codes.tobytes() and a.scales.tobytes() == b.scales.tobytes() and a.stats == b.stats
    assert a.stats.nonfinite == 3
    values = element_values(scheme, a.codes)
    zp = 0.0 if a.zero_points is None else float(a.zero_points[min(2, a.zero_points.shape[0] - 1), 0])
    lo, hi = scheme.code_range
    assert values[4, 5] == hi and values[6, 7] == lo
    if scheme.symmetric:
        assert values[2, 3] == 0
    else:
        assert values[2, 3] == zp  # NaN dequantizes to 0


@pytest.mark.parametrize("dtype", SOURCES, ids=lambda d: d.name)
def test_row_pieces_carry_the_sums_of_the_whole(dtype):
    """The compiled kernel's sums, taken over row pieces in order, are those of the whole (kernels.quantize_rows_into)."""
    from fp8conv.numerics.kernels import quantize_rows_into, stats_of

    require("native")
    scheme = Scheme("fp8_e4m3", "block", block_size=BLOCK)
    w = edge_weight(scheme, dtype, seed=9)[:12]
    whole = quantize_2d(w, scheme, backend="numpy")
    carried = np.zeros(5)
    codes = [quantize_rows_into(w[r:r + 4], scheme, None, carried).codes for r in range(0, 12, 4)]
    assert np.concatenate(codes).tobytes() == whole.codes.tobytes()
    assert stats_of(w.size, carried) == whole.stats


@pytest.mark.parametrize("tile", [(1, 8), (3, 16), (7, 45), (2, 5), (1, 45)])
@pytest.mark.parametrize("signed", [False, True])
def test_bf16_tile_ranges_are_the_float32_kernels_bit_for_bit(tile, signed):
    """The compiled tile ranges of a bf16 weight (taken on its 16-bit patterns) are those of the same values as
    float32 (the 32-bit path) to the bit, signed zeros included, and the float64 reference's values; ragged
    tiles, all-negative and all-zero tiles; NaN / Inf refused by both."""
    require("native")
    rng = np.random.default_rng(sum(tile) + signed)
    w = (rng.standard_t(3, size=(7, 45)) * rng.choice([1e-30, 1e-3, 2.0, 3e30], size=(7, 1))).astype(np.float32)
    w[0, :8] = -np.abs(w[0, :8])  # an all-negative tile
    w[1, :16] = rng.choice([0.0, -0.0], 16)  # zeros of both signs
    w[2, 5:9] = -0.0
    w = w.astype(BF16)
    lo, hi = native.tile_range(w, tile, signed)
    lo32, hi32 = native.tile_range(w.astype(np.float32), tile, signed)
    assert hi.tobytes() == hi32.tobytes()
    assert (lo is None and lo32 is None) if not signed else lo.tobytes() == lo32.tobytes()
    x = w.astype(np.float64)
    for i in range(hi.shape[0]):
        for j in range(hi.shape[1]):
            t = x[i * tile[0]:(i + 1) * tile[0], j * tile[1]:(j + 1) * tile[1]]
            if signed:
                assert (lo[i, j], hi[i, j]) == (t.min(), t.max()), (i, j)
            else:
                assert hi[i, j] == np.abs(t).max() and not np.signbit(hi[i, j]), (i, j)
    for bad in (np.inf, -np.inf, np.nan):
        v = w.copy()
        v[6, 44] = bad
        assert native.tile_range(v, tile, signed) is None
        assert native.tile_range(v.astype(np.float32), tile, signed) is None


@pytest.mark.parametrize("dtype", SOURCES, ids=lambda d: d.name)
@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_amax_matches_the_float64_reference(dtype, backend):
    """NVFP4's global-scale amax (microscale.tensor_amax, one tile of the compiled kernel): the largest |x|
    in float64, on signed zeros, subnormals and an odd shape; NaN where a NaN is, on both backends."""
    from fp8conv.numerics.microscale import tensor_amax

    compiled = require(backend) == "native"
    rng = np.random.default_rng(11)
    w = (rng.standard_normal((7, 45)) * 2.0 ** rng.integers(-30, 8, (7, 45))).astype(dtype)
    w[0, 0], w[3, 4] = -0.0, ml_dtypes.finfo(dtype).smallest_subnormal
    for sample in (w, -np.abs(w), np.zeros((3, 5), dtype), w[:, :1]):
        expected = np.abs(sample.astype(np.float64)).max()
        got = tensor_amax(sample, compiled)
        assert type(got) is np.float32 and float(got) == expected, (sample.shape, got, expected)
    bad = w.copy()
    bad[5, 6] = np.nan
    assert np.isnan(tensor_amax(bad, compiled))


def test_a_float_codec_without_rounding_facts_runs_on_numpy(monkeypatch):
    """A codec registered without mantissa_bits / exponent_bias is not guessed at: `auto` quantizes it with
    the numpy kernels, `native` refuses it."""
    scheme = Scheme("fp8_e5m2", "channel")
    w = edge_weight(scheme, BF16, seed=7)
    want = quantize_2d(w, scheme, backend="numpy")
    monkeypatch.setattr(type(FORMATS["fp8_e5m2"]), "mantissa_bits", 0)
    calls = []
    monkeypatch.setattr(native, "quantize", lambda *args: calls.append(args) or None)
    got = quantize_2d(w, scheme, backend="auto")
    assert calls == [] and got.codes.tobytes() == want.codes.tobytes() and got.stats == want.stats
    with pytest.raises(SchemeError, match="does not run fp8_e5m2"):
        quantize_2d(w, scheme, backend=require("native"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("out_dtype", [np.dtype(np.float32), BF16, np.dtype(np.float16)], ids=lambda d: d.name)
@pytest.mark.parametrize("scheme", [s for s in SCHEMES if not s.microscale], ids=lambda s: s.describe())
def test_dequantize_matches_the_float64_reference(scheme, out_dtype, backend, monkeypatch):
    """(code value - zero point) * scale in float32, rounded once to nearest even into the output dtype,
    by either backend (FP8CONV_BACKEND picks the dequantize kernels)."""
    from fp8conv.numerics.dequantize import dequantize_2d

    monkeypatch.setenv("FP8CONV_BACKEND", require(backend))
    w = edge_weight(scheme, BF16, seed=11)
    codes, scales, zps, deq = reference_grid(w.astype(np.float32), scheme)
    q = quantize_2d(w, scheme, backend="numpy")
    got = dequantize_2d(q.codes, q.scales, scheme, out_dtype=out_dtype, zero_points=q.zero_points)
    want = deq.astype(out_dtype)  # float32 values, rounded to nearest even once
    assert_same(got.view(np.uint8), want.view(np.uint8), f"dequantized {out_dtype.name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("out_dtype", [np.dtype(np.float32), BF16, np.dtype(np.float16)], ids=lambda d: d.name)
@pytest.mark.parametrize("scheme", [s for s in SCHEMES if s.microscale], ids=lambda s: s.describe())
def test_microscale_dequantize_matches_the_float64_reference(scheme, out_dtype, backend, monkeypatch):
    """NVFP4 / MX: element value times its group's divisor in float32, rounded once into the output dtype."""
    from fp8conv.numerics import microscale as ms

    monkeypatch.setenv("FP8CONV_BACKEND", require(backend))
    w = edge_weight(scheme, BF16, seed=13)
    _, _, _, deq, _ = reference_microscale(w, scheme)
    q = quantize_2d(w, scheme, backend="numpy")
    micro = MICROSCALE[scheme.microscale]
    codes = np.asarray(q.codes).view(np.uint8)
    if micro.global_scale:
        got = ms.dequantize_nvfp4(codes, np.asarray(q.scales).view(np.uint8), q.global_scale, out_dtype)
    else:
        got = ms.dequantize_mx(codes, np.asarray(q.scales).view(np.uint8), "e2m1" if micro.packed else "e4m3", out_dtype)
    assert_same(got.view(np.uint8), deq.astype(out_dtype).view(np.uint8), f"dequantized {out_dtype.name}")
