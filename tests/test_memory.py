"""Peak memory does not grow with tensor or shard size (tracemalloc sees numpy's allocations)."""
from __future__ import annotations

import tracemalloc

import ml_dtypes
import numpy as np
import pytest

from fp8conv import compiled, jobs, pipeline
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
    compiled.preload()  # loading numba once is not conversion memory
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


@pytest.mark.parametrize("command,args", [("dequantize", []), ("quantize", ["--format", "int8", "--granularity", "channel"]),
                                          ("quantize", ["--granularity", "tensor"])])
def test_chunked_paths_from_quantized_source_match_unchunked(tmp_path, monkeypatch, command, args):
    """Quantized sources read in many small chunks (tile-aligned) give the same bytes as in one chunk."""
    from fp8conv import jobs
    from helpers import run_cli

    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(1)
    data = (rng.standard_normal((736, 1100), dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16).tobytes()
    write(src / "model.safetensors", {"w.weight": entry("BF16", [736, 1100], 0, len(data))}, data)
    run_cli("quantize", src, "-o", tmp_path / "fp8")
    run_cli(command, tmp_path / "fp8", "-o", tmp_path / "whole", *args)
    monkeypatch.setattr(jobs, "CHUNK_BYTES", 100_000)
    run_cli(command, tmp_path / "fp8", "-o", tmp_path / "chunked", *args)
    assert (tmp_path / "whole" / "model.safetensors").read_bytes() == (tmp_path / "chunked" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("command,args,from_quantized", [
    ("quantize", [], False), ("quantize", ["--granularity", "channel", "--format", "int8"], False),
    ("quantize", ["--granularity", "channel", "--format", "int8"], True), ("dequantize", [], True)])
def test_split_jobs_give_the_same_bytes(tmp_path, monkeypatch, command, args, from_quantized):
    """Matrices cut into row-range jobs (shared by workers) give the bytes of whole-matrix jobs."""
    from helpers import run_cli

    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(2)
    data = (rng.standard_normal((3, 520, 300), dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16).tobytes()
    write(src / "model.safetensors", {"experts.weight": entry("BF16", [3, 520, 300], 0, len(data))}, data)
    if from_quantized:
        run_cli("quantize", src, "-o", tmp_path / "q")
        src = tmp_path / "q"
    run_cli(command, src, "-o", tmp_path / "whole", *args, "--workers", "2")
    monkeypatch.setattr(pipeline, "JOB_BYTES", 20_000)
    run_cli(command, src, "-o", tmp_path / "split", *args, "--workers", "2")
    whole = (tmp_path / "whole" / "model.safetensors").read_bytes()
    assert whole == (tmp_path / "split" / "model.safetensors").read_bytes()
