"""The params and reconstruct functions of a scheme, with the kernels' arithmetic: what the scale observers
evaluate their candidates with (numpy), and the compiled search bound to a scheme."""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from ..accel import native
from ..formats.fastcast import bf16_to_value_table, round_to_odd_bf16
from .scales import asymmetric_quotients, range_end_scales, symmetric_quotients, zero_points


def scheme_functions(scheme) -> "tuple[ParamsFn, ReconstructFn]":
    """params and reconstruct of a resolved scheme.Scheme, with the kernels' arithmetic:

    symmetric: scale = stored(max(-lo, hi) / D); asymmetric: lo0 = min(lo, 0), hi0 = max(hi, 0),
    scale = stored((hi0 - lo0) / (qmax - qmin)), zero = clip(rint(qmin - lo0 / scale), qmin, qmax);
    scale 1 for an all-zero range, and (unlike the kernels, which refuse the tensor) also where a
    candidate's scale is not representable in the stored format, so such a candidate repeats min-max.
    reconstruct: (encode(clip(x / scale + zero, code range)) - zero) * scale, decoded to float32.
    """
    fmt, scale_fmt = scheme.fmt, scheme.scale_fmt
    round_float = float_rounder(fmt) if fmt.is_float else None
    code_lo, code_hi = (np.float32(v) for v in scheme.code_range)

    def stored(raw: np.ndarray, exact: np.ndarray, empty: np.ndarray) -> np.ndarray:
        # The kernels' rule, range ends included (a scale never 0, capped so codes stay finite).
        scale, bad = range_end_scales(raw.astype(np.float32), exact, scheme, empty)
        scale[empty | bad] = np.float32(1.0)
        return scale

    def symmetric(lo: np.ndarray, hi: np.ndarray):
        return stored(*symmetric_quotients(np.maximum(-lo, hi), scheme)), None

    def asymmetric(lo: np.ndarray, hi: np.ndarray):
        raw, exact, empty, lo0 = asymmetric_quotients(lo, hi, scheme)
        scale = stored(raw, exact, empty)
        return scale, zero_points(lo0, scale, scheme)

    buffers: dict[tuple[int, int], tuple[np.ndarray, ...]] = {}

    def scratch(shape: tuple[int, int]) -> tuple[np.ndarray, ...]:
        # Large temporaries cost page faults on every allocation: keep one set per batch shape.
        if shape not in buffers:
            buffers.clear()
            buffers[shape] = (np.empty(shape, np.float32), np.empty(shape, np.float32),
                              np.empty(shape, np.uint32), np.empty(shape, np.bool_))
        return buffers[shape]

    def reconstruct(x, scale, zero, out):
        full, aux, bits, mask = scratch(x.shape)
        np.copyto(full, scale[:, None])
        np.divide(x, full, out=out)
        if zero is not None:
            np.copyto(aux, zero[:, None])
            out += aux
        np.minimum(out, code_hi, out=out)
        np.maximum(out, code_lo, out=out)
        if fmt.is_float:
            round_float(out, aux, bits, mask)
        else:
            np.rint(out, out=out)  # what integer encode/decode do, without the int8 round trip
        if zero is not None:
            np.copyto(aux, zero[:, None])
            out -= aux
        out *= full

    return (symmetric if scheme.symmetric else asymmetric), reconstruct


def compiled_search_for(scheme) -> Callable[..., None]:
    """The compiled candidate evaluation (native.mse_search) bound to a resolved scheme's format and code
    range; call only where the compiled kernels run."""

    def search(tiles, scales, zeros, has_zero, margin, exponent, index, sums) -> None:
        tiles = np.ascontiguousarray(tiles, np.float32)
        if not native.mse_search(tiles, tiles.shape[1], scales, zeros, has_zero, scheme.fmt, scheme.code_range, margin,
                                 exponent, index, sums):
            raise ValueError("mse_search: the tiles hold NaN / Inf (the observer takes finite tiles)")

    return search


def _float_rounding(fmt) -> tuple[np.uint32, np.uint32, np.uint32, np.float32, np.float32]:
    """(dropped significand bits, half - 1, keep mask, smallest normal, subnormal quantum) of an FP8 format."""
    import ml_dtypes  # here, not at import (formats/dtypes.py says why)

    info = ml_dtypes.finfo(fmt.dtype)
    drop = 23 - int(info.nmant)
    return (np.uint32(drop), np.uint32((1 << (drop - 1)) - 1), np.uint32(~((1 << drop) - 1) & 0xFFFFFFFF),
            np.float32(2.0 ** int(info.minexp)), np.float32(2.0 ** (int(info.minexp) - int(info.nmant))))


def float_rounder(fmt) -> Callable[..., None]:
    """In place: float32 values (already within +-qmax) -> the nearest value of an FP8 element format, ties
    to even: decode(encode(v)) by fastcast's table (the one copy of FP8 rounding on the numpy side)."""
    table = bf16_to_value_table(fmt)

    def round_in_place(values: np.ndarray, aux: Optional[np.ndarray] = None, lsb: Optional[np.ndarray] = None,
                       tiny: Optional[np.ndarray] = None) -> None:
        """`aux` (float32) is scratch of the values' shape (`lsb` and `tiny` are accepted and unused)."""
        aux = np.empty(values.shape, np.float32) if aux is None else aux
        np.copyto(aux, values)
        np.take(table, round_to_odd_bf16(aux), out=values)

    return round_in_place
