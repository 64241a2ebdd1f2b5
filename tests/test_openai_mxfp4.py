"""--layout openai-mxfp4: gpt-oss's fused experts in the form gpt-oss ships (quant_method mxfp4,
`<x>_blocks` uint8 [E, out, in/32, 16] + `<x>_scales` uint8 [E, out, in/32], the transpose of [E, in, out]).

References are written here in float64 (the e2m1 / E8M0 rules of test_microscale.ref_mx, nibble packing and
the decode 2^(s-127) x e2m1 by hand); the slow tests load the output with transformers' own MXFP4 path
(CPU: dequantized to bf16 by its convert_moe_packed_tensors) and compare with `fp8conv dequantize`.
"""
from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from helpers import load_all, read_json, run_cli
from test_microscale import GRID, ref_mx

BF16 = np.dtype(ml_dtypes.bfloat16)
E, HIDDEN, INTER = 2, 64, 32
EXPERTS = ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj")
CONFIG = {"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "num_hidden_layers": 1,
          "num_local_experts": E, "hidden_size": HIDDEN, "intermediate_size": INTER}
SHAPES = {
    "model.embed_tokens.weight": (96, HIDDEN), "lm_head.weight": (96, HIDDEN),
    "model.layers.0.self_attn.q_proj.weight": (HIDDEN, HIDDEN), "model.layers.0.mlp.router.weight": (E, HIDDEN),
    "model.layers.0.mlp.router.bias": (E,), "model.layers.0.input_layernorm.weight": (HIDDEN,),
    EXPERTS[0]: (E, HIDDEN, 2 * INTER), EXPERTS[0] + "_bias": (E, 2 * INTER),
    EXPERTS[1]: (E, INTER, HIDDEN), EXPERTS[1] + "_bias": (E, HIDDEN),
}


