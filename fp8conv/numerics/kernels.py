"""Pure numpy quantization kernels: no I/O, no logging. The reference implementation.

Every granularity is one code path: a 2-D weight is cut into tiles (tile_rows x tile_cols) that
share one scale (and, asymmetric, one zero point); shapes that do not divide are zero-padded for
the amax and cropped after. All arithmetic is float32, in this order:

- symmetric: scale = stored(amax / D), D = qmax (FP8, INT8 W8A8) or (qmax - qmin) / 2 (integer
  weight-only: 7.5 for int4, 127.5 for int8); q = rint(clip(w / scale, lo, qmax));
- asymmetric: lo_t = min(0, min w), hi_t = max(0, max w); scale = stored((hi_t - lo_t) / (qmax - qmin));
  zp = clip(rint(qmin - lo_t / scale), qmin, qmax); q = rint(clip(w / scale + zp, qmin, qmax));
- an all-zero tile gets scale 1 (and zp = qmin - 0 = qmin when asymmetric, so it still decodes to 0);
- stored(x) rounds to the scheme's scale format (float32: unchanged; bf16 / fp16: nearest even)
  *before* any weight is divided by it; w' = (q - zp) * scale is then what every loader computes;
- the two ends of the range (_stored_scales): a stored scale below its dtype's smallest normal is the
  exact quotient rounded up onto the dtype's subnormal grid (never 0), and every scale is capped so
  that each code times it stays finite in float32.

Error statistics are float64 sums in one fixed order that the compiled kernels (native.py) reproduce exactly:
per row, eight lanes (column c goes to lane c % 8) summed sequentially, the lanes combined in
order 0..7, the rows added in order. Both backends give the same report, bit for bit.
"""
from __future__ import annotations

from typing import Callable, Iterable

import numpy as np

from ..accel import native
from ..formats import TAG_OF_DTYPE, ElementFormat
from ..plan.scheme import Scheme
from . import hqq, observe_rows, observers
from .lanes import LANES, RowSums  # noqa: F401  (LANES re-exported)
from .scales import _stored_scales, asymmetric_params, range_end_scales, scale_from_amax  # noqa: F401
from .dequantize import WINDOW_ELEMENTS, dequantize_2d, dequantize_rows, round_to_bf16, window as _window  # noqa: F401
from .nonfinite import NonFiniteError, count_nonfinite, microscale_nonfinite_error, nonfinite_error  # noqa: F401
from .stats import ErrorStats
from .quantized import QuantizedTensor, load_float32, stats_of  # noqa: F401  (re-exported)
from .quantized import wants_compiled
from .microscale_kernel import quantize_microscale, quantize_microscale_rows_into  # noqa: F401  (re-exported)

_COMPILED_SOURCES = ("bfloat16", "float32", "float16")  # dtype names (ml_dtypes is imported where used)
BACKENDS = native.BACKENDS


def _resolved(scheme: Scheme, dtype: np.dtype) -> Scheme:
    return scheme.for_source(TAG_OF_DTYPE.get(np.dtype(dtype), "BF16"))


