"""The compiled kernels (the C extension fp8conv._native) behind numpy arguments, and the choice of backend.

Two backends give the same codes, scales, zero points and statistics, bit for bit: `numpy` (the
reference kernels, always there) and `native` (the extension, built by `pip install` where a C
compiler is found). FP8CONV_BACKEND=numpy|native picks one for a whole process (tests, benchmarks);
the default, `auto`, is native where the extension was built. Each function here returns None where
the source holds NaN / Inf: the numpy path owns that policy (it maps or refuses them).
"""
from __future__ import annotations

import os

import numpy as np

# The interface version this source expects of the extension (_native.c's ABI constant): a build left over
# from an older source (a checkout whose C changed since `pip install -e .`) is not used.
ABI = 10

try:
    from . import _native
except ImportError as exc:  # not built: no compiler at install time, or a source checkout never built
    _native = None
    IMPORT_ERROR = str(exc)
else:
    IMPORT_ERROR = ""
    if getattr(_native, "ABI", None) != ABI:
        IMPORT_ERROR = f"the built extension is from another source version (ABI {getattr(_native, 'ABI', None)}, not {ABI})"
        _native = None

BACKENDS = ("auto", "numpy", "native")
AVAILABLE = _native is not None
_SOURCE_KINDS = {"bfloat16": 0, "float32": 1, "float16": 2}
LANES = 8


class BackendError(ValueError):
    """An unknown backend, or `native` asked for where the extension is not built."""


def default_backend() -> str:
    """FP8CONV_BACKEND, else auto."""
    return os.environ.get("FP8CONV_BACKEND", "").strip().lower() or "auto"


def use_native(backend: str | None = None) -> bool:
    """Whether the compiled kernels run under `backend` (None: FP8CONV_BACKEND / auto)."""
    backend = default_backend() if backend in (None, "auto") else backend
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "native" and not AVAILABLE:
        raise BackendError(f"the native backend is not built ({IMPORT_ERROR}); {HOW_TO_BUILD}")
    return AVAILABLE and backend != "numpy"


HOW_TO_BUILD = ("install a C compiler and the Python headers, then `pip install --force-reinstall --no-deps fp8conv` "
                "(from a checkout: `pip install -e .`)")


def fallback_warning() -> str | None:
    """The one line to show when the default backend runs numpy because the extension is missing."""
    if AVAILABLE or default_backend() == "numpy":
        return None
    return f"warning: the C kernels are not built; running the numpy kernels (several times slower): {HOW_TO_BUILD}"


def source(weight: np.ndarray) -> tuple[np.ndarray, int] | None:
    """(C-contiguous source, kind) of a bf16 / fp16 / float32 array; None for another dtype."""
    kind = _SOURCE_KINDS.get(weight.dtype.name)
    if kind is None:
        return None
    weight = np.ascontiguousarray(weight)
    return (weight.view(np.uint16) if kind != 1 else weight), kind


def supports(fmt) -> bool:
    """Whether the kernels can encode a codec: integers of up to 8 bits, or floats of up to 8 bits with
    subnormals whose codec gives its mantissa width and exponent bias."""
    return fmt.bits <= 8 and (not fmt.is_float or fmt.mantissa_bits >= 1)


def float_element(fmt) -> tuple[int, int]:
    """(mantissa bits, exponent bias) of a float element format (the codec's facts); (0, 0) for integers."""
    if not fmt.is_float:
        return 0, 0
    if fmt.mantissa_bits < 1:
        raise BackendError(f"{fmt.name}: no mantissa width for the compiled kernels")
    return fmt.mantissa_bits, fmt.exponent_bias


