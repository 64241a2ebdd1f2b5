"""fp8conv: stream bf16/fp16/fp32 safetensors checkpoints into FP8/INT8 checkpoints engines load."""
from __future__ import annotations

__version__ = "0.1.0"

from .numerics.kernels import QuantizedTensor, dequantize_tensor, quantize_tensor  # noqa: E402

__all__ = ["QuantizedTensor", "dequantize_tensor", "quantize_tensor", "__version__"]
