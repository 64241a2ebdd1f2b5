"""The element-format codec base and its registry: a format is a subclass that registers itself.

A codec owns its facts (bits, range, in-memory dtype, safetensors tag), encode / decode, packing, and
what the rest of fp8conv needs to know instead of testing its name (weight-only, default granularity,
verify's error limit, the mse observer's objective). The codecs: fp8.py, integer.py, fp4.py; a new
format is one more module like them, imported by formats/__init__.py (or by its user: registering is
subclassing).
"""
from __future__ import annotations

from typing import ClassVar

import numpy as np

from ..registry import Registered


class ElementFormat(Registered):
    """A target format of quantization: facts plus encode / decode / pack / unpack.

    Codes live in memory as `dtype` (one code per element: FP8 as its ml_dtypes type, integers as
    int8) and are stored unpacked under `safetensors_tag`; integer formats can also be packed
    densely into int32 words (compressed-tensors `pack-quantized`).
    """

    registry: ClassVar[dict[str, "ElementFormat"]] = {}
    kind = "format"
    name: ClassVar[str]
    bits: ClassVar[int]
    is_float: ClassVar[bool]
    dtype: ClassVar[np.dtype]
    safetensors_tag: ClassVar[str]
    qmin: ClassVar[float]
    qmax: ClassVar[float]

    # What the rest of fp8conv asks a format instead of testing its name:
    standalone: ClassVar[bool] = True  # selectable by itself (--format); False: only inside a microscaled format
    weight_only: ClassVar[bool] = False  # no engine quantizes activations to it (W4A16)
    default_granularity: ClassVar[str] = "block"  # the granularity when none is given
    # verify's default limit of the relative RMS error: catches broken conversions (a wrong scale or a
    # swapped tensor gives errors >= 50%), set above what the format's rounding gives on heavy-tailed weights.
    max_rel_error: ClassVar[float] = 0.10
    short_name: ClassVar[str] = ""  # e4m3 / e5m2 / e2m1: the name inside other formats' configs
    packs_int32: ClassVar[bool] = False  # stored as compressed-tensors pack-quantized int32 words when weight-only
    # A float format with subnormals, for the compiled kernels' rounding (accel/native.py); 0 / 0: integers.
    mantissa_bits: ClassVar[int] = 0
    exponent_bias: ClassVar[int] = 0

    @property
    def emax(self) -> int:
        """floor(log2(qmax)): the exponent of the largest value (e2m1 2, e4m3 8; MX scales subtract it)."""
        return int(np.floor(np.log2(self.qmax)))

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

    def mse_exponent(self, granularity: str) -> int:
        """The error exponent P the mse observer minimises (sum |error|^P) for this format."""
        return 2

    def mse_offered(self, granularity: str, symmetric: bool) -> bool:
        """Whether the command line offers --observer mse for this format's grid scheme: only where it was
        never worse than min-max on any development or evaluation pair of bench/QUALITY.md (#28)."""
        return False

    # Packed storage (formats whose codes are narrower than a byte): [rows, cols] codes <-> stored rows.
    def packed_cols(self, cols: int) -> int:
        """Stored elements (words or bytes) per row of `cols` codes when packed."""
        raise NotImplementedError(f"{self.name} codes are not packed")

    def packed_bytes(self, cols: int) -> int:
        """Stored bytes per row of `cols` codes when packed."""
        raise NotImplementedError(f"{self.name} codes are not packed")

    def pack_codes(self, codes: np.ndarray) -> np.ndarray:
        """[rows, cols] codes -> their packed stored form."""
        raise NotImplementedError(f"{self.name} codes are not packed")

    def unpack_codes(self, packed: np.ndarray, cols: int) -> np.ndarray:
        """Inverse of pack_codes: stored rows -> [rows, cols] codes."""
        raise NotImplementedError(f"{self.name} codes are not packed")


QuantFormat = ElementFormat  # the name the kernels and tests have always used
FORMATS: dict[str, ElementFormat] = ElementFormat.registry


def format_of_tag(tag: str) -> ElementFormat | None:
    """The quantized format stored unpacked under a safetensors dtype tag, if any (I8 is int8)."""
    for fmt in FORMATS.values():
        if fmt.safetensors_tag == tag and fmt.bits == fmt.dtype.itemsize * 8:
            return fmt
    return None


def integer_format(bits: int) -> ElementFormat | None:
    """The registered integer format of `bits` bits (compressed-tensors' num_bits), if any."""
    for fmt in FORMATS.values():
        if not fmt.is_float and fmt.bits == bits:
            return fmt
    return None
