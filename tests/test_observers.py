"""The mse observer against a float64 brute force written here: every candidate of the documented set
is evaluated exactly, and the observer's choice must be the best one and never worse than min-max."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fp8conv.accel import native
from fp8conv.numerics import api, kernels, observe_rows, observers
from fp8conv.plan.scheme import Scheme


def native_built() -> bool:
    """The C extension is built by `pip install -e .`; its absence fails (tests/test_install.py covers
    the install without a compiler)."""
    if not native.AVAILABLE:
        pytest.fail(f"the C extension is not built ({native.IMPORT_ERROR}): pip install -e .")
    return True
from reference import QMAX, SCALE_GRID, reference_stored_scale, round_to_fp8, value_table

FACTORS = [round(1.0 - k / 100, 2) for k in range(11)]  # the documented candidate set (1.00 ... 0.90), restated


class Kind:
    """The documented arithmetic of one scheme, restated for the reference."""

    def __init__(self, scheme: Scheme) -> None:
        self.scheme = scheme
        fmt = scheme.fmt
        self.float_name = scheme.format if fmt.is_float else None
        self.symmetric = scheme.symmetric
        self.stored = scheme.scale_format
        if self.float_name:
            self.code_lo, self.code_hi, self.divisor = -QMAX[scheme.format], QMAX[scheme.format], QMAX[scheme.format]
        else:
            qmin, qmax = -(2 ** (fmt.bits - 1)), 2 ** (fmt.bits - 1) - 1
            full = scheme.activations == "none"  # weight-only integer schemes use [qmin, qmax], D = (qmax - qmin) / 2
            self.qmin, self.qmax = qmin, qmax
            self.code_lo, self.code_hi = (qmin if full or not self.symmetric else -qmax), qmax
            self.divisor = (qmax - qmin) / 2 if full else qmax

    def __repr__(self) -> str:
        return self.scheme.describe() + f" ({self.stored} scales)"

    def candidates(self, tile: np.ndarray, factors) -> list[tuple[float, float | None]]:
        """(scale, zero) of every candidate, from the float32 range shrunk by each factor (float32 math)."""
        f32 = np.float32
        lo, hi = f32(tile.min()), f32(tile.max())
        out = []
        for f in factors:
            lo_f, hi_f = f32(lo * f32(f)), f32(hi * f32(f))
            if self.symmetric:
                amax = max(-lo_f, hi_f)
                raw, empty = f32(amax / f32(self.divisor)), amax == 0
                exact = float(amax) / self.divisor
            else:
                lo0, hi0 = min(lo_f, f32(0)), max(hi_f, f32(0))
                exact = (float(hi0) - float(lo0)) / (self.qmax - self.qmin)
                with np.errstate(over="ignore"):
                    raw, empty = f32(f32(hi0 - lo0) / f32(self.qmax - self.qmin)), hi0 == lo0
                if not math.isfinite(float(raw)):
                    raw = f32(exact)
            # The kernels' range-end rule (reference.py): subnormal quotients rounded up onto the
            # format's subnormal grid, capped so reach * scale stays finite; a bf16 / fp16 quotient
            # below its smallest step, or beyond the format, is refused there: min-max (1.0) here.
            reach = (self.code_hi - self.code_lo) if not self.symmetric else max(-self.code_lo, self.code_hi)
            scale = float(reference_stored_scale(raw, exact, reach, self.stored))
            refused = self.stored != "float32" and exact < 2.0 ** SCALE_GRID[self.stored][1]
            if empty or refused or not 0 < scale < math.inf:
                scale = 1.0
            zero = None
            if not self.symmetric:
                zero = float(np.clip(np.round(f32(f32(self.qmin) - f32(lo0) / f32(scale))), self.qmin, self.qmax))
            out.append((scale, zero))
        return out

    @property
    def exponent(self) -> int:
        """The documented objective: sum |error|^3 for 4-bit integers, sum |error|^4 for FP8 e4m3 with block
        granularity, the squared error otherwise."""
        if not self.float_name and self.qmax == 7:
            return 3
        return 4 if self.float_name == "fp8_e4m3" and self.scheme.granularity == "block" else 2

    def error(self, tile: np.ndarray, scale: float, zero: float | None, exponent: int = 2) -> float:
        """Exact sum |error|^exponent of one tile (default: the squared error): codes from the float32
        quotient (plus zero point), weights reconstructed as a float32 loader does ((q - zero) * scale
        exact in float64, rounded once)."""
        x = (tile.astype(np.float32) / np.float32(scale)).astype(np.float64)
        z = zero or 0.0
        x = np.clip(x + z, self.code_lo, self.code_hi)
        if self.float_name:
            q = value_table(self.float_name)[round_to_fp8(x, self.float_name)]
        else:
            q = np.round(x)
        recon = ((q - z) * scale).astype(np.float32).astype(np.float64)
        return float((np.abs(recon - tile.astype(np.float64)) ** exponent).sum())


SCHEMES = [
    Scheme("int8", "channel"),                                                        # W8A8: [-127, 127] / 127
    Scheme("int4", "group", group_size=32, scale_format="bf16"),                      # W4A16: [-8, 7] / 7.5
    Scheme("int4", "group", group_size=32, scale_format="fp16"),
    Scheme("int4", "group", group_size=32, symmetric=False, scale_format="bf16"),     # W4A16 asymmetric
    Scheme("int8", "channel", activations="none", scale_format="bf16"),               # W8A16: / 127.5
    Scheme("int8", "channel", activations="none", symmetric=False),
    Scheme("fp8_e4m3", "block"),
    Scheme("fp8_e5m2", "group", group_size=32),
]
KINDS = [Kind(s) for s in SCHEMES]


def check(tiles: np.ndarray, kind: Kind, factors=observers.SHRINK_FACTORS, exponent: int | None = None) -> observers.Choice:
    """The observer's choice under `exponent` (default: the scheme's documented one) against the brute
    force: the best candidate on that objective, never worse than min-max on it; the squared errors and
    the objective sums reported are the reference's."""
    exponent = kind.exponent if exponent is None else exponent
    params, reconstruct = observers.scheme_functions(kind.scheme)
    choice = observers.mse(tiles, params, reconstruct, factors=factors, exponent=exponent)
    if native_built():  # the compiled evaluation: the same choices and error sums, bit for bit
        fast = observers.mse(tiles, params, reconstruct, factors=factors, exponent=exponent,
                             compiled_search=observers.compiled_search_for(kind.scheme))
        for field in ("scale", "zero", "factor_index", "error", "minmax_error", "objective", "minmax_objective"):
            a, b = getattr(choice, field), getattr(fast, field)
            assert (a is None and b is None) or a.tobytes() == b.tobytes(), f"{field} of {kind}: numpy {a}, native {b}"
    for i, tile in enumerate(tiles):
        cands = kind.candidates(tile, factors)
        objs = [kind.error(tile, s, z, exponent) for s, z in cands]
        k = int(choice.factor_index[i])
        where = f"tile {i} of {kind}, exponent {exponent}"
        assert choice.scale[i] == np.float32(cands[k][0]), where
        if cands[k][1] is not None:
            assert choice.zero[i] == cands[k][1], where
        assert objs[k] <= objs[0], f"{where}: mse objective {objs[k]} > min-max {objs[0]}"
        assert objs[k] <= min(objs) * (1 + 2.0 ** -18), f"{where}: chose {k} ({objs[k]}), best {np.argmin(objs)} ({min(objs)})"
        assert choice.objective[i] == pytest.approx(objs[k], rel=1e-9, abs=1e-30), where
        assert choice.minmax_objective[i] == pytest.approx(objs[0], rel=1e-9, abs=1e-30), where
        assert choice.error[i] == pytest.approx(kind.error(tile, *cands[k]), rel=1e-9, abs=1e-30), where
        assert choice.minmax_error[i] == pytest.approx(kind.error(tile, *cands[0]), rel=1e-9, abs=1e-30), where
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


