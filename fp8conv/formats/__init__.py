"""Number formats: their names (names.py), element codecs (fp8.py, integer.py, fp4.py on codec.py's registry), scale formats
(scales.py), the microscaled formats built from both (microscaled.py) and safetensors dtype tags
(dtypes.py). The bottom of the package: nothing here imports another fp8conv module.

This face is what the rest of fp8conv imports. Importing it registers the built-in codecs; a codec
defined elsewhere registers itself by subclassing ElementFormat (with a `name=`)."""
from __future__ import annotations

from . import fp8, integer, fp4  # noqa: F401,I001  (the built-in codecs register themselves, in this order)
from .codec import FORMATS, ElementFormat, QuantFormat, format_of_tag, integer_format
from .dtypes import HIGH_PRECISION, QUANTIZABLE_TAGS, SAFETENSORS_DTYPES, TAG_OF_DTYPE
from .microscaled import MICROSCALE, Microscale, microscale_of_tags
from .scales import SCALE_FORMAT_OF_TAG, SCALE_FORMATS, MicroScaleFormat, ScaleFormat

DEFAULT_FORMAT = fp8.FP8E4M3.name


def format_choices() -> list[str]:
    """What --format / a scheme spec accepts, now: every standalone codec, then the microscaled formats."""
    return [name for name, fmt in FORMATS.items() if fmt.standalone] + list(MICROSCALE)


__all__ = ["DEFAULT_FORMAT", "FORMATS", "HIGH_PRECISION", "MICROSCALE", "QUANTIZABLE_TAGS", "SAFETENSORS_DTYPES",
           "SCALE_FORMAT_OF_TAG", "SCALE_FORMATS", "TAG_OF_DTYPE", "ElementFormat", "MicroScaleFormat", "Microscale",
           "QuantFormat", "ScaleFormat", "format_choices", "format_of_tag", "integer_format", "microscale_of_tags"]
