"""Microscaling kernels (pure numpy): FP4 e2m1 elements, E8M0 and e4m3 group scales, nibble packing.

Three compressed-tensors formats are built from these pieces (weights [rows, cols], groups along
cols, rows any number):

- NVFP4 (`nvfp4-pack-quantized`): e2m1 codes, one e4m3 scale per 16, one float32 global scale.
- MXFP4 (`mxfp4-pack-quantized`): e2m1 codes, one E8M0 scale (uint8, 2^(e-127)) per 32.
- MXFP8 (`mxfp8-quantized`): e4m3 codes, one E8M0 scale per 32.

Every formula and the order of its roundings is the one compressed-tensors 0.19/0.20 uses, whose scale
arithmetic runs in the weight's own dtype (`arith`: bf16, fp16 or float32), so that the bytes equal
its compressor's; README.md ("4-bit and microscaled formats") states them, tests/test_microscale.py
checks them against float64 references written in the test and tests/test_microscale_interop.py bit
for bit against the installed package. One deliberate difference: an fp16 NVFP4 global scale that
overflows fp16 (amax below ~0.041) is computed in float32 here, where compressed-tensors falls back
to 1.0 and loses most of the e4m3 scale range.

Speed: the e2m1 encode is a 64 Ki-entry table indexed by the bf16 round-to-odd pattern of the
float32 value (the FP8 path's trick), the E8M0 exponent is integer work on the amax's bits, and
packing is two shifts on a uint16 view. Work happens in cache-sized windows of whole rows.
"""
from __future__ import annotations

import numpy as np

from ..accel import native
from ..formats import FORMATS
from ..formats.dtypes import bf16, ml_dtype
from ..formats.fastcast import bf16_to_code_table, cast_clamped_to_fp8, round_to_odd_bf16
from ..formats.fp8 import FP8E4M3
from ..formats.microscaled import MICROSCALE, Microscale  # noqa: F401  (re-exported)
from ..formats.fp4 import (_bf16_to_e2m1, e2m1_decode, e2m1_encode, e2m1_values, pack_nibbles,  # noqa: F401
                          unpack_e2m1_values, unpack_nibbles)
from ..formats.scales import (E8M0_BIAS, E8M0_NAN, e4m3_decode, e8m0_decode, e8m0_encode,  # noqa: F401
                              e8m0_from_amax, e8m0_reciprocal)

WINDOW_ELEMENTS = 1 << 17

NVFP4_GROUP = 16
MX_GROUP = 32
E2M1_MAX = np.float32(6.0)
# The e4m3 scale that replaces a zero group scale: compressed-tensors' "eps" of float8_e4m3fn
# (calculate_qparams step 5), so a stored scale is never 0.
NVFP4_ZERO_GROUP_SCALE = np.float32(0.125)
# floor(log2(element max)): the E8M0 exponent is the amax's minus this (6 -> 2, 448 -> 8).
EMAX_E2M1 = 2
EMAX_E4M3 = 8


def _e4m3_max() -> np.float32:
    """448: the e4m3 codec's largest value (read when first needed: ml_dtypes is imported there)."""
    return np.float32(FP8E4M3.qmax)


def __getattr__(name: str):
    if name == "E4M3_MAX":  # the module constant other modules read, computed on first use
        return _e4m3_max()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---- scales -------------------------------------------------------------------------------------

def round_bf16(values: np.ndarray) -> np.ndarray:
    """float32 -> float32 rounded to the nearest even bf16 (finite inputs; what torch does when a bf16
    result is stored)."""
    bits = np.array(values, dtype=np.float32, copy=True).view(np.uint32)
    bits += 0x7FFF + ((bits >> 16) & 1)
    bits &= np.uint32(0xFFFF0000)
    return bits.view(np.float32)


