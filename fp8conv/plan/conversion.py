"""The whole conversion decided before the first byte is written: decisions, output shards, warnings."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from .architecture import OPENAI_MXFP4_EXPERTS, Architecture
from ..io.checkpoint import CONFIG_NAME, Checkpoint
from ..errors import InputError, SchemeError, TileError
from .engines import fused_constraints, weight_constraints
from ..report.findings import cut, grouped
from ..layouts import CODES, Layout, TensorSpec, packs, unquantized_linear_modules
from .decisions import CARRY, COPY, DEQUANTIZE, DROP, QUANTIZE, REQUANTIZE, Decision, Matcher, decide, module_name
from ..layouts.read import CheckpointView, QuantizedWeight, open_view
from .carry import can_carry, carried_scheme, share_global_scales
from ..layouts.source_checks import refuse_bad_sources
from ..io.safetensors import HEADER_CAP, OutEntry, TensorInfo, build_header
from ..io.untrusted import printable
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
    """For `quantize`, scheme and layout are set; for `dequantize`, out_dtype (and layout is None)."""

    scheme: Scheme | None
    layout: Layout | None
    tensors: dict[str, TensorInfo]
    decisions: dict[str, Decision]
    source_shard: dict[str, str]
    shards: list[OutShard]
    outputs: dict[str, list[TensorSpec]]  # quantized source tensor -> every tensor its layout writes
    schemes: dict[str, Scheme]  # quantized source tensor -> its scheme (scale format resolved)
    source_quant: dict[str, QuantizedWeight]
    warnings: list[str]
    unquantized_modules: list[str]
    out_dtype: str | None = None
    # Modules the engines build that have no tensor of their own (a tied lm_head): kept, with the reason.
    tensorless_modules: dict[str, str] = field(default_factory=dict)
    global_scales: dict[str, list] = field(default_factory=dict)  # NVFP4: per matrix, set before the jobs run
    # What the pre-flight refuses (a real run raises, a dry run lists them and exits 2).
    refusals: list[str] = field(default_factory=list)
    # --scheme overrides: (scheme, module names) written as extra config_groups.
    scheme_groups: list[tuple[Scheme, list[str]]] = field(default_factory=list)
    # Every engine finding, one per tensor (warnings / refusals hold them grouped by rule).
    findings: list[dict] = field(default_factory=list)

    @property
    def shard_of_output(self) -> dict[str, str]:
        return {e.name: shard.name for shard in self.shards for e in shard.entries}

    @property
    def origin(self) -> dict[str, str]:
        """Output tensor name -> the source tensor it comes from."""
        names = {}
        for name, decision in self.decisions.items():
            if decision.action == DROP:
                continue
            if decision.quantized:
                names.update({spec.name: name for spec in self.outputs[name]})
            elif decision.action == DEQUANTIZE:
                names[self.source_quant[name].name] = name
            else:
                names[name] = name
        return names

    def spec(self, name: str, role: str) -> TensorSpec | None:
        return next((s for s in self.outputs.get(name, []) if s.role == role), None)

    def output_dtype(self, name: str) -> str | None:
        action = self.decisions[name].action
        if action == DROP:
            return None
        if self.decisions[name].quantized:
            spec = self.spec(name, CODES)
            assert spec is not None
            return spec.dtype
        if action == DEQUANTIZE:
            return self.out_dtype or "BF16"
        return self.tensors[name].dtype


def _outputs_of(plan: ConversionPlan, info: TensorInfo) -> list[OutEntry]:
    decision = plan.decisions[info.name]
    if decision.action == DROP:
        return []
    if decision.quantized:
        return [OutEntry(spec.name, spec.dtype, spec.shape) for spec in plan.outputs[info.name]]
    if decision.action == DEQUANTIZE:
        qw = plan.source_quant[info.name]
        return [OutEntry(qw.name, plan.output_dtype(info.name), qw.shape)]
    return [OutEntry(info.name, plan.output_dtype(info.name), info.shape)]


def _preflight(plan: ConversionPlan, arch: Architecture, tp: int, engines: tuple[str, ...]) -> None:
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


def _kept_expert_warnings(plan: ConversionPlan, arch: Architecture) -> list[str]:
    """Expert-sized tensors the scheme asks for but the plan leaves in high precision: said out loud."""
    if plan.scheme is None:
        return []
    kept = [n for n, d in plan.decisions.items() if d.action == COPY and d.reason.startswith("fused experts")]
    if not kept:
        return []
    size = sum(plan.tensors[n].nbytes for n in kept)
    shipped = [n for n in kept if arch.openai_mxfp4_expert(n, plan.tensors[n].shape)]
    experts_layout = next((lay for lay in Layout.registry.values() if lay.fused_experts_only), None)
    hint = (f"; --format {experts_layout.microscale} --layout {experts_layout.name} quantizes them in the form "
            "gpt-oss ships (OpenAI MXFP4), which both engines load" if shipped and experts_layout else "")
    return [f"{len(kept)} expert tensors ({size / 1e9:.3g} GB, e.g. {printable(kept[0])}) stay in high precision "
            f"although the scheme asks for {plan.scheme.describe()}: {plan.decisions[kept[0]].reason}{hint}"]


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


def _quantized_source(view: CheckpointView) -> tuple[dict[str, QuantizedWeight], set[str]]:
    """The source's quantized weights (refusing any it cannot read) and the tensors that go with them."""
    view.refuse_unsupported()
    for name, qw in sorted(view.weights.items()):
        if qw.problem:
            raise InputError(f"{view.checkpoint.root}: quantized weight {printable(name)} {qw.problem}")
    if view.orphan_scales:
        raise InputError(f"{view.checkpoint.root}: scale {printable(view.orphan_scales[0])} belongs to no quantized weight")
    companions = {name for qw in view.weights.values() for name in qw.companions}
    return dict(view.weights), companions


