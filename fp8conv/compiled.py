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

AVAILABLE = not os.environ.get("FP8CONV_NO_NUMBA") and importlib.util.find_spec("numba") is not None

KIND = {"fp8_e4m3": 0, "fp8_e5m2": 1, "int8": 2}


def quantize_chunk(*args):
    """See _numba_kernels.quantize_chunk (the first call loads or compiles the kernel)."""
    from . import _numba_kernels

    return _numba_kernels.quantize_chunk(*args)
