"""The mse observer against a float64 brute force written here: every candidate of the documented set
is evaluated exactly, and the observer's choice must be the best one and never worse than min-max."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fp8conv import observers
from fp8conv.formats import FORMATS
from reference import QMAX, round_to_fp8, value_table

FACTORS = [round(1.0 - k / 100, 2) for k in range(21)]  # the documented candidate set, restated


def round_stored(s: np.ndarray, stored: str) -> np.ndarray:
    """float64 reference of the stored rounding of float32 scales, from the formats' definitions."""
    s = np.asarray(s, np.float64)
    if stored == "float32":
        return s
    if stored == "e8m0":
        return 2.0 ** np.ceil(np.log2(s))
    bits = {"bf16": 8, "fp16": 11, "e4m3": 4}[stored]  # significand bits incl. the implicit one
    min_exp = {"bf16": -126, "fp16": -14, "e4m3": -6}[stored]  # smallest normal exponent
    top = {"bf16": math.inf, "fp16": 65504.0, "e4m3": 448.0}[stored]
    exp = np.maximum(np.floor(np.log2(s)), min_exp)
    quantum = 2.0 ** (exp - (bits - 1))
    return np.minimum(np.round(s / quantum) * quantum, top)  # np.round: half to even


def ref_candidates(tile: np.ndarray, kind: tuple, stored: str, factors) -> list[tuple[float, float | None]]:
    """(scale, zero) of every candidate, from the float32 range shrunk by each factor."""
    lo, hi = np.float32(tile.min()), np.float32(tile.max())
    out = []
    for f in factors:
        lo_f, hi_f = np.float64(np.float32(lo * np.float32(f))), np.float64(np.float32(hi * np.float32(f)))
        if kind[0] == "asym":
            qmin, qmax = kind[1], kind[2]
            lo0 = min(lo_f, 0.0)
            span = np.float32(max(hi_f, 0.0) - lo0)  # float32 arithmetic, as documented
            scale = 1.0 if span == 0 else float(round_stored(np.float32(span / np.float32(qmax - qmin)), stored))
            scale = 1.0 if scale == 0 else scale
            zero = float(np.clip(np.round(np.float32(np.float32(qmin) - np.float32(lo0) / np.float32(scale))), qmin, qmax))
            out.append((scale, zero))
        else:
            amax = max(-lo_f, hi_f)
            qmax = QMAX[kind[1]] if kind[0] == "fp8" else kind[2]
            scale = 1.0 if amax == 0 else float(round_stored(np.float32(np.float32(amax) / np.float32(qmax)), stored))
            out.append((1.0 if scale == 0 else scale, None))
    return out


def ref_error(tile: np.ndarray, kind: tuple, scale: float, zero: float | None) -> float:
    """Exact squared error of one tile at one (scale, zero): codes from the float32 quotient, weights
    reconstructed as a float32 loader does (q * scale is exact in float64, then rounded once)."""
    x = (tile.astype(np.float32) / np.float32(scale)).astype(np.float64)
    if kind[0] == "fp8":
        qmax = QMAX[kind[1]]
        q = value_table(kind[1])[round_to_fp8(np.clip(x, -qmax, qmax), kind[1])]
        recon = (q * scale).astype(np.float32)
    else:
        qmin, qmax = kind[1], kind[2]
        z = zero or 0.0
        q = np.clip(np.round(x) + z, qmin, qmax) - z
        recon = (q * scale).astype(np.float32)
    return float(((recon.astype(np.float64) - tile.astype(np.float64)) ** 2).sum())


def make(kind: tuple, stored: str):
    if kind[0] == "fp8":
        fmt = FORMATS[kind[1]]
        return observers.symmetric_params(fmt.qmax, stored), observers.float_reconstruct(observers.fp8_round(fmt))
    if kind[0] == "asym":
        return observers.asymmetric_params(kind[1], kind[2], stored), observers.int_reconstruct(kind[1], kind[2])
    return observers.symmetric_params(kind[2], stored), observers.int_reconstruct(kind[1], kind[2])