def _decide_quantize(name: str, info: TensorInfo, source_quant: dict, companions: set[str], scheme: Scheme,
                     layout: Layout, ignore: Matcher, include: Matcher, arch: Architecture) -> Decision:
    if name in companions:
        return Decision(name, DROP, "scale or activation parameter of a quantized source weight (replaced)")
    qw = source_quant.get(name)
    if qw is None:
        return decide(info, ignore, include, arch)
    assert qw.scheme is not None
    pattern = ignore.first_match(name)
    if pattern is not None:
        return Decision(name, DEQUANTIZE, f"quantized in the source, matched --ignore {pattern}: dequantized to BF16")
    if can_carry(qw, scheme, layout):
        return Decision(name, CARRY, f"already {qw.scheme.describe()} in the source: codes and scales carried over unchanged")
    return Decision(name, REQUANTIZE, f"{qw.scheme.describe()} in the source: dequantized (float32) and re-quantized")


def _fused_experts_only(decisions: dict[str, Decision], tensors: dict[str, TensorInfo], source_quant: dict,
                        arch: Architecture, layout: Layout) -> dict[str, Decision]:
    """--layout openai-mxfp4: the family's fused experts quantized, every other tensor kept as in the source
    (engines load nothing else of this form quantized); refused where the form does not exist or an engine
    would misread it."""
    name_of = f"--layout {layout.name}"
    if arch.model_type not in OPENAI_MXFP4_EXPERTS:
        raise SchemeError(f"{name_of} is defined for fused experts of {', '.join(OPENAI_MXFP4_EXPERTS)} "
                          f"(model_type in config.json), not {arch.model_type or 'a checkpoint without model_type'}; "
                          "use --layout compressed-tensors")
    if source_quant:
        raise SchemeError(f"{name_of} quantizes high-precision checkpoints; SRC is quantized already "
                          f"({printable(next(iter(source_quant)))}): run `fp8conv dequantize` first")
    out, experts = {}, 0
    for name, decision in decisions.items():
        if arch.openai_mxfp4_expert(name, tensors[name].shape) and tensors[name].dtype in ("BF16", "F16", "F32"):
            if decision.reason.startswith("matched --ignore"):
                raise SchemeError(f"{name_of}: {decision.reason[8:]} keeps {printable(name)} in high precision, but "
                                  "vLLM reads every experts layer of an mxfp4 checkpoint as MXFP4; convert all of them")
            out[name] = Decision(name, QUANTIZE, "fused 3-D experts: OpenAI MXFP4, the transpose [E, out, in] with one "
                                                 "E8M0 scale per 32 inputs, as gpt-oss ships (transformers and vLLM load it)")
            experts += 1
        elif decision.quantized:
            out[name] = Decision(name, COPY, f"kept as in the source: {name_of} quantizes only the fused experts, as "
                                             "gpt-oss ships (both engines load every other module unquantized)")
        else:
            out[name] = decision
    if not experts:
        raise SchemeError(f"{name_of} quantizes fused 3-D experts ({' / '.join(OPENAI_MXFP4_EXPERTS['gpt_oss'])} "
                          "[E, in, out], high precision); SRC has none")
    return out


def _refuse_groups(plan: ConversionPlan) -> None:
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


def _refuse_microscale_shapes(plan: ConversionPlan, scheme: Scheme) -> None:
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


