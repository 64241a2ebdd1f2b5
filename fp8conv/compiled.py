"""Optional numba kernel: the numerics of kernels.py fused into a few loops per row.

Used when numba is installed (the `fast` extra); kernels.py keeps the numpy path as the fallback,
and takes it for any chunk holding NaN/Inf. FP8 rounding there is integer arithmetic on the
float32 bit pattern (round to nearest even at 3 or 2 mantissa bits; the subnormal range by rint
at the format's fixed step). tests/test_kernels.py runs both paths against the float64
reference, and tests/test_fastcast.py against ml_dtypes, bit for bit.

numba itself is imported on first use (in the worker processes), not at start-up.
"""
from __future__ import annotations

import importlib.util
import os
import sys

import numpy as np

AVAILABLE = not os.environ.get("FP8CONV_NO_NUMBA") and importlib.util.find_spec("numba") is not None

KIND = {"fp8_e4m3": 0, "fp8_e5m2": 1, "int8": 2}


def quantize_chunk(*args):
    """See _numba_kernels.quantize_chunk (the first call loads or compiles the kernel)."""
    from . import _numba_kernels

    return _numba_kernels.quantize_chunk(*args)


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
                       np.empty((1, 1), np.float32), np.zeros(5))
    finally:
        if skip_scipy and saved is absent:
            del sys.modules["scipy"]
