"""Compiled kernels beside the numpy reference (numerics/): one C extension (_native.c, built by pip
install) behind native.py. Optional: every scheme also runs on the numpy path, with the same bytes."""