def _in_arith(values: np.ndarray, arith: np.dtype) -> np.ndarray:
    """float32 `values` rounded to the dtype the scale arithmetic runs in (as torch stores each step)."""
    if arith == bf16():
        return round_bf16(values)
    if arith == np.float16:
        with np.errstate(over="ignore"):
            return np.asarray(values, np.float32).astype(np.float16).astype(np.float32)
    return np.asarray(values, np.float32)


def group_amax(weight: np.ndarray, group: int) -> np.ndarray:
    """float32 [rows, cols/group]: largest |value| per group of a 2-D bf16/f16/f32 weight (NaN -> NaN).

    Integer max over the magnitude bits: |x| of IEEE values orders like its bit pattern.
    """
    rows, cols = weight.shape
    if cols % group:
        raise ValueError(f"{cols} columns do not divide into groups of {group}")
    bits_dtype = {2: np.uint16, 4: np.uint32}[weight.dtype.itemsize]
    mask = bits_dtype(0x7FFF if weight.dtype.itemsize == 2 else 0x7FFFFFFF)
    magnitude = np.bitwise_and(np.ascontiguousarray(weight).view(bits_dtype), mask)
    top = magnitude.reshape(rows, cols // group, group).max(axis=2)
    return np.asarray(top.view(weight.dtype), np.float32)


def tensor_amax(weight: np.ndarray, use_compiled: bool | None = None) -> np.float32:
    """Largest |value| of a bf16/f16/f32 array (NaN if it holds NaN); a 2-D one by the compiled kernel
    where it runs (one tile: the same integer max over the magnitude bits; NaN / Inf: numpy, below)."""
    if weight.size == 0:
        return np.float32(0)
    if weight.ndim == 2 and _use_compiled(weight, use_compiled):
        ranges = native.tile_range(weight, weight.shape, False)
        if ranges is not None:
            return np.float32(ranges[1][0, 0])
    bits_dtype = {2: np.uint16, 4: np.uint32}[weight.dtype.itemsize]
    mask = bits_dtype(0x7FFF if weight.dtype.itemsize == 2 else 0x7FFFFFFF)
    top = np.bitwise_and(np.ascontiguousarray(weight).view(bits_dtype), mask).max()
    return np.float32(np.array([top], bits_dtype).view(weight.dtype)[0])


def nvfp4_global_scale(amax: float, arith: np.dtype) -> np.float32:
    """float32 global scale = 448 * 6 / amax, rounded as compressed-tensors' generate_gparam does.

    torch evaluates `2688 / amax` as reciprocal(amax) * 2688, each step rounded to the weight's
    dtype `arith` (bf16: twice to bf16); amax is clamped below at that dtype's smallest normal; a
    result that is not finite (amax tiny or zero) becomes 1.0, except that an fp16 overflow is
    redone in float32. `amax` is over all partners of a fused set.
    """
    arith = np.dtype(arith)
    tiny = np.float32(2.0**-14 if arith == np.float16 else 2.0**-126)
    with np.errstate(over="ignore", divide="ignore"):
        amax32 = np.maximum(np.float32(amax), tiny)
        reciprocal = _in_arith(np.float32(1.0) / amax32, arith)
        scale = np.float32(_in_arith(reciprocal * np.float32(_e4m3_max() * E2M1_MAX), arith))
    if not np.isfinite(scale) and arith == np.float16:
        return nvfp4_global_scale(amax, np.dtype(np.float32))
    return scale if np.isfinite(scale) else np.float32(1.0)


def nvfp4_group_scales(amax: np.ndarray, global_scale: np.float32, arith: np.dtype) -> np.ndarray:
    """uint8 e4m3 codes of the group scales: e4m3(clamp(global_scale * arith(amax / 6), 448)); a zero
    scale becomes 0.125 (compressed-tensors' eps)."""
    local = _in_arith(np.asarray(amax, np.float32) / E2M1_MAX, np.dtype(arith))
    scaled = np.minimum(np.float32(global_scale) * local, _e4m3_max()).astype(np.float32)
    codes = np.empty(scaled.shape, np.uint8)
    cast_clamped_to_fp8(np.array(scaled, np.float32), FORMATS[FP8E4M3.name], codes)  # within [0, 448]
    codes = np.where(codes & 0x7F, codes, np.float32(NVFP4_ZERO_GROUP_SCALE).astype(ml_dtype("float8_e4m3fn")).view(np.uint8))
    return codes.astype(np.uint8)



# ---- whole weights ------------------------------------------------------------------------------

def load_float32(src: np.ndarray) -> np.ndarray:
    """float32 copy of a bf16/f16/f32 array (bf16 by bit shift: exact and fast)."""
    if src.dtype == bf16():
        wide = np.ascontiguousarray(src).view(np.uint16).astype(np.uint32)
        wide <<= 16
        return wide.view(np.float32)
    return np.array(src, dtype=np.float32, copy=True)


def _row_windows(rows: int, cols: int):
    step = max(1, WINDOW_ELEMENTS // max(cols, 1))
    for r0 in range(0, rows, step):
        yield r0, min(rows, r0 + step)


def _use_compiled(weight: np.ndarray, use_compiled: bool | None) -> bool:
    """Whether the compiled kernels (native.py) take this weight; None: the process's default backend."""
    if use_compiled is None:
        use_compiled = native.use_native()
    return bool(use_compiled) and weight.size > 0 and native.source(weight) is not None


def weight_group_amax(weight: np.ndarray, group: int, use_compiled: bool | None = None) -> np.ndarray:
    """group_amax, by the compiled kernel where it runs (NaN / Inf: the numpy path, which shows them)."""
    rows, cols = weight.shape
    if _use_compiled(weight, use_compiled) and not cols % group:
        ranges = native.tile_range(weight, (1, group), False)
        if ranges is not None:
            return ranges[1]
    return group_amax(weight, group)


def _encode_elements(weight: np.ndarray, group: int, factor: np.ndarray, divide: bool, element: str,
                     use_compiled: bool | None) -> np.ndarray:
    """Element codes of weight / factor (divide) or weight * factor per group: packed e2m1 or e4m3."""
    rows, cols = weight.shape
    if _use_compiled(weight, use_compiled):
        fmt = next(f for f in FORMATS.values() if f.short_name == element)
        codes = native.micro_encode(weight, group, factor, divide, fmt)
        if codes is not None:
            return codes
    out = np.empty((rows, cols // 2) if element == "e2m1" else (rows, cols), np.uint8)
    e4m3_table = bf16_to_code_table(FORMATS[FP8E4M3.name])
    for r0, r1 in _row_windows(rows, cols):
        values = load_float32(weight[r0:r1]).reshape(r1 - r0, cols // group, group)
        if divide:
            np.divide(values, factor[r0:r1, :, None], out=values)
        else:
            np.multiply(values, factor[r0:r1, :, None], out=values)
        if element == "e2m1":
            codes = np.take(_bf16_to_e2m1(), round_to_odd_bf16(values)).reshape(r1 - r0, cols)
            out[r0:r1] = pack_nibbles(codes)
        else:
            np.clip(values, -_e4m3_max(), _e4m3_max(), out=values)
            out[r0:r1] = np.take(e4m3_table, round_to_odd_bf16(values)).reshape(r1 - r0, cols)
    return out


def quantize_nvfp4(weight: np.ndarray, global_scale: np.float32,
                   use_compiled: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(packed uint8 [rows, cols/2], e4m3 scale codes uint8 [rows, cols/16]) of a 2-D weight.

    Elements: e2m1(w / float32(scale / global_scale)), the quotient in float32 as compressed-tensors
    computes it (x promoted to float32 by its float32 scale).
    """
    amax = weight_group_amax(weight, NVFP4_GROUP, use_compiled)
    scales = nvfp4_group_scales(amax, global_scale, weight.dtype)
    effective = (e4m3_decode(scales) / np.float32(global_scale)).astype(np.float32)
    return _encode_elements(weight, NVFP4_GROUP, effective, True, "e2m1", use_compiled), scales


def quantize_mx(weight: np.ndarray, element: str,
                use_compiled: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(element codes, E8M0 scale codes uint8 [rows, cols/32]) of a 2-D weight; element "e2m1" gives
    packed uint8 [rows, cols/2], "e4m3" uint8 e4m3 codes [rows, cols].

    Elements: w * 2^(127 - code), exact in float32 (a power of two), then e2m1 (saturating at 6) or
    e4m3 (clamped to 448, RNE).
    """
    emax = {"e2m1": EMAX_E2M1, "e4m3": EMAX_E4M3}[element]
    scales = e8m0_from_amax(weight_group_amax(weight, MX_GROUP, use_compiled), emax)
    return _encode_elements(weight, MX_GROUP, e8m0_reciprocal(scales), False, element, use_compiled), scales


def _to_dtype(values: np.ndarray, out_dtype: np.dtype) -> np.ndarray:
    out_dtype = np.dtype(out_dtype)
    if out_dtype == bf16():
        high = round_bf16(values).view(np.uint32) >> 16
        return high.astype(np.uint16).view(bf16())
    return values.astype(out_dtype)


def dequantize_nvfp4(packed: np.ndarray, scales: np.ndarray, global_scale: np.float32,
                     out_dtype: np.dtype | type | None = None) -> np.ndarray:
    """[rows, 2*packed cols] = out_dtype(float32(e2m1 * float32(scale / global_scale))): compressed-tensors'
    decompression, whose product is float32 and whose result is rounded once into the output dtype."""
    rows, half = packed.shape
    cols = half * 2
    out_dtype = bf16() if out_dtype is None else out_dtype
    out = np.empty((rows, cols), out_dtype)
    gs = np.float32(global_scale)
    if native.use_native() and native.micro_dequantize(
            packed, NVFP4_GROUP, True, e2m1_values(), (e4m3_decode(scales) / gs).astype(np.float32), out):
        return out  # the compiled kernel: the same float32 product and rounding (tests/test_conformance.py)
    for r0, r1 in _row_windows(rows, cols):
        values = unpack_e2m1_values(packed[r0:r1]).reshape(r1 - r0, cols // NVFP4_GROUP, NVFP4_GROUP)
        effective = (e4m3_decode(scales[r0:r1]) / gs).astype(np.float32)
        values *= effective[:, :, None]
        out[r0:r1] = _to_dtype(values.reshape(r1 - r0, cols), out_dtype)
    return out


def dequantize_mx(codes: np.ndarray, scales: np.ndarray, element: str,
                  out_dtype: np.dtype | type | None = None) -> np.ndarray:
    """[rows, cols] = out_dtype(element value * 2^(code - 127)), exact before the one rounding."""
    rows = codes.shape[0]
    cols = codes.shape[1] * 2 if element == "e2m1" else codes.shape[1]
    out_dtype = bf16() if out_dtype is None else out_dtype
    out = np.empty((rows, cols), out_dtype)
    table = e2m1_values() if element == "e2m1" else e4m3_decode(np.arange(256, dtype=np.uint8))
    with np.errstate(over="ignore"):
        if native.use_native() and native.micro_dequantize(codes, MX_GROUP, element == "e2m1", table,
                                                           e8m0_decode(scales), out):
            return out
    for r0, r1 in _row_windows(rows, cols):
        if element == "e2m1":
            values = unpack_e2m1_values(codes[r0:r1])
        else:
            values = e4m3_decode(codes[r0:r1])
        values = values.reshape(r1 - r0, cols // MX_GROUP, MX_GROUP)
        values *= e8m0_decode(scales[r0:r1])[:, :, None]
        out[r0:r1] = _to_dtype(values.reshape(r1 - r0, cols), out_dtype)
    return out
