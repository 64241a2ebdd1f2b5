"""Facts about number formats: the one table that holds qmax, numpy dtypes and safetensors tags."""
from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np


@dataclass(frozen=True)
class QuantFormat:
    """A target format of quantization."""

    name: str
    dtype: np.dtype
    qmax: float
    safetensors_tag: str
    is_float: bool

    @property
    def qmax32(self) -> np.float32:
        return np.float32(self.qmax)


def _float_format(name: str, dtype: type, tag: str) -> QuantFormat:
    return QuantFormat(name, np.dtype(dtype), float(ml_dtypes.finfo(dtype).max), tag, True)


FORMATS: dict[str, QuantFormat] = {
    "fp8_e4m3": _float_format("fp8_e4m3", ml_dtypes.float8_e4m3fn, "F8_E4M3"),
    "fp8_e5m2": _float_format("fp8_e5m2", ml_dtypes.float8_e5m2, "F8_E5M2"),
    "int8": QuantFormat("int8", np.dtype(np.int8), float(np.iinfo(np.int8).max), "I8", False),
}

# Every dtype tag the safetensors format defines that numpy can hold.
SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "U16": np.dtype(np.uint16),
    "I16": np.dtype(np.int16),
    "U32": np.dtype(np.uint32),
    "I32": np.dtype(np.int32),
    "U64": np.dtype(np.uint64),
    "I64": np.dtype(np.int64),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
TAG_OF_DTYPE: dict[np.dtype, str] = {dtype: tag for tag, dtype in SAFETENSORS_DTYPES.items()}

# Source dtypes that fp8conv quantizes; everything else is copied byte-for-byte.
QUANTIZABLE_TAGS = frozenset({"F32", "F16", "BF16"})

# Output dtypes that `dequantize` can produce.
HIGH_PRECISION = {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}


def format_of_tag(tag: str) -> QuantFormat | None:
    """The quantized format stored under a safetensors dtype tag, if any."""
    for fmt in FORMATS.values():
        if fmt.safetensors_tag == tag:
            return fmt
    return None
