"""What the engines require of a quantized checkpoint: load constraints, checked by the pre-flight
(before quantize writes a byte) and by verify (on any checkpoint), from one set of rules.

Read from vLLM 0.32 (`validate_fp8_block_shape`, `_maybe_allow_fp8_block_shape_mismatch`,
`is_layer_skipped`) and transformers 5.17 (fine-grained FP8 `Fp8Dequantize`, compressed-tensors'
MoE expert decompression):

- vLLM, tensor parallel `--tp N`: a column-parallel layer splits its output rows, a row-parallel layer
  its input columns; both must split evenly, and with block scales each partition must hold whole blocks.
- vLLM, fused layers (q/k/v, gate/up, DeepSeek's q_a/kv_a): all partitions quantized alike; with
  compressed-tensors block FP8 every partition but the last must hold whole blocks (fine-grained FP8
  skips that check); MoE experts need whole blocks in gate and up.
- transformers fine-grained FP8: every weight must divide the block.
- transformers compressed-tensors: per-expert FP8 block scales cannot be loaded (it multiplies each
  expert's codes by the scale grid without expanding it).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .architecture import EXPERT_PROJECTIONS, Architecture, module_name
from ..report.findings import Finding
from ..io.safetensors import printable
from ..layouts import Layout
from .scheme import Scheme

ENGINES = ("vllm", "transformers")
# The engines whose load constraints refuse by default, in quantize's pre-flight, --dry-run and verify alike.
DEFAULT_ENGINES = ("vllm",)
COLUMN_PARALLEL = re.compile(r"(^|\.)(q_proj|k_proj|v_proj|qkv_proj|gate_proj|up_proj|gate_up_proj|w1|w3|query|key|value|"
                             r"c_attn|c_fc|fc1|dense_h_to_4h|q_b_proj|kv_b_proj)$")
ROW_PARALLEL = re.compile(r"(^|\.)(o_proj|down_proj|w2|out_proj|c_proj|fc2|dense_4h_to_h)$")
REPLICATED_FUSED = ("q_a_proj", "kv_a_proj_with_mqa")  # vLLM fuses them without splitting over TP


@dataclass(frozen=True)
class Constraint:
    """One engine requirement a weight breaks: `rule` is the same sentence for every weight that breaks it
    (findings are grouped by it), `message` names the weight and its numbers."""

    engine: str
    tensor: str
    message: str
    rule: str = ""

    def text(self) -> str:
        return f"{self.engine}: {self.message}"

    def finding(self) -> Finding:
        return Finding(self.engine, self.rule or self.message, self.tensor, self.message)


def weight_constraints(name: str, shape: tuple[int, ...], scheme: Scheme, layout: Layout, tp: int,
                       arch: Architecture) -> list[Constraint]:
    """What vLLM and transformers require of one quantized weight ([out, in] or [E, out, in]).

    `layout` is the checkpoint's layout object (its flags say what the engines' loaders do with it)."""
    if not layout.engine_loadable or len(shape) < 2:
        return []
    rows, cols = shape[-2:]
    module = module_name(name)
    leaf = module.rpartition(".")[2]
    found: list[Constraint] = []

    def add(engine: str, rule: str, detail: str) -> None:
        found.append(Constraint(engine, name, f"{printable(name)} {detail}", rule))

    def vllm(rule: str, detail: str) -> None:
        add("vllm", rule, detail)

    column = COLUMN_PARALLEL.search(module) and leaf not in REPLICATED_FUSED
    row = ROW_PARALLEL.search(module)
    if column and rows % tp:
        vllm(f"output dims do not split over --tp {tp}", f"output dim {rows} does not split over --tp {tp}")
    if row and cols % tp:
        vllm(f"input dims do not split over --tp {tp}", f"input dim {cols} does not split over --tp {tp}")
    if scheme.granularity == "group" and (cols % scheme.group_size or (row and (cols // tp) % scheme.group_size)):
        vllm(f"input dims (per --tp {tp} partition) are not divisible by group {scheme.group_size}",
             f"input dim {cols} (per --tp {tp} partition {cols // tp}) is not divisible by group {scheme.group_size}")
    if scheme.granularity != "block":
        return found
    bn, bk = scheme.block_size
    if tp > 1 and column and (rows // tp) % bn:
        vllm(f"output partitions (tp {tp}) are not divisible by block {bn}",
             f"output partition {rows // tp} (tp {tp}) is not divisible by block {bn}")
    if tp > 1 and row and (cols // tp) % bk:
        vllm(f"input partitions (tp {tp}) are not divisible by block {bk}",
             f"input partition {cols // tp} (tp {tp}) is not divisible by block {bk}")
    group = arch.fused_group(module)
    if tp == 1 and group and rows % bn and scheme.fmt.is_float:
        expert = ".experts." in f".{name}"
        not_last = module != group[-1]
        if expert and leaf in ("gate_proj", "up_proj"):
            vllm(f"expert partitions are not divisible by block {bn} (vLLM's fused MoE needs whole blocks)",
                 f"expert partition {rows} is not divisible by block {bn} (vLLM's fused MoE needs whole blocks)")
        elif not_last and layout.strict_fused_blocks:
            others = ", ".join(g.rpartition(".")[2] for g in group if g != module)
            vllm(f"rows of a fused layer's part are not divisible by block {bn} (only the last part may hold a "
                 "partial block)",
                 f"{rows} rows are not divisible by block {bn}, and vLLM fuses it with {others} "
                 "(only the last part may hold a partial block)")
    if layout.whole_blocks_only and (rows % bn or cols % bk):
        add("transformers", f"weights are not divisible by the {bn}x{bk} block: the fine-grained FP8 loader "
            "refuses them (vLLM pads them)",
            f"{rows}x{cols} is not divisible by the {bn}x{bk} block: the fine-grained FP8 loader refuses it "
            "(vLLM pads it)")
    if layout.moe_single_block and ".experts." in f".{name}" and scheme.fmt.is_float and (rows > bn or cols > bk):
        add("transformers", "experts with block scales larger than one block: transformers' compressed-tensors MoE "
            "loader cannot expand them (use channel scales)",
            "is an expert with block scales larger than one block: transformers' compressed-tensors MoE loader "
            "cannot expand them (use channel scales)")
    return found


def fused_constraints(schemes: dict[str, str | None], arch: Architecture) -> list[Constraint]:
    """Partitions of one fused layer with different schemes (None: high precision): vLLM refuses them.

    `schemes` maps module names that exist to their scheme description."""
    found = []
    experts: dict[str, set[str | None]] = {}
    for module, scheme in schemes.items():
        owner = arch.experts_module(module)
        if owner is not None:
            experts.setdefault(owner, set()).add(scheme)
    for owner, kinds in sorted(experts.items()):
        if len(kinds) > 1:
            described = ", ".join(sorted(k or "high precision" for k in kinds))
            found.append(Constraint("vllm", owner, f"the experts of {printable(owner)} are quantized differently "
                                    f"({described}); vLLM loads all experts of a layer as one fused MoE layer",
                                    "experts of one layer are quantized differently (vLLM loads them as one fused MoE "
                                    "layer)"))
    seen: set[str] = set()
    for module in sorted(schemes):
        group = arch.fused_group(module)
        if not group or module in seen:
            continue
        present = [m for m in group if m in schemes]
        seen.update(present)
        kinds = {schemes[m] for m in present}
        if len(kinds) > 1:
            described = ", ".join(f"{m.rpartition('.')[2]}: {schemes[m] or 'high precision'}" for m in present)
            found.append(Constraint("vllm", present[0] + ".weight",
                                    f"fused layer {printable(module.rpartition('.')[0])} has partitions quantized "
                                    f"differently ({described}); vLLM loads them as one layer and refuses this",
                                    "fused layers have partitions quantized differently (vLLM loads each as one layer "
                                    "and refuses this)"))
    return found


def kept_experts_constraints(schemes: dict[str, str | None], ignore: list[str], arch: Architecture) -> list[Constraint]:
    """compressed-tensors: an experts layer kept in high precision must look ignored to vLLM, which asks about
    its expert 0's gate/up/down projections after rewriting the ignore list with the family's name mapper."""
    found = []
    kept: dict[str, bool] = {}
    for module, scheme in schemes.items():
        owner = arch.experts_module(module)
        if owner is not None:
            kept[owner] = kept.get(owner, True) and scheme is None
    for owner in sorted(o for o, all_kept in kept.items() if all_kept):
        asked = [f"{owner}.0.{p}" for p in EXPERT_PROJECTIONS]
        if not all(arch.vllm_sees_ignored(name, ignore) for name in asked):
            found.append(Constraint("vllm", owner, f"the experts of {printable(owner)} are kept in high precision but "
                                    f"vLLM does not find {', '.join(p.rpartition('.')[2] for p in asked)} of its expert 0 "
                                    f"ignored (it builds the layer quantized); ignore "
                                    f"{arch.experts_ignore_pattern(owner)}",
                                    "experts layers kept in high precision do not look ignored to vLLM (it builds them "
                                    "quantized)"))
    return found
