"""Pure numpy quantization kernels: no I/O, no logging.

Every granularity is one code path: a 2-D weight is cut into tiles (tile_rows x tile_cols) that
share one float32 scale = amax / qmax (1.0 for an all-zero tile); shapes that do not divide are
zero-padded for the amax and cropped after. Work happens in cache-sized windows of whole tiles,
because whole-tensor float32 temporaries cost more in page faults than in arithmetic.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Iterable

import ml_dtypes
import numpy as np

from . import compiled
from .errors import InputError, SchemeError
from .fastcast import cast_clamped_to_fp8, code_to_float_table
from .formats import QuantFormat
from .safetensors_io import printable
from .scheme import Scheme

WINDOW_ELEMENTS = 1 << 17
_BF16 = np.dtype(ml_dtypes.bfloat16)
_COMPILED_SOURCES = (_BF16, np.dtype(np.float32), np.dtype(np.float16))


@dataclass
class ErrorStats:
    """Running error statistics of one tensor, mergeable across chunks and workers."""

    elements: int = 0
    sum_sq_ref: float = 0.0
    sum_sq_err: float = 0.0
    max_abs_err: float = 0.0
    saturated: int = 0
    flushed_to_zero: int = 0
    nonfinite: int = 0

    def merge(self, other: "ErrorStats") -> None:
        self.elements += other.elements
        self.sum_sq_ref += other.sum_sq_ref
        self.sum_sq_err += other.sum_sq_err
        self.max_abs_err = max(self.max_abs_err, other.max_abs_err)
        self.saturated += other.saturated
        self.flushed_to_zero += other.flushed_to_zero
        self.nonfinite += other.nonfinite

    def to_json(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, data: dict) -> "ErrorStats":
        return cls(**data)


@dataclass
class QuantizedTensor:
    """Codes (same shape as the weight, format dtype) and the float32 scale grid ([E,] rows, cols)."""

    codes: np.ndarray
    scales: np.ndarray
    stats: ErrorStats = field(default_factory=ErrorStats)


def load_float32(dst: np.ndarray, src: np.ndarray) -> None:
    """Copy a bf16/f16/f32 array into a float32 array (bf16 by bit shift: exact and fast)."""
    if src.dtype == _BF16:
        wide = dst.view(np.uint32)
        np.copyto(wide, src.view(np.uint16), casting="unsafe")
        wide <<= 16
    else:
        np.copyto(dst, src, casting="unsafe")


def _window(scheme: Scheme, rows: int, cols: int, whole_scale: bool) -> tuple[int, int, int, int]:
    """(tile_rows, tile_cols, window_rows, window_cols): windows are whole tiles near WINDOW_ELEMENTS."""
    if whole_scale:
        tile_rows, tile_cols = 1, max(cols, 1)
    else:
        tile_rows, tile_cols = scheme.tile(rows, cols)
    tiles_across = max(1, min(-(-cols // tile_cols), WINDOW_ELEMENTS // (tile_rows * tile_cols)))
    window_cols = tiles_across * tile_cols
    tiles_down = max(1, min(-(-rows // tile_rows), WINDOW_ELEMENTS // (tile_rows * window_cols)))
    return tile_rows, tile_cols, tiles_down * tile_rows, window_cols


class NonFiniteError(InputError):
    """A tensor to quantize holds NaN or Inf (refused unless explicitly allowed)."""


def scale_from_amax(amax: np.ndarray, fmt: QuantFormat) -> np.ndarray:
    """float32 scale = amax / qmax, and 1.0 where the tile is all zeros."""
    scale = (amax / fmt.qmax32).astype(np.float32)
    scale[amax == 0] = np.float32(1.0)
    return scale


def _encode(values: np.ndarray, fmt: QuantFormat, out: np.ndarray) -> None:
    """Clamp, round to nearest even and store codes; `values` (float32 scratch) is destroyed."""
    np.minimum(values, fmt.qmax32, out=values)
    np.maximum(values, -fmt.qmax32, out=values)
    if fmt.is_float:
        cast_clamped_to_fp8(values, fmt, out.view(np.uint8))
    else:
        np.rint(values, out=values)
        np.copyto(out, values, casting="unsafe")


def _decode(codes: np.ndarray, fmt: QuantFormat, out: np.ndarray) -> None:
    """Code values as float32 (without the scale)."""
    if fmt.is_float:
        np.take(code_to_float_table(fmt), codes.view(np.uint8), out=out)
    else:
        np.copyto(out, codes, casting="unsafe")


class _Stripe:
    """Scratch buffers for one window, reused across windows of a call."""

    def __init__(self, rows: int, cols: int, fmt: QuantFormat) -> None:
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
) -> QuantizedTensor:
    """Quantize a 2-D bf16/f16/f32 weight [rows, cols] into codes [rows, cols] + scale grid.

    `tensor_scale` is the one scale of tensor granularity when the weight is only a row chunk of
    the tensor (the caller computed the amax over the whole tensor).
    """
    fmt = scheme.fmt
    rows, cols = weight.shape
    whole_scale = scheme.granularity == "tensor"
    if whole_scale and tensor_scale is None:
        tensor_scale = tensor_scale_of(lambda: [weight], fmt, allow_nonfinite, name)
    if compiled.AVAILABLE and weight.dtype in _COMPILED_SOURCES and weight.size:
        fast = _quantize_compiled(weight, scheme, tensor_scale)
        if fast is not None:
            return fast
    tile_rows, tile_cols, window_rows, window_cols = _window(scheme, rows, cols, whole_scale)
    grid = (1, 1) if whole_scale else scheme.scale_grid(rows, cols)
    scales = np.empty(grid, np.float32)
    if whole_scale:
        scales[0, 0] = tensor_scale
    codes = np.empty((rows, cols), fmt.dtype)
    stats = ErrorStats(elements=rows * cols)
    stripe = _Stripe(window_rows, window_cols, fmt)
    for r0 in range(0, rows, window_rows):
        for c0 in range(0, cols, window_cols):
            src = weight[r0 : r0 + window_rows, c0 : c0 + window_cols]
            orig, work = stripe.load(src)
            tiles = (window_rows // tile_rows, tile_rows, window_cols // tile_cols, tile_cols)
            nonfinite = None
            if whole_scale:
                scale = np.full((tiles[0], tiles[2]), tensor_scale, np.float32)
            else:
                scale, nonfinite = _tile_scales(orig, tiles, fmt, allow_nonfinite, name, weight)
                gr, gc = r0 // tile_rows, c0 // tile_cols
                grid_part = scales[gr : gr + tiles[0], gc : gc + tiles[2]]
                grid_part[...] = scale[: grid_part.shape[0], : grid_part.shape[1]]
            np.divide(orig.reshape(tiles), scale[:, None, :, None], out=work.reshape(tiles))
            if nonfinite or (whole_scale and allow_nonfinite):
                _saturate_nonfinite(orig, work, fmt, stats)
            _encode(work, fmt, stripe.codes)
            h, w = src.shape
            codes[r0 : r0 + h, c0 : c0 + w] = stripe.codes[:h, :w]
            _accumulate_stats(stats, orig, stripe.codes, scale, tiles, fmt, work)
    return QuantizedTensor(codes, scales, stats)


def _quantize_compiled(weight: np.ndarray, scheme: Scheme, tensor_scale: np.float32 | None) -> QuantizedTensor | None:
    """The numba path (tensor_scale given for tensor granularity); None when the weight holds NaN/Inf
    (the numpy path maps them)."""
    fmt = scheme.fmt
    rows, cols = weight.shape
    if scheme.granularity == "tensor":
        tile_rows, tile_cols, grid = 1, cols, (rows, 1)
    else:
        tile_rows, tile_cols = scheme.tile(rows, cols)
        grid = scheme.scale_grid(rows, cols)
    src = np.ascontiguousarray(weight)
    src = src.view(np.uint16) if src.dtype == _BF16 else src.astype(np.float32, copy=False)
    codes = np.empty((rows, cols), fmt.dtype)
    scales = np.empty(grid, np.float32)
    stats = np.zeros(5)
    fixed = np.float32(tensor_scale) if tensor_scale is not None else np.float32(0)
    if compiled.quantize_chunk(src, src.dtype == np.uint16, tile_rows, tile_cols, fixed, fmt.qmax32,
                               compiled.KIND[fmt.name], codes.view(np.uint8), scales, stats):
        return None
    if scheme.granularity == "tensor":
        scales = scales[:1, :1].copy()
    return QuantizedTensor(codes, scales, ErrorStats(rows * cols, float(stats[0]), float(stats[1]), float(stats[2]),
                                                      int(stats[3]), int(stats[4])))


def _tile_scales(orig, tiles, fmt, allow_nonfinite, name, weight):
    view = orig.reshape(tiles)
    amax = np.maximum(view.max(axis=(1, 3)), -view.min(axis=(1, 3)))
    if np.isfinite(amax).all():
        return scale_from_amax(amax, fmt), None
    if not allow_nonfinite:
        raise nonfinite_error(name, *count_nonfinite([weight]))
    finite = np.where(np.isfinite(view), np.abs(view), 0).max(axis=(1, 3))
    return scale_from_amax(finite.astype(np.float32), fmt), True


def _saturate_nonfinite(orig, work, fmt, stats) -> None:
    """Documented mapping under --allow-nonfinite: NaN -> 0, +-Inf -> +-qmax (saturated)."""
    mask = ~np.isfinite(orig)
    stats.nonfinite += int(mask.sum())
    work[np.isnan(orig)] = 0
    work[np.isposinf(orig)] = fmt.qmax32
    work[np.isneginf(orig)] = -fmt.qmax32
    orig[mask] = 0  # excluded from the error statistics


def count_nonfinite(chunks: Iterable[np.ndarray]) -> tuple[int, int]:
    """(NaN count, Inf count) over arrays of bf16/f16/f32 values."""
    nan = inf = 0
    for chunk in chunks:
        values = chunk.astype(np.float32)
        nan += int(np.isnan(values).sum())
        inf += int(np.isinf(values).sum())
    return nan, inf


def nonfinite_error(name: str, nan: int, inf: int) -> NonFiniteError:
    return NonFiniteError(
        f"tensor {printable(name)} holds {nan} NaN and {inf} Inf values; refusing to quantize it "
        "(--allow-nonfinite maps NaN to 0 and Inf to +-qmax)"
    )


def tensor_scale_of(chunks: Callable[[], Iterable[np.ndarray]], fmt: QuantFormat, allow_nonfinite: bool,
                    name: str) -> np.float32:
    """The one scale of tensor granularity, over a tensor seen as row chunks (`chunks()` is called
    again, to count or skip NaN/Inf, only when the amax is not finite)."""
    amax = np.float32(0)
    for chunk in chunks():
        amax = np.maximum(amax, amax_2d(chunk))
    if not np.isfinite(amax):
        if not allow_nonfinite:
            raise nonfinite_error(name, *count_nonfinite(chunks()))
        amax = np.float32(0)
        for chunk in chunks():
            values = chunk.astype(np.float32)
            amax = np.maximum(amax, np.float32(np.abs(values[np.isfinite(values)]).max(initial=0)))
    return scale_from_amax(np.array([amax], np.float32), fmt)[0]


@lru_cache(maxsize=None)
def _qmax_code(fmt: QuantFormat) -> int:
    return int(np.array([fmt.qmax], np.float32).astype(fmt.dtype).view(np.uint8)[0])


def _accumulate_stats(stats, orig, codes, scale, tiles, fmt, work) -> None:
    """Error of the dequantized window w' = q * scale against the source (padding contributes 0)."""
    _decode(codes, fmt, work)
    wview = work.reshape(tiles)
    wview *= scale[:, None, :, None]
    flat_codes = codes.view(np.uint8) if fmt.is_float else codes
    if fmt.is_float:
        stats.saturated += int(np.count_nonzero((flat_codes & 0x7F) == _qmax_code(fmt)))
    else:
        stats.saturated += int(np.count_nonzero(np.abs(flat_codes.astype(np.int16)) == int(fmt.qmax)))
    stats.flushed_to_zero += int(np.count_nonzero((work == 0) & (orig != 0)))
    flat_orig = orig.ravel()
    stats.sum_sq_ref += float(np.dot(flat_orig, flat_orig))
    np.subtract(orig, work, out=work)
    flat_err = work.ravel()
    stats.sum_sq_err += float(np.dot(flat_err, flat_err))
    stats.max_abs_err = max(stats.max_abs_err, float(np.abs(flat_err).max(initial=0)))