class _Stripe:
    """Scratch buffers for one window, reused across windows of a call."""

    def __init__(self, rows: int, cols: int, fmt: ElementFormat) -> None:
        self.work = np.zeros((rows, cols), np.float32)
        self.orig = np.zeros((rows, cols), np.float32)
        self.codes = np.zeros((rows, cols), fmt.dtype)

    def load(self, src: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows, cols = src.shape
        if rows < self.orig.shape[0] or cols < self.orig.shape[1]:
            self.orig.fill(0)
        load_float32(self.orig[:rows, :cols], src)
        return self.orig, self.work


def amax_2d(weight: np.ndarray) -> np.float32:
    """Largest |value| of a 2-D bf16/f16/f32 array, computed in float32 windows."""
    rows, cols = weight.shape
    window_rows = max(1, WINDOW_ELEMENTS // max(cols, 1))
    buf = np.empty((window_rows, cols), np.float32)
    amax = np.float32(0)
    for r0 in range(0, rows, window_rows):
        part = buf[: min(window_rows, rows - r0)]
        load_float32(part, weight[r0 : r0 + window_rows])
        if part.size:
            # np.maximum propagates NaN (Python's max would silently drop it).
            amax = np.maximum(amax, np.maximum(part.max(), -part.min()))
    return np.float32(amax)


def quantize_2d(
    weight: np.ndarray,
    scheme: Scheme,
    tensor_scale: np.float32 | None = None,
    allow_nonfinite: bool = False,
    name: str = "tensor",
    backend: str = "auto",
) -> QuantizedTensor:
    """Quantize a 2-D bf16/f16/f32 weight [rows, cols] into codes [rows, cols] + scale grid (+ zero points).

    `tensor_scale` is the one scale of tensor granularity when the weight is only a row chunk of
    the tensor (the caller computed the amax over the whole tensor). backend: "auto" (FP8CONV_BACKEND,
    else the compiled kernels where they are built), "numpy" or "native" (an error when not built).
    """
    scheme = _resolved(scheme, weight.dtype)
    if scheme.microscale:
        return quantize_microscale(weight, scheme, tensor_scale, name, backend)
    whole_scale = scheme.granularity == "tensor"
    if whole_scale and tensor_scale is None:
        tensor_scale = tensor_scale_of(lambda: [weight], scheme, allow_nonfinite, name)
    observed = None
    use_compiled = wants_compiled(backend, scheme) and weight.dtype.name in _COMPILED_SOURCES and weight.size > 0
    if scheme.observer != "minmax":
        # The observer's candidates are evaluated by the compiled kernels where they run (the same choices
        # as numpy's); the weight is then quantized with its scales (the same codes and statistics).
        observed = _observe(weight, scheme, allow_nonfinite, name, wants_compiled(backend, scheme))
        if use_compiled:
            fast = _quantize_compiled(weight, scheme, None, (observed.scale, observed.zero), name=name)
            if fast is not None:
                fast.stats.observed_sum_sq_err, fast.stats.minmax_sum_sq_err = observed.error, observed.minmax_error
                return fast
    elif use_compiled:
        fast = _quantize_compiled(weight, scheme, tensor_scale, name=name)
        if fast is not None:
            return fast
    return _quantize_numpy(weight, scheme, tensor_scale, allow_nonfinite, name, observed)


def _quantize_numpy(weight: np.ndarray, scheme: Scheme, tensor_scale: np.float32 | None, allow_nonfinite: bool,
                    name: str, observed) -> QuantizedTensor:
    """The numpy reference of quantize_2d (scheme resolved, not microscaled; `observed`: the mse observer's
    scales and zero points, else None)."""
    fmt = scheme.fmt
    rows, cols = weight.shape
    whole_scale = scheme.granularity == "tensor"
    tile_rows, tile_cols, window_rows, window_cols = _window(scheme, rows, cols, whole_scale)
    grid = (1, 1) if whole_scale else scheme.scale_grid(rows, cols)
    scales = np.empty(grid, np.float32)
    zero_points = None if scheme.symmetric else np.empty(grid, np.int8)
    if whole_scale:
        scales[0, 0] = tensor_scale
    codes = np.empty((rows, cols), fmt.dtype)
    stats = ErrorStats(elements=rows * cols)
    if observed is not None:
        scales[...] = observed.scale
        if zero_points is not None:
            zero_points[...] = observed.zero
        stats.observed_sum_sq_err, stats.minmax_sum_sq_err = observed.error, observed.minmax_error
    stripe = _Stripe(window_rows, window_cols, fmt)
    for r0 in range(0, rows, window_rows):
        h = min(window_rows, rows - r0)
        sums_ref, sums_err = RowSums(h), RowSums(h)
        for c0 in range(0, cols, window_cols):
            src = weight[r0 : r0 + window_rows, c0 : c0 + window_cols]
            orig, work = stripe.load(src)
            tiles = (window_rows // tile_rows, tile_rows, window_cols // tile_cols, tile_cols)
            nonfinite, zp = None, None
            gr, gc = r0 // tile_rows, c0 // tile_cols
            if whole_scale:
                scale = np.full((tiles[0], tiles[2]), tensor_scale, np.float32)
            elif observed is not None:
                scale, zp = _given_params(scales, zero_points, gr, gc, tiles)
                nonfinite = allow_nonfinite and not np.isfinite(orig).all()
            else:
                scale, zp, nonfinite = _tile_params(orig, tiles, scheme, allow_nonfinite, name, weight)
                grid_part = scales[gr : gr + tiles[0], gc : gc + tiles[2]]
                grid_part[...] = scale[: grid_part.shape[0], : grid_part.shape[1]]
                if zp is not None:
                    zp_part = zero_points[gr : gr + tiles[0], gc : gc + tiles[2]]
                    zp_part[...] = zp[: zp_part.shape[0], : zp_part.shape[1]]
            np.divide(orig.reshape(tiles), scale[:, None, :, None], out=work.reshape(tiles))
            if nonfinite or (whole_scale and allow_nonfinite):
                _saturate_nonfinite(orig, work, stats)
            if zp is not None:
                work.reshape(tiles)[...] += zp[:, None, :, None]
            lo, hi = scheme.code_range
            np.clip(work, np.float32(lo), np.float32(hi), out=work)
            fmt.encode(work, stripe.codes)
            w = src.shape[1]
            codes[r0 : r0 + h, c0 : c0 + w] = stripe.codes[:h, :w]
            _accumulate_stats(stats, orig, stripe.codes, scale, zp, tiles, scheme, work, (h, w))
            sums_ref.add(orig[:h, :w], c0)
            sums_err.add(work[:h, :w], c0)
        stats.sum_sq_ref = sums_ref.fold_into(stats.sum_sq_ref, h)
        stats.sum_sq_err = sums_err.fold_into(stats.sum_sq_err, h)
    return QuantizedTensor(codes, scales, stats, zero_points)


def compiled_rows(scheme: Scheme, dtype: np.dtype, backend: str = "auto") -> bool:
    """Whether quantize_2d runs rows of this dtype by the compiled kernel with no observer pass, so
    that `quantize_rows_into` can take a chunk's rows piece by piece."""
    scheme = _resolved(scheme, dtype)
    return scheme.observer == "minmax" and np.dtype(dtype).name in _COMPILED_SOURCES and wants_compiled(backend, scheme)


def quantize_rows_into(weight: np.ndarray, scheme: Scheme, tensor_scale: np.float32 | None,
                       stats: np.ndarray, name: str = "tensor") -> QuantizedTensor | None:
    """The compiled kernel on some whole tile rows of a chunk (where `compiled_rows` holds), adding
    its error sums into `stats` (float64[5], carried from the chunk's earlier pieces): the kernel
    adds each row's sums in row order, so pieces taken in order give the chunk's statistics to the
    last bit (`stats_of`) while each piece stays in the CPU's cache from the read to the write.
    The result's own stats are not filled in. None when the piece holds NaN/Inf: quantize_2d then
    takes the whole chunk."""
    if weight.size == 0:
        return None
    scheme = _resolved(scheme, weight.dtype)
    if scheme.microscale:
        return quantize_microscale_rows_into(weight, scheme, tensor_scale, stats)
    return _quantize_compiled(weight, scheme, tensor_scale, None, stats, name)


def _quantize_compiled(weight: np.ndarray, scheme: Scheme, tensor_scale: np.float32 | None,
                       given: tuple[np.ndarray, np.ndarray | None] | None = None, carried: np.ndarray | None = None,
                       name: str = "tensor") -> QuantizedTensor | None:
    """The compiled path (native.py): tile ranges by the kernel, scales and zero points from them by this
    module's rules (scale_from_amax, asymmetric_params), codes and statistics by the kernel. tensor_scale:
    tensor granularity's one scale; given: the (scale, zero point) grids to use, the mse observer's;
    carried: sums to add into (quantize_rows_into). None when the weight holds NaN/Inf (the numpy path
    maps or refuses them)."""
    fmt = scheme.fmt
    rows, cols = weight.shape
    zeros = None
    if scheme.granularity == "tensor":
        tile = (max(rows, 1), max(cols, 1))
        scales = np.full((1, 1), tensor_scale, np.float32)
    elif given is not None:
        tile = scheme.tile(rows, cols)
        scales, zeros = given
    else:
        tile = scheme.tile(rows, cols)
        ranges = native.tile_range(weight, tile, not scheme.symmetric)
        if ranges is None:
            return None
        lo, hi = ranges
        if scheme.symmetric:
            scales = scale_from_amax(hi, scheme, name)
        else:
            scales, zeros = asymmetric_params(lo, hi, scheme, name)
    stats = np.zeros(5) if carried is None else carried
    codes = native.quantize(weight, tile, scales, zeros, fmt, scheme.code_range, stats)
    if codes is None:
        return None
    zero_points = None if zeros is None else np.asarray(zeros).astype(np.int8)
    return QuantizedTensor(codes, np.array(scales, np.float32), ErrorStats() if carried is not None
                           else stats_of(rows * cols, stats), zero_points)


def _observe(weight: np.ndarray, scheme: Scheme, allow_nonfinite: bool, name: str,
             use_compiled: bool = False) -> "observers.GridChoice":
    """mse scale (and zero-point) grid of a 2-D weight; NaN/Inf, when allowed, are seen as 0 (as min-max
    ignores them); the candidates evaluated by the compiled kernel when `use_compiled` (for tiles along a row,
    straight from the weight: observe_rows.mse_grid)."""
    if use_compiled and scheme.observer == "mse":
        fast = observe_rows.mse_grid(weight, scheme)
        if fast is not None:
            return fast
    values = np.empty(weight.shape, np.float32)
    load_float32(values, weight)
    finite = np.isfinite(values)
    if not finite.all():
        if not allow_nonfinite:
            raise nonfinite_error(name, *count_nonfinite([weight]))
        values[~finite] = 0
    if scheme.observer == "hqq":
        return _hqq_grid(values, scheme)
    return observers.mse_grid(values, scheme, use_compiled)


def _hqq_grid(weight: np.ndarray, scheme: Scheme) -> "observers.GridChoice":
    """The hqq observer's scale and zero-point grids of a finite float32 2-D weight (asymmetric integer
    groups / channels), with the kernels' scale storage and reconstruction."""
    rows, cols = weight.shape
    params, reconstruct = observers.scheme_functions(scheme)
    tiles = observers.tiles_of(weight, scheme.tile(rows, cols))
    lo, hi = observers.tile_range(tiles)
    scale, zero = params(lo, hi)

    def store(raw: np.ndarray) -> np.ndarray:
        # A scale that cannot be stored is NaN: its candidate's error is NaN and never chosen.
        with np.errstate(over="ignore"):
            stored, bad = range_end_scales(raw.astype(np.float32), raw, scheme, np.zeros(raw.shape, np.bool_))
        return np.where(bad, np.float32(np.nan), stored).astype(np.float32)

    choice = hqq.hqq(tiles, scale, zero, scheme.code_range, store, reconstruct, params)
    grid = scheme.scale_grid(rows, cols)
    return observers.GridChoice(choice.scale.reshape(grid), choice.zero.reshape(grid), float(choice.error.sum()),
                                float(choice.minmax_error.sum()))


def _given_params(scales, zero_points, gr, gc, tiles):
    """The window's slice of precomputed grids, padded with scale 1 (zero point 0) past the edge."""
    scale = np.ones((tiles[0], tiles[2]), np.float32)
    given = scales[gr : gr + tiles[0], gc : gc + tiles[2]]
    scale[: given.shape[0], : given.shape[1]] = given
    if zero_points is None:
        return scale, None
    zp = np.zeros((tiles[0], tiles[2]), np.float32)
    zp[: given.shape[0], : given.shape[1]] = zero_points[gr : gr + tiles[0], gc : gc + tiles[2]]
    return scale, zp


def _tile_params(orig, tiles, scheme: Scheme, allow_nonfinite, name, weight):
    """(scales, zero points or None, whether NaN/Inf were found) of the tiles of a window."""
    view = orig.reshape(tiles)
    hi, lo = view.max(axis=(1, 3)), view.min(axis=(1, 3))
    nonfinite = None
    if not (np.isfinite(hi).all() and np.isfinite(lo).all()):
        if not allow_nonfinite:
            raise nonfinite_error(name, *count_nonfinite([weight]))
        finite = np.where(np.isfinite(view), view, 0)
        hi, lo, nonfinite = finite.max(axis=(1, 3)), finite.min(axis=(1, 3)), True
    if scheme.symmetric:
        return scale_from_amax(np.maximum(hi, -lo), scheme, name), None, nonfinite
    scale, zp = asymmetric_params(lo, hi, scheme, name)
    return scale, zp, nonfinite


def _saturate_nonfinite(orig, work, stats) -> None:
    """Documented mapping under --allow-nonfinite: NaN -> 0, +-Inf -> the ends of the code range."""
    mask = ~np.isfinite(orig)
    stats.nonfinite += int(mask.sum())
    work[np.isnan(orig)] = 0
    big = np.float32(np.finfo(np.float32).max / 4)  # clipped to the code range after the zero point
    work[np.isposinf(orig)] = big
    work[np.isneginf(orig)] = -big
    orig[mask] = 0  # excluded from the error statistics


def tensor_scale_of(chunks: Callable[[], Iterable[np.ndarray]], scheme: Scheme, allow_nonfinite: bool,
                    name: str) -> np.float32:
    """The one (stored) scale of tensor granularity, over a tensor seen as row chunks (`chunks()` is
    called again, to count or skip NaN/Inf, only when the amax is not finite)."""
    amax = np.float32(0)
    dtype = None
    for chunk in chunks():
        dtype = chunk.dtype
        amax = np.maximum(amax, amax_2d(chunk))
    if not np.isfinite(amax):
        if not allow_nonfinite:
            raise nonfinite_error(name, *count_nonfinite(chunks()))
        amax = np.float32(0)
        for chunk in chunks():
            values = chunk.astype(np.float32)
            amax = np.maximum(amax, np.float32(np.abs(values[np.isfinite(values)]).max(initial=0)))
    scheme = _resolved(scheme, dtype if dtype is not None else np.float32)
    return scale_from_amax(np.array([amax], np.float32), scheme, name)[0]


def _accumulate_stats(stats, orig, codes, scale, zp, tiles, scheme: Scheme, work, real: tuple[int, int]) -> None:
    """Counts and max error of the dequantized window w' = (q - zp) * scale (padding contributes 0, and is
    not counted as saturated where an asymmetric zero point sits at an end of the range; `real`: the
    window's rows and columns that are the weight's); leaves the float32 error w - w' in `work` for the
    fixed-order sums."""
    scheme.fmt.decode(codes, work)
    lo, hi = scheme.code_range
    inside = work[: real[0], : real[1]]
    stats.saturated += int(np.count_nonzero((inside <= lo) | (inside >= hi)))
    wview = work.reshape(tiles)
    if zp is not None:
        wview -= zp[:, None, :, None]
    wview *= scale[:, None, :, None]
    stats.flushed_to_zero += int(np.count_nonzero((work == 0) & (orig != 0)))
    np.subtract(orig, work, out=work)
    stats.max_abs_err = max(stats.max_abs_err, float(np.abs(work).max(initial=0)))
