"""NVFP4 / MXFP4 / MXFP8 quantization of a 2-D weight (group scale codes, then the elements), with its error
statistics; the primitives are in numerics/microscale.py."""
from __future__ import annotations

import numpy as np

from ..accel import native
from ..errors import InputError
from ..formats import FORMATS
from ..formats.fp8 import FP8E4M3
from ..io.untrusted import printable
from ..plan.scheme import Scheme
from . import microscale as ms
from . import expanded, observers
from .dequantize import WINDOW_ELEMENTS
from .lanes import RowSums
from .nonfinite import count_nonfinite, microscale_nonfinite_error
from .quantized import QuantizedTensor, load_float32, stats_of, wants_compiled
from .stats import ErrorStats


def quantize_microscale(weight: np.ndarray, scheme: Scheme, global_scale: np.float32 | None, name: str = "tensor",
                        backend: str = "auto") -> QuantizedTensor:
    """NVFP4 / MXFP4 / MXFP8 (microscale.py): codes as stored (e2m1 two per byte, element 2k in the low
    nibble; e4m3 one per element),
    `scales` the uint8 scale codes [rows, cols / group], `global_scale` the NVFP4 float32 global scale
    (computed over the whole tensor, or its fused set, by the caller; from this weight alone when None:
    _own_global_scale). NaN/Inf are refused (there is no saturating mapping for them in these formats)."""
    use_compiled = wants_compiled(backend, scheme)
    micro = ms.MICROSCALE[scheme.microscale]
    rows, cols = weight.shape
    compiled = ms._use_compiled(weight, use_compiled)
    if compiled and micro.global_scale and global_scale is None:
        global_scale = _own_global_scale(weight, scheme)
    if compiled and scheme.observer == "minmax":
        fused = _quantize_compiled(weight, scheme, micro, global_scale)
        if fused is not None:
            return fused
    global_scale, scale_codes, observed = _scale_codes(weight, scheme, micro, global_scale, name, use_compiled,
                                                       compiled)
    if micro.global_scale:
        divisor = (ms.e4m3_decode(scale_codes) / np.float32(global_scale)).astype(np.float32)
        factor, divide = divisor, True
    else:
        divisor = ms.e8m0_decode(scale_codes)
        factor, divide = ms.e8m0_reciprocal(scale_codes), False
    fused = None
    if ms._use_compiled(weight, use_compiled):
        # the compiled kernel encodes and takes the statistics in one pass (the two calls' results, bit for bit)
        fused = native.micro_encode_stats(weight, micro.group, factor, divide, scheme.fmt, _code_values(scheme),
                                          divisor)
    if fused is not None:
        packed, raw = fused
        codes = packed if micro.packed else packed.view(scheme.fmt.dtype)
        stats = stats_of(rows * cols, raw)
    else:
        packed = ms._encode_elements(weight, micro.group, factor, divide, micro.codec.short_name, use_compiled)
        codes = packed if micro.packed else packed.view(scheme.fmt.dtype)
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is refused just below, not warned about
            stats = _microscale_stats(weight, codes, divisor, scheme, use_compiled)
    if not np.isfinite(stats.max_abs_err) or not np.isfinite(stats.sum_sq_err):
        # finite weights whose nearest code times its scale is past float32 (3e38 in MXFP4: 4 x 2^126 = 2^128)
        amax = ms.weight_group_amax(weight, micro.group, use_compiled)
        raise InputError(f"tensor {printable(name)}: values up to {float(np.max(amax)):.4g} overflow {micro.name} (a code "
                         "times its scale decodes to Inf); keep it in high precision with --ignore")
    if observed is not None:
        stats.observed_sum_sq_err = float(observed.error.sum())
        stats.minmax_sum_sq_err = float(observed.minmax_error.sum())
    return QuantizedTensor(codes, scale_codes, stats, global_scale=None if global_scale is None else np.float32(global_scale))


def _scale_codes(weight: np.ndarray, scheme: Scheme, micro: ms.Microscale, global_scale: np.float32 | None, name: str,
                 use_compiled: bool, compiled: bool) -> tuple[np.float32 | None, np.ndarray, observers.MicroChoice | None]:
    """(global scale, group scale codes, the observer's choice or None): the min-max codes, or the observer's
    search from them (only the scale codes change; the elements are then encoded as with min-max codes). With
    the compiled kernels the search makes the min-max codes it starts from itself, in its own pass over the
    weight (micro_scales' codes; a pass less); where it cannot (NaN / Inf), the steps one by one."""
    search = None
    if scheme.observer != "minmax":
        search = expanded.expanded_microscale if scheme.observer == "expanded" else observers.mse_microscale
    rule = (global_scale if micro.global_scale else None, FORMATS[FP8E4M3.name], ms.NVFP4_ZERO_GROUP_SCALE,
            _emax(micro))
    if compiled and search is not None:
        observed = search(weight, micro, None, global_scale, use_compiled=True, minmax_rule=rule)
        if observed is not None:
            return global_scale, observed.codes, observed
    scale_codes = native.micro_scales(weight, micro.group, scheme.fmt, *rule) if compiled else None
    if scale_codes is None:
        global_scale, scale_codes = _minmax_scale_codes(weight, scheme, micro, global_scale, name, use_compiled)
    if search is None:
        return global_scale, scale_codes, None
    observed = search(weight, micro, scale_codes, global_scale, use_compiled=compiled)
    return global_scale, observed.codes, observed


def _own_global_scale(weight: np.ndarray, scheme: Scheme) -> np.float32:
    """NVFP4 global scale of one weight alone: the pipeline's rule (run/global_scales.py), from the amax, or from
    1.25x the amax with the expanded observer (expanded.global_maximum)."""
    top = ms.tensor_amax(weight)
    if scheme.observer == "expanded":
        top = expanded.global_maximum(top)
    return ms.nvfp4_global_scale(top, weight.dtype)