def _scheme_groups(schemes: dict[str, Scheme], default: Scheme, stored: list, source_quant: dict,
                   arch: Architecture) -> list[tuple[Scheme, list[str]]]:
    """--scheme overrides as (scheme, module names as vLLM and transformers name them), in pattern order:
    written as extra compressed-tensors config_groups that target those modules by exact name (an exact
    name wins over the default group's "Linear" target in both engines)."""
    def key(s: Scheme) -> tuple:
        return s.describe(), s.symmetric, s.activations

    groups: list[tuple[Scheme, list[str]]] = []
    for _, override in stored:
        if key(override) == key(default) or any(key(g) == key(override) for g, _ in groups):
            continue
        modules = sorted({loaded for name, s in schemes.items() if key(s) == key(override)
                          for loaded in arch.loader_names(module_name(source_quant[name].name if name in source_quant else name))})
        if modules:
            groups.append((override, modules))
    return groups


def _finish(checkpoint: Checkpoint, plan: ConversionPlan, max_shard_size: int | None) -> ConversionPlan:
    groups = []
    for shard in checkpoint.shards:
        for name in sorted(shard.tensors):
            groups.append((shard.path.name, _outputs_of(plan, shard.tensors[name])))
    plan.shards = _pack(groups, max_shard_size)
    _check_headers(plan.shards)
    plan.warnings = _kept_expert_warnings(plan, architecture_of(checkpoint))
    return plan


def _kept_expert_modules(decisions: dict[str, Decision], tensors: dict[str, TensorInfo], arch: Architecture) -> list[str]:
    """`*.experts` modules none of whose matrices is quantized: vLLM builds each as one fused MoE layer and
    picks its quantization method from the ignore list, so the layer itself must be listed."""
    quantized: dict[str, bool] = {}
    for name, decision in decisions.items():
        owner = arch.experts_module(name)
        if owner is not None and len(tensors[name].shape) >= 2 and decision.action != DROP:
            quantized[owner] = quantized.get(owner, False) or decision.quantized
    return [owner for owner, any_quantized in quantized.items() if not any_quantized]


def architecture_of(checkpoint: Checkpoint) -> Architecture:
    """The model family from config.json (an unreadable config is reported when it is rewritten)."""
    try:
        return Architecture.from_config(checkpoint.read_json(CONFIG_NAME))
    except InputError:
        return Architecture()


def _check_headers(shards: list[OutShard]) -> None:
    """Never write a file our own reader (and the safetensors format) would refuse."""
    for shard in shards:
        header, _ = build_header(shard.entries)
        if len(header) - 8 > HEADER_CAP:
            longest = max((len(e.name) for e in shard.entries), default=0)
            raise InputError(f"output shard {printable(shard.name)} would have a {len(header) - 8}-byte header, over the "
                             f"{HEADER_CAP}-byte safetensors limit (tensor names up to {longest} characters); "
                             "use --max-shard-size to spread the tensors over more shards, or shorter names")


