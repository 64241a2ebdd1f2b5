from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"
sys.path.insert(0, str(Path(__file__).resolve().parent))


def tree_digest(path: Path) -> dict[str, str]:
    """sha256 of every file under path (following links), to prove inputs are never modified."""
    if path.is_file():
        return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


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
