"""Which weights inference engines fuse into one matrix, and so must share one NVFP4 global scale.

vLLM loads q/k/v into one QKV projection and gate/up (MoE: w1/w3) into one merged projection, and
runs each fused matrix with a single global scale. The sets are the ones llm-compressor's
model-free PTQ fuses (llmcompressor/entrypoints/model_free/microscale.py): attention q/k/v, MLA
wq_a/wkv_a_with_mqa, MLP gate/up and MoE w1/w3. A set counts only when complete; the partners may
sit in different shards (the caller reads each partner's amax wherever it is).
"""
from __future__ import annotations

import re

# (pattern with one (?P<member>...) group, the members that make a complete set)
_SETS: tuple[tuple[re.Pattern[str], tuple[str, ...]], ...] = (
    (re.compile(r"^(?P<prefix>.*(?:attn|attention))\.(?P<member>q_proj|k_proj|v_proj)\.weight$"),
     ("q_proj", "k_proj", "v_proj")),
    (re.compile(r"^(?P<prefix>.*(?:attn|attention))\.(?P<member>wq_a|wkv_a_with_mqa)\.weight$"),
     ("wq_a", "wkv_a_with_mqa")),
    (re.compile(r"^(?P<prefix>.*(?:mlp|feed_forward))\.(?P<member>gate_proj|up_proj)\.weight$"),
     ("gate_proj", "up_proj")),
    (re.compile(r"^(?P<prefix>.*)\.(?P<member>w1|w3)\.weight$"), ("w1", "w3")),
)


def fused_sets(names: list[str] | set[str]) -> list[tuple[str, ...]]:
    """Complete fused sets among `names` (tensor names), each in its members' canonical order, sorted."""
    found: dict[tuple[int, str], dict[str, str]] = {}
    for name in names:
        for index, (pattern, _) in enumerate(_SETS):
            match = pattern.match(name)
            if match:
                found.setdefault((index, match["prefix"]), {})[match["member"]] = name
                break
    sets = []
    for (index, _), members in found.items():
        order = _SETS[index][1]
        if all(m in members for m in order):
            sets.append(tuple(members[m] for m in order))
    return sorted(sets)


def partners_of(names: list[str] | set[str]) -> dict[str, tuple[str, ...]]:
    """tensor name -> its complete fused set (only names that belong to one)."""
    return {name: group for group in fused_sets(names) for name in group}
