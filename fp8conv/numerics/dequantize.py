"""Dequantization (pure numpy): codes -> (code value - zero point) * scale of its tile, in float32, in
cache-sized windows, rounded once into the output dtype. The windows are the quantize kernels' too."""
from __future__ import annotations

import numpy as np

from ..accel import native
from ..errors import SchemeError
from ..formats.dtypes import bf16
from ..formats.scales import _round_bf16
from ..plan.scheme import Scheme

WINDOW_ELEMENTS = 1 << 17


def window(scheme: Scheme, rows: int, cols: int, whole_scale: bool) -> tuple[int, int, int, int]:
    """(tile_rows, tile_cols, window_rows, window_cols): windows are whole tiles near WINDOW_ELEMENTS."""
    if whole_scale:
        tile_rows, tile_cols = 1, max(cols, 1)
    else:
        # A tile larger than the matrix covers it in one band / one column of tiles whatever its
        # declared size: buffers follow the data (--block-size 65536 on an 8x8 weight), not the tile.
        tile_rows, tile_cols = scheme.tile(rows, cols)
        tile_rows, tile_cols = min(tile_rows, max(rows, 1)), min(tile_cols, max(cols, 1))
    tiles_across = max(1, min(-(-cols // tile_cols), WINDOW_ELEMENTS // (tile_rows * tile_cols)))
    window_cols = tiles_across * tile_cols
    tiles_down = max(1, min(-(-rows // tile_rows), WINDOW_ELEMENTS // (tile_rows * window_cols)))
    return tile_rows, tile_cols, tiles_down * tile_rows, window_cols


def dequantize_2d(codes: np.ndarray, scales: np.ndarray, scheme: Scheme, out: np.ndarray | None = None,
                  out_dtype: np.dtype | type = np.float32, zero_points: np.ndarray | None = None) -> np.ndarray:
    """[rows, cols] = (code value - zero point) * scale of its tile, computed in float32 in
    cache-sized windows, then rounded to nearest even into `out_dtype` (float32, bf16 or f16)."""
    fmt = scheme.fmt
    rows, cols = codes.shape
    whole_scale = scheme.granularity == "tensor"
    expected = (1, 1) if whole_scale else scheme.scale_grid(rows, cols)
    if scales.size == 1 and whole_scale:
        scales = scales.reshape(1, 1)
    if tuple(scales.shape) != expected:
        raise SchemeError(f"scale grid {tuple(scales.shape)} does not fit weight {codes.shape} under {scheme.describe()}")
    if zero_points is not None:
        zero_points = np.asarray(zero_points, np.float32).reshape(scales.shape)
    if out is None:
        out = np.empty((rows, cols), out_dtype)
    if (native.use_native() and native.supports(fmt) and codes.dtype.itemsize == 1 and codes.size
            and out.dtype.name in ("float32", "bfloat16") and out.flags.c_contiguous):
        # The compiled kernel: the same float32 arithmetic and rounding (tests/test_conformance.py).
        native.dequantize(codes, (max(rows, 1), max(cols, 1)) if whole_scale else scheme.tile(rows, cols), scales,
                          zero_points, fmt, out)
        return out
    tile_rows, tile_cols, window_rows, window_cols = window(scheme, rows, cols, whole_scale)
    scratch = np.empty((min(window_rows, rows), min(window_cols, cols)), np.float32)
    for r0 in range(0, rows, window_rows):
        for c0 in range(0, cols, window_cols):
            part = codes[r0 : r0 + window_rows, c0 : c0 + window_cols]
            values = scratch[: part.shape[0], : part.shape[1]]
            fmt.decode(part, values)
            if whole_scale:
                if zero_points is not None:
                    values -= zero_points[0, 0]
                values *= scales[0, 0]
            else:
                gr, gc = r0 // tile_rows, c0 // tile_cols
                cut = (slice(gr, gr + -(-part.shape[0] // tile_rows)), slice(gc, gc + -(-part.shape[1] // tile_cols)))

                def expand(grid: np.ndarray) -> np.ndarray:
                    big = np.repeat(np.repeat(grid[cut], tile_rows, axis=0), tile_cols, axis=1)
                    return big[: part.shape[0], : part.shape[1]]

                if zero_points is not None:
                    values -= expand(zero_points)
                values *= expand(scales)
            dst = out[r0 : r0 + part.shape[0], c0 : c0 + part.shape[1]]
            with np.errstate(over="ignore"):  # beyond the target's range gives Inf; callers count and refuse it
                dst[...] = round_to_bf16(values) if out.dtype == bf16() else values
    return out


def round_to_bf16(values: np.ndarray) -> np.ndarray:
    """float32 -> bf16, rounding to nearest even on the bit pattern (what ml_dtypes' cast does, several
    times faster); inputs must be finite, as dequantized weights are."""
    return _round_bf16(values).view(bf16())


def dequantize_rows(codes: np.ndarray, grid_rows: np.ndarray, scheme: Scheme,
                    out_dtype: np.dtype | type = np.float32, zero_points: np.ndarray | None = None) -> np.ndarray:
    """A row chunk of codes, given the scale-grid (and zero-point) rows that cover it (whole tiles).

    For tensor granularity the grid is the single scale, whatever the chunk. Values past the output
    dtype come back as Inf without a numpy warning: the callers count them and say where they are.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        return _dequantize_rows(codes, grid_rows, scheme, out_dtype, zero_points)


def _dequantize_rows(codes, grid_rows, scheme: Scheme, out_dtype, zero_points):
    if scheme.granularity == "tensor":
        # Every row has the same scale: one scale per row is the same arithmetic.
        per_row = np.full((codes.shape[0], 1), grid_rows.reshape(-1)[0], np.float32)
        zp = None if zero_points is None else np.full((codes.shape[0], 1), np.asarray(zero_points).reshape(-1)[0], np.float32)
        return dequantize_2d(codes, per_row, Scheme(scheme.format, "channel", activations=scheme.activations,
                                                    symmetric=scheme.symmetric), out_dtype=out_dtype, zero_points=zp)
    return dequantize_2d(codes, grid_rows, scheme, out_dtype=out_dtype, zero_points=zero_points)
