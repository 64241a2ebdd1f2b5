"""Architecture facts read from config.json and tensor names: tied heads (fast, no torch)."""
from __future__ import annotations

import json
import shutil

import pytest

from fp8conv.architecture import Architecture
from safetensors.numpy import save_file

from helpers import load_all, read_json, run_cli

EMBED = ["model.embed_tokens.weight", "model.layers.0.mlp.down_proj.weight"]


@pytest.mark.parametrize("config,names,expected", [
    ({"architectures": ["Gemma3ForCausalLM"], "tie_word_embeddings": True}, EMBED, ["lm_head"]),
    ({"architectures": ["LlamaForCausalLM"], "tie_word_embeddings": False}, EMBED, []),
    ({"architectures": ["LlamaForCausalLM"], "tie_word_embeddings": True}, EMBED + ["lm_head.weight"], []),
    ({"architectures": ["Gemma3ForConditionalGeneration"], "text_config": {"tie_word_embeddings": True}}, EMBED, ["lm_head"]),
    ({"architectures": ["Qwen3ForCausalLM"]}, EMBED, ["lm_head"]),  # not stated, no stored head: shared
    ({"architectures": ["BertModel"]}, EMBED, []),  # no head module at all
    (None, EMBED, []),
])
def test_tied_heads(config, names, expected):
    assert Architecture.from_config(config).tied_heads(names) == expected


@pytest.fixture
def tied_llama(sample, tmp_path):
    """The Llama sample with its head removed and tie_word_embeddings set, as SmolLM2 / Gemma 3 ship."""
    original = sample("llama-tiny")
    src = tmp_path / "tied"
    src.mkdir()
    tensors = {n: t for n, t in load_all(original).items() if n != "lm_head.weight"}
    save_file(tensors, str(src / "model.safetensors"))
    config = read_json(original / "config.json")
    config["tie_word_embeddings"] = True
    (src / "config.json").write_text(json.dumps(config))
    return src


@pytest.mark.parametrize("layout", ["compressed-tensors", "fp8-native"])
def test_tied_head_is_ignored_recorded_and_verified(tied_llama, tmp_path, layout):
    out = tmp_path / "out"
    dry = run_cli("quantize", tied_llama, "-o", out, "--layout", layout, "--dry-run").stdout
    assert "lm_head" in dry and "tied to the input embedding" in dry
    run_cli("quantize", tied_llama, "-o", out, "--layout", layout)
    qc = read_json(out / "config.json")["quantization_config"]
    ignored = qc.get("ignore", qc.get("modules_to_not_convert"))
    assert "lm_head" in ignored and "model.embed_tokens" in ignored
    manifest = read_json(out / "fp8conv.manifest.json")
    assert manifest["modules_without_tensors"]["lm_head"]["decision"] == "keep"
    run_cli("verify", out, "--against", tied_llama)


def test_verify_fails_when_a_tied_head_is_not_ignored(tied_llama, tmp_path):
    out = tmp_path / "out"
    run_cli("quantize", tied_llama, "-o", out)
    config = read_json(out / "config.json")
    config["quantization_config"]["ignore"] = ["model.embed_tokens"]  # what fp8conv wrote before the fix
    (out / "config.json").write_text(json.dumps(config))
    (out / "fp8conv.manifest.json").unlink()
    report = json.loads(run_cli("verify", out, "--json", expect=1).stdout)
    assert report["checks"]["structure"] == "fail"
    assert any(f["tensor"] == "lm_head" and "tied to the input embedding" in f["message"] for f in report["findings"])
