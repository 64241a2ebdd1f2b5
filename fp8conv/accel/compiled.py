"""The numba kernel: the numerics of kernels.py fused into a few loops per row.

numba is a runtime dependency (FP8CONV_NO_NUMBA=1 turns it off); the kernel runs the schemes it
declares in `supports`;
kernels.py runs every other scheme, and any chunk holding NaN/Inf, on the numpy reference path.
FP8 rounding there is integer arithmetic on the float32 bit pattern (round to nearest even at 3 or
2 mantissa bits; the subnormal range by rint at the format's fixed step). tests/test_kernels.py
runs both paths against the float64 reference, and tests/test_fastcast.py against ml_dtypes, bit
for bit; both give the same error statistics.

The FP8 / INT8 kernel is compiled ahead into an object file and mapped without numba (aot.py,
about 0.025 s per process instead of numba's ~0.8 s); numba's own dispatcher runs it where that
object cannot be had. numba itself is imported only there, or to build the object, in the worker
processes, not at start-up. Both caches live in one folder: the package's __pycache__ when
writable, else the user's cache dir, else a per-user temporary dir, so a read-only or multi-user
install compiles once per user, not on every run. NUMBA_CACHE_DIR wins.
"""
from __future__ import annotations

import importlib.util
import os
import sys

import numpy as np

from . import aot
from .kcache import cache_dir, kernel_cache_dir, load_numba  # noqa: F401  (aot.py reads them from kcache)

AVAILABLE = not os.environ.get("FP8CONV_NO_NUMBA") and importlib.util.find_spec("numba") is not None

# The element formats the kernel knows, with the rounding it applies to each (an unknown kind makes
# the kernel return an error, never another format's rounding).
KIND = {"fp8_e4m3": 0, "fp8_e5m2": 1, "int8": 2}


def supports(scheme) -> bool:
    """Symmetric schemes over the restricted range [-qmax, qmax] with float32 scales, in a known format
    (min-max scales computed by the kernel, or the mse observer's scales given to it)."""
    return (scheme.format in KIND and scheme.symmetric and not scheme.full_range
            and scheme.scale_format == "float32")


def kind_of(scheme) -> int:
    return KIND[scheme.format]


def quantize_chunk(src, is_bf16, tile_rows, tile_cols, fixed_scale, qmax, kind, codes, scales, stats, given) -> bool:
    """See _numba_kernels.quantize_chunk: through the ahead-compiled object (aot.py) where it loads,
    else numba's dispatcher (the first call loads or compiles the kernel)."""
    native = aot.entry(is_bf16)
    kernel = native if native is not None else load_numba().quantize_chunk
    return kernel(src, is_bf16, tile_rows, tile_cols, fixed_scale, qmax, kind, codes, scales, stats, given)


def preload(skip_scipy: bool = False) -> None:
    """Load the cached kernel now (e.g. in a worker before its first job).

    numba probes scipy for BLAS on first use (~0.2 s); the kernel uses no BLAS, so worker
    processes that will never import scipy can skip the probe with skip_scipy.
    """
    if not AVAILABLE:
        return
    absent = object()
    saved = sys.modules.get("scipy", absent)
    if skip_scipy and saved is absent:
        sys.modules["scipy"] = None  # type: ignore[assignment]  # makes `import scipy` fail fast
    try:
        tile = np.zeros((1, 1), np.uint16)
        quantize_chunk(tile, True, 1, 1, np.float32(0), np.float32(448), 0, np.empty((1, 1), np.uint8),
                       np.empty((1, 1), np.float32), np.zeros(5), False)
    finally:
        if skip_scipy and saved is absent:
            del sys.modules["scipy"]