KINDS = [
    (("sym", -127, 127), "float32"),
    (("sym", -8, 7), "float32"),
    (("sym", -8, 7), "bf16"),
    (("sym", -8, 7), "fp16"),
    (("asym", -8, 7), "bf16"),
    (("asym", -128, 127), "float32"),
    (("fp8", "fp8_e4m3"), "float32"),
    (("fp8", "fp8_e5m2"), "float32"),
    (("fp8", "fp8_e4m3"), "e4m3"),
    (("sym", -8, 7), "e8m0"),
]


def check(tiles: np.ndarray, kind: tuple, stored: str, factors=tuple(observers.SHRINK_FACTORS)) -> observers.Choice:
    params, reconstruct = make(kind, stored)
    choice = observers.mse(tiles, params, reconstruct, factors=factors)
    for i, tile in enumerate(tiles):
        cands = ref_candidates(tile, kind, stored, factors)
        errs = [ref_error(tile, kind, s, z) for s, z in cands]
        k = int(choice.factor_index[i])
        chosen_scale, chosen_zero = cands[k]
        where = f"tile {i} of {kind} {stored}"
        assert choice.scale[i] == np.float32(chosen_scale), where
        if chosen_zero is not None:
            assert choice.zero[i] == chosen_zero, where
        assert errs[k] <= errs[0], f"{where}: mse error {errs[k]} > min-max {errs[0]}"
        assert errs[k] <= min(errs) * (1 + 2.0 ** -18), f"{where}: chose {k} ({errs[k]}), best {np.argmin(errs)} ({min(errs)})"
        assert choice.error[i] == pytest.approx(errs[k], rel=1e-9, abs=1e-30), where
        assert choice.minmax_error[i] == pytest.approx(errs[0], rel=1e-9, abs=1e-30), where
    return choice


def tiles_strategy(max_cols: int = 64):
    @st.composite
    def build(draw):
        rows = draw(st.integers(1, 6))
        cols = draw(st.integers(1, max_cols))
        seed = draw(st.integers(0, 2**32 - 1))
        dist = draw(st.sampled_from(["normal", "student_t2", "cauchy", "uniform", "outlier", "sparse"]))
        rng = np.random.default_rng(seed)
        scale = 10.0 ** draw(st.integers(-4, 2))
        if dist == "normal":
            x = rng.normal(size=(rows, cols))
        elif dist == "student_t2":
            x = rng.standard_t(2, size=(rows, cols))
        elif dist == "cauchy":
            x = rng.standard_cauchy(size=(rows, cols))
        elif dist == "uniform":
            x = rng.uniform(-1, 1, size=(rows, cols))
        elif dist == "outlier":
            x = rng.normal(size=(rows, cols))
            x[:, 0] *= 20
        else:
            x = rng.normal(size=(rows, cols)) * (rng.random((rows, cols)) < 0.1)
        return (x * scale).astype(np.float32)

    return build()


@pytest.mark.parametrize("kind,stored", KINDS, ids=[f"{k[0]}{k[1]}-{s}" for k, s in KINDS])
@settings(max_examples=40, deadline=None)
@given(tiles=tiles_strategy())
def test_mse_is_the_best_candidate_and_never_worse_than_minmax(kind, stored, tiles):
    factors = observers.E8M0_FACTORS if stored == "e8m0" else observers.SHRINK_FACTORS
    check(tiles, kind, stored, factors)


def test_documented_candidate_sets():
    assert observers.SHRINK_FACTORS == pytest.approx(FACTORS, abs=0) and len(observers.SHRINK_FACTORS) == 21
    assert observers.E8M0_FACTORS == (1.0, 0.5, 2.0)


