"""What the kernels return (QuantizedTensor) and what they share: float32 loading, the choice of backend,
the compiled kernel's carried sums as ErrorStats."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..accel import native
from ..errors import SchemeError
from ..formats.dtypes import bf16
from ..plan.scheme import Scheme
from .stats import ErrorStats


@dataclass
class QuantizedTensor:
    """Codes (the weight's shape, the format's dtype: int4 codes one per int8), the scale grid
    ([E,] rows, cols; float32 values of the stored scales) and, asymmetric, the zero-point grid
    (same shape, int8 values)."""

    codes: np.ndarray
    scales: np.ndarray
    stats: ErrorStats = field(default_factory=ErrorStats)
    zero_points: np.ndarray | None = None
    global_scale: np.float32 | None = None  # NVFP4: the float32 global scale the scales are relative to


def load_float32(dst: np.ndarray, src: np.ndarray) -> None:
    """Copy a bf16/f16/f32 array into a float32 array (bf16 by bit shift: exact and fast)."""
    if src.dtype == bf16():
        wide = dst.view(np.uint32)
        np.copyto(wide, src.view(np.uint16), casting="unsafe")
        wide <<= 16
    else:
        np.copyto(dst, src, casting="unsafe")


def wants_compiled(backend: str, scheme: Scheme) -> bool:
    """Whether the compiled kernels run the scheme: every built-in one; a codec registered without the
    facts they need (native.supports) runs on numpy, or is refused when `native` is asked for."""
    try:
        wanted = native.use_native(backend)
    except native.BackendError as exc:
        raise SchemeError(str(exc)) from None
    if wanted and not native.supports(scheme.fmt):
        if backend == "native":
            raise SchemeError(f"the native backend does not run {scheme.fmt.name} (no mantissa width for its rounding)")
        return False
    return wanted


def stats_of(elements: int, stats: np.ndarray) -> ErrorStats:
    """ErrorStats of a chunk from the compiled kernel's carried sums."""
    return ErrorStats(elements, float(stats[0]), float(stats[1]), float(stats[2]), int(stats[3]), int(stats[4]))
