"""Number formats: element codecs (fp8 e4m3 / e5m2, int8, int4, fp4 e2m1), scale formats and the
safetensors dtype tags. The bottom of the package: nothing here imports another fp8conv module.

This face is what the rest of fp8conv imports; the modules behind it may be split or renamed."""
from __future__ import annotations

from .core import (FORMATS, HIGH_PRECISION, QUANTIZABLE_TAGS, SAFETENSORS_DTYPES, SCALE_FORMAT_OF_TAG,
                   SCALE_FORMATS, TAG_OF_DTYPE, ElementFormat, MicroScaleFormat, QuantFormat, ScaleFormat,
                   format_of_tag)
from .microscaled import MICROSCALE, Microscale

__all__ = ["FORMATS", "HIGH_PRECISION", "MICROSCALE", "QUANTIZABLE_TAGS", "SAFETENSORS_DTYPES", "SCALE_FORMAT_OF_TAG",
           "SCALE_FORMATS", "TAG_OF_DTYPE", "ElementFormat", "MicroScaleFormat", "Microscale", "QuantFormat",
           "ScaleFormat", "format_of_tag"]
