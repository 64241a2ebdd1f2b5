"""FP8 codecs (e4m3fn, e5m2): codes are ml_dtypes' float8 values, encoded through fastcast's tables."""
from __future__ import annotations

import numpy as np

from . import names
from .codec import ElementFormat
from .dtypes import ml_dtype
from .fastcast import cast_clamped_to_fp8, code_to_float_table

# FP8 e4m3 block's mse objective: sum |error|^4 (numerics/observers.py's docstring has the measurements).
FP8_BLOCK_EXPONENT = 4


class _FromMlDtypes:
    """A class attribute computed from ml_dtypes when first read (then stored on the class): importing
    fp8conv does not import ml_dtypes (dtypes.py says why)."""

    def __init__(self, compute) -> None:
        self.compute = compute

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: object, owner: type):
        value = self.compute(owner)
        setattr(owner, self.name, value)
        return value


def _finfo(cls: type):
    import ml_dtypes

    return ml_dtypes.finfo(cls.dtype)


class _FP8(ElementFormat):
    is_float = True
    bits = 8
    qmax = _FromMlDtypes(lambda cls: float(_finfo(cls).max))
    qmin = _FromMlDtypes(lambda cls: -cls.qmax)
    mantissa_bits = _FromMlDtypes(lambda cls: int(_finfo(cls).nmant))
    exponent_bias = _FromMlDtypes(lambda cls: 1 - int(_finfo(cls).minexp))

    def encode(self, values: np.ndarray, out: np.ndarray) -> None:
        cast_clamped_to_fp8(values, self, out.view(np.uint8))

    def decode(self, codes: np.ndarray, out: np.ndarray) -> None:
        np.take(code_to_float_table(self), codes.view(np.uint8), out=out)


class FP8E4M3(_FP8, name=names.FP8_E4M3):
    dtype = _FromMlDtypes(lambda cls: ml_dtype("float8_e4m3fn"))
    safetensors_tag = "F8_E4M3"
    short_name = "e4m3"
    max_rel_error = 0.08

    def mse_exponent(self, granularity: str) -> int:
        return FP8_BLOCK_EXPONENT if granularity == "block" else 2


class FP8E5M2(_FP8, name=names.FP8_E5M2):
    dtype = _FromMlDtypes(lambda cls: ml_dtype("float8_e5m2"))
    safetensors_tag = "F8_E5M2"
    short_name = "e5m2"
    max_rel_error = 0.15