def tile_range(weight: np.ndarray, tile: tuple[int, int], signed: bool
               ) -> tuple[np.ndarray | None, np.ndarray] | None:
    """Per tile of a 2-D weight (grid row-major): (None, max |x|) or, signed, (min x, max x), float32; None
    when it holds NaN / Inf."""
    src, kind = source(weight)
    rows, cols = weight.shape
    grid = (-(-rows // tile[0]), -(-cols // tile[1]))
    lo = np.empty(grid, np.float32)
    hi = np.empty(grid, np.float32)
    if _native.tile_range(src, kind, rows, cols, tile[0], tile[1], lo, hi, signed):
        return None
    return (lo if signed else None), hi


def quantize(weight: np.ndarray, tile: tuple[int, int], scales: np.ndarray, zeros: np.ndarray | None, fmt,
             code_range: tuple[float, float], stats: np.ndarray) -> np.ndarray | None:
    """Codes [rows, cols] (fmt.dtype) of a 2-D weight under a float32 scale grid (and zero-point grid),
    adding its statistics into float64 stats[5] (kernels.stats_of); None when it holds NaN / Inf."""
    src, kind = source(weight)
    rows, cols = weight.shape
    codes = np.empty((rows, cols), np.uint8)
    mbits, bias = float_element(fmt)
    zeros = None if zeros is None else np.ascontiguousarray(zeros, np.float32)
    if _native.quantize(src, kind, rows, cols, tile[0], tile[1], np.ascontiguousarray(scales, np.float32), zeros,
                        mbits, bias, float(code_range[0]), float(code_range[1]), codes, stats):
        return None
    return codes.view(fmt.dtype)


def dequantize(codes: np.ndarray, tile: tuple[int, int], scales: np.ndarray, zeros: np.ndarray | None, fmt,
               out: np.ndarray) -> None:
    """out[rows, cols] (float32 or bf16, C-contiguous) = (code value - zero point) * scale of its tile;
    codes one byte each (fmt.dtype)."""
    rows, cols = codes.shape
    table = np.empty(256, np.float32)
    with np.errstate(invalid="ignore"):
        fmt.decode(np.arange(256, dtype=np.uint8).view(fmt.dtype), table)
    zeros = None if zeros is None else np.ascontiguousarray(zeros, np.float32)
    _native.dequantize(np.ascontiguousarray(codes).view(np.uint8), rows, cols, tile[0], tile[1], table,
                       np.ascontiguousarray(scales, np.float32), zeros, out.dtype.name == "bfloat16",
                       out.view(np.uint16) if out.dtype.name == "bfloat16" else out)


def micro_dequantize(codes: np.ndarray, group: int, packed: bool, values: np.ndarray, divisor: np.ndarray,
                     out: np.ndarray) -> bool:
    """out[rows, cols] = value(code) * divisor of its group (float32 or bf16 out, C-contiguous); False
    (nothing written) for another output dtype or layout."""
    if out.dtype.name not in ("float32", "bfloat16") or not out.flags.c_contiguous or not out.size:
        return False
    rows, cols = out.shape
    _native.micro_dequantize(np.ascontiguousarray(codes).view(np.uint8), rows, cols, group, packed,
                             np.ascontiguousarray(values, np.float32), np.ascontiguousarray(divisor, np.float32),
                             out.dtype.name == "bfloat16", out.view(np.uint16) if out.dtype.name == "bfloat16" else out)
    return True


def micro_encode(weight: np.ndarray, group: int, factor: np.ndarray, divide: bool, fmt) -> np.ndarray | None:
    """Element codes of weight / factor (divide) or weight * factor per group: 4-bit codes packed two per
    byte, or one byte per element; None when it holds NaN / Inf."""
    src, kind = source(weight)
    rows, cols = weight.shape
    packed = fmt.bits == 4
    out = np.empty((rows, cols // 2 if packed else cols), np.uint8)
    mbits, bias = float_element(fmt)
    if _native.micro_encode(src, kind, rows, cols, group, np.ascontiguousarray(factor, np.float32), divide, mbits,
                            bias, float(fmt.qmax), packed, out):
        return None
    return out


def micro_stats(weight: np.ndarray, group: int, codes: np.ndarray, packed: bool, values: np.ndarray,
                divisor: np.ndarray, qmax: float) -> np.ndarray:
    """float64[5] statistics of w' = value(code) * divisor (kernels.stats_of)."""
    src, kind = source(weight)
    rows, cols = weight.shape
    stats = np.zeros(5)
    _native.micro_stats(src, kind, rows, cols, group, np.ascontiguousarray(codes).view(np.uint8), packed,
                        np.ascontiguousarray(values, np.float32), np.ascontiguousarray(divisor, np.float32),
                        float(qmax), stats)
    return stats


def micro_encode_stats(weight: np.ndarray, group: int, factor: np.ndarray, divide: bool, fmt, values: np.ndarray,
                       divisor: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """micro_encode and micro_stats in one pass over the rows: (codes, float64[5] statistics of w' =
    value(code) * divisor), both bit for bit those of the two calls; None when the weight holds NaN / Inf."""
    src, kind = source(weight)
    rows, cols = weight.shape
    packed = fmt.bits == 4
    out = np.empty((rows, cols // 2 if packed else cols), np.uint8)
    stats = np.zeros(5)
    mbits, bias = float_element(fmt)
    if _native.micro_encode_stats(src, kind, rows, cols, group, np.ascontiguousarray(factor, np.float32), divide,
                                  mbits, bias, float(fmt.qmax), packed, out, np.ascontiguousarray(values, np.float32),
                                  np.ascontiguousarray(divisor, np.float32), stats):
        return None
    return out, stats


def micro_scales(weight: np.ndarray, group: int, fmt, global_scale: np.float32 | None, scale_fmt, zero_scale: float,
                 emax: int) -> np.ndarray | None:
    """The min-max scale codes micro_quantize makes (uint8 [rows, cols / group]), alone; None when the weight holds
    NaN / Inf."""
    src, kind = source(weight)
    rows, cols = weight.shape
    scale_codes = np.empty((rows, cols // group), np.uint8)
    scale_mbits, scale_bias = float_element(scale_fmt)
    nvfp4 = global_scale is not None
    if _native.micro_scales(src, kind, rows, cols, group, nvfp4, float(global_scale) if nvfp4 else 1.0, float(fmt.qmax),
                            scale_mbits, scale_bias, float(scale_fmt.qmax), float(zero_scale), emax, scale_codes):
        return None
    return scale_codes


def micro_quantize(weight: np.ndarray, group: int, fmt, values: np.ndarray, global_scale: np.float32 | None,
                   scale_fmt, zero_scale: float, emax: int, stats: np.ndarray | None = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """A min-max NVFP4 (global_scale given: scale_fmt e4m3 codes of max(scale) <= scale_fmt.qmax, a zero code
    replaced by zero_scale's, the weight's dtype as the scale arithmetic's) or MX (E8M0, emax) quantization in one
    pass: (element codes, scale codes uint8 [rows, cols / group], float64[5] statistics), each bit for bit the
    numpy path's (numerics/microscale.py); the statistics are added into `stats` where given (sums carried from
    earlier rows, as quantize's). None when the weight holds NaN / Inf."""
    src, kind = source(weight)
    rows, cols = weight.shape
    packed = fmt.bits == 4
    out = np.empty((rows, cols // 2 if packed else cols), np.uint8)
    scale_codes = np.empty((rows, cols // group), np.uint8)
    stats = np.zeros(5) if stats is None else stats
    mbits, bias = float_element(fmt)
    scale_mbits, scale_bias = float_element(scale_fmt)
    nvfp4 = global_scale is not None
    if _native.micro_quantize(src, kind, rows, cols, group, nvfp4, float(global_scale) if nvfp4 else 1.0,
                              float(fmt.qmax), scale_mbits, scale_bias, float(scale_fmt.qmax), float(zero_scale), emax,
                              mbits, bias, float(fmt.qmax), packed, out, scale_codes,
                              np.ascontiguousarray(values, np.float32), stats):
        return None
    return out, scale_codes, stats


def pack_fields(codes: np.ndarray, bits: int, row_bytes: int) -> np.ndarray:
    """uint8 [rows, row_bytes]: integer codes (int8 [rows, cols]) + 2^(bits-1) as unsigned fields, 8 / bits a
    byte, the first in the low bits, zero past the last (formats/integer.pack_int32's bytes)."""
    rows, cols = codes.shape
    out = np.empty((rows, row_bytes), np.uint8)
    _native.pack_fields(np.ascontiguousarray(codes).view(np.uint8), rows, cols, bits, row_bytes, out)
    return out


def mse_search(weight: np.ndarray, group: int, scales: np.ndarray, zeros: np.ndarray, has_zero: bool, fmt,
               code_range: tuple[float, float], margin: float, exponent: int, index: np.ndarray,
               sums: np.ndarray, keys: np.ndarray | None = None) -> bool:
    """The mse observer's candidate evaluation (observers.mse) over the tiles of `group` consecutive elements
    along the rows of a 2-D bf16 / fp16 / float32 weight (row-major grid; a float32 [n, m] array of tiles is
    group = m): scales / zeros float32 [candidates, tiles]; fills index int32 [tiles] and sums float64 [4, tiles].
    With `keys` (uint16 [tiles], filled; a bf16 / fp16 weight, symmetric): `scales` is a table float32
    [65536, candidates] read at each tile's max |x| bit pattern, and `zeros` is not read.
    False (outputs undefined) when the weight holds NaN / Inf."""
    src, kind = source(weight)
    rows, cols = weight.shape
    mbits, bias = float_element(fmt)
    k_count = scales.shape[0] if keys is None else scales.shape[1]
    return not _native.mse_search(src, kind, rows, cols, group, np.ascontiguousarray(scales, np.float32),
                                  np.ascontiguousarray(zeros, np.float32), k_count, has_zero, mbits, bias,
                                  float(code_range[0]), float(code_range[1]), margin, exponent, index, sums,
                                  keys is not None, np.empty(0, np.uint16) if keys is None else keys)


def micro_search(weight: np.ndarray, group: int, first: np.ndarray | None, steps: tuple[int, ...],
                 code_limits: tuple[int, int], div_table: np.ndarray, rcp_table: np.ndarray, divide: bool, fmt,
                 margin: float, minmax_rule: tuple | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The microscale observers' search (observers.mse_microscale) over a bf16 / fp16 / float32 weight whose
    consecutive `group` elements form its groups: per group, candidate codes clamp(first + step, *code_limits)
    with divisors div_table[code] (reciprocals rcp_table[code]); (codes uint8, error, min-max error float64)
    [n_groups], or None when the weight holds NaN / Inf. `first`: the min-max codes uint8 [n_groups], or None
    with `minmax_rule` = (global_scale or None, scale_fmt, zero_scale, emax), micro_scales' arguments: the kernel
    makes them from each group's amax while it reads the group for the search (micro_scales' codes, bit for bit)."""
    src, kind = source(weight)
    n = weight.size // group
    if first is None and minmax_rule is None:
        raise ValueError("micro_search: neither the min-max codes nor the rule that makes them were given")
    if weight.size % group or (first is not None and np.size(first) != n):
        raise ValueError(f"micro_search: {weight.shape} elements do not form the {np.size(first)} groups of {group} given")
    codes = np.empty(n, np.uint8)
    error = np.empty(n, np.float64)
    minmax_error = np.empty(n, np.float64)
    mbits, bias = float_element(fmt)
    rule = (False, False, 1.0, 1.0, 0, 0, 1.0, 1.0, 0)
    if minmax_rule is not None:
        global_scale, scale_fmt, zero_scale, emax = minmax_rule
        scale_mbits, scale_bias = float_element(scale_fmt)
        nvfp4 = global_scale is not None
        rule = (True, nvfp4, float(global_scale) if nvfp4 else 1.0, float(fmt.qmax), scale_mbits, scale_bias,
                float(scale_fmt.qmax), float(zero_scale), int(emax))
    first = np.empty(0, np.uint8) if first is None else np.ascontiguousarray(first, np.uint8).reshape(-1)
    if _native.micro_search(src, kind, n, group, first,
                            np.asarray(steps, np.int32), int(code_limits[0]), int(code_limits[1]),
                            np.ascontiguousarray(div_table, np.float32), np.ascontiguousarray(rcp_table, np.float32),
                            divide, mbits, bias, float(fmt.qmax), margin, codes, error, minmax_error, *rule):
        return None
    return codes, error, minmax_error