def test_clipping_helps_on_an_int4_tile_with_an_outlier():
    rng = np.random.default_rng(7)
    tile = rng.normal(size=(1, 64)).astype(np.float32)
    tile[0, 3] = 4.0 * np.abs(tile).max()
    choice = check(tile, ("sym", -8, 7), "float32")
    assert choice.factor_index[0] > 0
    assert choice.scale[0] < np.float32(np.abs(tile).max()) / np.float32(7)
    assert choice.error[0] < choice.minmax_error[0] * (1 - observers.MARGIN)


def test_tile_on_the_minmax_grid_keeps_the_minmax_scale():
    scale = np.float32(0.125)
    tile = (np.arange(-7, 8, dtype=np.float32) * scale)[None]  # every value exact at amax / 7
    choice = check(tile, ("sym", -8, 7), "float32")
    assert choice.factor_index[0] == 0 and choice.scale[0] == scale and choice.error[0] == 0.0
    fp8_tile = value_table("fp8_e4m3")[np.arange(0, 127)][None].astype(np.float32)  # all e4m3 values up to 448
    choice = check(fp8_tile, ("fp8", "fp8_e4m3"), "float32")
    assert choice.factor_index[0] == 0 and choice.scale[0] == 1.0 and choice.error[0] == 0.0


def test_heavy_tailed_int4_groups_gain_on_average():
    rng = np.random.default_rng(11)
    tiles = rng.standard_t(4, size=(256, 64)).astype(np.float32)
    params, reconstruct = make(("sym", -8, 7), "bf16")
    choice = observers.mse(tiles, params, reconstruct)
    assert (choice.error <= choice.minmax_error).all()
    assert choice.error.sum() < 0.9 * choice.minmax_error.sum()


def test_all_zero_tiles_and_batches():
    rng = np.random.default_rng(3)
    tiles = rng.normal(size=(50, 48)).astype(np.float32)
    tiles[7] = 0
    params, reconstruct = make(("asym", -8, 7), "bf16")
    whole = observers.mse(tiles, params, reconstruct)
    for batch in (1, 48, 48 * 7, 1 << 20):
        part = observers.mse(tiles, params, reconstruct, batch_elements=batch)
        np.testing.assert_array_equal(part.scale, whole.scale, err_msg=f"batch {batch}")
        np.testing.assert_array_equal(part.zero, whole.zero, err_msg=f"batch {batch}")
        np.testing.assert_array_equal(part.error, whole.error, err_msg=f"batch {batch}")
    assert whole.scale[7] == 1.0 and whole.error[7] == 0.0 and whole.zero[7] == -8.0
    empty = observers.mse(np.zeros((0, 16), np.float32), params, reconstruct)
    assert empty.scale.shape == (0,)


def test_minmax_choice_is_amax_over_qmax():
    tiles = np.array([[1.0, -3.5, 2.0], [0.0, 0.0, 0.0]], np.float32)
    params, reconstruct = make(("sym", -127, 127), "float32")
    choice = observers.minmax(tiles, params, reconstruct)
    assert choice.scale.tolist() == [np.float32(3.5) / np.float32(127), 1.0]
    assert (choice.factor_index == 0).all()


@pytest.mark.parametrize("stored", ["bf16", "fp16", "e4m3", "e8m0"])
def test_round_scale_matches_reference(stored):
    rng = np.random.default_rng(5)
    s = (10.0 ** rng.uniform(-4, 2, 2000)).astype(np.float32)
    if stored == "e4m3":
        s = np.clip(s, 2.0 ** -6, 448).astype(np.float32)  # normal e4m3 range
    np.testing.assert_array_equal(observers.round_scale(s, stored), round_stored(s, stored).astype(np.float32))


def test_first_factor_must_be_one():
    params, reconstruct = make(("sym", -8, 7), "float32")
    with pytest.raises(ValueError):
        observers.mse(np.ones((1, 4), np.float32), params, reconstruct, factors=(0.9, 1.0))
