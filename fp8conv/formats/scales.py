"""Scale formats: how a scale is stored. float32 / bf16 / fp16 are rounded from amax / qmax; the
microscaled ones (e4m3 with a float32 global scale, E8M0 exponents) are codes computed from the group
amax (numerics/microscale.py), whose bit codecs live here."""
from __future__ import annotations

from functools import cached_property
from typing import ClassVar

import numpy as np

from .dtypes import bf16, ml_dtype
E8M0_BIAS = 127
E8M0_NAN = 255


class ScaleFormat:
    """How scales are stored: a safetensors tag, a numpy dtype and the rounding into it."""

    registry: ClassVar[dict[str, "ScaleFormat"]] = {}
    microscale: ClassVar[bool] = False  # MicroScaleFormat: codes computed from the group amax
    global_scale: ClassVar[bool] = False  # divided by a per-tensor float32 global scale
    power_of_two: ClassVar[bool] = False  # scales are powers of two (E8M0)

    def __init__(self, name: str, tag: str, dtype: type | str) -> None:
        """dtype: a numpy type, or the name of an ml_dtypes one (imported when first needed)."""
        self.name, self.tag, self._dtype = name, tag, dtype
        ScaleFormat.registry[name] = self

    @cached_property
    def dtype(self) -> np.dtype:
        return ml_dtype(self._dtype) if isinstance(self._dtype, str) else np.dtype(self._dtype)

    @property
    def smallest_normal(self) -> np.float32:
        """Where scales stop being normal (kernels round scales below it up onto the subnormal grid)."""
        return self._range_ends[0]

    @property
    def smallest_subnormal(self) -> float:
        return self._range_ends[1]

    @cached_property
    def _range_ends(self) -> tuple[np.float32, float]:
        return self._range_end()

    def _range_end(self) -> tuple[np.float32, float]:
        import ml_dtypes

        info = ml_dtypes.finfo(self.dtype)
        return np.float32(info.smallest_normal), float(info.smallest_subnormal)

    def __repr__(self) -> str:
        return f"<scale format {self.name}>"

    def round(self, scales: np.ndarray) -> np.ndarray:
        """float32 scales -> the float32 values of their stored form (round to nearest even)."""
        scales = np.asarray(scales, np.float32)
        if self.dtype == np.float32:
            return scales
        if self.dtype == bf16():
            return _round_bf16(scales).view(bf16()).astype(np.float32)
        with np.errstate(over="ignore", under="ignore"):
            return scales.astype(self.dtype).astype(np.float32)

    def store(self, scales: np.ndarray) -> np.ndarray:
        """float32 scales already rounded by `round` -> the array written to the file (exact)."""
        return np.asarray(scales, np.float32).astype(self.dtype)