@pytest.mark.parametrize("kind", KINDS, ids=[repr(k) for k in KINDS])
@settings(max_examples=40, deadline=None)
@given(tiles=tiles_strategy())
def test_mse_is_the_best_candidate_and_never_worse_than_minmax(kind, tiles):
    check(tiles, kind)


@pytest.mark.parametrize("kind", [KINDS[0], KINDS[6]], ids=repr)
@settings(max_examples=25, deadline=None)
@given(tiles=tiles_strategy())
def test_cubic_objective_on_other_formats_is_searched_like_int4(kind, tiles):
    """The exponent-3 search is not tied to INT4: on INT8 / FP8 tiles it is the brute force's best too."""
    check(tiles, kind, exponent=3)


@settings(max_examples=25, deadline=None)
@given(tiles=tiles_strategy())
def test_squared_objective_on_int4_is_still_searched_exactly(tiles):
    check(tiles, KINDS[1], exponent=2)


@pytest.mark.parametrize("kind", [KINDS[0], KINDS[1], KINDS[3], KINDS[7]], ids=repr)
@settings(max_examples=20, deadline=None)
@given(tiles=tiles_strategy())
def test_quartic_objective_on_other_formats_is_searched_like_fp8_block(kind, tiles):
    """The exponent-4 search is not tied to FP8 e4m3 block: on INT8 / INT4 (asymmetric too) / e5m2 tiles it
    is the brute force's best too, on both kernel paths."""
    check(tiles, kind, exponent=4)


@settings(max_examples=20, deadline=None)
@given(tiles=tiles_strategy())
def test_squared_objective_on_fp8_block_is_still_searched_exactly(tiles):
    check(tiles, KINDS[6], exponent=2)


def _first_smallest(tiles, candidate, power):
    """Per tile, over FACTORS in order, the first candidate scale with the smallest sum |recon - w|^power
    (a later one must be smaller by more than 2^-20, relative): (chosen scale, its sum, min-max's sum,
    min-max's squared error), all float64. `candidate(amax, f)` -> (scales, reconstructions)."""
    w = tiles.astype(np.float64)
    amax = np.abs(tiles).max(axis=1)
    best = np.full(len(tiles), np.inf)
    chosen = np.zeros(len(tiles), np.float64)
    for f in FACTORS:
        s, recon = candidate(amax, f)
        obj = (np.abs(recon - w) ** power).sum(axis=1)
        if f == 1.0:
            minmax_obj, minmax_sq = obj, ((recon - w) ** 2).sum(axis=1)
        better = obj < best * (1 - 2.0 ** -20)
        best = np.where(better, obj, best)
        chosen = np.where(better, s, chosen)
    return chosen, best, minmax_obj, minmax_sq


