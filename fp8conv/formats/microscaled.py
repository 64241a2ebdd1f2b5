"""The microscaled formats (NVFP4, MXFP4, MXFP8) as data: element format, group size, scale format,
the compressed-tensors format that stores them and llm-compressor's preset name."""
from __future__ import annotations

from dataclasses import dataclass

from . import names
from .codec import FORMATS, ElementFormat
from .fp4 import FP4E2M1
from .fp8 import FP8E4M3
from .scales import SCALE_FORMATS, MicroScaleFormat


@dataclass(frozen=True)
class Microscale:
    """One microscaled format: its element format, group size along the input dim, scale format, the
    compressed-tensors format that stores it and llm-compressor's name for the same scheme."""

    name: str
    element: str
    group: int
    scale_format: str
    ct_format: str
    preset: str
    max_rel_error: float  # verify's default limit of the relative RMS error

    @property
    def codec(self) -> ElementFormat:
        return FORMATS[self.element]

    @property
    def scale(self) -> MicroScaleFormat:
        return SCALE_FORMATS[self.scale_format]  # type: ignore[return-value]

    @property
    def packed(self) -> bool:
        """Codes narrower than a byte, stored packed (two e2m1 per byte)."""
        return self.codec.bits < 8

    @property
    def global_scale(self) -> bool:
        return self.scale.global_scale


MICROSCALE: dict[str, Microscale] = {m.name: m for m in (
    Microscale(names.NVFP4, FP4E2M1.name, 16, "e4m3_global", "nvfp4-pack-quantized", "NVFP4A16", 0.20),
    Microscale(names.MXFP4, FP4E2M1.name, 32, "e8m0", "mxfp4-pack-quantized", "MXFP4A16", 0.25),
    Microscale(names.MXFP8, FP8E4M3.name, 32, "e8m0", "mxfp8-quantized", "MXFP8A16", 0.08),
)}


def microscale_of_tags(codes_tag: str, scale_tag: str, has_global: bool) -> str | None:
    """The microscaled format stored with these dtypes (a checkpoint without a config), if one."""
    for micro in MICROSCALE.values():
        if (micro.codec.safetensors_tag, micro.scale.tag) == (codes_tag, scale_tag) and (has_global or not micro.global_scale):
            return micro.name
    return None
