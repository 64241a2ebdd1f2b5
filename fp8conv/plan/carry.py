"""Carrying a quantized source weight over unchanged: when the requested scheme and layout would write
exactly the tensors the source already holds, and when a fused set's NVFP4 global scales allow it."""
from __future__ import annotations

import math

from ..layouts import CODES, GLOBAL_SCALE, SCALE, SHAPE, ZERO_POINT, Layout
from ..layouts.read import CheckpointView, QuantizedWeight, Readers
from ..io.untrusted import printable
from .decisions import CARRY, REQUANTIZE, Decision
from .fusion import fused_sets
from .scheme import Scheme


def carried_scheme(qw: QuantizedWeight, scheme: Scheme) -> Scheme:
    """`scheme` with the scale format the source's scales are stored in, where the layout lets the scale
    dtype follow the weight (pack-quantized: the source's weight dtype is gone, its scales tell it)."""
    assert qw.scale is not None
    return scheme.for_source(qw.scale.dtype) if not scheme.microscale else scheme


def can_carry(qw: QuantizedWeight, scheme: Scheme, layout: Layout) -> bool:
    """Same scheme (format, granularity, tile, symmetry, observer) and every tensor the layout would write
    for it (codes, scale, zero point, global scale) already in the source with its dtype and size: keep the bytes."""
    assert qw.scheme is not None and qw.scale is not None
    if bool(scheme.microscale) != bool(qw.scheme.microscale) or layout.transposes != qw.transposed:
        return False
    if scheme.microscale:
        if qw.scheme.microscale != scheme.microscale:
            return False
    elif qw.scheme.describe() != scheme.describe() or qw.scheme.symmetric != scheme.symmetric:
        return False
    stored = {CODES: qw.weight, SCALE: qw.scale, ZERO_POINT: qw.zero_point, GLOBAL_SCALE: qw.global_scale}
    for spec in layout.tensors(carried_scheme(qw, scheme), qw.name, qw.shape):
        if spec.role == SHAPE:
            continue
        source = stored.get(spec.role)
        if source is None or source.dtype != spec.dtype or source.numel != math.prod(spec.shape):
            return False
        if spec.role == CODES and tuple(source.shape) != tuple(spec.shape):
            return False
    return True


def _global_scaled(scheme: Scheme) -> bool:
    return bool(scheme.microscale) and scheme.scale_fmt.global_scale


def share_global_scales(decisions: dict[str, Decision], source_quant: dict[str, QuantizedWeight], view: CheckpointView,
                         scheme_of) -> dict[str, Decision]:
    """NVFP4: engines run a fused q/k/v or gate/up matrix with one global scale. A carried member keeps its
    source global scale, so a fused set is carried only when every member is carried with the same one;
    otherwise its carried members are re-quantized with the others (one global scale over the set)."""
    logical = {(source_quant[n].name if n in source_quant else n): n for n, d in decisions.items()
               if d.quantized and _global_scaled(scheme_of(n))}
    out = dict(decisions)
    with Readers(view.checkpoint) as readers:
        for group in fused_sets(list(logical)):
            members = [logical[m] for m in group]
            carried = [n for n in members if decisions[n].action == CARRY]
            if not carried:
                continue
            values = {readers.read(source_quant[n].global_scale).tobytes() for n in carried
                      if source_quant[n].global_scale is not None}
            if len(carried) == len(members) and len(values) == 1:
                continue
            for n in carried:
                out[n] = Decision(n, REQUANTIZE, "nvfp4 in the source, but its fused partners "
                                  f"({', '.join(printable(m) for m in group)}) need one global scale and do not share "
                                  "this one: dequantized (float32) and re-quantized with them")
    return out
