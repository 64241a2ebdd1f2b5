"""Peak memory does not grow with tensor or shard size (tracemalloc sees numpy's allocations)."""
from __future__ import annotations

import tracemalloc

import ml_dtypes
import numpy as np
import pytest

from fp8conv.accel import native
from fp8conv.run import pipeline
from fp8conv.run.pipeline import QuantizeOptions, RunOptions
from fp8conv.plan.scheme import Scheme, microscale_scheme
from safetensors import safe_open
from stfile import entry, write


def convert(command: str, src, out, scheme: Scheme | None, run: RunOptions) -> None:
    """quantize (with `scheme`) or dequantize through the library, with explicit chunk / job sizes."""
    if command == "dequantize":
        checkpoint, plan = pipeline.make_dequantize_plan(src, "BF16")
    else:
        checkpoint, plan = pipeline.make_plan(src, QuantizeOptions(scheme=scheme, run=run))
    pipeline.run_plan(checkpoint, plan, src, out, run)


QUANTIZED_TARGETS = [
    ("dequantize", None),
    ("quantize", Scheme(format="int8", granularity="channel")),
    ("quantize", Scheme(granularity="tensor")),
    ("quantize", Scheme(format="int4", granularity="group", group_size=20, symmetric=False)),
    ("quantize", Scheme(format="int8", granularity="channel", activations="none", symmetric=False)),
]

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
    options = QuantizeOptions(scheme=Scheme(granularity=granularity), run=RunOptions(chunk_bytes=4 << 20))
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