def _round_bf16(values: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns (uint16), round to nearest even; finite inputs."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = (bits >> 16) & 1
    rounded += 0x7FFF
    rounded += bits
    rounded >>= 16
    return rounded.astype(np.uint16)


class MicroScaleFormat(ScaleFormat):
    """Group scales stored as codes, whose float32 value the weights are divided by comes from the codes
    (and, for e4m3 scales, a per-tensor float32 global scale): NVFP4's e4m3 and MX's E8M0. They are
    computed from the group amax by microscale.py, not rounded from amax / qmax."""

    microscale: ClassVar[bool] = True
    code_limits: ClassVar[tuple[int, int]]  # the codes the mse observer may choose

    def _range_end(self) -> tuple[np.float32, float]:
        """The smallest scale a code stores. The range-end rule of the kernels (round a tiny scale up
        onto the subnormal grid, cap it so codes times scale stay finite) never applies here: these
        codes follow compressed-tensors byte for byte (microscale.py). E8M0: exponents only, code 0
        is 2**-127 (never a zero scale), 254 is 2**127 (255, NaN, is never produced); no subnormals.
        e4m3_global: the e4m3 group scale before the division by the global scale (2**-6 normal,
        2**-9 step); a zero group scale is stored as 0.125, as compressed-tensors does."""
        if self.dtype == np.uint8:
            return np.float32(2.0**-127), 2.0**-127
        return super()._range_end()

    def round(self, scales: np.ndarray) -> np.ndarray:  # pragma: no cover - never called for these
        raise TypeError(f"{self.name} scales are computed from the group amax (microscale.py)")

    def store(self, scales: np.ndarray) -> np.ndarray:
        """The uint8 codes, as the stored dtype (float8_e4m3fn bytes for e4m3)."""
        return np.ascontiguousarray(scales, np.uint8).view(self.dtype)

    def values(self, codes: np.ndarray, global_scale: float | None = None) -> np.ndarray:
        """float32 divisor of each group: float32(e4m3 / global) or 2^(code - 127)."""
        codes = np.ascontiguousarray(codes).view(np.uint8)
        if not self.global_scale:
            return self.decode(codes)
        return (self.decode(codes) / np.float32(global_scale)).astype(np.float32)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """float32 values of the uint8 codes (before any global scale)."""
        raise NotImplementedError


class E4M3GlobalScale(MicroScaleFormat):
    """NVFP4's group scales: e4m3 codes, relative to a per-tensor float32 global scale."""

    global_scale: ClassVar[bool] = True
    code_limits: ClassVar[tuple[int, int]] = (1, 126)  # positive normal-or-subnormal codes below 448's

    def decode(self, codes: np.ndarray) -> np.ndarray:
        return e4m3_decode(codes)


class E8M0Scale(MicroScaleFormat):
    """MX group scales: E8M0 exponents 2^(code - 127) in a uint8."""

    power_of_two: ClassVar[bool] = True
    code_limits: ClassVar[tuple[int, int]] = (0, E8M0_NAN - 1)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        return e8m0_decode(codes)


SCALE_FORMATS: dict[str, ScaleFormat] = ScaleFormat.registry
for _name, _tag, _dtype in (("float32", "F32", np.float32), ("bf16", "BF16", "bfloat16"), ("fp16", "F16", np.float16)):
    ScaleFormat(_name, _tag, _dtype)
# NVFP4: e4m3 group scales with a float32 global scale; MX: E8M0 exponents 2^(e - 127) in a uint8.
E4M3GlobalScale("e4m3_global", "F8_E4M3", "float8_e4m3fn")
E8M0Scale("e8m0", "U8", np.uint8)
SCALE_FORMAT_OF_TAG = {f.tag: f for f in SCALE_FORMATS.values() if not f.microscale}


# ---- scale codes ---------------------------------------------------------------------------------

def e4m3_decode(codes: np.ndarray) -> np.ndarray:
    """float32 values of uint8 e4m3 codes."""
    return np.asarray(codes, np.uint8).view(ml_dtype("float8_e4m3fn")).astype(np.float32)


def e8m0_from_amax(amax: np.ndarray, emax: int) -> np.ndarray:
    """uint8 E8M0 codes of MX group scales from float32 group amax, as compressed-tensors' generate_mx_scales.

    The amax's exponent is rounded up when its significand is >= 1.75 (round_to_power_2 adds half
    of an e2m1 mantissa step to the bits and truncates), then emax (2 for e2m1, 8 for e4m3) is
    subtracted and the bias 127 added; clamped to [0, 254]. Zero and subnormal amax give code 0.
    """
    bits = np.asarray(amax, np.float32).view(np.uint32) & np.uint32(0x7FFFFFFF)
    biased = ((bits + np.uint32(1 << 21)) >> 23).astype(np.int32)  # float32 bias is 127, as E8M0's
    biased = np.where(biased == 0, 0, biased - emax)
    return np.clip(biased, 0, E8M0_NAN - 1).astype(np.uint8)


def e8m0_decode(codes: np.ndarray) -> np.ndarray:
    """float32 2^(code - 127) of uint8 E8M0 codes; 255 is NaN."""
    codes = np.asarray(codes, np.uint8).astype(np.int32)
    with np.errstate(over="ignore"):
        values = np.ldexp(np.float32(1.0), codes - E8M0_BIAS).astype(np.float32)
    return np.where(codes == E8M0_NAN, np.float32(np.nan), values)


def e8m0_reciprocal(codes: np.ndarray) -> np.ndarray:
    """float32 2^(127 - code): multiplying by it is exactly dividing by the scale (power of two)."""
    codes = np.asarray(codes, np.uint8).astype(np.int32)
    return np.ldexp(np.float32(1.0), E8M0_BIAS - codes).astype(np.float32)


def e8m0_encode(values: np.ndarray) -> np.ndarray:
    """uint8 E8M0 codes of float32 powers of two (2^-127 .. 2^127) and NaN (-> 255)."""
    values = np.asarray(values, np.float32)
    mantissa, exponent = np.frexp(values)  # value = mantissa * 2^exponent, mantissa 0.5 for a power of two
    codes = np.where(np.isnan(values), E8M0_NAN, exponent - 1 + E8M0_BIAS)
    return codes.astype(np.uint8)