def dequantize_2d(codes: np.ndarray, scales: np.ndarray, scheme: Scheme, out: np.ndarray | None = None,
                  out_dtype: np.dtype | type = np.float32) -> np.ndarray:
    """[rows, cols] = code value * scale of its tile, computed in float32 in cache-sized windows, then
    rounded to nearest even into `out_dtype` (float32, bf16 or f16)."""
    fmt = scheme.fmt
    rows, cols = codes.shape
    whole_scale = scheme.granularity == "tensor"
    expected = (1, 1) if whole_scale else scheme.scale_grid(rows, cols)
    if scales.size == 1 and whole_scale:
        scales = scales.reshape(1, 1)
    if tuple(scales.shape) != expected:
        raise SchemeError(f"scale grid {tuple(scales.shape)} does not fit weight {codes.shape} under {scheme.describe()}")
    if out is None:
        out = np.empty((rows, cols), out_dtype)
    tile_rows, tile_cols, window_rows, window_cols = _window(scheme, rows, cols, whole_scale)
    scratch = np.empty((min(window_rows, rows), min(window_cols, cols)), np.float32)
    for r0 in range(0, rows, window_rows):
        for c0 in range(0, cols, window_cols):
            part = codes[r0 : r0 + window_rows, c0 : c0 + window_cols]
            values = scratch[: part.shape[0], : part.shape[1]]
            _decode(part, fmt, values)
            if whole_scale:
                values *= scales[0, 0]
            else:
                gr, gc = r0 // tile_rows, c0 // tile_cols
                local = scales[gr : gr + -(-part.shape[0] // tile_rows), gc : gc + -(-part.shape[1] // tile_cols)]
                expanded = np.repeat(np.repeat(local, tile_rows, axis=0), tile_cols, axis=1)
                values *= expanded[: part.shape[0], : part.shape[1]]
            dst = out[r0 : r0 + part.shape[0], c0 : c0 + part.shape[1]]
            dst[...] = round_to_bf16(values) if out.dtype == _BF16 else values
    return out


def round_to_bf16(values: np.ndarray) -> np.ndarray:
    """float32 -> bf16, rounding to nearest even on the bit pattern (what ml_dtypes' cast does, several
    times faster); inputs must be finite, as dequantized weights are."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = (bits >> 16) & 1
    rounded += 0x7FFF
    rounded += bits
    rounded >>= 16
    return rounded.astype(np.uint16).view(_BF16)


def dequantize_rows(codes: np.ndarray, grid_rows: np.ndarray, scheme: Scheme,
                    out_dtype: np.dtype | type = np.float32) -> np.ndarray:
    """A row chunk of codes, given the scale-grid rows that cover it (whole tiles), as `out_dtype`.

    For tensor granularity the grid is the single scale, whatever the chunk.
    """
    if scheme.granularity == "tensor":
        # Every row has the same scale: one scale per row is the same arithmetic.
        per_row = np.full((codes.shape[0], 1), grid_rows.reshape(-1)[0], np.float32)
        return dequantize_2d(codes, per_row, Scheme(scheme.format, "channel"), out_dtype=out_dtype)
    return dequantize_2d(codes, grid_rows, scheme, out_dtype=out_dtype)


def _per_expert(shape: tuple[int, ...]) -> bool:
    if len(shape) not in (2, 3):
        raise SchemeError(f"only 2-D weights and 3-D stacked experts are quantized, got shape {shape}")
    return len(shape) == 3


def quantize_tensor(
    array: np.ndarray,
    format: str = "fp8_e4m3",
    granularity: str = "block",
    block_size: int | tuple[int, int] = 128,
    group_size: int = 128,
) -> QuantizedTensor:
    """Public API: quantize a 2-D weight [out, in] or 3-D experts [E, out, in] (bf16/f16/f32)."""
    scheme = make_scheme(format, granularity, block_size, group_size)
    return quantize_array(array, scheme)


def quantize_array(array: np.ndarray, scheme: Scheme, name: str = "tensor", allow_nonfinite: bool = False) -> QuantizedTensor:
    """Quantize 2-D or per expert for 3-D; scales are [E, grid...] for experts."""
    if not _per_expert(array.shape):
        return quantize_2d(array, scheme, name=name, allow_nonfinite=allow_nonfinite)
    parts = [quantize_2d(expert, scheme, name=f"{name}[{i}]", allow_nonfinite=allow_nonfinite) for i, expert in enumerate(array)]
    stats = ErrorStats()
    for part in parts:
        stats.merge(part.stats)
    codes = np.stack([p.codes for p in parts]) if parts else np.empty(array.shape, scheme.fmt.dtype)
    scales = np.stack([p.scales for p in parts]) if parts else np.empty((0, *scheme.scale_grid(*array.shape[1:])), np.float32)
    return QuantizedTensor(codes, scales, stats)


def dequantize_tensor(
    codes: np.ndarray,
    scales: np.ndarray,
    format: str = "fp8_e4m3",
    granularity: str = "block",
    block_size: int | tuple[int, int] = 128,
    group_size: int = 128,
) -> np.ndarray:
    """Public API: float32 weights w' = q * scale from codes and their scale grid."""
    scheme = make_scheme(format, granularity, block_size, group_size)
    return dequantize_array(codes, scales, scheme)


def dequantize_array(codes: np.ndarray, scales: np.ndarray, scheme: Scheme) -> np.ndarray:
    if not _per_expert(codes.shape):
        return dequantize_2d(codes, _as_grid(scales, 2), scheme)
    out = np.empty(codes.shape, np.float32)
    grids = _as_grid(scales, 3)
    if grids.shape[0] != codes.shape[0]:
        raise SchemeError(f"scales for {grids.shape[0]} experts do not fit weight {codes.shape}")
    for i in range(codes.shape[0]):
        dequantize_2d(codes[i], grids[i], scheme, out=out[i])
    return out


def _as_grid(scales: np.ndarray, ndim: int) -> np.ndarray:
    """Accept the stored shapes of a per-tensor scale ((), (1,), [E, 1]) as a 2-D grid."""
    scales = np.asarray(scales, dtype=np.float32)
    while scales.ndim < ndim:
        scales = scales.reshape(*scales.shape, 1) if scales.ndim else scales.reshape(1)
    return scales


def make_scheme(format: str, granularity: str, block_size: int | tuple[int, int], group_size: int) -> Scheme:
    block = (block_size, block_size) if isinstance(block_size, int) else tuple(block_size)
    return Scheme(format=format, granularity=granularity, block_size=block, group_size=group_size)