@pytest.mark.parametrize("packed_source", [False, True])
@pytest.mark.parametrize("command,scheme", QUANTIZED_TARGETS)
def test_chunked_paths_from_quantized_source_match_unchunked(tmp_path, command, scheme, packed_source):
    """Quantized sources (FP8, or int4 pack-quantized with zero points) read in many small chunks
    (tile- and packed-word-aligned) give the same bytes as in one chunk."""
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(1)
    data = (rng.standard_normal((737, 1100), dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16).tobytes()
    write(src / "model.safetensors", {"w.weight": entry("BF16", [737, 1100], 0, len(data))}, data)
    first = Scheme(format="int4", granularity="group", group_size=100, symmetric=False) if packed_source else Scheme()
    convert("quantize", src, tmp_path / "q", first, RunOptions())
    convert(command, tmp_path / "q", tmp_path / "whole", scheme, RunOptions())
    convert(command, tmp_path / "q", tmp_path / "chunked", scheme, RunOptions(chunk_bytes=10_000))
    assert (tmp_path / "whole" / "model.safetensors").read_bytes() == (tmp_path / "chunked" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("from_quantized", [False, True])
@pytest.mark.parametrize("command,scheme", [("quantize", Scheme())] + QUANTIZED_TARGETS)
def test_split_jobs_give_the_same_bytes(tmp_path, command, scheme, from_quantized):
    """Matrices cut into row-range jobs (shared by workers) give the bytes of whole-matrix jobs."""
    if command == "dequantize" and not from_quantized:
        return
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(2)
    data = (rng.standard_normal((3, 520, 300), dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16).tobytes()
    write(src / "model.safetensors", {"experts.weight": entry("BF16", [3, 520, 300], 0, len(data))}, data)
    if from_quantized:
        convert("quantize", src, tmp_path / "q", Scheme(format="int4", granularity="channel", symmetric=False),
                RunOptions())
        src = tmp_path / "q"
    convert(command, src, tmp_path / "whole", scheme, RunOptions(workers=2))
    # stack_bytes=0: one job per matrix, then cut into row ranges (the default groups the 3 experts).
    convert(command, src, tmp_path / "split", scheme, RunOptions(workers=2, job_bytes=20_000, stack_bytes=0))
    whole = (tmp_path / "whole" / "model.safetensors").read_bytes()
    assert whole == (tmp_path / "split" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("command,scheme", QUANTIZED_TARGETS + [
    ("quantize", Scheme(format="int4", granularity="channel", activations="none", symmetric=False)),
    ("quantize", Scheme(format="int4", granularity="group", group_size=8, activations="none")),
    ("quantize", Scheme(granularity="block", block_size=(4, 8))),
    ("quantize", Scheme(format="int8", granularity="block", block_size=(128, 128))),
    ("quantize", Scheme(format="int4", granularity="group", group_size=8, activations="none", symmetric=False,
                        observer="mse")),
    ("quantize", Scheme(granularity="block", block_size=(4, 8), observer="mse"))])
@pytest.mark.parametrize("rows", [16, 5])
@pytest.mark.parametrize("from_quantized", [False, True])
def test_grouped_small_experts_give_the_bytes_of_one_job_per_expert(tmp_path, command, scheme, rows, from_quantized):
    """Small matrices of a stack grouped into one job (quantized as one stacked matrix where every
    declared tensor stacks, matrix by matrix where not: packed zero points of 5-row int4 experts)
    write exactly what one job per expert writes, in every layout tensor."""
    if command == "dequantize" and not from_quantized:
        return
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(rows)
    shape = [40, rows, 40]
    data = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16).tobytes()
    write(src / "model.safetensors", {"experts.weight": entry("BF16", shape, 0, len(data))}, data)
    if from_quantized:
        convert("quantize", src, tmp_path / "q", Scheme(format="int4", granularity="channel", symmetric=False),
                RunOptions())
        src = tmp_path / "q"
    convert(command, src, tmp_path / "grouped", scheme, RunOptions(stack_bytes=4000))
    convert(command, src, tmp_path / "each", scheme, RunOptions(stack_bytes=0))
    grouped = (tmp_path / "grouped" / "model.safetensors").read_bytes()
    assert grouped == (tmp_path / "each" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4", "mxfp8"])
@pytest.mark.parametrize("from_quantized", [False, True])
def test_grouped_microscale_experts_give_the_bytes_of_one_job_per_expert(tmp_path, fmt, from_quantized):
    """NVFP4 / MXFP4 / MXFP8 experts grouped into one job: MX formats quantize as one stacked
    matrix (group scales along a row never straddle two experts); NVFP4 runs matrix by matrix in the
    job, each expert with its own global scale. Same bytes (codes, scales, global scales) as one job
    per expert, whose values test_microscale_cli checks against the float64 reference."""
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(7)
    shape = [12, 5, 64]
    # Experts of very different magnitudes, so NVFP4 global scales differ from expert to expert.
    values = rng.standard_normal(shape, dtype=np.float32) * np.logspace(-3, 2, shape[0], dtype=np.float32)[:, None, None]
    data = values.astype(ml_dtypes.bfloat16).tobytes()
    write(src / "model.safetensors", {"experts.weight": entry("BF16", shape, 0, len(data))}, data)
    if from_quantized:
        convert("quantize", src, tmp_path / "q", Scheme(format="int8", granularity="channel", activations="none"),
                RunOptions())
        src = tmp_path / "q"
    scheme = microscale_scheme(fmt)
    convert("quantize", src, tmp_path / "grouped", scheme, RunOptions(stack_bytes=4000))
    convert("quantize", src, tmp_path / "each", scheme, RunOptions(stack_bytes=0))
    grouped = (tmp_path / "grouped" / "model.safetensors").read_bytes()
    assert grouped == (tmp_path / "each" / "model.safetensors").read_bytes()
    if fmt == "nvfp4":
        with safe_open(tmp_path / "each" / "model.safetensors", "np") as f:
            global_scales = f.get_tensor("experts.weight_global_scale")
        assert len(set(global_scales.reshape(-1).tolist())) == shape[0]


@pytest.mark.parametrize("scheme", [Scheme(), Scheme(format="int8", granularity="channel"), Scheme(granularity="tensor"),
                                    Scheme(format="int4", granularity="group", group_size=32, symmetric=False),
                                    Scheme(format="int8", granularity="channel", scale_format="bf16"),
                                    Scheme(format="fp8_e4m3", granularity="group", group_size=32, observer="mse"),
                                    Scheme(format="fp4_e2m1", granularity="group", group_size=16,
                                           scale_format="e4m3_global")])
def test_report_is_the_same_on_both_backends(tmp_path, scheme):
    """The whole output, fp8conv.report.json included (its float64 error sums), does not depend on the kernel."""
    from conftest import SAMPLES, tree_digest

    if not native.AVAILABLE:
        pytest.fail(f"the C extension is not built ({native.IMPORT_ERROR}): pip install -e .")
    for backend in ("numpy", "native"):
        convert("quantize", SAMPLES / "llama-tiny", tmp_path / backend, scheme, RunOptions(backend=backend))
    assert tree_digest(tmp_path / "numpy") == tree_digest(tmp_path / "native")
