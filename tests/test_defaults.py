"""A release pipeline can trust the defaults (issue #25): quantize's default output passes verify on the
README's sample and on SmolLM2's shapes; findings are grouped; every scheme is reported; the whole folder
is carried; hub ids resolve from a local cache; verify says when nothing is quantized; one error style."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import stfile
from helpers import read_json, run_cli

pytestmark = pytest.mark.cli
ROOT = Path(__file__).resolve().parent.parent
FORMATS = ("fp8_e4m3", "fp8_e5m2", "int8", "int4", "nvfp4", "mxfp4", "mxfp8")


def readme_quantize_command() -> list[str]:
    """The quick start's `fp8conv quantize ...` as the README writes it (the install step before it is pip's)."""
    text = (ROOT / "README.md").read_text()
    line = next(line for line in text.splitlines() if "fp8conv quantize sample_models/" in line and "&&" in line)
    command = shlex.split(line.split("&&", 1)[1].split("#")[0])
    assert command[:2] == ["fp8conv", "quantize"], command
    return command[2:]


def test_readme_setup_command_output_passes_verify(tmp_path, monkeypatch):
    args = readme_quantize_command()
    out = tmp_path / "out"
    args[args.index("-o") + 1] = str(out)
    monkeypatch.chdir(ROOT)
    result = run_cli("quantize", *args)
    source = args[0]
    verified = run_cli("verify", out, "--against", source)
    assert verified.stdout.splitlines()[0].endswith("PASS (layout compressed-tensors)")
    # The sample's 704-row gate_proj (fused with up_proj) does not hold whole 128-row blocks: one line says
    # the default block became 64x64 (the largest that every weight fits for vLLM).
    notes = [line for line in result.stderr.splitlines() if "does not fit this model" in line]
    assert len(notes) == 1 and "using fp8_e4m3 block 64x64" in notes[0] and "--block-size 64" in notes[0]


# ---- SmolLM2-135M's shapes, built offline ----------------------------------------------------------------

SMOL = dict(hidden=576, heads=9, kv_heads=3, head_dim=64, intermediate=1536, vocab=256)


def write_model(root: Path, tensors: dict[str, np.ndarray], config: dict) -> Path:
    """A one-shard bf16 checkpoint written by hand (independent of fp8conv's writer)."""
    root.mkdir(parents=True, exist_ok=True)
    header, blobs, offset = {}, [], 0
    for name, array in tensors.items():
        data = array.astype(ml_dtypes.bfloat16).tobytes()
        header[name] = stfile.entry("BF16", list(array.shape), offset, offset + len(data))
        blobs.append(data)
        offset += len(data)
    stfile.write(root / "model.safetensors", header, b"".join(blobs))
    (root / "config.json").write_text(json.dumps(config, indent=2))
    return root


def llama_like(root: Path, layers: int, hidden: int, heads: int, kv_heads: int, head_dim: int, intermediate: int,
               vocab: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    tensors = {"model.embed_tokens.weight": rng.standard_normal((vocab, hidden)) * 0.02}
    shapes = {"self_attn.q_proj": (heads * head_dim, hidden), "self_attn.k_proj": (kv_heads * head_dim, hidden),
              "self_attn.v_proj": (kv_heads * head_dim, hidden), "self_attn.o_proj": (hidden, heads * head_dim),
              "mlp.gate_proj": (intermediate, hidden), "mlp.up_proj": (intermediate, hidden),
              "mlp.down_proj": (hidden, intermediate)}
    for i in range(layers):
        for module, shape in shapes.items():
            tensors[f"model.layers.{i}.{module}.weight"] = rng.standard_normal(shape) * 0.02
        tensors[f"model.layers.{i}.input_layernorm.weight"] = np.ones(hidden)
        tensors[f"model.layers.{i}.post_attention_layernorm.weight"] = np.ones(hidden)
    tensors["model.norm.weight"] = np.ones(hidden)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": kv_heads, "head_dim": head_dim, "vocab_size": vocab, "tie_word_embeddings": True,
              "torch_dtype": "bfloat16"}
    return write_model(root, tensors, config)


@pytest.fixture(scope="module")
def smollm2_shapes(tmp_path_factory) -> Path:
    return llama_like(tmp_path_factory.mktemp("smol") / "smollm2-shapes", layers=2, **SMOL)


@pytest.mark.parametrize("fmt", FORMATS)
def test_default_output_passes_verify_on_smollm2_shapes(smollm2_shapes, tmp_path, fmt):
    """576 hidden, 192-row k/v, 1536 intermediate: every --format with its defaults either writes what verify
    passes, or is refused before a byte is written naming the flag (fp8_e5m2: no engine layout describes it)."""
    out = tmp_path / "out"
    result = run_cli("quantize", smollm2_shapes, "-o", out, "--format", fmt, "-q", expect=None)
    if fmt == "fp8_e5m2":
        assert result.exit_code == 2 and "use --layout fp8conv" in result.stderr and not out.exists()
        run_cli("quantize", smollm2_shapes, "-o", out, "--format", fmt, "--layout", "fp8conv", "-q")
    else:
        assert result.exit_code == 0, result.stderr
    run_cli("verify", out, "--against", smollm2_shapes)
    scheme = read_json(out / "fp8conv.report.json")["scheme"]
    # q_proj's 576 rows are fused with k_proj / v_proj: FP8 block 128 would leave a partial block in a part that
    # is not the last; 576 = 9 x 64 fits 64. INT4 group 128 does not divide 576 input columns; 64 does.
    expected = {"fp8_e4m3": [64, 64], "int8": [128, 128], "fp8_e5m2": [128, 128]}
    if fmt in expected:
        assert scheme["block_size"] == expected[fmt]
    if fmt == "int4":
        assert scheme["group_size"] == 64


def test_explicit_block_that_vllm_cannot_load_is_refused_naming_the_flag(smollm2_shapes, tmp_path):
    out = tmp_path / "out"
    result = run_cli("quantize", smollm2_shapes, "-o", out, "--block-size", "128", expect=2)
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("fp8conv: error: refused before writing anything: vllm: ") and line.endswith(
        "; --block-size 64 fits every weight")
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    refused = run_cli("quantize", smollm2_shapes, "-o", out, "--format", "int4", "--group-size", "128", expect=2)
    assert "--group-size 64 / 32 / 16 / 8 fits every tensor" in refused.stderr and not out.exists()


# ---- findings grouped ----------------------------------------------------------------------------------


def test_findings_are_grouped_per_rule_in_natural_order(tmp_path):
    """12 layers whose 192-row q_proj (fused with k/v) breaks vLLM's block rule: one line with the count and the
    first three tensors by layer number (0, 1, 2; not 0, 1, 10), the full list in --dry-run --json."""
    src = llama_like(tmp_path / "src", layers=12, hidden=192, heads=3, kv_heads=2, head_dim=64, intermediate=256,
                     vocab=64)
    out = tmp_path / "out"
    result = run_cli("quantize", src, "-o", out, "--block-size", "128", "--dry-run", expect=2)
    lines = [line for line in result.stderr.splitlines() if "rows of a fused layer's part" in line]
    assert len(lines) == 1
    names = [f"model.layers.{i}.self_attn.q_proj.weight" for i in range(3)]
    assert f"(12 tensors: {', '.join(names)} and 9 more (--dry-run --json lists all))" in lines[0]
    assert "e.g. model.layers.0.self_attn.q_proj.weight 192 rows are not divisible by block 128" in lines[0]
    listed = json.loads(run_cli("quantize", src, "-o", out, "--block-size", "128", "--dry-run", "--json",
                                expect=2).stdout)
    refused = [f["tensor"] for f in listed["findings"] if f["refused"]]
    assert sorted(refused) == sorted(f"model.layers.{i}.self_attn.q_proj.weight" for i in range(12))
    assert len(listed["refusals"]) == 1
    # A warning (not the default engine) is grouped the same way, in the report and the HTML page.
    run_cli("quantize", src, "-o", out, "--block-size", "128", "--layout", "fp8-native", "-q")
    report = read_json(out / "fp8conv.report.json")
    (warning,) = [w for w in report["warnings"] if w.startswith("transformers:")]
    assert ("(84 tensors: model.layers.0.mlp.down_proj.weight, model.layers.0.mlp.gate_proj.weight, "
            "model.layers.0.mlp.up_proj.weight and 81 more (--dry-run --json lists all))") in warning
    assert len([f for f in report["findings"] if f["engine"] == "transformers"]) == 84
    page = (out / "fp8conv.report.html").read_text()
    assert page.count("the fine-grained FP8 loader refuses them") == 1


# ---- every scheme reported ------------------------------------------------------------------------------


def test_mixed_schemes_in_summary_report_manifest_and_page(sample, tmp_path):
    src, out = sample("llama-tiny"), tmp_path / "out"
    result = run_cli("quantize", src, "-o", out, "--granularity", "channel", "--scheme", "re:.*mlp.*=int4:group:64")
    # Expected bytes from the shapes: int4 packs 8 codes per int32, bf16 scale per 64 inputs, int64 weight_shape;
    # fp8 channel: one byte per weight plus a float32 scale per row.
    mlp = [(704, 256), (704, 256), (256, 704)] * 2
    attn = [(256, 256), (128, 256), (128, 256), (256, 256)] * 2
    int4_bytes = sum(r * c // 2 + r * (c // 64) * 2 + 16 for r, c in mlp)
    fp8_bytes = sum(r * c + r * 4 for r, c in attn)
    want = {"int4 group 64 weight-only": (6, int4_bytes), "fp8_e4m3 channel": (8, fp8_bytes)}
    lines = result.stdout.splitlines()
    assert lines[1] == "schemes (2, layout compressed-tensors):"
    assert lines[2].startswith("  int4 group 64 weight-only: 6 tensors, ")
    assert lines[3].startswith("  fp8_e4m3 channel: 8 tensors, ")
    for record in (read_json(out / "fp8conv.report.json"), read_json(out / "fp8conv.manifest.json")):
        got = {s["describe"]: (s["tensors"], s["bytes"]) for s in record["schemes"]}
        assert got == want
    page = (out / "fp8conv.report.html").read_text()
    for described, (count, nbytes) in want.items():
        row = re.search(rf'<tr data-scheme="{re.escape(described)}">(.*?)</tr>', page).group(1)
        assert f">{count}<" in row and f"{nbytes:,}" in row
    assert "int4 group 64 weight-only (6 tensors)" in page.split("</header>")[0]


# ---- the whole folder -----------------------------------------------------------------------------------


def test_subfolders_are_carried_and_listed_in_the_manifest(tmp_path):
    src = llama_like(tmp_path / "src", layers=1, hidden=128, heads=2, kv_heads=1, head_dim=64, intermediate=256,
                     vocab=64)
    (src / "1_Pooling").mkdir()
    (src / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    (src / "2_Dense").mkdir()
    stfile.write(src / "2_Dense" / "model.safetensors", {"linear.weight": stfile.entry("F32", [2, 2], 0, 16)}, bytes(16))
    (src / "modules.json").write_text("[]")
    (src / ".git").mkdir()
    (src / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (src / "pytorch_model.bin").write_bytes(b"pickle")
    out = tmp_path / "out"
    result = run_cli("quantize", src, "-o", out, "-q")
    for rel in ("1_Pooling/config.json", "2_Dense/model.safetensors", "modules.json"):
        assert (out / rel).read_bytes() == (src / rel).read_bytes(), rel
        record = read_json(out / "fp8conv.manifest.json")["files"][rel]
        assert record["sha256"] == hashlib.sha256((src / rel).read_bytes()).hexdigest()
    assert not (out / ".git").exists() and not (out / "pytorch_model.bin").exists()
    (warning,) = [line for line in result.stderr.splitlines() if "not carried" in line]
    assert ".git/: hidden folder" in warning and "pytorch_model.bin: weights in another format" in warning
    run_cli("verify", out, "--against", src)
    (out / "1_Pooling" / "config.json").write_text("{}")
    tampered = run_cli("verify", out, expect=1)
    assert "file 1_Pooling/config.json does not match its sha256 in the manifest" in tampered.stdout


def test_folder_of_bin_weights_says_they_are_not_read(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "pytorch_model.bin").write_bytes(b"pickle")
    (src / "config.json").write_text("{}")
    result = run_cli("quantize", src, "-o", tmp_path / "out", expect=3)
    (line,) = result.stderr.strip().splitlines()
    assert "it holds pytorch_model.bin: fp8conv reads safetensors only" in line


# ---- hub ids --------------------------------------------------------------------------------------------


def test_hub_id_resolves_from_a_local_cache_offline(tmp_path):
    """The HF cache layout (models--org--name/refs/main + snapshots/<commit>/), built here; HF_HUB_OFFLINE=1."""
    pytest.importorskip("huggingface_hub")
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--tiny-org--tiny-llama"
    llama_like(repo / "snapshots" / commit, layers=1, hidden=128, heads=2, kv_heads=1, head_dim=64, intermediate=256,
               vocab=64)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    out = tmp_path / "out"

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "fp8conv", *args], env=env, capture_output=True, text=True,
                              timeout=600)

    done = cli("quantize", "tiny-org/tiny-llama", "-o", str(out), "-q")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"fp8conv quantize {repo / 'snapshots' / commit} -> {out}")
    assert "\nbase_model: tiny-org/tiny-llama\n" in (out / "README.md").read_text()  # the model card names the id
    verified = cli("verify", str(out), "--against", "tiny-org/tiny-llama", "-q")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    missing = cli("quantize", "tiny-org/not-cached", "-o", str(tmp_path / "o2"))
    assert missing.returncode == 3 and missing.stderr.count("\n") == 1
    assert missing.stderr.startswith("fp8conv: error: tiny-org/not-cached: no such file or folder, and the Hugging "
                                     "Face hub could not provide it")


def test_hub_id_without_the_extra_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails as if not installed
    monkeypatch.chdir(tmp_path)
    result = run_cli("quantize", "HuggingFaceTB/SmolLM2-135M", "-o", tmp_path / "out", expect=2)
    assert result.stderr == ("fp8conv: error: HuggingFaceTB/SmolLM2-135M: no such file or folder; to read it as a "
                             "Hugging Face hub id, pip install 'fp8conv[hub]'\n")


# ---- verify on an unquantized folder --------------------------------------------------------------------


def test_verify_on_an_unquantized_folder_fails_saying_so(sample):
    src = sample("llama-tiny")
    result = run_cli("verify", src, expect=1)
    assert result.stdout.splitlines()[0].endswith(": FAIL: not a quantized checkpoint (nothing is quantized)")
    assert json.loads(run_cli("verify", src, "--json", expect=1).stdout)["checks"]["structure"] == "fail"


# ---- one error style ------------------------------------------------------------------------------------


@pytest.mark.parametrize("args,words", [
    (["quantize"], "Missing argument 'SRC'. (see fp8conv quantize --help)"),
    (["quantize", "x", "-o", "y", "--format", "fp9"], "Invalid value for '--format': 'fp9' is not one of"),
    (["verify", "x", "--no-such-option"], "No such option '--no-such-option'. (see fp8conv verify --help)"),
    (["frobnicate"], "No such command 'frobnicate'. (see fp8conv --help)"),
    (["quantize", "x", "-o", "y", "--granularity", "channel", "--block-size", "64"],
     "--block-size applies to --granularity block, not channel"),
])
def test_click_usage_errors_are_one_fp8conv_line(args, words):
    result = run_cli(*args, expect=2)
    assert result.stderr.startswith("fp8conv: error: ") and result.stderr.count("\n") == 1, result.stderr
    assert words in result.stderr and "Usage:" not in result.output and "Try " not in result.output


def test_scheme_does_not_offer_fp4_e2m1(sample, tmp_path):
    result = run_cli("quantize", sample("llama-tiny"), "-o", tmp_path / "o", "--scheme", "*=fp4_e2m1", expect=2)
    assert "choose one of fp8_e4m3, fp8_e5m2, int8, int4, nvfp4, mxfp4, mxfp8" in result.stderr


def test_long_refusal_lists_are_cut(tmp_path):
    src = llama_like(tmp_path / "src", layers=12, hidden=192, heads=3, kv_heads=1, head_dim=64, intermediate=256,
                     vocab=64)
    result = run_cli("quantize", src, "-o", tmp_path / "out", "--format", "int4", "--group-size", "128", expect=2)
    (line,) = result.stderr.strip().splitlines()
    # 12 layers x 6 projections of 192 input columns: the first three by layer number, then a count.
    assert ("72 tensor(s) are not: model.layers.0.mlp.gate_proj.weight (192), model.layers.0.mlp.up_proj.weight "
            "(192), model.layers.0.self_attn.k_proj.weight (192) and 69 more (fp8conv inspect --tensors lists every "
            "shape)") in line
