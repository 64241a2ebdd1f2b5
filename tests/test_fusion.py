"""Fused sets (shared NVFP4 global scales) against llm-compressor's own matcher on the same names."""
from __future__ import annotations

import pytest

from fp8conv.plan.fusion import fused_sets, partners_of

LLAMA = [f"model.layers.{i}.{m}.weight" for i in range(2) for m in
         ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
          "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
MOE = [f"model.layers.0.block_sparse_moe.experts.{e}.{w}.weight" for e in range(2) for w in ("w1", "w2", "w3")]
MLA = ["model.layers.0.self_attn.wq_a.weight", "model.layers.0.self_attn.wkv_a_with_mqa.weight"]
BERT = [f"encoder.layer.0.attention.self.{m}.weight" for m in ("query", "key", "value")]


def test_sets_of_a_llama_moe_and_mla():
    sets = fused_sets(LLAMA + MOE + MLA + BERT)
    assert ("model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight",
            "model.layers.1.self_attn.v_proj.weight") in sets
    assert ("model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight") in sets
    assert ("model.layers.0.block_sparse_moe.experts.1.w1.weight",
            "model.layers.0.block_sparse_moe.experts.1.w3.weight") in sets
    assert tuple(MLA) in sets
    assert len(sets) == 2 * 2 + 2 + 1  # BERT's query/key/value are not fused by llm-compressor either
    assert "model.layers.0.self_attn.o_proj.weight" not in partners_of(LLAMA)


def test_incomplete_set_is_not_fused():
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"]
    assert fused_sets(names) == []


@pytest.mark.slow
def test_same_sets_as_llm_compressor():
    pytest.importorskip("llmcompressor")
    from llmcompressor.entrypoints.model_free.microscale import get_fused_names

    names = LLAMA + MOE + MLA + BERT
    matched, _ = get_fused_names(names)
    theirs = sorted(tuple(sorted(s.values())) for s in matched)
    assert sorted(tuple(sorted(s)) for s in fused_sets(names)) == theirs
