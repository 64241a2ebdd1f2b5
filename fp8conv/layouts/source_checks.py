"""One validation of every quantized source tensor, used alike by quantize (weights carried over and
weights re-quantized), dequantize and verify: a tensor that fails here is never read as numbers.

Per quantized weight (fp8conv.layouts.read.QuantizedWeight), the tensors that go with its codes:
- float scales (F32 / BF16 / F16): finite and > 0;
- NVFP4 e4m3 group scales: no NaN code, not negative, not zero (compressed-tensors stores a zero
  group's scale as 0.125); MX E8M0 scales: no code 255 (NaN);
- NVFP4 `weight_global_scale`: finite and > 0, and every group scale divided by it finite and > 0;
- zero points: inside the code range of the format's bit width (int8: -128..127; packed int4 zero
  points are 4-bit fields, in range by construction).
Each problem names the tensor that holds the bad value, not the weight it belongs to.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from ..errors import InputError
from ..formats import FORMATS
from ..io.safetensors import printable
from .read import CheckpointView, QuantizedWeight, Readers

E8M0_NAN = 255


def _count(mask: np.ndarray) -> int:
    return int(np.count_nonzero(mask))


def _scale_problems(readers: Readers, qw: QuantizedWeight) -> Iterator[tuple[str, str]]:
    assert qw.scale is not None and qw.scheme is not None
    raw = readers.read(qw.scale)
    scale_fmt = qw.scheme.scale_fmt
    if not scale_fmt.microscale:
        values = raw.astype(np.float32)
        bad = _count(~np.isfinite(values) | (values <= 0))
        if bad:
            yield qw.scale.name, f"holds {bad} value(s) that are NaN, Inf or <= 0"
        return
    codes = np.ascontiguousarray(raw).view(np.uint8)
    if not scale_fmt.global_scale:  # MX: E8M0 exponents
        bad = _count(codes == E8M0_NAN)
        if bad:
            yield qw.scale.name, f"holds {bad} E8M0 scale code(s) 255, which is NaN"
        return
    # NVFP4: e4m3 group scales (sign bit set, NaN 0x7f, zero), then the same divided by the global scale
    bad = _count(((codes & 0x80) != 0) | ((codes & 0x7F) == 0x7F) | (codes == 0))
    if bad:
        yield qw.scale.name, f"holds {bad} e4m3 group scale(s) that are NaN, negative or zero"
        return
    if qw.global_scale is None:
        return
    gs = readers.read(qw.global_scale).astype(np.float32).reshape(-1)
    bad = _count(~np.isfinite(gs) | (gs <= 0))
    if bad:
        yield qw.global_scale.name, f"holds {bad} NVFP4 global scale(s) that are NaN, Inf or <= 0"
        return
    matrices = gs.size
    with np.errstate(all="ignore"):
        per_matrix = codes.reshape(matrices, -1)
        decoded = np.stack([scale_fmt.values(per_matrix[e], gs[e]) for e in range(matrices)]) if matrices else per_matrix
    bad = _count(~np.isfinite(decoded) | (decoded <= 0))
    if bad:
        yield qw.global_scale.name, (f"NVFP4 global scale makes {bad} group scale(s) of {printable(qw.scale.name)} "
                                     "Inf or 0 in float32")


def _zero_point_problems(readers: Readers, qw: QuantizedWeight) -> Iterator[tuple[str, str]]:
    if qw.zero_point is None or qw.zp_packed or qw.scheme is None:
        return
    fmt = FORMATS[qw.scheme.format]
    zp = readers.read(qw.zero_point).astype(np.int64)
    bad = _count((zp < fmt.qmin) | (zp > fmt.qmax))
    if bad:
        yield qw.zero_point.name, (f"holds {bad} zero point(s) outside {int(fmt.qmin)}..{int(fmt.qmax)}, the range of "
                                   f"{fmt.bits}-bit codes")


def source_problems(view: CheckpointView, names) -> Iterator[tuple[str, str, str]]:
    """(weight, tensor, what is wrong) for every bad scale, global scale or zero point of the quantized
    weights `names` (keys of view.weights), in name order."""
    with Readers(view.checkpoint) as readers:
        for name in sorted(names):
            qw = view.weights[name]
            if qw.scale is None or qw.scheme is None:
                continue
            for tensor, problem in (*_scale_problems(readers, qw), *_zero_point_problems(readers, qw)):
                yield name, tensor, problem


def refuse_bad_sources(view: CheckpointView, names) -> None:
    """Raise InputError for the first problem source_problems finds."""
    for _, tensor, problem in source_problems(view, names):
        raise InputError(f"{view.checkpoint.root}: {printable(tensor)} {problem}")