def build_plan(
    checkpoint: Checkpoint,
    scheme: Scheme,
    layout: Layout,
    ignore: Matcher,
    include: Matcher,
    max_shard_size: int | None = None,
    tp: int = 1,
    engines: tuple[str, ...] = (),
    overrides: tuple[tuple[Matcher, Scheme], ...] = (),
) -> ConversionPlan:
    """Decide every tensor and every output byte range for `quantize`; raises before anything is written.

    `overrides` (--scheme PATTERN=SPEC): the first pattern matching a quantized tensor picks its scheme."""
    layout.check(scheme)
    arch = architecture_of(checkpoint)
    scheme = layout.stored_scheme(scheme, composite=arch.vision)
    if overrides and not layout.per_module_schemes:
        writers = " or ".join(n for n, lay in Layout.registry.items() if lay.per_module_schemes)
        raise SchemeError(f"--scheme needs --layout {writers} (several config_groups); "
                          f"--layout {layout.name} describes one scheme")
    if overrides and (scheme.microscale or any(o.microscale for _, o in overrides)):
        raise SchemeError("--scheme does not mix NVFP4 / MXFP4 / MXFP8 with other schemes yet (their config "
                          "groups carry global / e8m0 scales fp8conv does not write per group)")
    for _, override in overrides:
        layout.check(override)
    stored = [(matcher, layout.stored_scheme(override, composite=arch.vision)) for matcher, override in overrides]
    tensors = checkpoint.tensors
    view = open_view(checkpoint)
    source_quant, companions = _quantized_source(view)
    transposed = next((qw.name for qw in source_quant.values() if qw.transposed), None)
    if transposed is not None:
        raise SchemeError(f"{checkpoint.root}: {printable(transposed)} is OpenAI MXFP4 (quant_method mxfp4); quantize "
                          "does not re-quantize that form: run `fp8conv dequantize` first")

    def scheme_of(name: str) -> Scheme:
        """The first --scheme PATTERN matching the tensor, else the default scheme."""
        return next((s for matcher, s in stored if matcher.first_match(name)), scheme)

    decisions = {
        name: _decide_quantize(name, info, source_quant, companions, scheme_of(name), layout, ignore, include, arch)
        for name, info in tensors.items()
    }
    if layout.fused_experts_only:
        decisions = _fused_experts_only(decisions, tensors, source_quant, arch, layout)
    decisions = share_global_scales(decisions, source_quant, view, scheme_of)
    refuse_bad_sources(view, source_quant)  # carried, re-quantized and dequantized weights alike
    schemes, outputs = {}, {}
    for name, decision in decisions.items():
        if decision.quantized:
            qw = source_quant.get(name)
            logical, shape = (qw.name, qw.shape) if qw else (name, tensors[name].shape)
            schemes[name] = (carried_scheme(qw, scheme_of(name)) if decision.action == CARRY and qw is not None
                             else scheme_of(name).for_source(tensors[name].dtype))
            outputs[name] = layout.tensors(schemes[name], logical, shape)
    for weight, specs in outputs.items():
        for spec in specs:
            if spec.name in tensors and spec.name != weight and decisions[spec.name].action != DROP:
                raise InputError(f"tensor {printable(spec.name)} already exists in the source, so "
                                 f"{printable(weight)} looks quantized already")
    tensorless = {
        module: "tied to the input embedding (no tensor of its own); listed as ignored so loaders keep it "
                "in high precision instead of expecting a scale that does not exist"
        for module in arch.tied_heads(tensors)
    }
    kept = unquantized_linear_modules({n: d for n, d in decisions.items() if d.action != DROP}, tensors)
    kept_experts = _kept_expert_modules(decisions, tensors, arch)
    patterns = [arch.experts_ignore_pattern(o) for o in kept_experts] if layout.regex_ignore else []
    plan = ConversionPlan(
        scheme=scheme, layout=layout, tensors=tensors, decisions=decisions,
        source_shard={name: path.name for name, path in checkpoint.shard_of().items()},
        shards=[], outputs=outputs, schemes=schemes, source_quant=source_quant, warnings=[],
        unquantized_modules=sorted({n for m in (*kept, *kept_experts, *tensorless) for n in arch.loader_names(m)} | set(patterns)),
        tensorless_modules=tensorless,
        scheme_groups=_scheme_groups(schemes, scheme, stored, source_quant, arch),
    )
    _refuse_groups(plan)
    _refuse_microscale_shapes(plan, scheme)
    plan = _finish(checkpoint, plan, max_shard_size)
    names = list(tensors)
    for matcher in (ignore, include, *(m for m, _ in overrides)):
        plan.warnings += matcher.unmatched_warnings(names)
    if arch.vision and not any(d.reason.startswith("vision tower") for d in decisions.values()):
        plan.warnings.append("config.json describes a vision tower (vision_config) but no tensor has a known vision "
                             "prefix (visual., vision_tower., vision_model., multi_modal_projector., mm_projector.): "
                             "check the dry run, and --ignore the tower if it is quantized")
    _preflight(plan, arch, tp, engines)
    return plan


def build_dequantize_plan(checkpoint: Checkpoint, out_dtype: str, max_shard_size: int | None = None) -> ConversionPlan:
    """Every quantized weight back to `out_dtype` (w = q * scale in float32), scales dropped."""
    view = open_view(checkpoint)
    source_quant, companions = _quantized_source(view)
    refuse_bad_sources(view, source_quant)
    if not source_quant:
        raise InputError(f"{checkpoint.root}: holds no quantized weights (FP8/INT8 tensors with scales); nothing to dequantize")
    decisions = {}
    for name, info in checkpoint.tensors.items():
        if name in companions:
            decisions[name] = Decision(name, DROP, "scale or activation parameter (removed)")
        elif name in source_quant:
            qw = source_quant[name]
            assert qw.scheme is not None
            decisions[name] = Decision(name, DEQUANTIZE, f"{qw.scheme.describe()}: w = q * scale in float32, rounded to {out_dtype}")
        else:
            decisions[name] = Decision(name, COPY, "not quantized; copied byte-for-byte")
    plan = ConversionPlan(
        scheme=None, layout=None, tensors=checkpoint.tensors, decisions=decisions,
        source_shard={name: path.name for name, path in checkpoint.shard_of().items()},
        shards=[], outputs={}, schemes={}, source_quant=source_quant, warnings=[], unquantized_modules=[],
        out_dtype=out_dtype,
    )
    return _finish(checkpoint, plan, max_shard_size)

