"""safetensors dtype tags and the numpy dtypes that hold them.

ml_dtypes (bf16, float8) costs 1-2 s to import on a loaded machine, so it is imported on first use of
one of its dtypes (`ml_dtype`, and the mappings below when an ml_dtypes tag is looked up): `fp8conv
--version`, `--help` and an `inspect` of headers never pay for it."""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from functools import lru_cache

import numpy as np

_NUMPY = {"BOOL": np.bool_, "U8": np.uint8, "I8": np.int8, "U16": np.uint16, "I16": np.int16, "U32": np.uint32,
          "I32": np.int32, "U64": np.uint64, "I64": np.int64, "F16": np.float16, "F32": np.float32, "F64": np.float64}
_ML_DTYPES = {"BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
# Bytes per element of every tag (header checks and sizes need no dtype object).
DTYPE_BYTES: dict[str, int] = {**{tag: np.dtype(t).itemsize for tag, t in _NUMPY.items()},
                               "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1}


@lru_cache(maxsize=None)
def ml_dtype(name: str) -> np.dtype:
    """The numpy dtype of an ml_dtypes type ("bfloat16", "float8_e4m3fn", ...), importing ml_dtypes now."""
    import ml_dtypes

    return np.dtype(getattr(ml_dtypes, name))


def bf16() -> np.dtype:
    return ml_dtype("bfloat16")


class _Dtypes(Mapping):
    """Every dtype tag the safetensors format defines that numpy can hold -> its numpy dtype."""

    def __getitem__(self, tag: str) -> np.dtype:
        if tag in _NUMPY:
            return np.dtype(_NUMPY[tag])
        return ml_dtype(_ML_DTYPES[tag])

    def __iter__(self) -> Iterator[str]:
        return iter(DTYPE_BYTES)

    def __len__(self) -> int:
        return len(DTYPE_BYTES)

    def __contains__(self, tag: object) -> bool:
        return tag in DTYPE_BYTES


class _TagOf(Mapping):
    """numpy dtype -> its safetensors tag."""

    def __getitem__(self, dtype: np.dtype) -> str:
        dtype = np.dtype(dtype)
        for tag, t in _NUMPY.items():
            if np.dtype(t) == dtype:
                return tag
        if dtype.kind == "V" or dtype.name in _ML_DTYPES.values():  # an ml_dtypes dtype: the module is loaded
            for tag, name in _ML_DTYPES.items():
                if ml_dtype(name) == dtype:
                    return tag
        raise KeyError(dtype)

    def __iter__(self) -> Iterator[np.dtype]:
        return (SAFETENSORS_DTYPES[tag] for tag in DTYPE_BYTES)

    def __len__(self) -> int:
        return len(DTYPE_BYTES)


SAFETENSORS_DTYPES: Mapping[str, np.dtype] = _Dtypes()
TAG_OF_DTYPE: Mapping[np.dtype, str] = _TagOf()

# Source dtypes that fp8conv quantizes; everything else is copied byte-for-byte.
QUANTIZABLE_TAGS = frozenset({"F32", "F16", "BF16"})

# Output dtypes that `dequantize` can produce.
HIGH_PRECISION = {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}
