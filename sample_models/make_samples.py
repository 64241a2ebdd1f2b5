"""Build the tiny checkpoints shipped in sample_models/ (deterministic: seed 0).

    python sample_models/make_samples.py

- llama-tiny/   bf16 Llama (2 layers, hidden 256, intermediate 704: not a multiple of 128), two
                shards + index, config.json, tokenizer.json; a few outlier columns ~20x larger.
- bert-tiny-fp32/  a single fp32 model.safetensors with an I64 position_ids buffer.
- moe-tiny/     bf16 MoE layer: stacked 3-D experts [n_experts, out, in] and a router mlp.gate.
"""
from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

HERE = Path(__file__).resolve().parent
BF16 = ml_dtypes.bfloat16


def heavy_tailed(rng: np.random.Generator, shape: tuple[int, ...], std: float = 0.02) -> np.ndarray:
    """Gaussian weights with a few input columns ~20x larger, as real LLM weights have."""
    w = rng.standard_normal(shape).astype(np.float32) * std
    cols = rng.choice(shape[-1], size=max(1, shape[-1] // 64), replace=False)
    w[..., cols] *= 20
    return w


def _tokenizer(vocab_size: int) -> dict:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"tok{i}": i for i in range(3, vocab_size)})
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [],
        "normalizer": None,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": None,
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
    }


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def make_llama(root: Path, rng: np.random.Generator) -> None:
    hidden, inter, layers, heads, kv_heads, vocab = 256, 704, 2, 4, 2, 512
    head_dim = hidden // heads
    tensors: dict[str, np.ndarray] = {
        "model.embed_tokens.weight": heavy_tailed(rng, (vocab, hidden)),
        "model.norm.weight": np.ones(hidden, np.float32),
        "lm_head.weight": heavy_tailed(rng, (vocab, hidden)),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors.update({
            p + "self_attn.q_proj.weight": heavy_tailed(rng, (heads * head_dim, hidden)),
            p + "self_attn.k_proj.weight": heavy_tailed(rng, (kv_heads * head_dim, hidden)),
            p + "self_attn.v_proj.weight": heavy_tailed(rng, (kv_heads * head_dim, hidden)),
            p + "self_attn.o_proj.weight": heavy_tailed(rng, (hidden, heads * head_dim)),
            p + "mlp.gate_proj.weight": heavy_tailed(rng, (inter, hidden)),
            p + "mlp.up_proj.weight": heavy_tailed(rng, (inter, hidden)),
            p + "mlp.down_proj.weight": heavy_tailed(rng, (hidden, inter)),
            p + "input_layernorm.weight": (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32),
            p + "post_attention_layernorm.weight": (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32),
        })
    tensors = {k: v.astype(BF16) for k, v in tensors.items()}
    root.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    first = [n for n in names if n.startswith(("model.layers.0.", "model.embed"))]
    shards = {
        "model-00001-of-00002.safetensors": first,
        "model-00002-of-00002.safetensors": [n for n in names if n not in first],
    }
    weight_map, total = {}, 0
    for shard, members in shards.items():
        save_file({n: tensors[n] for n in members}, str(root / shard), metadata={"format": "pt"})
        weight_map.update({n: shard for n in members})
        total += sum(tensors[n].nbytes for n in members)
    _write_json(root / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
    _write_json(root / "config.json", {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": head_dim, "vocab_size": vocab,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "bos_token_id": 1, "eos_token_id": 2,
    })
    _write_json(root / "tokenizer.json", _tokenizer(vocab))
    _write_json(root / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2})


def make_bert_fp32(root: Path, rng: np.random.Generator) -> None:
    hidden, inter, vocab = 128, 512, 256
    tensors = {
        "embeddings.word_embeddings.weight": heavy_tailed(rng, (vocab, hidden)),
        "embeddings.position_embeddings.weight": heavy_tailed(rng, (64, hidden)),
        "embeddings.position_ids": np.arange(64, dtype=np.int64)[None, :],
        "embeddings.LayerNorm.weight": np.ones(hidden, np.float32),
        "embeddings.LayerNorm.bias": np.zeros(hidden, np.float32),
        "encoder.layer.0.attention.self.query.weight": heavy_tailed(rng, (hidden, hidden)),
        "encoder.layer.0.attention.self.query.bias": 0.01 * rng.standard_normal(hidden).astype(np.float32),
        "encoder.layer.0.attention.self.key.weight": heavy_tailed(rng, (hidden, hidden)),
        "encoder.layer.0.attention.self.value.weight": heavy_tailed(rng, (hidden, hidden)),
        "encoder.layer.0.intermediate.dense.weight": heavy_tailed(rng, (inter, hidden)),
        "encoder.layer.0.output.dense.weight": heavy_tailed(rng, (hidden, inter)),
        "encoder.layer.0.output.dense.bias": np.zeros(hidden, np.float32),
    }
    tensors["encoder.layer.0.attention.self.value.weight"][:3] = 0  # an all-zero tile row under channel scales
    root.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(root / "model.safetensors"), metadata={"format": "pt"})
    _write_json(root / "config.json", {"architectures": ["BertModel"], "model_type": "bert", "hidden_size": hidden,
                                       "intermediate_size": inter, "vocab_size": vocab, "torch_dtype": "float32"})


def make_moe(root: Path, rng: np.random.Generator) -> None:
    hidden, inter, experts = 128, 192, 4
    p = "model.layers.0."
    tensors = {
        "model.embed_tokens.weight": heavy_tailed(rng, (256, hidden)),
        p + "self_attn.q_proj.weight": heavy_tailed(rng, (hidden, hidden)),
        p + "mlp.gate.weight": heavy_tailed(rng, (experts, hidden)),
        p + "mlp.experts.gate_up_proj.weight": heavy_tailed(rng, (experts, 2 * inter, hidden)),
        p + "mlp.experts.down_proj.weight": heavy_tailed(rng, (experts, hidden, inter)),
        p + "input_layernorm.weight": np.ones(hidden, np.float32),
    }
    tensors = {k: v.astype(BF16) for k, v in tensors.items()}
    root.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(root / "model.safetensors"), metadata={"format": "pt"})
    _write_json(root / "config.json", {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
                                       "hidden_size": hidden, "intermediate_size": inter,
                                       "num_local_experts": experts, "torch_dtype": "bfloat16"})


def main() -> None:
    rng = np.random.default_rng(0)
    make_llama(HERE / "llama-tiny", rng)
    make_bert_fp32(HERE / "bert-tiny-fp32", rng)
    make_moe(HERE / "moe-tiny", rng)


if __name__ == "__main__":
    main()