def test_fp8_block_quartic_objective_against_a_float64_reference():
    """A float64 restatement of the FP8 e4m3 block rule, independent of the observer's code: every candidate
    scale is float32(f * amax) / 448 (f = 1.00 ... 0.90, float32 scales), codes the nearest e4m3 value of
    w / s (ties to even, ml_dtypes' cast), and the chosen scale is the first one with the smallest
    sum (w - q * s)^4 (ties keep the larger scale); never worse than min-max on that sum, and both kernel
    paths agree bit for bit."""
    import ml_dtypes

    rng = np.random.default_rng(47)
    tiles = rng.standard_t(3, size=(200, 512)).astype(np.float32) * np.float32(0.02)
    tiles[::5, 7] *= 8  # outliers: clipping them is tempting for the squared error
    scheme = KINDS[6].scheme
    params, reconstruct = observers.scheme_functions(scheme)
    got = observers.mse(tiles, params, reconstruct, exponent=4)
    if native_built():
        fast = observers.mse(tiles, params, reconstruct, exponent=4,
                             compiled_search=observers.compiled_search_for(scheme))
        for field in ("scale", "factor_index", "objective", "error", "minmax_objective", "minmax_error"):
            assert getattr(fast, field).tobytes() == getattr(got, field).tobytes(), field
    def candidate(amax, f):
        s = (amax * np.float32(f)) / np.float32(448)  # float32 arithmetic, as the kernels; stored as float32
        y = np.clip(tiles / s[:, None], -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
        return s.astype(np.float64), (y * s.astype(np.float64)[:, None]).astype(np.float32).astype(np.float64)

    chosen, best, minmax_obj, minmax_sq = _first_smallest(tiles, candidate, 4)
    np.testing.assert_array_equal(got.scale.astype(np.float64), chosen)
    np.testing.assert_allclose(got.objective, best, rtol=1e-9)
    np.testing.assert_allclose(got.minmax_objective, minmax_obj, rtol=1e-9)
    np.testing.assert_allclose(got.minmax_error, minmax_sq, rtol=1e-9)
    assert (got.objective <= minmax_obj * (1 + 1e-12)).all()
    assert (got.factor_index > 0).sum() > 20  # the search did move scales


def test_documented_objectives():
    """INT4 (symmetric or not, any stored scale format) minimises sum |error|^3, FP8 e4m3 with block
    granularity sum |error|^4, every other grid scheme (FP8 e4m3 channel / group, FP8 e5m2, INT8) the
    squared error; the search accepts only those three exponents."""
    for kind in KINDS:
        assert observers.exponent_for(kind.scheme) == kind.exponent, repr(kind)
    assert [k.exponent for k in KINDS] == [2, 3, 3, 3, 2, 2, 4, 2]
    assert observers.INT4_EXPONENT == 3 and observers.FP8_BLOCK_EXPONENT == 4
    assert observers.exponent_for(Scheme("fp8_e4m3", "block", block_size=(64, 32), scale_format="bf16")) == 4
    for other in (Scheme("fp8_e4m3", "channel"), Scheme("fp8_e4m3", "group", group_size=128),
                  Scheme("fp8_e5m2", "block"), Scheme("int8", "group", group_size=64)):
        assert observers.exponent_for(other) == 2, other
    params, reconstruct = observers.scheme_functions(KINDS[0].scheme)
    for unsupported in (1, 5):
        with pytest.raises(ValueError, match="exponent"):
            observers.mse(np.ones((1, 8), np.float32), params, reconstruct, exponent=unsupported)


def test_int4_cubic_objective_against_a_float64_reference():
    """A float64 restatement of the INT4 group rule, independent of the observer's code: every candidate
    scale is bf16(f * amax / 7.5) (f = 1.00 ... 0.90), codes clip(rint(w / s), -8, 7), and the chosen scale
    is the first one with the smallest sum |w - q * s|^3 (ties keep the larger scale); never worse than
    min-max on that sum, and both kernel paths agree bit for bit."""
    import ml_dtypes

    rng = np.random.default_rng(31)
    tiles = rng.standard_t(3, size=(300, 64)).astype(np.float32) * np.float32(0.02)
    tiles[::7, 5] *= 6  # outliers: clipping them is tempting for the squared error
    params, reconstruct = observers.scheme_functions(KINDS[1].scheme)
    got = observers.mse(tiles, params, reconstruct, exponent=3)
    if native_built():
        fast = observers.mse(tiles, params, reconstruct, exponent=3,
                             compiled_search=observers.compiled_search_for(KINDS[1].scheme))
        assert fast.scale.tobytes() == got.scale.tobytes() and fast.objective.tobytes() == got.objective.tobytes()
        assert fast.error.tobytes() == got.error.tobytes() and fast.minmax_error.tobytes() == got.minmax_error.tobytes()
    def candidate(amax, f):
        raw = (amax * np.float32(f)) / np.float32(7.5)  # float32 arithmetic, as the kernels
        s = raw.astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)
        q = np.clip(np.round((tiles / s.astype(np.float32)[:, None]).astype(np.float64)), -8, 7)
        return s, (q * s[:, None]).astype(np.float32).astype(np.float64)

    chosen, best, minmax_obj, minmax_sq = _first_smallest(tiles, candidate, 3)
    np.testing.assert_array_equal(got.scale.astype(np.float64), chosen)
    np.testing.assert_allclose(got.objective, best, rtol=1e-9)
    np.testing.assert_allclose(got.minmax_error, minmax_sq, rtol=1e-9)
    assert (got.objective <= minmax_obj * (1 + 1e-12)).all()
    assert (got.factor_index > 0).sum() > 30  # the search did move scales


