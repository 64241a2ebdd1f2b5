"""The `expanded` observer: NVFP4 / MXFP4 group scales searched above the group's range as well as below
(range expansion). Pure numpy candidate sets; the search itself is observers.mse_microscale.

An FP4 (e2m1) element has the values 0, 0.5, 1, 1.5, 2, 3, 4, 6: min-max maps a group's amax onto 6, where
the grid's top step (4 -> 6) is coarse. A larger scale maps the amax below 6 and can reconstruct the
whole group better; a smaller one clips the group's largest elements. Per group, among the candidates
below, the stored scale code with the smallest squared error sum (w' - w)^2 over the group is kept; the
min-max code comes first and a candidate replaces the best only when it is smaller by more than
observers.MARGIN (relative), so the result is never worse than min-max in squared error. The candidates
are the stored codes themselves, so the e4m3 rounding of an NVFP4 group scale is part of the search.

- NVFP4: e4m3 codes min-max -3 .. +7 (`NVFP4_STEPS`). Positive e4m3 codes are ordered like their values,
  8 codes to an octave in the normal range, so +7 codes is about 1.8x the min-max scale and -3 about
  0.78x: the range llm-compressor's `nvfp4_expanded_mse` searches (1.8x down to 0.8x of the group range)
  on the stored grid. The global scale is compressed-tensors' rule applied to 1.25x the amax (below), so
  a group whose expanded scale would pass e4m3's 448 is capped there (the candidate repeats an earlier one).
- MXFP4: E8M0 exponents min-max +1 and -1 (`MXFP4_STEPS`): a power-of-two scale has no finer steps. The
  scheme refuses `expanded` for MXFP4: on the decoder evaluation pairs of bench/QUALITY.md it was worse
  than min-max (+1.9% .. +15.6%), on MiniLM better; the function stays for the bench.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from . import observers

NVFP4_STEPS: tuple[int, ...] = (0, -1, -2, -3, 1, 2, 3, 4, 5, 6, 7)
MXFP4_STEPS: tuple[int, ...] = (0, 1, -1)


def steps_for(scale_format: str) -> tuple[int, ...]:
    """The candidate code steps of a microscaling scale format (first 0, the min-max code)."""
    return NVFP4_STEPS if scale_format == "e4m3_global" else MXFP4_STEPS


def expanded_microscale(weight: np.ndarray, micro, minmax_codes: Optional[np.ndarray],
                        global_scale: Optional[float] = None, use_compiled: bool = False,
                        minmax_rule: Optional[tuple] = None) -> Optional["observers.MicroChoice"]:
    """The expanded choice of scale codes for a bf16 / fp16 / float32 [rows, cols] weight under a microscale.Microscale
    (`minmax_codes`: uint8 [rows, cols / group], or None with `minmax_rule`: observers.mse_microscale's;
    `global_scale`: NVFP4's, unchanged)."""
    return observers.mse_microscale(weight, micro, minmax_codes, global_scale, use_compiled=use_compiled,
                                    steps=steps_for(micro.scale_format), minmax_rule=minmax_rule)


# ---- the global scale of `expanded` (NVFP4) ------------------------------------------------------------
# compressed-tensors' global scale is 448 * 6 / amax: the group holding the tensor's amax gets e4m3's largest
# code, 448, and cannot expand at all. `expanded` computes it from amax * GLOBAL_HEADROOM instead, so groups
# up to the tensor's amax can take scales up to 1.25x their min-max one before 448 caps them. Chosen among five
# rules on the development pairs of bench/QUALITY.md (#28 nvfp4 round 4): the lowest mean KL there, never
# worse than min-max; the searched-maximum rules (llm-compressor's) are in bench/expanded_global_dev.py.
GLOBAL_HEADROOM = 1.25


def global_maximum(amax: float) -> np.float32:
    """The float32 value `expanded`'s NVFP4 global scale is computed from, in place of the amax: amax * 1.25
    (exact in float64, then rounded once to float32; float32's largest value where that overflows)."""
    return np.float32(min(np.float64(np.float32(amax)) * GLOBAL_HEADROOM, float(np.finfo(np.float32).max)))
