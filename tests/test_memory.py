"""Peak memory does not grow with tensor or shard size (tracemalloc sees numpy's allocations)."""
from __future__ import annotations

import tracemalloc

import ml_dtypes
import numpy as np
import pytest

from fp8conv import jobs, pipeline
from fp8conv.pipeline import QuantizeOptions
from fp8conv.scheme import Scheme
from stfile import entry, write

ROWS, COLS = 4096, 8192  # one bf16 tensor of 64 MiB


def big_checkpoint(folder):
    folder.mkdir()
    rng = np.random.default_rng(0)
    data = (rng.standard_normal((ROWS, COLS), dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16).tobytes()
    write(folder / "model.safetensors", {"big.weight": entry("BF16", [ROWS, COLS], 0, len(data))}, data)
    return folder


@pytest.mark.parametrize("granularity", ["block", "channel", "tensor"])
def test_peak_memory_bounded_by_chunk_not_tensor(tmp_path, monkeypatch, granularity):
    src = big_checkpoint(tmp_path / "src")
    monkeypatch.setattr(jobs, "CHUNK_BYTES", 4 << 20)
    options = QuantizeOptions(scheme=Scheme(granularity=granularity), workers=1)
    tracemalloc.start()
    try:
        pipeline.quantize_checkpoint(src, tmp_path / "out", options)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    shard = (src / "model.safetensors").stat().st_size
    print(f"peak {peak / 2**20:.1f} MiB")
    assert peak < 24 << 20, f"peak {peak / 2**20:.1f} MiB for a {shard / 2**20:.0f} MiB shard"
    assert (tmp_path / "out" / "model.safetensors").stat().st_size > ROWS * COLS
