"""The whole conversion decided before the first byte is written: decisions, output shards, warnings."""
from __future__ import annotations

from dataclasses import dataclass, field

from .checkpoint import Checkpoint
from .errors import InputError
from .layouts import Layout, unquantized_linear_modules
from .plan import Decision, Matcher, plan_tensors
from .safetensors_io import OutEntry, TensorInfo, printable
from .scheme import Scheme


@dataclass
class OutShard:
    name: str
    entries: list[OutEntry] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)


@dataclass
class ConversionPlan:
    scheme: Scheme
    layout: Layout
    tensors: dict[str, TensorInfo]
    decisions: dict[str, Decision]
    source_shard: dict[str, str]
    shards: list[OutShard]
    scale_of: dict[str, str]
    warnings: list[str]
    unquantized_modules: list[str]

    @property
    def shard_of_output(self) -> dict[str, str]:
        return {e.name: shard.name for shard in self.shards for e in shard.entries}


def _outputs_of(info: TensorInfo, decision: Decision, scheme: Scheme, layout: Layout) -> list[OutEntry]:
    if not decision.quantized:
        return [OutEntry(info.name, info.dtype, info.shape)]
    scale = OutEntry(layout.scale_name(info.name), "F32", layout.scale_shape(scheme, info.shape))
    return [OutEntry(info.name, scheme.fmt.safetensors_tag, info.shape), scale]


def _engine_warnings(plan_items: list[tuple[TensorInfo, Decision]], scheme: Scheme, layout: Layout) -> list[str]:
    """transformers refuses fine-grained FP8 weights whose dims do not divide the block (vLLM pads them)."""
    if layout.name != "fp8-native":
        return []
    bn, bk = scheme.block_size
    return [
        f"{printable(info.name)} {info.shape[-2]}x{info.shape[-1]} is not divisible by the {bn}x{bk} block: "
        "transformers' fine-grained FP8 loader refuses it (vLLM pads and loads it)"
        for info, decision in plan_items
        if decision.quantized and (info.shape[-2] % bn or info.shape[-1] % bk)
    ]


def _pack(groups: list[tuple[str, list[OutEntry]]], max_shard_size: int | None) -> list[OutShard]:
    """Keep the source grouping, or pack weight+scale units greedily into shards of max_shard_size."""
    if max_shard_size is None:
        shards: dict[str, OutShard] = {}
        for shard_name, entries in groups:
            shards.setdefault(shard_name, OutShard(shard_name)).entries.extend(entries)
        return list(shards.values())
    packed: list[OutShard] = [OutShard("")]
    for _, entries in groups:
        size = sum(e.nbytes for e in entries)
        if packed[-1].entries and packed[-1].nbytes + size > max_shard_size:
            packed.append(OutShard(""))
        packed[-1].entries.extend(entries)
    total = len(packed)
    for i, shard in enumerate(packed, 1):
        shard.name = "model.safetensors" if total == 1 else f"model-{i:05d}-of-{total:05d}.safetensors"
    return packed


def build_plan(
    checkpoint: Checkpoint,
    scheme: Scheme,
    layout: Layout,
    ignore: Matcher,
    include: Matcher,
    max_shard_size: int | None = None,
) -> ConversionPlan:
    """Decide every tensor and every output byte range; raises before anything is written."""
    layout.check(scheme)
    tensors = checkpoint.tensors
    decisions = plan_tensors(tensors, ignore, include)
    source_shard = {name: path.name for name, path in checkpoint.shard_of().items()}
    scale_of = {name: layout.scale_name(name) for name, d in decisions.items() if d.quantized}
    for weight, scale in scale_of.items():
        if scale in tensors:
            raise InputError(
                f"tensor {printable(scale)} already exists in the source, so {printable(weight)} looks quantized already"
            )
    groups = []
    items = []
    for shard in checkpoint.shards:
        for name in sorted(shard.tensors):
            info = shard.tensors[name]
            items.append((info, decisions[name]))
            groups.append((shard.path.name, _outputs_of(info, decisions[name], scheme, layout)))
    return ConversionPlan(
        scheme=scheme,
        layout=layout,
        tensors=tensors,
        decisions=decisions,
        source_shard=source_shard,
        shards=_pack(groups, max_shard_size),
        scale_of=scale_of,
        warnings=_engine_warnings(items, scheme, layout),
        unquantized_modules=unquantized_linear_modules(decisions, tensors),
    )
