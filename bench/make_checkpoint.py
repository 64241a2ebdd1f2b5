"""Write a synthetic Llama-shaped bf16 checkpoint for benchmarks (deterministic, seed 0).

    python bench/make_checkpoint.py bench/data/llama-2g               # ~2 GB, hidden 4096, ~1 GB shards
    python bench/make_checkpoint.py bench/data/one-4g --single-shard --layers 10

Weights are heavy-tailed: Gaussian with a few input columns ~20x larger, as real LLMs have.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

BF16 = ml_dtypes.bfloat16


def heavy_tailed(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    w = rng.standard_normal(shape, dtype=np.float32)
    w *= 0.02
    cols = rng.choice(shape[1], size=max(1, shape[1] // 256), replace=False)
    w[:, cols] *= 20
    return w.astype(BF16)


def layer_tensors(rng, i: int, hidden: int, inter: int, kv: int) -> dict[str, np.ndarray]:
    p = f"model.layers.{i}."
    return {
        p + "self_attn.q_proj.weight": heavy_tailed(rng, (hidden, hidden)),
        p + "self_attn.k_proj.weight": heavy_tailed(rng, (kv, hidden)),
        p + "self_attn.v_proj.weight": heavy_tailed(rng, (kv, hidden)),
        p + "self_attn.o_proj.weight": heavy_tailed(rng, (hidden, hidden)),
        p + "mlp.gate_proj.weight": heavy_tailed(rng, (inter, hidden)),
        p + "mlp.up_proj.weight": heavy_tailed(rng, (inter, hidden)),
        p + "mlp.down_proj.weight": heavy_tailed(rng, (hidden, inter)),
        p + "input_layernorm.weight": np.ones(hidden, BF16),
        p + "post_attention_layernorm.weight": np.ones(hidden, BF16),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--kv", type=int, default=1024, help="k/v projection rows (GQA)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--shard-bytes", type=float, default=1e9)
    parser.add_argument("--single-shard", action="store_true")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    args.out.mkdir(parents=True, exist_ok=True)
    groups: list[dict[str, np.ndarray]] = [{}]

    def add(tensors: dict[str, np.ndarray]) -> None:
        for name, t in tensors.items():
            size = sum(v.nbytes for v in groups[-1].values())
            if groups[-1] and not args.single_shard and size + t.nbytes > args.shard_bytes:
                flush()
                groups.append({})
            groups[-1][name] = t

    written: list[tuple[str, list[str]]] = []

    def flush() -> None:
        name = f"part-{len(written):05d}.safetensors"
        save_file(groups[-1], str(args.out / name), metadata={"format": "pt"})
        written.append((name, list(groups[-1])))
        groups[-1].clear()

    add({"model.embed_tokens.weight": heavy_tailed(rng, (args.vocab, args.hidden))})
    for i in range(args.layers):
        add(layer_tensors(rng, i, args.hidden, args.intermediate, args.kv))
    add({"model.norm.weight": np.ones(args.hidden, BF16), "lm_head.weight": heavy_tailed(rng, (args.vocab, args.hidden))})
    flush()
    total = len(written)
    weight_map, size = {}, 0
    for i, (old, names) in enumerate(written, 1):
        new = "model.safetensors" if total == 1 else f"model-{i:05d}-of-{total:05d}.safetensors"
        (args.out / old).rename(args.out / new)
        size += (args.out / new).stat().st_size
        weight_map.update({n: new for n in names})
    if total > 1:
        (args.out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    (args.out / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": args.hidden,
        "intermediate_size": args.intermediate, "num_hidden_layers": args.layers, "num_attention_heads": args.hidden // 128,
        "num_key_value_heads": args.kv // 128, "vocab_size": args.vocab, "torch_dtype": "bfloat16"}, indent=1))
    print(f"wrote {args.out}: {total} shard(s), {size / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