@settings(max_examples=30, deadline=None)
@given(tiles=tiles_strategy())
def test_power_of_two_factor_set_is_minmax(tiles):
    """E8M0 scales keep the min-max exponent: the search then reproduces min-max and its error."""
    choice = check(tiles, KINDS[1], factors=observers.E8M0_FACTORS)
    assert (choice.factor_index == 0).all() and (choice.error == choice.minmax_error).all()
    assert (choice.objective == choice.minmax_objective).all()


@settings(max_examples=30, deadline=None)
@given(tiles=tiles_strategy())
def test_expanding_factors_are_evaluated_like_shrinking_ones(tiles):
    """The search itself takes any factors after 1.0 (here larger ranges too), never worse than min-max."""
    check(tiles, KINDS[1], factors=(1.0, 0.5, 2.0, 0.95, 1.07))


def test_documented_candidate_sets():
    assert list(observers.SHRINK_FACTORS) == FACTORS and len(FACTORS) == 11 and FACTORS[-1] == 0.9
    assert observers.E8M0_FACTORS == (1.0,)
    assert observers.factors_for(KINDS[1].scheme) == observers.SHRINK_FACTORS


def test_clipping_helps_on_an_int4_tile_with_an_outlier():
    rng = np.random.default_rng(7)
    tile = rng.normal(size=(1, 64)).astype(np.float32)
    # A negative outlier (INT4's code -8 is one step longer than +7): with the cubic objective a +4x one
    # keeps min-max on this tile, this one is clipped by the 0.90 shrink.
    tile[0, 3] = -4.0 * np.abs(tile).max()
    choice = check(tile, KINDS[1])  # INT4: the cubic objective
    assert choice.factor_index[0] > 0
    assert choice.scale[0] < np.float32(np.abs(tile).max()) / np.float32(7.5)
    assert choice.objective[0] < choice.minmax_objective[0] * (1 - observers.MARGIN)
    assert choice.error[0] < choice.minmax_error[0]


def test_tile_on_the_minmax_grid_keeps_the_minmax_scale():
    scale = np.float32(0.125)
    tile = (np.arange(-127, 128, dtype=np.float32) * scale)[None]  # every value exact at amax / 127
    choice = check(tile, KINDS[0])
    assert choice.factor_index[0] == 0 and choice.scale[0] == scale and choice.error[0] == 0.0
    fp8_tile = value_table("fp8_e4m3")[np.arange(0, 127)][None].astype(np.float32)  # all e4m3 values up to 448
    choice = check(fp8_tile, KINDS[6])
    assert choice.factor_index[0] == 0 and choice.scale[0] == 1.0 and choice.error[0] == 0.0


def test_heavy_tailed_int4_groups_gain_on_average():
    rng = np.random.default_rng(11)
    tiles = rng.standard_t(4, size=(256, 64)).astype(np.float32)
    params, reconstruct = observers.scheme_functions(KINDS[1].scheme)
    for exponent in (2, 3):
        choice = observers.mse(tiles, params, reconstruct, exponent=exponent)
        assert (choice.objective <= choice.minmax_objective).all()
        assert choice.objective.sum() < 0.95 * choice.minmax_objective.sum()
        assert choice.error.sum() < 0.95 * choice.minmax_error.sum()  # the squared error falls with either


def test_all_zero_tiles_and_batches():
    rng = np.random.default_rng(3)
    tiles = rng.normal(size=(50, 48)).astype(np.float32)
    tiles[7] = 0
    params, reconstruct = observers.scheme_functions(KINDS[3].scheme)
    whole = observers.mse(tiles, params, reconstruct)
    for batch in (1, 48, 48 * 7, 1 << 20):
        part = observers.mse(tiles, params, reconstruct, batch_elements=batch)
        np.testing.assert_array_equal(part.scale, whole.scale, err_msg=f"batch {batch}")
        np.testing.assert_array_equal(part.zero, whole.zero, err_msg=f"batch {batch}")
        np.testing.assert_array_equal(part.error, whole.error, err_msg=f"batch {batch}")
    assert whole.scale[7] == 1.0 and whole.error[7] == 0.0 and whole.zero[7] == -8.0
    empty = observers.mse(np.zeros((0, 16), np.float32), params, reconstruct)
    assert empty.scale.shape == (0,)


