"""Bit-level codecs of the small float formats: FP4 e2m1 elements (codes, nibble packing) and the
E8M0 / e4m3 scale codes of the microscaled formats. Pure numpy, no dependency inside fp8conv beyond
formats/fastcast.py, so the format registry (formats/core.py) can use them directly."""
from __future__ import annotations

import sys
from functools import lru_cache

import ml_dtypes
import numpy as np

from .fastcast import round_to_odd_bf16

_E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
E8M0_BIAS = 127
E8M0_NAN = 255

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


# ---- scale codes ---------------------------------------------------------------------------------

def e4m3_decode(codes: np.ndarray) -> np.ndarray:
    """float32 values of uint8 e4m3 codes."""
    return np.asarray(codes, np.uint8).view(_E4M3).astype(np.float32)


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