def _minmax_scale_codes(weight: np.ndarray, scheme: Scheme, micro: ms.Microscale, global_scale: np.float32 | None,
                        name: str, use_compiled: bool) -> tuple[np.float32 | None, np.ndarray]:
    """(global scale, min-max scale codes) by the numpy rules (microscale.py); NaN / Inf refused."""
    amax = ms.weight_group_amax(weight, micro.group, use_compiled)
    if not np.isfinite(amax).all():
        raise microscale_nonfinite_error(name, micro.name, *count_nonfinite([weight]))
    if not micro.global_scale:
        return global_scale, ms.e8m0_from_amax(amax, _emax(micro))
    if global_scale is None:
        global_scale = _own_global_scale(weight, scheme)
    return global_scale, ms.nvfp4_group_scales(amax, global_scale, weight.dtype)


def _emax(micro: ms.Microscale) -> int:
    """floor(log2(element max)) of an MX format: the E8M0 exponent is the amax's minus this."""
    return ms.EMAX_E2M1 if micro.packed else ms.EMAX_E4M3


def quantize_microscale_rows_into(weight: np.ndarray, scheme: Scheme, global_scale: np.float32 | None,
                                  carried: np.ndarray) -> QuantizedTensor | None:
    """Min-max NVFP4 / MX of some whole rows of a chunk by the compiled one-pass kernel (kernels.quantize_rows_into),
    adding their statistics into `carried` (float64[5]): the kernel adds each row's sums in row order, so pieces
    taken in order give the chunk's statistics to the last bit. The result's own stats are not filled in. None on
    NaN / Inf or an overflow: the caller then takes the whole chunk (quantize_microscale names either)."""
    return _quantize_compiled(weight, scheme, ms.MICROSCALE[scheme.microscale], global_scale, carried)


def _quantize_compiled(weight: np.ndarray, scheme: Scheme, micro: ms.Microscale, global_scale: np.float32 | None,
                       carried: np.ndarray | None = None) -> QuantizedTensor | None:
    """Min-max scale codes, element codes and statistics by the compiled one-pass kernel (the rules of
    nvfp4_group_scales / e8m0_from_amax and the encode below, bit for bit: tests/test_microscale.py), added into
    `carried` where given; None where the weight holds NaN / Inf or a code times its scale overflows (the numpy
    path below names either)."""
    rows, cols = weight.shape
    fused = native.micro_quantize(weight, micro.group, scheme.fmt, _code_values(scheme),
                                  global_scale if micro.global_scale else None, FORMATS[FP8E4M3.name],
                                  ms.NVFP4_ZERO_GROUP_SCALE, _emax(micro), carried)
    if fused is None:
        return None
    packed, scale_codes, raw = fused
    if not np.isfinite(raw[2]) or not np.isfinite(raw[1]):
        return None
    codes = packed if micro.packed else packed.view(scheme.fmt.dtype)
    return QuantizedTensor(codes, scale_codes, ErrorStats() if carried is not None else stats_of(rows * cols, raw),
                           global_scale=None if global_scale is None else np.float32(global_scale))


def _code_values(scheme: Scheme) -> np.ndarray:
    """float32 value of every element code: [16] for e2m1, [256] for e4m3 (NaN codes: NaN)."""
    if scheme.fmt.bits == 4:
        return ms.e2m1_values()
    with np.errstate(invalid="ignore"):
        return np.arange(256, dtype=np.uint8).view(scheme.fmt.dtype).astype(np.float32)


def _microscale_stats(weight: np.ndarray, codes: np.ndarray, divisor: np.ndarray, scheme: Scheme,
                      use_compiled: bool | None) -> ErrorStats:
    """Error statistics of w' = code value * divisor (codes packed two per byte for fp4), in the fixed
    order of the other schemes' (lanes.RowSums); the compiled kernel reproduces them bit for bit."""
    rows, cols = weight.shape
    group = scheme.group_size
    packed = scheme.fmt.bits == 4
    if ms._use_compiled(weight, use_compiled):
        return stats_of(rows * cols, native.micro_stats(weight, group, codes, packed, _code_values(scheme), divisor,
                                                        scheme.fmt.qmax))
    stats = ErrorStats(elements=rows * cols)
    step = max(1, WINDOW_ELEMENTS // max(cols, 1))
    for r0 in range(0, rows, step):
        h = min(step, rows - r0)
        orig = np.empty((h, cols), np.float32)
        load_float32(orig, weight[r0 : r0 + h])
        if packed:
            work = ms.unpack_e2m1_values(codes[r0 : r0 + h])
        else:
            work = np.empty((h, cols), np.float32)
            scheme.fmt.decode(codes[r0 : r0 + h], work)
        stats.saturated += int(np.count_nonzero(np.abs(work) >= scheme.fmt.qmax32))
        work.reshape(h, cols // group, group)[...] *= divisor[r0 : r0 + h, :, None]
        stats.flushed_to_zero += int(np.count_nonzero((work == 0) & (orig != 0)))
        np.subtract(orig, work, out=work)
        stats.max_abs_err = max(stats.max_abs_err, float(np.abs(work).max(initial=0)))
        sums_ref, sums_err = RowSums(h), RowSums(h)
        sums_ref.add(orig, 0)
        sums_err.add(work, 0)
        stats.sum_sq_ref = sums_ref.fold_into(stats.sum_sq_ref, h)
        stats.sum_sq_err = sums_err.fold_into(stats.sum_sq_err, h)
    return stats
