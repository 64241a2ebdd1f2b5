"""Error statistics of a quantized tensor: plain data, merged across chunks and workers in a fixed order.
Shared by the kernels that fill them, the journal that records them and the report that reads them."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ErrorStats:
    """Running error statistics of one tensor, mergeable across chunks and workers (in a fixed order)."""

    elements: int = 0
    sum_sq_ref: float = 0.0
    sum_sq_err: float = 0.0
    max_abs_err: float = 0.0
    saturated: int = 0
    flushed_to_zero: int = 0
    nonfinite: int = 0
    # With the mse observer: the squared error it measured with its scales and with min-max ones.
    observed_sum_sq_err: float | None = None
    minmax_sum_sq_err: float | None = None

    def merge(self, other: "ErrorStats") -> None:
        self.elements += other.elements
        self.sum_sq_ref += other.sum_sq_ref
        self.sum_sq_err += other.sum_sq_err
        self.max_abs_err = max(self.max_abs_err, other.max_abs_err)
        self.saturated += other.saturated
        self.flushed_to_zero += other.flushed_to_zero
        self.nonfinite += other.nonfinite
        if other.minmax_sum_sq_err is not None:
            self.observed_sum_sq_err = (self.observed_sum_sq_err or 0.0) + other.observed_sum_sq_err
            self.minmax_sum_sq_err = (self.minmax_sum_sq_err or 0.0) + other.minmax_sum_sq_err

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}

    @classmethod
    def from_json(cls, data: dict) -> "ErrorStats":
        return cls(**data)