@pytest.mark.unit
@pytest.mark.parametrize("kind", [KINDS[1], KINDS[3]], ids=repr)
@pytest.mark.parametrize("exponent", observers.EXPONENTS)
def test_int4_tile_counts_off_the_native_tile_block(kind, exponent):
    """The compiled integer search takes tiles in blocks of 4 (then one by one): every count from 1 to 9,
    with heavy-tailed (Cauchy), all-zero and single-outlier tiles, numpy == native bit for bit (check) and
    the float64 brute force's choice."""
    rng = np.random.default_rng(29)
    for n in range(1, 10):
        tiles = (rng.standard_cauchy(size=(n, 64)) * 0.01).astype(np.float32)
        tiles[n // 2] = 0
        if n > 2:
            tiles[1] = 0
            tiles[1, 5] = -3.0
        check(tiles, kind, exponent=exponent)


def test_minmax_choice_is_the_kernels_scale():
    from fp8conv.numerics import kernels

    rng = np.random.default_rng(9)
    tiles = (rng.standard_t(3, size=(64, 32)) * 1e-3).astype(np.float32)
    tiles[5] = 0
    for kind in KINDS:
        params, reconstruct = observers.scheme_functions(kind.scheme)
        choice = observers.minmax(tiles, params, reconstruct)
        lo, hi = tiles.min(axis=1), tiles.max(axis=1)
        if kind.symmetric:
            np.testing.assert_array_equal(choice.scale, kernels.scale_from_amax(np.maximum(hi, -lo), kind.scheme), str(kind))
        else:
            scale, zero = kernels.asymmetric_params(lo, hi, kind.scheme)
            np.testing.assert_array_equal(choice.scale, scale, str(kind))
            np.testing.assert_array_equal(choice.zero, zero, str(kind))
        assert (choice.factor_index == 0).all()


def test_first_factor_must_be_one():
    params, reconstruct = observers.scheme_functions(KINDS[0].scheme)
    with pytest.raises(ValueError):
        observers.mse(np.ones((1, 4), np.float32), params, reconstruct, factors=(0.9, 1.0))


# -- the observer inside quantization ---------------------------------------------------------------

WIRED = [Scheme("fp8_e4m3", "block", block_size=(16, 32), observer="mse"),
         Scheme("int8", "channel", observer="mse"),
         Scheme("fp8_e5m2", "group", group_size=24, observer="mse"),
         Scheme("int4", "group", group_size=24, observer="mse"),
         Scheme("int4", "group", group_size=24, symmetric=False, observer="mse"),
         Scheme("int8", "channel", activations="none", observer="mse")]


def ref_tiles(w: np.ndarray, tile: tuple[int, int]) -> list[np.ndarray]:
    rows, cols = w.shape
    return [w[i:i + tile[0], j:j + tile[1]].ravel() for i in range(0, rows, tile[0]) for j in range(0, cols, tile[1])]


@pytest.mark.parametrize("scheme", WIRED, ids=[s.describe() for s in WIRED])
@pytest.mark.parametrize("backend", ["auto", "numpy"])
def test_quantize_with_mse_scales_is_the_brute_force_choice(scheme, backend):
    rng = np.random.default_rng(21)
    w = (rng.standard_t(3, size=(40, 72)) * 0.05).astype(np.float32)
    q = api.quantize_array(w, scheme, backend=backend)
    kind = Kind(kernels._resolved(scheme, w.dtype))
    scales = q.scales.ravel()
    zeros = None if q.zero_points is None else q.zero_points.ravel()
    total_err = total_minmax = 0.0
    for i, t in enumerate(ref_tiles(w, scheme.tile(*w.shape))):
        cands = kind.candidates(t, observers.SHRINK_FACTORS)
        errs = [kind.error(t, s, z) for s, z in cands]
        objs = [kind.error(t, s, z, kind.exponent) for s, z in cands]
        keys = [(np.float32(s), z) for s, z in cands]
        key = (scales[i], None if zeros is None else float(zeros[i]))
        assert key in keys, f"tile {i}: {key} is not a candidate"
        chosen = objs[keys.index(key)]
        assert chosen <= objs[0] and chosen <= min(objs) * (1 + 2.0 ** -18), f"tile {i}: {chosen} vs best {min(objs)}"
        total_err += errs[keys.index(key)]
        total_minmax += errs[0]
    # Codes are the plain quantization of the weight with those scales.
    deq = api.dequantize_array(q.codes, q.scales, scheme, zero_points=q.zero_points).astype(np.float64)
    assert ((deq - w) ** 2).sum() == pytest.approx(total_err, rel=1e-9)
    assert q.stats.minmax_sum_sq_err == pytest.approx(total_minmax, rel=1e-9)
    assert q.stats.observed_sum_sq_err == pytest.approx(total_err, rel=1e-9)
    assert q.stats.sum_sq_err == pytest.approx(total_err, rel=1e-6)


@pytest.mark.parametrize("scheme", WIRED, ids=[s.describe() for s in WIRED])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_compiled_kernel_with_mse_scales_equals_numpy(scheme, dtype, monkeypatch):
    """The compiled kernel given the observer's scales (and zero points) writes the numpy kernel's codes
    and statistics."""
    import ml_dtypes
    from fp8conv.numerics import kernels

    native_built()
    calls = []
    kernel = native.quantize

    def spy(weight, tile, scales, zeros, *rest):
        calls.append(zeros is not None)
        return kernel(weight, tile, scales, zeros, *rest)

    monkeypatch.setattr(native, "quantize", spy)
    rng = np.random.default_rng(5)
    w = (rng.standard_t(3, size=(40, 72)) * 0.05).astype(np.float32)
    w[3, 5] = 0.0
    w = w.astype(ml_dtypes.bfloat16) if dtype == "bfloat16" else w
    fast = api.quantize_array(w, scheme, backend="native")
    assert calls == [not scheme.symmetric], "the compiled kernel did not quantize with the observer's grids"
    ref = api.quantize_array(w, scheme, backend="numpy")
    assert len(calls) == 1
    assert fast.codes.tobytes() == ref.codes.tobytes()
    assert fast.scales.tobytes() == ref.scales.tobytes()
    assert (fast.zero_points is None and ref.zero_points is None) or fast.zero_points.tobytes() == ref.zero_points.tobytes()
    assert fast.stats == ref.stats
    assert ref.stats.observed_sum_sq_err <= ref.stats.minmax_sum_sq_err or observers.exponent_for(scheme) != 2


def test_mse_with_tensor_granularity_is_refused():
    from fp8conv.errors import SchemeError
    from fp8conv.plan.scheme import Scheme

    with pytest.raises(SchemeError, match="mse"):
        Scheme("int8", "tensor", observer="mse")
    with pytest.raises(SchemeError, match="observer"):
        Scheme("int8", "channel", observer="best")
    assert "observer" not in Scheme("int8", "channel").to_json()  # pinned bytes of minmax outputs
    assert Scheme("int8", "channel", observer="mse").to_json()["observer"] == "mse"


@pytest.mark.parametrize("args", [("--format", "fp8_e4m3", "--granularity", "block"),
                                  ("--format", "fp8_e4m3", "--granularity", "channel"),
                                  ("--format", "int8", "--granularity", "channel"),
                                  ("--format", "int4", "--granularity", "channel"),
                                  ("--format", "int4", "--group-size", "32", "--asymmetric")])
def test_cli_observer_mse_is_refused_where_it_lost_end_to_end(sample, tmp_path, args):
    """#28: the command line offers mse only where it never lost to min-max on the evaluation pairs of
    bench/QUALITY.md; elsewhere one line says so and names the alternative, and nothing is written."""
    from helpers import run_cli

    src = sample("llama-tiny")
    result = run_cli("quantize", src, "-o", tmp_path / "o", *args, "--observer", "mse", expect=2)
    assert "--observer mse is not offered for" in result.output and "bench/QUALITY.md" in result.output
    assert ("--observer hqq" in result.output) == ("int4" in args)
    assert not (tmp_path / "o").exists()
    # An override inherits --observer: refused the same way.
    result = run_cli("quantize", src, "-o", tmp_path / "o", "--format", "nvfp4", "--observer", "mse",
                     "--scheme", "re:.*down_proj=" + ":".join(["int8", "channel"]), expect=2)
    assert "--observer mse is not offered for" in result.output and not (tmp_path / "o").exists()


def test_cli_observer_mse_refuses_tensor_granularity(sample, tmp_path):
    from helpers import run_cli

    result = run_cli("quantize", sample("llama-tiny"), "-o", tmp_path / "o", "--granularity", "tensor",
                     "--observer", "mse", expect=2)
    assert "mse" in result.output and not (tmp_path / "o").exists()


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4", "mxfp8"])
def test_cli_observer_mse_on_microscale_formats(sample, tmp_path, fmt):
    """Recorded in the manifest and config, never worse than min-max per tensor, the same tensors with
    only scale values changed (NVFP4 global scales kept), and verify accepts the output."""
    from helpers import load_all, read_json, run_cli

    src = sample("llama-tiny")
    outs = {}
    for observer in ("minmax", "mse"):
        outs[observer] = tmp_path / observer
        run_cli("quantize", src, "-o", outs[observer], "--format", fmt, "--observer", observer, "-q")
    group = next(iter(read_json(outs["mse"] / "config.json")["quantization_config"]["config_groups"].values()))
    assert group["weights"]["observer"] == "mse"
    assert read_json(outs["mse"] / "fp8conv.manifest.json")["scheme"]["observer"] == "mse"
    group = next(iter(read_json(outs["minmax"] / "config.json")["quantization_config"]["config_groups"].values()))
    assert group["weights"]["observer"] is None  # as llm-compressor writes it: min-max bytes unchanged
    plain, chosen = load_all(outs["minmax"]), load_all(outs["mse"])
    assert set(plain) == set(chosen)
    changed = 0
    for name in plain:
        assert plain[name].dtype == chosen[name].dtype and plain[name].shape == chosen[name].shape, name
        if name.endswith("weight_global_scale") or not name.endswith(("_scale", "_packed", "weight")):
            assert plain[name].tobytes() == chosen[name].tobytes(), name
        changed += name.endswith("weight_scale") and plain[name].tobytes() != chosen[name].tobytes()
    if fmt == "nvfp4":
        assert changed > 0
    else:  # E8M0 scales keep the min-max exponent (observers.py): only config and manifest say mse
        assert changed == 0
    minmax_rows = {r["name"]: r for r in read_json(outs["minmax"] / "fp8conv.report.json")["tensors"]}
    rows = [r for r in read_json(outs["mse"] / "fp8conv.report.json")["tensors"] if r["name"] in minmax_rows
            and "rel_rms_error" in minmax_rows[r["name"]]]
    assert len(rows) == 14  # q, k, v, o, gate, up, down of both layers
    for r in rows:
        assert r["minmax_rel_rms_error"] == pytest.approx(minmax_rows[r["name"]]["rel_rms_error"], rel=1e-5), r["name"]
        assert r["rel_rms_error"] <= r["minmax_rel_rms_error"] * (1 + 1e-6), r["name"]
    run_cli("verify", outs["mse"], "--against", src, "--engine", "transformers")


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2"])
def test_float_rounder_equals_encode_decode(name):
    """Every bf16 pattern within +-qmax, plus random float32 values: the observer's rounding is the
    value the kernel's encode/decode produce."""
    import ml_dtypes

    from fp8conv.formats import FORMATS

    fmt = FORMATS[name]
    patterns = np.arange(1 << 16, dtype=np.uint16).view(ml_dtypes.bfloat16).astype(np.float32)
    rng = np.random.default_rng(4)
    randoms = (rng.standard_normal(200_000) * 10.0 ** rng.uniform(-12, 5, 200_000)).astype(np.float32)
    values = np.concatenate([patterns, randoms])
    values = values[np.isfinite(values) & (np.abs(values) <= fmt.qmax)]
    expected = np.empty_like(values)
    codes = np.empty(values.shape, fmt.dtype)
    fmt.encode(values.copy(), codes)
    fmt.decode(codes, expected)
    got = values.copy()
    observers.float_rounder(fmt)(got)
    bad = np.flatnonzero(got != expected)
    assert bad.size == 0, f"{bad.size} values differ, first {values[bad[0]]!r}: {got[bad[0]]} vs {expected[bad[0]]}"


def test_recipe_round_trips_the_observer():
    """Partitioned and distributed runs ship the scheme as a recipe record: the observer must survive it."""
    from fp8conv.plan.recipe import Recipe

    recipe = Recipe(scheme=Scheme("int4", "group", group_size=64, observer="mse"))
    assert Recipe.from_json(recipe.to_json(), "test").scheme.observer == "mse"


@pytest.mark.parametrize("scheme", SCHEMES, ids=repr)
def test_minmax_candidate_is_the_kernels_scale_at_the_range_ends(scheme):
    """Candidate 1.0 of the observer is the kernels' min-max scale, range ends included: a subnormal
    quotient rounded up (never 0), a quotient near the float32 maximum capped (codes stay finite)."""
    from fp8conv.numerics import kernels

    params, _ = observers.scheme_functions(scheme)
    smallest = {"float32": 2.0**-140, "bf16": 2.0**-125, "fp16": 2.0**-20}[scheme.scale_format]
    amax = np.array([smallest, 2.0**-127, 1.0, 3.0e38, float(np.finfo(np.float32).max)], np.float32)
    amax = amax[(amax >= smallest) & ((amax < 1e5) if scheme.scale_format == "fp16" else True)]  # fp16: 65504 max
    lo, hi = -amax, amax
    scale, zero = params(lo, hi)
    if scheme.symmetric:
        expected = kernels.scale_from_amax(amax, scheme)
    else:
        expected, expected_zero = kernels.asymmetric_params(lo, hi, scheme)
        np.testing.assert_array_equal(zero, expected_zero)
    np.testing.assert_array_equal(scale, expected)
    assert (scale > 0).all() and np.isfinite(scale).all()


# -- the compiled search read straight from the weight (observe_rows.mse_grid) -------------------------

ROW_SCHEMES = [Scheme("int4", "group", group_size=128, scale_format="bf16", observer="mse"),   # the CLI's default
               Scheme("int4", "group", group_size=24, observer="mse"),  # groups not a multiple of 8
               Scheme("int4", "group", group_size=32, symmetric=False, scale_format="bf16", observer="mse"),
               Scheme("int8", "channel", activations="none", observer="mse"),
               Scheme("fp8_e5m2", "group", group_size=32, observer="mse")]                    # a float grid


def weights_with_edges(rows: int, cols: int, seed: int) -> dict[str, np.ndarray]:
    """float32 [rows, cols] weights: Gaussian, heavy-tailed (Cauchy) with all-zero rows and single outliers,
    signed zeros (rows of -0.0, -0.0 mixed with +0.0, tiles whose minimum is -0.0 or +0.0), tiny values (float32
    underflow in the pruned search's bounds), huge ones (overflow there) and flat tiles (near-tied candidates)."""
    rng = np.random.default_rng(seed)
    gauss = (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)
    cauchy = (rng.standard_cauchy((rows, cols)) * 0.01).astype(np.float32)
    cauchy[1] = 0
    cauchy[2] = 0
    cauchy[2, cols // 2] = -3.0
    zeros = np.abs(gauss)  # every minimum >= 0
    zeros[0] = -0.0
    zeros[1, ::2] = -0.0
    zeros[1, 1::2] = 0.0
    zeros[3, :: 3] = -0.0  # tiles whose minimum is -0.0 among positive values
    zeros[4] = -np.abs(zeros[4])
    zeros[4, ::5] = 0.0  # tiles whose maximum is +0.0 among negative values
    tiny = (rng.standard_normal((rows, cols)) * 1e-30).astype(np.float32)
    tiny[0, 0] = 1.0
    huge = (rng.standard_normal((rows, cols)) * 1e25).astype(np.float32)  # |d|^3 beyond float32: exact sums
    flat = np.full((rows, cols), 0.0625, np.float32)  # candidates whose errors tie or nearly tie
    flat[:, ::7] = -0.0625
    flat[1, 3] = 0.25
    return {"gaussian": gauss, "cauchy": cauchy, "signed zeros": zeros, "tiny": tiny, "huge": huge, "flat": flat}


@pytest.mark.unit
@pytest.mark.parametrize("scheme", ROW_SCHEMES, ids=[s.describe() for s in ROW_SCHEMES])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("cols", [256, 100])  # 100: ragged last group (zero-padded by the reference)
def test_compiled_search_from_the_weight_equals_numpy(scheme, dtype, cols):
    """observe_rows.mse_grid (ranges by native.tile_range, the search reading the weight's rows, the candidates
    of a 16-bit symmetric weight looked up by max |x|) == observers.mse_grid on numpy, bit for bit: scales, zero
    points and both error sums; the float64 brute force agrees with the choice (check, on the tiles)."""
    import ml_dtypes

    native_built()
    for what, w32 in weights_with_edges(6, cols, 29).items():
        if dtype == "float16" and what in ("tiny", "huge"):
            continue  # beyond fp16's range: zeros ("signed zeros") or Inf (left to numpy, the next test)
        w = w32.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)
        resolved = kernels._resolved(scheme, w.dtype)
        values = w.astype(np.float32)
        fast = observe_rows.mse_grid(w, resolved)
        ref = observers.mse_grid(values, resolved)
        where = f"{what}, {dtype}, {resolved.describe()}"
        assert fast is not None, where
        assert fast.scale.tobytes() == ref.scale.tobytes(), f"{where}: scales {fast.scale} vs {ref.scale}"
        assert (fast.zero is None and ref.zero is None) or fast.zero.tobytes() == ref.zero.tobytes(), where
        assert (fast.error, fast.minmax_error) == (ref.error, ref.minmax_error), where
    tiles = observers.tiles_of(values, resolved.tile(*values.shape))
    check(tiles, Kind(resolved))


@pytest.mark.unit
def test_compiled_search_from_the_weight_leaves_nonfinite_weights_to_numpy():
    """A weight holding NaN / Inf: observe_rows.mse_grid answers None (the numpy path owns that policy), and the search
    itself reports it."""
    native_built()
    scheme = kernels._resolved(ROW_SCHEMES[0], np.dtype(np.float32))
    w = np.ones((4, 256), np.float32)
    for bad in (np.nan, np.inf, -np.inf):
        w[3, 200] = bad
        assert observe_rows.mse_grid(w, scheme) is None
        n = 8
        ok = native.mse_search(w, 128, np.ones((2, n), np.float32), np.zeros((2, n), np.float32), False, scheme.fmt,
                               scheme.code_range, observers.MARGIN, 3, np.zeros(n, np.int32), np.zeros((4, n)))
        assert not ok


@pytest.mark.unit
def test_a_zero_minimum_gives_the_same_params_whatever_its_sign():
    """docs/numerics.md: native.tile_range may return -0.0 where numpy's min returns +0.0 (or the reverse); the
    scale and zero point are the same bytes either way (lo0 = min(lo, 0); hi0 - lo0 and qmin - lo0 / scale do not
    see the sign of a zero), for every candidate factor."""
    for scheme in [Scheme("int4", "group", group_size=32, symmetric=False, scale_format="bf16"),
                   Scheme("int8", "channel", activations="none", symmetric=False)]:
        params, _ = observers.scheme_functions(scheme)
        hi = np.array([0.0, 0.5, 3.0, 1e-30, 0.0], np.float32)
        for f in observers.SHRINK_FACTORS:
            f32 = np.float32(f)
            plus = params(np.zeros(5, np.float32) * f32, hi * f32)
            minus = params(np.full(5, -0.0, np.float32) * f32, hi * f32)
            neg_hi = params(np.full(5, -0.0, np.float32) * f32, -hi * f32)  # maximum -0.0 where hi is 0
            assert plus[0].tobytes() == minus[0].tobytes() and plus[1].tobytes() == minus[1].tobytes(), scheme
            assert np.signbit(minus[0]).sum() == 0 and neg_hi[0][0] == 1.0
    # and the C ranges are numpy's values (== : -0.0 == 0.0) on tiles with signed zeros
    import ml_dtypes

    for w in weights_with_edges(6, 100, 3).values():
        for src in (w, w.astype(ml_dtypes.bfloat16)):
            lo, hi = native.tile_range(src, (1, 32), True)
            ref_lo, ref_hi = observers.tile_range(observers.tiles_of(src.astype(np.float32), (1, 32)))
            # the reference's tiles are zero-padded to 4 x 32; callers clamp the range at 0, so compare clamped
            np.testing.assert_array_equal(np.minimum(lo.ravel(), 0), np.minimum(ref_lo, 0))
            np.testing.assert_array_equal(np.maximum(hi.ravel(), 0), np.maximum(ref_hi, 0))


@pytest.mark.unit
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_candidates_looked_up_by_max_abs_are_the_references(dtype):
    """The candidate scales of a 16-bit weight's symmetric tile, looked up by its max |x|
    (observe_rows._amax_candidates), are the float64 brute force's candidates (Kind.candidates) for amax values
    across the whole range: subnormal, tiny, ordinary, huge, zero."""
    import ml_dtypes

    rng = np.random.default_rng(7)
    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(np.float16)
    patterns = np.concatenate([np.arange(0, 40), rng.integers(0, 0x7C00 if dtype == "float16" else 0x7F80, 400),
                               [0x7F7F if dtype == "bfloat16" else 0x7BFF]]).astype(np.uint16)
    amax = patterns.view(np_dtype).astype(np.float32)
    for scheme in [Scheme("int4", "group", group_size=128, scale_format="bf16"),
                   Scheme("int4", "group", group_size=32)]:
        resolved = scheme.for_source("BF16" if dtype == "bfloat16" else "F16")
        table = observe_rows._amax_candidates(resolved, np_dtype.name)
        kind = Kind(resolved)
        for p, a in zip(patterns.tolist(), amax.tolist()):
            expected = [s for s, _ in kind.candidates(np.array([-a, a], np.float32), observers.SHRINK_FACTORS)]
            got = table[p].tolist()
            assert got == [float(np.float32(s)) for s in expected], f"{resolved.describe()}: amax {a!r} (0x{p:04x})"
