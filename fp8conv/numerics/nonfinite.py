"""NaN and Inf in a tensor to quantize: counted, and refused with one message naming the tensor."""
from __future__ import annotations

from typing import Iterable

import numpy as np

from ..errors import InputError
from ..io.untrusted import printable


class NonFiniteError(InputError):
    """A tensor to quantize holds NaN or Inf (refused unless explicitly allowed)."""


def count_nonfinite(chunks: Iterable[np.ndarray]) -> tuple[int, int]:
    """(NaN count, Inf count) over arrays of bf16/f16/f32 values."""
    nan = inf = 0
    for chunk in chunks:
        values = chunk.astype(np.float32)
        nan += int(np.isnan(values).sum())
        inf += int(np.isinf(values).sum())
    return nan, inf


def nonfinite_error(name: str, nan: int, inf: int) -> NonFiniteError:
    return NonFiniteError(
        f"tensor {printable(name)} holds {nan} NaN and {inf} Inf values; refusing to quantize it "
        "(--allow-nonfinite maps NaN to 0 and Inf to +-qmax)"
    )


def microscale_nonfinite_error(name: str, fmt: str, nan: int, inf: int) -> NonFiniteError:
    return NonFiniteError(f"tensor {printable(name)} holds {nan} NaN and {inf} Inf values; {fmt} has no mapping for "
                          "them: fix the weights or keep the tensor in high precision with --ignore")
