"""safetensors dtype tags and the numpy dtypes that hold them."""
from __future__ import annotations

import ml_dtypes
import numpy as np

_BF16 = np.dtype(ml_dtypes.bfloat16)

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
    "BF16": _BF16,
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
