"""FP8 codecs (e4m3fn, e5m2): codes are ml_dtypes' float8 values, encoded through fastcast's tables."""
from __future__ import annotations

import ml_dtypes
import numpy as np

from .codec import ElementFormat
from .fastcast import cast_clamped_to_fp8, code_to_float_table

# FP8 e4m3 block's mse objective: sum |error|^4 (numerics/observers.py's docstring has the measurements).
FP8_BLOCK_EXPONENT = 4


class _FP8(ElementFormat):
    is_float = True
    bits = 8

    def __init_subclass__(cls, name: str = "", **kwargs) -> None:
        info = ml_dtypes.finfo(cls.dtype)
        cls.qmax = float(info.max)
        cls.qmin = -cls.qmax
        cls.mantissa_bits, cls.exponent_bias = int(info.nmant), 1 - int(info.minexp)
        super().__init_subclass__(name=name, **kwargs)

    def encode(self, values: np.ndarray, out: np.ndarray) -> None:
        cast_clamped_to_fp8(values, self, out.view(np.uint8))

    def decode(self, codes: np.ndarray, out: np.ndarray) -> None:
        np.take(code_to_float_table(self), codes.view(np.uint8), out=out)


class FP8E4M3(_FP8, name="fp8_e4m3"):
    dtype = np.dtype(ml_dtypes.float8_e4m3fn)
    safetensors_tag = "F8_E4M3"
    short_name = "e4m3"
    max_rel_error = 0.08

    def mse_exponent(self, granularity: str) -> int:
        return FP8_BLOCK_EXPONENT if granularity == "block" else 2


class FP8E5M2(_FP8, name="fp8_e5m2"):
    dtype = np.dtype(ml_dtypes.float8_e5m2)
    safetensors_tag = "F8_E5M2"
    short_name = "e5m2"
    max_rel_error = 0.15
