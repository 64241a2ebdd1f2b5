"""Compiled kernels beside the numpy reference (numerics/): today numba, loaded from an ahead-compiled
object where it can be. Optional: every scheme also runs on the numpy path, with the same bytes."""
