"""FP4 e2m1 codec: codes 0..15 (0, 0.5, 1, 1.5, 2, 3, 4, 6 and negatives), two per byte when stored.
Pure numpy; NVFP4 and MXFP4 (formats/microscaled.py) are built from it."""
from __future__ import annotations

import sys
from functools import lru_cache

import numpy as np

from . import names
from .codec import ElementFormat
from .fastcast import round_to_odd_bf16

assert sys.byteorder == "little", "nibble packing below relies on a little-endian uint16 view"


# ---- FP4 e2m1 elements --------------------------------------------------------------------------

def e2m1_values() -> np.ndarray:
    """float32[16]: the value of every e2m1 code (bit 3 sign, bits 2-1 exponent bias 1, bit 0 mantissa)."""
    codes = np.arange(16)
    sign = np.where(codes & 8, -1.0, 1.0)
    exponent = (codes >> 1) & 3
    mantissa = codes & 1
    magnitude = np.where(exponent == 0, mantissa * 0.5, (1 + mantissa / 2) * 2.0 ** (exponent - 1))
    return (sign * magnitude).astype(np.float32)


@lru_cache(maxsize=None)
def _bf16_to_e2m1() -> np.ndarray:
    """uint8[65536]: the e2m1 code of every bf16 bit pattern (RNE, saturating at +-6).

    An exact zero of either sign gets code 0 and any other value keeps its sign, as
    compressed-tensors does (its cast multiplies by torch.sign, which is 0 for +-0).
    NaN patterns get +-6; callers refuse NaN before quantizing.
    """
    patterns = np.arange(1 << 16, dtype=np.uint32)
    with np.errstate(invalid="ignore"):
        values = (patterns << 16).view(np.float32).astype(np.float64)
    magnitude = np.abs(values)
    grid = e2m1_values()[:8].astype(np.float64)
    # Magnitude code = how many RNE boundaries lie below; a tie goes to the even code, i.e.
    # the boundary counts as passed only when the code above it is even.
    code = np.zeros(values.shape, np.uint8)
    for upper in range(1, 8):
        midpoint = (grid[upper - 1] + grid[upper]) / 2
        passed = magnitude > midpoint if upper % 2 else magnitude >= midpoint
        code += passed
    code[np.isnan(values)] = 7
    negative = (patterns & 0x8000) != 0
    code[negative & (magnitude > 0)] |= 8
    return code


def e2m1_encode(values: np.ndarray) -> np.ndarray:
    """uint8 e2m1 codes (0..15) of float32 `values`, any shape; `values` is left unchanged."""
    work = np.array(values, dtype=np.float32, copy=True)
    return np.take(_bf16_to_e2m1(), round_to_odd_bf16(work))


def e2m1_decode(codes: np.ndarray) -> np.ndarray:
    """float32 values of uint8 e2m1 codes (low nibble)."""
    return np.take(e2m1_values(), np.asarray(codes, np.uint8) & 0xF)


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """uint8 [..., n/2] from uint8 codes [..., n] (< 16): element 2k in the low nibble of byte k."""
    codes = np.ascontiguousarray(codes, np.uint8)
    if codes.shape[-1] % 2:
        raise ValueError(f"cannot pack {codes.shape[-1]} 4-bit codes per row into bytes (odd count)")
    pairs = codes.view(np.uint16)  # little-endian: low byte = element 2k, high byte = element 2k+1
    return (pairs | (pairs >> 4)).astype(np.uint8)


def unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    """uint8 codes [..., 2n] from packed bytes [..., n] (inverse of pack_nibbles)."""
    packed = np.ascontiguousarray(packed, np.uint8)
    wide = packed.astype(np.uint16)
    pairs = (wide & 0xF) | ((wide & 0xF0) << 4)
    return pairs.view(np.uint8).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


@lru_cache(maxsize=None)
def _byte_to_e2m1_pair() -> np.ndarray:
    """float32[256, 2]: the two e2m1 values (low nibble first) of every packed byte."""
    byte = np.arange(256)
    values = e2m1_values()
    return np.stack([values[byte & 0xF], values[byte >> 4]], axis=1)


def unpack_e2m1_values(packed: np.ndarray) -> np.ndarray:
    """float32 [..., 2n] e2m1 values of packed bytes [..., n]: one table lookup per byte."""
    packed = np.asarray(packed, np.uint8)
    pairs = np.take(_byte_to_e2m1_pair(), packed, axis=0)
    return pairs.reshape(*packed.shape[:-1], packed.shape[-1] * 2)


class FP4E2M1(ElementFormat, name=names.FP4_E2M1):
    """FP4 e2m1 (0, 0.5, 1, 1.5, 2, 3, 4, 6 and negatives): one code 0..15 per uint8 in memory, stored
    two per byte (element 2k in the low nibble). Its bit arithmetic is below."""

    is_float = True
    bits = 4
    dtype = np.dtype(np.uint8)
    safetensors_tag = "U8"
    qmax = 6.0
    qmin = -6.0
    standalone = False  # written as nvfp4 / mxfp4 (formats/microscaled.py)
    weight_only = True
    default_granularity = "group"
    short_name = "e2m1"
    max_rel_error = 0.25
    mantissa_bits = 1
    exponent_bias = 1

    def encode(self, values: np.ndarray, out: np.ndarray) -> None:
        out[...] = e2m1_encode(values)

    def decode(self, codes: np.ndarray, out: np.ndarray) -> None:
        out[...] = e2m1_decode(codes)

    def packed_cols(self, cols: int) -> int:
        return cols // 2

    def packed_bytes(self, cols: int) -> int:
        return cols // 2

    def pack_codes(self, codes: np.ndarray) -> np.ndarray:
        return pack_nibbles(codes)

    def unpack_codes(self, packed: np.ndarray, cols: int) -> np.ndarray:
        return unpack_nibbles(packed)