def write_gpt_oss(folder: Path, config: dict = CONFIG, shapes: dict = SHAPES) -> Path:
    """Small random float32 tensors (scaled like real weights, one expert group all zero, one with an outlier)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(7)
    tensors = {n: (rng.standard_normal(s) * 0.02).astype(np.float32) for n, s in shapes.items()}
    if EXPERTS[0] in tensors:
        tensors[EXPERTS[0]][1, :32, 5] = 0.0  # expert 1, output column 5, first group of 32 inputs: all zero
        tensors[EXPERTS[0]][0, 40, 7] = 3.0  # an outlier that saturates its group's neighbours
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def ref_pack(codes: np.ndarray) -> np.ndarray:
    """uint8 [.., n/2]: element 2k in the low nibble of byte k (OpenAI's and compressed-tensors' order)."""
    out = np.zeros((*codes.shape[:-1], codes.shape[-1] // 2), np.uint8)
    for k in range(codes.shape[-1] // 2):
        out[..., k] = codes[..., 2 * k] | (codes[..., 2 * k + 1] << 4)
    return out


def ref_decode(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """float64 [E, in, out] from blocks [E, out, G, 16] and scales [E, out, G]: e2m1 x 2^(s - 127), transposed."""
    experts, out, groups, _ = blocks.shape
    w = np.zeros((experts, out, groups * 32))
    for e in range(experts):
        for o in range(out):
            for g in range(groups):
                for k in range(16):
                    byte = int(blocks[e, o, g, k])
                    for half, nibble in ((0, byte & 0xF), (1, byte >> 4)):
                        w[e, o, g * 32 + 2 * k + half] = GRID[nibble] * 2.0 ** (int(scales[e, o, g]) - 127)
    return w.transpose(0, 2, 1)


def quantize(src: Path, out: Path, *extra: str, expect: int = 0):
    return run_cli("quantize", src, "-o", out, "--format", "mxfp4", "--layout", "openai-mxfp4", *extra, expect=expect)


def test_experts_written_as_openai_mxfp4_against_float64_reference(tmp_path):
    src, out, deq = write_gpt_oss(tmp_path / "src"), tmp_path / "q", tmp_path / "deq"
    quantize(src, out)
    source, written = load_all(src), load_all(out)
    qc = read_json(out / "config.json")["quantization_config"]
    assert qc["quant_method"] == "mxfp4" and set(qc) == {"quant_method", "modules_to_not_convert"}
    assert {"model.layers.0.self_attn.q_proj", "model.layers.0.mlp.router", "model.embed_tokens", "lm_head"} \
        <= set(qc["modules_to_not_convert"])
    assert not any("experts" in m for m in qc["modules_to_not_convert"])
    for name in SHAPES:
        if name in EXPERTS:
            assert name not in written
            continue
        assert written[name].dtype == source[name].dtype and np.array_equal(written[name], source[name]), name
    for name in EXPERTS:
        w = source[name]
        blocks, scales = written[name + "_blocks"], written[name + "_scales"]
        experts, rows_in, cols_out = w.shape
        assert blocks.dtype == np.uint8 and blocks.shape == (experts, cols_out, rows_in // 32, 16), name
        assert scales.dtype == np.uint8 and scales.shape == (experts, cols_out, rows_in // 32), name
        for e in range(experts):
            codes, e8m0 = ref_mx(w[e].T, emax=2)  # quantized along `in`: the transpose [out, in]
            expected = ref_pack(codes).reshape(cols_out, rows_in // 32, 16)
            bad = np.argwhere(blocks[e] != expected)
            assert bad.size == 0, f"{name} expert {e}: blocks differ first at {tuple(bad[0])}"
            bad = np.argwhere(scales[e] != e8m0)
            assert bad.size == 0, f"{name} expert {e}: scales differ first at {tuple(bad[0])}"
    assert written[EXPERTS[0] + "_scales"][1, 5, 0] == 0  # the all-zero group: E8M0 code 0, codes 0
    assert not written[EXPERTS[0] + "_blocks"][1, 5, 0].any()
    manifest = read_json(out / "fp8conv.manifest.json")["tensors"]
    assert manifest[EXPERTS[0]]["decision"] == "quantize" and "OpenAI MXFP4" in manifest[EXPERTS[0]]["reason"]
    q_proj = manifest["model.layers.0.self_attn.q_proj.weight"]
    assert q_proj["decision"] == "copy" and "quantizes only the fused experts" in q_proj["reason"]

    run_cli("verify", out, "--against", src)
    run_cli("dequantize", out, "-o", deq)
    rebuilt = load_all(deq)
    assert set(rebuilt) == set(SHAPES)
    for name in EXPERTS:
        want = ref_decode(written[name + "_blocks"], written[name + "_scales"])
        got = rebuilt[name]
        assert got.dtype == BF16 and got.shape == source[name].shape, name
        assert np.array_equal(got.astype(np.float64), want.astype(np.float32).astype(BF16).astype(np.float64)), name
        err = np.linalg.norm(want - source[name]) / np.linalg.norm(source[name])
        assert 0 < err < 0.2, (name, err)
    inspect = run_cli("inspect", out)
    assert "OpenAI MXFP4" in inspect.stdout


def test_verify_fails_a_tampered_scale_and_a_kept_expert(tmp_path):
    src, out = write_gpt_oss(tmp_path / "src"), tmp_path / "q"
    quantize(src, out)
    from fp8conv.io.safetensors import read_header

    path = out / "model.safetensors"
    info = read_header(path).tensors[EXPERTS[1] + "_scales"]
    data = bytearray(path.read_bytes())
    data[info.start : info.end] = bytes([min(b + 3, 254) for b in data[info.start : info.end]])  # x8 every scale
    path.write_bytes(bytes(data))
    (out / "fp8conv.manifest.json").unlink()
    report = json.loads(run_cli("verify", out, "--against", src, "--json", expect=1).stdout)
    assert any(f["tensor"] == EXPERTS[1] and "relative RMS error" in f["message"] for f in report["findings"])


@pytest.mark.parametrize("options,message", [
    (["--format", "fp8_e4m3"], "--layout openai-mxfp4 writes OpenAI's MXFP4 (the form gpt-oss ships in) and takes "
                               "--format mxfp4 only"),
    (["--format", "nvfp4"], "takes --format mxfp4 only"),
])
def test_refuses_other_formats(tmp_path, options, message):
    src, out = write_gpt_oss(tmp_path / "src"), tmp_path / "q"
    result = run_cli("quantize", src, "-o", out, "--layout", "openai-mxfp4", *options, expect=2)
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not out.exists()


def test_refuses_other_families_and_checkpoints_without_fused_experts(tmp_path):
    llama = write_gpt_oss(tmp_path / "llama", {**CONFIG, "model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    result = quantize(llama, tmp_path / "q1", expect=2)
    assert "--layout openai-mxfp4 is defined for fused experts of gpt_oss (model_type in config.json), not llama" \
        in result.stderr and len(result.stderr.strip().splitlines()) == 1
    dense = write_gpt_oss(tmp_path / "dense", CONFIG, {n: s for n, s in SHAPES.items() if ".experts." not in n})
    result = quantize(dense, tmp_path / "q2", expect=2)
    assert "SRC has none" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "q1").exists() and not (tmp_path / "q2").exists()


def test_refuses_inputs_not_divisible_by_32_naming_the_tensor(tmp_path):
    shapes = {**SHAPES, EXPERTS[1]: (E, 48, HIDDEN)}  # down_proj's input dim (intermediate) 48
    src, out = write_gpt_oss(tmp_path / "src", CONFIG, shapes), tmp_path / "q"
    result = quantize(src, out, expect=2)
    assert (f"mxfp4 needs input dims divisible by its group of 32; 1 tensor(s) are not: {EXPERTS[1]} (48)"
            in result.stderr) and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not out.exists()


def test_refuses_ignoring_some_experts(tmp_path):
    src, out = write_gpt_oss(tmp_path / "src"), tmp_path / "q"
    result = quantize(src, out, "--ignore", "*.experts.down_proj", expect=2)
    assert "vLLM reads every experts layer of an mxfp4 checkpoint as MXFP4" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()


def test_compressed_tensors_warning_names_the_layout(tmp_path):
    src = write_gpt_oss(tmp_path / "src")
    result = run_cli("quantize", src, "-o", tmp_path / "q", "--dry-run")
    assert "--format mxfp4 --layout openai-mxfp4 quantizes them in the form gpt-oss ships" in result.stderr


# ---- transformers: a tiny gpt-oss built from its config, loaded by transformers' MXFP4 path -----------------

@pytest.mark.slow
def test_transformers_loads_every_expert_as_fp8conv_dequantizes_it(tmp_path):
    torch = pytest.importorskip("torch", reason="needs the test extra (torch CPU 2.13.0)")
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    import test_arch_matrix as matrix

    src, out, deq = tmp_path / "src", tmp_path / "q", tmp_path / "deq"
    torch.manual_seed(0)
    matrix.gpt_oss(src)
    quantize(src, out)
    run_cli("verify", out, "--against", src)
    run_cli("dequantize", out, "-o", deq)
    written, ours, source = load_file(out / "model.safetensors"), load_file(deq / "model.safetensors"), \
        load_file(src / "model.safetensors")
    model, theirs = matrix.load(out)
    rebuilt, logits = matrix.load(deq)
    _, original = matrix.load(src)
    fresh = transformers.GptOssForCausalLM(model.config)  # what a loader that skipped the experts would hold
    params = dict(model.named_parameters())
    fresh_params = dict(fresh.named_parameters())
    experts = sorted(n for n in params if ".experts." in n)
    assert len(experts) == 8  # gate_up_proj, its bias, down_proj, its bias, per layer
    for name in experts:
        got = params[name].data
        assert got.dtype == torch.bfloat16 and torch.equal(got, ours[name]), name
        assert not torch.equal(got.float(), fresh_params[name].data.float()), name
        if name.endswith("_bias"):
            assert torch.equal(got, source[name]), name
            continue
        blocks, scales = written[name + "_blocks"], written[name + "_scales"]
        assert torch.equal(convert_moe_packed_tensors(blocks, scales), ours[name]), name  # transformers' own decode
        want = ref_decode(blocks.numpy(), scales.numpy())
        assert np.array_equal(got.float().numpy().astype(np.float64), want), name  # exact in bf16
        ref = source[name].double().numpy()
        assert 0 < np.linalg.norm(want - ref) / np.linalg.norm(ref) < 0.15, name
    for name, param in params.items():
        if ".experts." not in name:
            assert torch.equal(param.data, source[name] if name in source else source["model.embed_tokens.weight"]), name
    assert torch.equal(theirs, logits)  # same weights as the model rebuilt from `fp8conv dequantize`
    assert torch.isfinite(theirs).all()
    assert (theirs - original).abs().max().item() < 0.15 * original.abs().max().item()


def test_quantize_refuses_an_openai_mxfp4_source(tmp_path):
    src, out = write_gpt_oss(tmp_path / "src"), tmp_path / "q"
    quantize(src, out)
    result = run_cli("quantize", out, "-o", tmp_path / "again", expect=2)
    assert "is OpenAI MXFP4 (quant_method mxfp4); quantize does not re-quantize that form" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "again").exists()
