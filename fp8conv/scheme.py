"""A validated quantization scheme: format x granularity x tile size."""
from __future__ import annotations

from dataclasses import dataclass

from .errors import SchemeError
from .formats import FORMATS, QuantFormat

GRANULARITIES = ("block", "channel", "group", "tensor")
MAX_TILE = 1 << 16


@dataclass(frozen=True)
class Scheme:
    """How one weight is quantized. Every granularity is a 2-D tile of (rows, cols) sharing a scale."""

    format: str = "fp8_e4m3"
    granularity: str = "block"
    block_size: tuple[int, int] = (128, 128)
    group_size: int = 128

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise SchemeError(f"unknown format {self.format!r}; choose one of {', '.join(FORMATS)}")
        if self.granularity not in GRANULARITIES:
            raise SchemeError(
                f"unknown granularity {self.granularity!r}; choose one of {', '.join(GRANULARITIES)}"
            )
        sizes = (*self.block_size, self.group_size)
        if len(self.block_size) != 2 or any(not isinstance(s, int) or s <= 0 or s > MAX_TILE for s in sizes):
            raise SchemeError(f"block and group sizes must be integers in 1..{MAX_TILE}, got {sizes}")

    @property
    def fmt(self) -> QuantFormat:
        return FORMATS[self.format]

    def tile(self, rows: int, cols: int) -> tuple[int, int]:
        """The (rows, cols) of the tile that shares one scale, for a 2-D weight of this shape."""
        if self.granularity == "block":
            return self.block_size
        if self.granularity == "channel":
            return (1, max(cols, 1))
        if self.granularity == "group":
            return (1, self.group_size)
        return (max(rows, 1), max(cols, 1))

    def scale_grid(self, rows: int, cols: int) -> tuple[int, int]:
        """Shape of the 2-D scale grid: ceil(rows / tile_rows) x ceil(cols / tile_cols)."""
        tile_rows, tile_cols = self.tile(rows, cols)
        return (-(-rows // tile_rows), -(-cols // tile_cols))

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Scale grid for a 2-D weight, or [E, ...] grids for 3-D stacked experts."""
        *lead, rows, cols = shape
        return (*lead, *self.scale_grid(rows, cols))

    def describe(self) -> str:
        if self.granularity == "block":
            return f"{self.format} block {self.block_size[0]}x{self.block_size[1]}"
        if self.granularity == "group":
            return f"{self.format} group {self.group_size}"
        return f"{self.format} {self.granularity}"

    def to_json(self) -> dict:
        return {
            "format": self.format,
            "granularity": self.granularity,
            "block_size": list(self.block_size) if self.granularity == "block" else None,
            "group_size": self.group_size if self.granularity == "group" else None,
        }


def parse_block_size(text: str) -> tuple[int, int]:
    """'128' -> (128, 128); '128x64' -> (128, 64)."""
    parts = text.lower().split("x")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        raise SchemeError(f"block size {text!r} is not N or NxM (e.g. 128 or 128x64)") from None
    if len(values) == 1:
        values = values * 2
    if len(values) != 2:
        raise SchemeError(f"block size {text!r} is not N or NxM (e.g. 128 or 128x64)")
    return values  # type: ignore[return-value]
