"""On-disk layouts of quantized weights, one class per layout (compressed_tensors.py, fine_grained.py,
native.py, openai_mxfp4.py on base.py's registry): the tensors and config each writes, what it refuses,
how it is recognised and how its config is read. read.py reads any of them back."""
from __future__ import annotations

from . import compressed_tensors, fine_grained, native, openai_mxfp4  # noqa: F401,I001  (register, in this order)
from .base import (CODES, GLOBAL_SCALE, SCALE, SHAPE, ZERO_POINT, Layout, TensorSpec, decode_codes, decode_zero_points,
                   get_layout, packs, unquantized_linear_modules)

DEFAULT_LAYOUT = compressed_tensors.CompressedTensors.name


def layout_names() -> list[str]:
    """Every registered layout, in registration order (--layout's choices)."""
    return list(Layout.registry)


__all__ = ["CODES", "DEFAULT_LAYOUT", "GLOBAL_SCALE", "SCALE", "SHAPE", "ZERO_POINT", "Layout", "TensorSpec",
           "decode_codes", "decode_zero_points", "get_layout", "layout_names", "packs", "unquantized_linear_modules"]
