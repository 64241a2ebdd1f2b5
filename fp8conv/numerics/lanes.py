"""The fixed order of every float64 error sum, which the compiled kernels reproduce bit for bit: per row,
column c goes to lane c % LANES, each lane is summed sequentially, the lanes are combined 0..LANES-1,
and rows are added in order. Both backends give the same report because both sum this way."""
from __future__ import annotations

import numpy as np

LANES = 8


def combine_lanes(lanes: np.ndarray) -> np.ndarray:
    """float64 [n]: each row of [n, LANES] lane sums combined in lane order."""
    total = lanes[:, 0].copy()
    for lane in range(1, LANES):
        total += lanes[:, lane]
    return total


def lane_sums(squares: np.ndarray) -> np.ndarray:
    """float64 [n]: per row of a float64 [n, m] array (m a multiple of LANES), its sum in the fixed order."""
    n, m = squares.shape
    # Reducing a non-contiguous axis adds the slices one after the other: sequential per lane.
    return combine_lanes(np.add.reduce(squares.reshape(n, m // LANES, LANES), axis=1))


class RowSums:
    """Per-row float64 sums of squares in the fixed lane order, continued chunk by chunk along the row."""

    def __init__(self, rows: int) -> None:
        self.lanes = np.zeros((rows, LANES), np.float64)

    def add(self, values: np.ndarray, first_col: int) -> None:
        """Continue each row's lanes with float32 `values` [rows, n] that start at column first_col."""
        rows, n = values.shape
        skip = first_col % LANES
        buf = np.zeros((rows, 1 + -(-(skip + n) // LANES), LANES), np.float64)
        buf[:, 0] = self.lanes[:rows]
        flat = buf[:, 1:].reshape(rows, -1)
        np.square(values, out=flat[:, skip : skip + n], dtype=np.float64)
        # Reducing a non-contiguous axis adds the slices one after the other: sequential per lane.
        self.lanes[:rows] = np.add.reduce(buf, axis=1)

    def fold_into(self, total: float, rows: int) -> float:
        """total + row 0 + row 1 + ..., each row its lanes combined in order."""
        for value in combine_lanes(self.lanes[:rows]).tolist():
            total += value
        return total
