"""Integer codecs (int8, int4): two's complement codes held one per int8, packed into int32 words as
compressed-tensors' pack-quantized does."""
from __future__ import annotations

import numpy as np

from ..accel import native
from . import names
from .codec import ElementFormat

# INT4's mse objective: sum |error|^3 (numerics/observers.py's docstring has the measurements).
INT4_EXPONENT = 3


class _Int(ElementFormat):
    """Two's complement integers of `bits` bits, held one per int8 in memory."""

    is_float = False
    packs_int32 = True
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

    def packed_bytes(self, cols: int) -> int:
        return self.packed_cols(cols) * 4

    def pack_codes(self, codes: np.ndarray) -> np.ndarray:
        return self.pack_int32(codes)

    def unpack_codes(self, packed: np.ndarray, cols: int) -> np.ndarray:
        return self.unpack_int32(packed, cols)

    def pack_int32(self, codes: np.ndarray) -> np.ndarray:
        """[rows, cols] codes -> [rows, ceil(cols / per_word)] int32, as compressed-tensors'
        pack_to_int32: code + 2^(bits-1) as an unsigned field, element j of a word at bit j * bits
        (little end first), the last word zero-padded."""
        rows, cols = codes.shape
        if native.use_native() and codes.dtype.itemsize == 1:  # the same bytes, in one pass
            packed = native.pack_fields(codes, self.bits, self.packed_cols(cols) * 4)
            return packed.view("<u4").astype(np.uint32, copy=False).view(np.int32)
        per_byte = 8 // self.bits
        fields = np.zeros((rows, self.packed_cols(cols) * self.per_word), np.uint8)
        np.add(np.asarray(codes, np.int8).view(np.uint8), np.uint8(1 << (self.bits - 1)), out=fields[:, :cols])
        packed = fields[:, 0::per_byte].copy()  # a byte holds per_byte fields, the first in its low bits
        for j in range(1, per_byte):
            packed |= fields[:, j::per_byte] << np.uint8(j * self.bits)
        return packed.view("<u4").astype(np.uint32, copy=False).view(np.int32)  # four bytes, little end first

    def unpack_int32(self, words: np.ndarray, cols: int) -> np.ndarray:
        """Inverse of pack_int32: [rows, words] int32 -> [rows, cols] int8 codes."""
        per, mask = self.per_word, np.uint32((1 << self.bits) - 1)
        bits = np.ascontiguousarray(words).view(np.uint32)
        fields = np.empty((*bits.shape, per), np.int16)
        for j in range(per):
            fields[:, :, j] = (bits >> np.uint32(j * self.bits)) & mask
        fields -= 1 << (self.bits - 1)
        return fields.reshape(bits.shape[0], -1)[:, :cols].astype(np.int8)


class Int8(_Int, name=names.INT8):
    bits = 8


class Int4(_Int, name=names.INT4):
    bits = 4
    weight_only = True
    default_granularity = "group"
    max_rel_error = 0.40

    def mse_exponent(self, granularity: str) -> int:
        return INT4_EXPONENT

    def mse_offered(self, granularity: str, symmetric: bool) -> bool:
        # Symmetric groups: below min-max on all 3 development and 6 evaluation pairs (bench/QUALITY.md, #28).
        return granularity == "group" and symmetric
