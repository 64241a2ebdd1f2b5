"""What a conversion plan refuses, or warns about, before anything is written: engine load constraints,
group and microscale shapes that do not divide, and headers over the safetensors limit."""
from __future__ import annotations

import math
from dataclasses import replace

from .architecture import Architecture
from ..errors import InputError, SchemeError, TileError
from .engines import fused_constraints, weight_constraints
from ..report.findings import cut, grouped
from ..layouts import packs
from .decisions import DROP, module_name
from ..io.safetensors import HEADER_CAP, build_header
from ..io.untrusted import printable
from .scheme import Scheme
from .records import ConversionPlan, OutShard


def engine_preflight(plan: ConversionPlan, arch: Architecture, tp: int, engines: tuple[str, ...]) -> None:
    """Engine load constraints of the planned output (fp8conv.engines), before anything is written:
    fused partitions quantized differently are refused; the rest are refused for the engines named
    by --engine and warnings otherwise."""
    if plan.scheme is None or plan.layout is None:
        return
    schemes: dict[str, str | None] = {}
    found = []
    for name, info in plan.tensors.items():
        decision = plan.decisions[name]
        qw = plan.source_quant.get(name)
        logical, shape = (qw.name, qw.shape) if qw is not None else (name, info.shape)
        if decision.action == DROP or len(shape) < 2:
            continue
        if logical.endswith(".weight") or arch.fused_experts_rule(logical, shape):
            schemes[module_name(logical)] = plan.schemes[name].describe() if decision.quantized else None
        if decision.quantized:
            found += weight_constraints(logical, plan.layout.quantized_shape(shape), plan.schemes[name],
                                        plan.layout, tp, arch)
    fused = [replace(c, rule=c.rule + "; quantize or --ignore all of a layer's partitions")
             for c in fused_constraints(schemes, arch)]
    refused = [c for c in found if c.engine in engines]
    warned = [c for c in found if c.engine not in engines]
    where = "--dry-run --json lists all"
    plan.refusals += grouped([c.finding() for c in fused + refused], where)
    plan.warnings += grouped([c.finding() for c in warned], where)
    # "shape": a weight's shape against the scheme's tile (a smaller tile may fit; fp8conv.fitting).
    plan.findings += [{**c.finding().to_json(), "refused": True, "shape": False} for c in fused]
    plan.findings += [{**c.finding().to_json(), "refused": True, "shape": True} for c in refused]
    plan.findings += [{**c.finding().to_json(), "refused": False, "shape": True} for c in warned]


def refuse_groups(plan: ConversionPlan) -> None:
    """compressed-tensors and vLLM need in_features % group_size == 0: refuse the whole plan, naming
    every offending tensor and the group sizes that would fit them all."""
    grouped = {name: s for name, s in plan.schemes.items() if packs(s) and s.granularity == "group"}
    if not grouped:
        return
    cols = {name: (plan.source_quant[name].shape if name in plan.source_quant else plan.tensors[name].shape)[-1]
            for name in grouped}
    bad = sorted(name for name, c in cols.items() if c % grouped[name].group_size)
    if not bad:
        return
    group_size = grouped[bad[0]].group_size
    common = math.gcd(*cols.values())
    fits = [g for g in (1024, 512, 256, 128, 64, 32, 16, 8) if common % g == 0]
    listed = cut([f"{n} ({cols[n]})" for n in bad], "fp8conv inspect --tensors lists every shape")
    fix = (f"--group-size {' / '.join(map(str, fits))} fits every tensor" if fits else "no power-of-two group fits all")
    raise TileError(f"in_features must be divisible by the group size {group_size} for pack-quantized "
                    f"weights; {len(bad)} tensor(s) are not: {listed}. {fix}; or use --granularity channel, "
                    "or --ignore those tensors")


def refuse_microscale_shapes(plan: ConversionPlan, scheme: Scheme) -> None:
    """NVFP4 / MXFP4 / MXFP8 groups are fixed by the format (16 / 32 along the input dim): refuse the plan,
    naming every weight whose input dim does not divide, before anything is written."""
    if not scheme.microscale:
        return
    group = scheme.group_size
    assert plan.layout is not None
    cols = {name: plan.layout.quantized_shape(plan.source_quant[name].shape if name in plan.source_quant
                                              else plan.tensors[name].shape)[-1]
            for name in plan.outputs}
    bad = sorted(name for name, c in cols.items() if c % group)
    if bad:
        listed = cut([f"{n} ({cols[n]})" for n in bad], "fp8conv inspect --tensors lists every shape")
        raise SchemeError(f"{scheme.microscale} needs input dims divisible by its group of {group}; {len(bad)} "
                          f"tensor(s) are not: {listed}; keep them in high precision with --ignore")


def check_headers(shards: list[OutShard]) -> None:
    """Never write a file our own reader (and the safetensors format) would refuse."""
    for shard in shards:
        header, _ = build_header(shard.entries)
        if len(header) - 8 > HEADER_CAP:
            longest = max((len(e.name) for e in shard.entries), default=0)
            raise InputError(f"output shard {printable(shard.name)} would have a {len(header) - 8}-byte header, over the "
                             f"{HEADER_CAP}-byte safetensors limit (tensor names up to {longest} characters); "
                             "use --max-shard-size to spread the tensors over more shards, or shorter names")
