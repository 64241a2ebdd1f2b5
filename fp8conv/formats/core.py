"""Number formats: the one place that holds their facts (range, dtypes, safetensors tags) and their
behaviour (encode, decode, pack, unpack).

- Element formats (what a quantized weight's codes are) are classes that register themselves by
  subclassing ElementFormat: fp8_e4m3, fp8_e5m2, int8, int4. A new format (fp4 e2m1 next) is one
  more subclass here with its facts and its encode/decode, plus its rows in the tests' tables.
- Scale formats (how a scale is stored) are instances of ScaleFormat: float32, bf16, fp16. A stored
  scale is rounded to its format *before* weights are divided by it, so codes x stored scale is
  exactly what a loader reconstructs. (FP8 e4m3 scales with a float32 global scale and E8M0
  exponents are further ScaleFormats, with their own `round`.)
"""
from __future__ import annotations

from typing import ClassVar

import ml_dtypes
import numpy as np

from .fastcast import cast_clamped_to_fp8, code_to_float_table
from .minifloat import e2m1_decode, e2m1_encode, e4m3_decode, e8m0_decode, pack_nibbles, unpack_nibbles

_BF16 = np.dtype(ml_dtypes.bfloat16)


class ElementFormat:
    """A target format of quantization: facts plus encode / decode / pack / unpack.

    Codes live in memory as `dtype` (one code per element: FP8 as its ml_dtypes type, integers as
    int8) and are stored unpacked under `safetensors_tag`; integer formats can also be packed
    densely into int32 words (compressed-tensors `pack-quantized`).
    """

    registry: ClassVar[dict[str, "ElementFormat"]] = {}
    name: ClassVar[str]
    bits: ClassVar[int]
    is_float: ClassVar[bool]
    dtype: ClassVar[np.dtype]
    safetensors_tag: ClassVar[str]
    qmin: ClassVar[float]
    qmax: ClassVar[float]

    def __init_subclass__(cls, name: str = "", **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if name:
            cls.name = name
            ElementFormat.registry[name] = cls()

    def __repr__(self) -> str:
        return f"<format {self.name}>"

    @property
    def qmax32(self) -> np.float32:
        return np.float32(self.qmax)

    @property
    def qmin32(self) -> np.float32:
        return np.float32(self.qmin)

    def encode(self, values: np.ndarray, out: np.ndarray) -> None:
        """Codes of float32 `values` already clamped to [qmin, qmax], rounded to nearest even, into
        `out` (dtype `self.dtype`); `values` may be destroyed."""
        raise NotImplementedError

    def decode(self, codes: np.ndarray, out: np.ndarray) -> None:
        """Code values as float32 (without any scale)."""
        raise NotImplementedError


class _FP8(ElementFormat):
    is_float = True
    bits = 8

    def __init_subclass__(cls, name: str = "", **kwargs) -> None:
        cls.qmax = float(ml_dtypes.finfo(cls.dtype).max)
        cls.qmin = -cls.qmax
        super().__init_subclass__(name=name, **kwargs)

    def encode(self, values: np.ndarray, out: np.ndarray) -> None:
        cast_clamped_to_fp8(values, self, out.view(np.uint8))

    def decode(self, codes: np.ndarray, out: np.ndarray) -> None:
        np.take(code_to_float_table(self), codes.view(np.uint8), out=out)


class FP8E4M3(_FP8, name="fp8_e4m3"):
    dtype = np.dtype(ml_dtypes.float8_e4m3fn)
    safetensors_tag = "F8_E4M3"


class FP8E5M2(_FP8, name="fp8_e5m2"):
    dtype = np.dtype(ml_dtypes.float8_e5m2)
    safetensors_tag = "F8_E5M2"


class _Int(ElementFormat):
    """Two's complement integers of `bits` bits, held one per int8 in memory."""

    is_float = False
    dtype = np.dtype(np.int8)
    safetensors_tag = "I8"

    def __init_subclass__(cls, name: str = "", **kwargs) -> None:
        cls.qmin = float(-(1 << (cls.bits - 1)))
        cls.qmax = float((1 << (cls.bits - 1)) - 1)
        super().__init_subclass__(name=name, **kwargs)

    def encode(self, values: np.ndarray, out: np.ndarray) -> None:
        np.rint(values, out=values)
        np.copyto(out, values, casting="unsafe")

    def decode(self, codes: np.ndarray, out: np.ndarray) -> None:
        np.copyto(out, codes, casting="unsafe")

    @property
    def per_word(self) -> int:
        """Codes per int32 word when packed."""
        return 32 // self.bits

    def packed_cols(self, cols: int) -> int:
        return -(-cols // self.per_word)

    def pack_int32(self, codes: np.ndarray) -> np.ndarray:
        """[rows, cols] codes -> [rows, ceil(cols / per_word)] int32, as compressed-tensors'
        pack_to_int32: code + 2^(bits-1) as an unsigned field, element j of a word at bit j * bits
        (little end first), the last word zero-padded."""
        rows, cols = codes.shape
        per = self.per_word
        padded = np.zeros((rows, self.packed_cols(cols) * per), np.uint32)
        padded[:, :cols] = (codes.astype(np.int32) + (1 << (self.bits - 1))).astype(np.uint32)
        fields = padded.reshape(rows, -1, per)
        words = np.zeros(fields.shape[:2], np.uint32)
        for j in range(per):
            words |= fields[:, :, j] << np.uint32(j * self.bits)
        return words.view(np.int32)

    def unpack_int32(self, words: np.ndarray, cols: int) -> np.ndarray:
        """Inverse of pack_int32: [rows, words] int32 -> [rows, cols] int8 codes."""
        per, mask = self.per_word, np.uint32((1 << self.bits) - 1)
        bits = np.ascontiguousarray(words).view(np.uint32)
        fields = np.empty((*bits.shape, per), np.int16)
        for j in range(per):
            fields[:, :, j] = (bits >> np.uint32(j * self.bits)) & mask
        fields -= 1 << (self.bits - 1)
        return fields.reshape(bits.shape[0], -1)[:, :cols].astype(np.int8)


class Int8(_Int, name="int8"):
    bits = 8


class Int4(_Int, name="int4"):
    bits = 4


class FP4E2M1(ElementFormat, name="fp4_e2m1"):
    """FP4 e2m1 (0, 0.5, 1, 1.5, 2, 3, 4, 6 and negatives): one code 0..15 per uint8 in memory, stored
    two per byte (element 2k in the low nibble). The arithmetic lives in minifloat.py."""

    is_float = True
    bits = 4
    dtype = np.dtype(np.uint8)
    safetensors_tag = "U8"
    qmax = 6.0
    qmin = -6.0

    def encode(self, values: np.ndarray, out: np.ndarray) -> None:
        out[...] = e2m1_encode(values)

    def decode(self, codes: np.ndarray, out: np.ndarray) -> None:
        out[...] = e2m1_decode(codes)

    def packed_cols(self, cols: int) -> int:
        return cols // 2

    def pack(self, codes: np.ndarray) -> np.ndarray:
        return pack_nibbles(codes)

    def unpack(self, packed: np.ndarray) -> np.ndarray:
        return unpack_nibbles(packed)


QuantFormat = ElementFormat  # the name the kernels and tests have always used
FORMATS: dict[str, ElementFormat] = ElementFormat.registry


class ScaleFormat:
    """How scales are stored: a safetensors tag, a numpy dtype and the rounding into it."""

    registry: ClassVar[dict[str, "ScaleFormat"]] = {}
    microscale: ClassVar[bool] = False  # MicroScaleFormat: codes computed from the group amax

    def __init__(self, name: str, tag: str, dtype: np.dtype) -> None:
        self.name, self.tag, self.dtype = name, tag, np.dtype(dtype)
        # Where scales stop being normal, and the spacing below that (kernels round scales up onto it).
        self.smallest_normal, self.smallest_subnormal = self._range_end()
        ScaleFormat.registry[name] = self

    def _range_end(self) -> tuple[np.float32, float]:
        info = ml_dtypes.finfo(self.dtype)
        return np.float32(info.smallest_normal), float(info.smallest_subnormal)

    def __repr__(self) -> str:
        return f"<scale format {self.name}>"

    def round(self, scales: np.ndarray) -> np.ndarray:
        """float32 scales -> the float32 values of their stored form (round to nearest even)."""
        scales = np.asarray(scales, np.float32)
        if self.dtype == np.float32:
            return scales
        if self.dtype == _BF16:
            return _round_bf16(scales).view(_BF16).astype(np.float32)
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
        if self.name == "e8m0":
            return e8m0_decode(codes)
        return (e4m3_decode(codes) / np.float32(global_scale)).astype(np.float32)


SCALE_FORMATS: dict[str, ScaleFormat] = ScaleFormat.registry
for _name, _tag, _dtype in (("float32", "F32", np.float32), ("bf16", "BF16", _BF16), ("fp16", "F16", np.float16)):
    ScaleFormat(_name, _tag, _dtype)
# NVFP4: e4m3 group scales with a float32 global scale; MX: E8M0 exponents 2^(e - 127) in a uint8.
MicroScaleFormat("e4m3_global", "F8_E4M3", ml_dtypes.float8_e4m3fn)
MicroScaleFormat("e8m0", "U8", np.uint8)
SCALE_FORMAT_OF_TAG = {f.tag: f for f in SCALE_FORMATS.values() if not f.microscale}

# Every dtype tag the safetensors format defines that numpy can hold.
SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "U16": np.dtype(np.uint16),
    "I16": np.dtype(np.int16),
    "U32": np.dtype(np.uint32),
    "I32": np.dtype(np.int32),
    "U64": np.dtype(np.uint64),
    "I64": np.dtype(np.int64),
    "F16": np.dtype(np.float16),
    "BF16": _BF16,
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
TAG_OF_DTYPE: dict[np.dtype, str] = {dtype: tag for tag, dtype in SAFETENSORS_DTYPES.items()}

# Source dtypes that fp8conv quantizes; everything else is copied byte-for-byte.
QUANTIZABLE_TAGS = frozenset({"F32", "F16", "BF16"})

# Output dtypes that `dequantize` can produce.
HIGH_PRECISION = {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}


def format_of_tag(tag: str) -> ElementFormat | None:
    """The quantized format stored unpacked under a safetensors dtype tag, if any (I8 is int8)."""
    for fmt in FORMATS.values():
        if fmt.safetensors_tag == tag and fmt.bits == fmt.dtype.itemsize * 8:
            return fmt
    return None
