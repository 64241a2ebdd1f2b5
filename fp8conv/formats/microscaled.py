"""The microscaled formats (NVFP4, MXFP4, MXFP8) as data: element format, group size, scale format,
the compressed-tensors format that stores them and llm-compressor's preset name."""
from __future__ import annotations

from dataclasses import dataclass


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

    @property
    def packed(self) -> bool:
        return self.element == "fp4_e2m1"

    @property
    def global_scale(self) -> bool:
        return self.scale_format == "e4m3_global"


MICROSCALE: dict[str, Microscale] = {m.name: m for m in (
    Microscale("nvfp4", "fp4_e2m1", 16, "e4m3_global", "nvfp4-pack-quantized", "NVFP4A16"),
    Microscale("mxfp4", "fp4_e2m1", 32, "e8m0", "mxfp4-pack-quantized", "MXFP4A16"),
    Microscale("mxfp8", "fp8_e4m3", 32, "e8m0", "mxfp8-quantized", "MXFP8A16"),
)}
