"""The fast float32 -> FP8 path must equal ml_dtypes' cast on every input that matters."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from fp8conv.formats.fastcast import cast_clamped_to_fp8, code_to_float_table
from fp8conv.formats import FORMATS
from reference import fp8_value


def reference_cast(values: np.ndarray, fmt) -> np.ndarray:
    """The slow, obviously-correct cast that the fast path must equal (uint8 codes): ml_dtypes' own cast."""
    return values.astype(fmt.dtype).view(np.uint8)


FP8 = ["fp8_e4m3", "fp8_e5m2"]


def fast(values: np.ndarray, fmt) -> np.ndarray:
    out = np.empty(values.shape, np.uint8)
    cast_clamped_to_fp8(values.copy(), fmt, out)
    return out


def assert_same(values: np.ndarray, fmt) -> None:
    got, want = fast(values, fmt), reference_cast(values, fmt)
    bad = np.flatnonzero(got != want)
    assert bad.size == 0, f"{bad.size} differ; first: {values[bad[0]]!r} -> {got[bad[0]]} (ml_dtypes {want[bad[0]]})"


@pytest.mark.parametrize("name", FP8)
@pytest.mark.parametrize("low_bits", [0x0000, 0x0001, 0x7FFF, 0x8000, 0x8001, 0xFFFF, 0x4000, 0xC000])
def test_every_bf16_pattern_with_low_bit_endings(name, low_bits):
    fmt = FORMATS[name]
    patterns = (np.arange(1 << 16, dtype=np.uint32) << 16) | low_bits
    values = patterns.view(np.float32)
    values = values[np.isfinite(values)]
    assert_same(np.clip(values, -fmt.qmax, fmt.qmax).astype(np.float32), fmt)


@pytest.mark.parametrize("name", FP8)
def test_random_float32_times_scales(name):
    fmt = FORMATS[name]
    rng = np.random.default_rng(7)
    for exponent in (-40, -20, -10, -5, 0, 5, 10, 20):
        values = (rng.standard_normal(1 << 19) * 2.0 ** exponent).astype(np.float32)
        assert_same(np.clip(values, -fmt.qmax, fmt.qmax), fmt)
    bits = rng.integers(0, 2**32, size=1 << 21, dtype=np.uint64).astype(np.uint32)
    values = bits.view(np.float32)
    values = values[np.isfinite(values)]
    assert_same(np.clip(values, -fmt.qmax, fmt.qmax), fmt)


@pytest.mark.parametrize("name", FP8)
def test_all_256_codes_round_trip(name):
    fmt = FORMATS[name]
    table = code_to_float_table(fmt)
    for code in range(256):
        expected = fp8_value(code, name)
        if np.isnan(expected):
            assert np.isnan(table[code])
            continue
        assert table[code] == expected, f"code {code:#04x}"
        if np.isfinite(expected):
            back = fast(np.array([expected], np.float32), fmt)[0]
            assert back == code, f"code {code:#04x} ({expected}) re-encodes as {back:#04x}"


def test_ml_dtypes_does_not_saturate():
    """Why the kernels clamp first: this would be NaN, not 448."""
    assert np.isnan(np.array([448.5 * 2], np.float32).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)[0])


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("low_bits", [0x0000, 0x0001, 0x7FFF, 0x8000, 0x8001, 0xFFFF])
def test_compiled_rounding_equals_ml_dtypes(name, low_bits):
    """The C kernel's arithmetic rounding (scale 1), on every bf16 pattern with several low-bit endings
    and on random float32 patterns of all magnitudes, clamped as the kernel clamps them."""
    from fp8conv.accel import native

    if not native.AVAILABLE:
        pytest.fail(f"the C extension is not built ({native.IMPORT_ERROR}): pip install -e .")
    fmt = FORMATS[name]
    rng = np.random.default_rng(low_bits)
    random = rng.integers(0, 2**32, size=1 << 21, dtype=np.uint64).astype(np.uint32).view(np.float32)
    every = ((np.arange(1 << 16, dtype=np.uint32) << 16) | low_bits).view(np.float32)
    for values in (every, random):
        values = values[np.isfinite(values)]
        values = values[: values.size // 64 * 64].reshape(64, -1)
        codes = native.quantize(values, values.shape, np.ones((1, 1), np.float32), None, fmt,
                                (-fmt.qmax, fmt.qmax), np.zeros(5))
        want = reference_cast(np.clip(values, -fmt.qmax, fmt.qmax).astype(np.float32).ravel(), fmt)
        got = codes.view(np.uint8).ravel()
        bad = np.flatnonzero(got != want)
        assert bad.size == 0, f"{bad.size} differ; first {values.ravel()[bad[0]]!r}: {got[bad[0]]} vs {want[bad[0]]}"


def test_round_to_bf16_equals_ml_dtypes():
    from fp8conv.numerics.kernels import round_to_bf16

    rng = np.random.default_rng(3)
    patterns = rng.integers(0, 2**32, size=1 << 21, dtype=np.uint64).astype(np.uint32)
    edges = ((np.arange(1 << 16, dtype=np.uint32) << 16)[:, None] | np.array([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF], np.uint32)).ravel()
    values = np.concatenate([patterns, edges]).view(np.float32)
    values = values[np.isfinite(values)]
    want = values.astype(ml_dtypes.bfloat16).view(np.uint16)
    got = round_to_bf16(values).view(np.uint16)
    bad = np.flatnonzero(got != want)
    assert bad.size == 0, f"{bad.size} differ; first {values[bad[0]]!r}"
