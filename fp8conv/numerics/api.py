"""The Python API on whole arrays: quantize_tensor / dequantize_tensor (format names and options) and
quantize_array / dequantize_array (a Scheme); 2-D weights or 3-D stacked experts."""
from __future__ import annotations

import numpy as np

from ..errors import SchemeError
from ..formats import DEFAULT_FORMAT, MICROSCALE, TAG_OF_DTYPE
from ..plan.scheme import Scheme
from .dequantize import dequantize_2d, dequantize_rows
from .kernels import QuantizedTensor, quantize_2d
from .stats import ErrorStats


def _per_expert(shape: tuple[int, ...]) -> bool:
    if len(shape) not in (2, 3):
        raise SchemeError(f"only 2-D weights and 3-D stacked experts are quantized, got shape {shape}")
    return len(shape) == 3


def quantize_tensor(
    array: np.ndarray,
    format: str = DEFAULT_FORMAT,
    granularity: str = "block",
    block_size: int | tuple[int, int] = 128,
    group_size: int = 128,
    symmetric: bool = True,
    activations: str | None = None,
    scale_format: str = "float32",
    backend: str = "auto",
) -> QuantizedTensor:
    """Public API: quantize a 2-D weight [out, in] or 3-D experts [E, out, in] (bf16/f16/f32)."""
    scheme = make_scheme(format, granularity, block_size, group_size, symmetric, activations, scale_format)
    return quantize_array(array, scheme, backend=backend)


def quantize_array(array: np.ndarray, scheme: Scheme, name: str = "tensor", allow_nonfinite: bool = False,
                   backend: str = "auto") -> QuantizedTensor:
    """Quantize 2-D or per expert for 3-D; scales (and zero points) are [E, grid...] for experts."""
    if not _per_expert(array.shape):
        return quantize_2d(array, scheme, name=name, allow_nonfinite=allow_nonfinite, backend=backend)
    parts = [quantize_2d(expert, scheme, name=f"{name}[{i}]", allow_nonfinite=allow_nonfinite, backend=backend)
             for i, expert in enumerate(array)]
    stats = ErrorStats()
    for part in parts:
        stats.merge(part.stats)
    grid = scheme.scale_grid(*array.shape[1:])
    codes = np.stack([p.codes for p in parts]) if parts else np.empty(array.shape, scheme.fmt.dtype)
    scales = np.stack([p.scales for p in parts]) if parts else np.empty((0, *grid), np.float32)
    zps = None
    if not scheme.symmetric:
        zps = np.stack([p.zero_points for p in parts]) if parts else np.empty((0, *grid), np.int8)
    return QuantizedTensor(codes, scales, stats, zps)


def dequantize_tensor(
    codes: np.ndarray,
    scales: np.ndarray,
    format: str = DEFAULT_FORMAT,
    granularity: str = "block",
    block_size: int | tuple[int, int] = 128,
    group_size: int = 128,
    zero_points: np.ndarray | None = None,
    activations: str | None = None,
) -> np.ndarray:
    """Public API: float32 weights w' = (q - zp) * scale from codes and their scale (zero-point) grid."""
    scheme = make_scheme(format, granularity, block_size, group_size, zero_points is None, activations)
    return dequantize_array(codes, scales, scheme, zero_points)


def dequantize_array(codes: np.ndarray, scales: np.ndarray, scheme: Scheme,
                     zero_points: np.ndarray | None = None) -> np.ndarray:
    if not _per_expert(codes.shape):
        return dequantize_2d(codes, _as_grid(scales, 2), scheme, zero_points=zero_points)
    out = np.empty(codes.shape, np.float32)
    grids = _as_grid(scales, 3)
    if grids.shape[0] != codes.shape[0]:
        raise SchemeError(f"scales for {grids.shape[0]} experts do not fit weight {codes.shape}")
    for i in range(codes.shape[0]):
        dequantize_2d(codes[i], grids[i], scheme, out=out[i], zero_points=None if zero_points is None else zero_points[i])
    return out


def reconstruct_array(array: np.ndarray, scheme: Scheme, global_scales: list | None = None, name: str = "tensor",
                      out_dtype: np.dtype | type = np.float32) -> np.ndarray:
    """[rows, cols] or [E, rows, cols] -> the weight a checkpoint of `scheme` holds, read back: the codes, scales and
    zero points quantize writes (NVFP4: relative to `global_scales`, one per matrix, as the pipeline computes them),
    dequantized as `fp8conv dequantize` does (float32 arithmetic, rounded to nearest even into out_dtype)."""
    matrices = array[None] if not _per_expert(array.shape) else array
    out = np.empty(matrices.shape, out_dtype)
    for i, matrix in enumerate(matrices):
        tensor_scale = None if global_scales is None else np.float32(global_scales[i])
        q = quantize_2d(matrix, scheme, tensor_scale, name=name)
        resolved = scheme.for_source(TAG_OF_DTYPE.get(np.dtype(matrix.dtype), "BF16"))
        codes, grid = q.codes, q.scales.astype(np.float32)
        if resolved.microscale:  # scale codes relative to the global scale; e2m1 codes two to a byte
            grid = resolved.scale_fmt.values(q.scales, q.global_scale)
            if MICROSCALE[resolved.microscale].packed:
                codes = resolved.fmt.unpack_codes(codes, matrix.shape[1])
        out[i] = dequantize_rows(codes, grid, resolved, out_dtype, q.zero_points)
    return out.reshape(array.shape)


def _as_grid(scales: np.ndarray, ndim: int) -> np.ndarray:
    """Accept the stored shapes of a per-tensor scale ((), (1,), [E, 1]) as a 2-D grid."""
    scales = np.asarray(scales, dtype=np.float32)
    while scales.ndim < ndim:
        scales = scales.reshape(*scales.shape, 1) if scales.ndim else scales.reshape(1)
    return scales


def make_scheme(format: str, granularity: str, block_size: int | tuple[int, int], group_size: int,
                symmetric: bool = True, activations: str | None = None, scale_format: str = "float32") -> Scheme:
    block = (block_size, block_size) if isinstance(block_size, int) else tuple(block_size)
    return Scheme(format=format, granularity=granularity, block_size=block, group_size=group_size,
                  symmetric=symmetric, activations=activations, scale_format=scale_format)
