"""fp8conv: stream bf16/fp16/fp32 safetensors checkpoints into FP8/INT8 checkpoints engines load."""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["QuantizedTensor", "dequantize_tensor", "quantize_tensor", "__version__"]


def __getattr__(name: str):
    """The public API, imported when first used: `import fp8conv` (and the CLI's start-up) stays light."""
    if name in ("QuantizedTensor", "dequantize_tensor", "quantize_tensor"):
        from .numerics import api

        return getattr(api, name)
    raise AttributeError(f"module 'fp8conv' has no attribute {name!r}")
