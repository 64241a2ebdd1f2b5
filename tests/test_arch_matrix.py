"""Architecture matrix: tiny random-weight models of real families, built offline by transformers from a
config, saved with save_pretrained, converted with defaults, loaded back by transformers' own
quantization loaders and compared with the model rebuilt from `fp8conv dequantize`.

Marked slow (CI runs it). compressed-tensors in transformers multiplies codes by the scale cast to
bf16, so its weights are checked bit for bit against codes x bf16(scale) and its logits only for
closeness; the fine-grained FP8 loader dequantizes with float32 scales, as fp8conv does: equal logits.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from helpers import load_all, read_json, run_cli

pytestmark = pytest.mark.slow
torch = pytest.importorskip("torch", reason="the matrix needs the test extra (torch CPU 2.13.0)")
transformers = pytest.importorskip("transformers")

IDS = [[1, 5, 9, 33, 100, 200, 300, 7, 42, 11]]


def gemma3(path: Path) -> None:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=64, vocab_size=512, max_position_embeddings=128,
                              sliding_window=64)
    assert config.tie_word_embeddings
    Gemma3ForCausalLM(config).to(torch.bfloat16).save_pretrained(path)


FAMILIES = {"gemma3": gemma3}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache: dict[str, Path] = {}

    def build(family: str) -> Path:
        if family not in cache:
            torch.manual_seed(0)
            path = tmp_path_factory.mktemp(family)
            FAMILIES[family](path)
            cache[family] = path
        return cache[family]

    return build


def load(path: Path, quantization_config=None):
    from transformers import AutoModelForCausalLM

    kwargs = {"quantization_config": quantization_config} if quantization_config is not None else {}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, **kwargs).eval()
    with torch.no_grad():
        return model, model(torch.tensor(IDS)).logits.float()


def bf16_scale_dequant(codes: np.ndarray, scale: np.ndarray, block: list[int] | None):
    """What transformers' compressed-tensors path computes: codes (bf16) x scale cast to bf16, per tile."""
    c = torch.from_numpy(codes.view(np.uint8).copy()).view(torch.float8_e4m3fn).to(torch.bfloat16)
    s = torch.from_numpy(scale.copy()).to(torch.bfloat16)
    if block:
        s = s.repeat_interleave(block[0], -2).repeat_interleave(block[1], -1)[..., : c.shape[-2], : c.shape[-1]]
    return c * s.expand(c.shape)


@pytest.mark.parametrize("layout", ["compressed-tensors", "fp8-native"])
@pytest.mark.parametrize("family", ["gemma3"])
def test_family_loads_in_transformers_like_our_dequantized_model(built, tmp_path, family, layout):
    from transformers import CompressedTensorsConfig, FineGrainedFP8Config

    src, out, deq = built(family), tmp_path / "q", tmp_path / "deq"
    run_cli("quantize", src, "-o", out, "--layout", layout)
    run_cli("verify", out, "--against", src, "--engine", "vllm", "--engine", "transformers")
    run_cli("dequantize", out, "-o", deq)
    config = CompressedTensorsConfig(dequantize=True) if layout == "compressed-tensors" else FineGrainedFP8Config(dequantize=True)
    model, theirs = load(out, config)
    _, ours = load(deq)
    _, original = load(src)
    assert torch.isfinite(theirs).all()
    if layout == "fp8-native":
        assert torch.equal(theirs, ours)
    else:
        params = dict(model.named_parameters())
        tensors = load_all(out)
        block = read_json(out / "config.json")["quantization_config"]["config_groups"]["group_0"]["weights"]["block_structure"]
        for name, codes in tensors.items():
            if name + "_scale" in tensors:
                expected = bf16_scale_dequant(codes, tensors[name + "_scale"], block)
                assert torch.equal(params[name].data, expected), name
        assert (theirs - ours).abs().max().item() < 0.15 * ours.abs().max().item()
    assert (theirs - original).abs().max().item() < 0.15 * original.abs().max().item()
    if read_json(src / "config.json").get("tie_word_embeddings"):
        assert torch.equal(model.lm_head.weight.data, model.model.embed_tokens.weight.data)
