"""The model card OUT/README.md: front matter merged with SRC's card, what was done, provenance, a load
snippet that works (executed here), re-rendering, --no-card, and verify's check of the quoted digest."""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import minilm_dir, read_json, run_cli

from fp8conv.report.card import ORIGINAL_MARKER, split_front_matter


def snippet(card: str, engine: str, model: Path) -> str:
    code = re.search(rf"^{engine}:\n\n```python\n(.*?)```", card, re.S | re.M)
    assert code, f"no {engine} snippet in the card"
    return code.group(1).replace("MODEL_DIR_OR_REPO_ID", str(model))


@pytest.mark.cli
def test_card_front_matter_merged_and_sections(sample, tmp_path):
    src = shutil.copytree(sample("llama-tiny"), tmp_path / "llama-tiny")
    (src / "README.md").write_text("---\nlicense: mit\ntags:\n- llama\n- fp8\n---\n# Llama tiny\n\nSource text.\n")
    out = tmp_path / "q"
    run_cli("quantize", src, "-o", out, "--format", "int8", "--granularity", "channel", "-q")
    card = (out / "README.md").read_text()
    keys, body = split_front_matter(card)
    assert keys["license"] == "mit" and keys["base_model"] == "llama-tiny" and keys["library_name"] == "transformers"
    assert keys["tags"][:2] == ["llama", "fp8"] and {"fp8conv", "quantized", "int8", "compressed-tensors"} <= set(keys["tags"])
    assert keys["fp8conv_manifest_sha256"] == hashlib.sha256((out / "fp8conv.manifest.json").read_bytes()).hexdigest()
    assert "fp8conv quantize" in keys["fp8conv_command"] and "--format int8" in keys["fp8conv_command"]
    report = read_json(out / "fp8conv.report.json")
    assert f"| {report['tensors_quantized']} | quantize | BF16 | I8 |" in body
    assert f"{report['bits_per_weight']:.3f}" in body and "Kept in high precision" in body
    assert body.rstrip().endswith(f"{ORIGINAL_MARKER}\n\n# Llama tiny\n\nSource text.")
    assert "README.md" not in read_json(out / "fp8conv.manifest.json")["files"]
    verify = json.loads(run_cli("verify", out, "--json", "-q").stdout)
    assert verify["passed"] and not verify["findings"]
    # Re-rendered from OUT alone: the same card (SRC's text comes from below the marker).
    run_cli("card", out)
    assert (out / "README.md").read_text() == card


@pytest.mark.cli
def test_card_of_a_source_without_readme_is_recognised_as_ours(sample, tmp_path):
    """No SRC card, so no marker: verify still checks the quoted digest, and a re-render does not keep the old
    card below the new one as if it were the source's."""
    out = tmp_path / "q"
    run_cli("quantize", sample("llama-tiny"), "-o", out, "-q")
    card = (out / "README.md").read_text()
    assert ORIGINAL_MARKER not in card and card.count("## What was done") == 1
    verify = json.loads(run_cli("verify", out, "--json", "-q").stdout)
    assert not [f for f in verify["findings"] if "README.md" in f["message"]], verify["findings"]
    run_cli("card", out)
    assert (out / "README.md").read_text() == card
    manifest = out / "fp8conv.manifest.json"
    manifest.write_text(manifest.read_text() + " ")
    verify = json.loads(run_cli("verify", out, "--json", "-q").stdout)
    assert any("quotes another manifest" in f["message"] for f in verify["findings"]), verify["findings"]


@pytest.mark.cli
def test_no_card_keeps_the_source_readme_and_verify_flags_a_stale_card(sample, tmp_path):
    src = shutil.copytree(sample("llama-tiny"), tmp_path / "llama-tiny")
    (src / "README.md").write_text("# Only the source's card\n")
    out = tmp_path / "q"
    run_cli("quantize", src, "-o", out, "--no-card", "--format", "int8", "--granularity", "channel", "-q")
    assert (out / "README.md").read_text() == "# Only the source's card\n"
    verify = json.loads(run_cli("verify", out, "--json", "-q").stdout)
    assert verify["passed"] and any("not an fp8conv model card" in f["message"] for f in verify["findings"])
    run_cli("card", out)
    manifest = out / "fp8conv.manifest.json"
    manifest.write_text(manifest.read_text() + " ")  # same content, other bytes: the card's quote is stale
    verify = json.loads(run_cli("verify", out, "--json", "-q").stdout)
    assert any("quotes another manifest" in f["message"] and not f["fatal"] for f in verify["findings"])


@pytest.mark.interop
def test_card_on_a_real_model_and_its_transformers_snippet_runs(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("compressed_tensors")
    src = minilm_dir()
    out = tmp_path / "minilm-int8"
    run_cli("quantize", src, "-o", out, "--format", "int8", "--granularity", "channel", "-q")
    card = (out / "README.md").read_text()
    keys, body = split_front_matter(card)
    original_keys, original_body = split_front_matter((src / "README.md").read_text())
    assert keys["license"] == original_keys["license"] and keys["datasets"] == original_keys["datasets"]
    assert set(original_keys["tags"]) < set(keys["tags"]) and keys["base_model"] == "model"
    assert body.endswith(original_body.rstrip("\n") + "\n")
    proc = subprocess.run([sys.executable, "-c", snippet(card, "transformers", out)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("384])"), proc.stdout  # (1, tokens, 384): the encoder ran


@pytest.mark.interop
def test_decoder_card_snippet_generates(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("compressed_tensors")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    src = tmp_path / "src"
    LlamaForCausalLM(LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=30522)).to(torch.bfloat16).save_pretrained(src)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (minilm_dir() / name).exists():
            shutil.copy(minilm_dir() / name, src / name)
    out = tmp_path / "q"
    run_cli("quantize", src, "-o", out, "--format", "int4", "-q")
    card = (out / "README.md").read_text()
    assert "LLM(model=" in snippet(card, "vllm", out)
    proc = subprocess.run([sys.executable, "-c", snippet(card, "transformers", out)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "the river begins as a spring" in proc.stdout.lower(), proc.stderr[-2000:]
