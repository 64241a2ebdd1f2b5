"""The whole conversion decided before the first byte is written: decisions, output shards, warnings."""
from __future__ import annotations

from .architecture import OPENAI_MXFP4_EXPERTS, Architecture
from ..io.checkpoint import CONFIG_NAME, Checkpoint
from ..errors import InputError, SchemeError
from ..layouts import Layout, unquantized_linear_modules
from .decisions import CARRY, COPY, DEQUANTIZE, DROP, QUANTIZE, REQUANTIZE, Decision, Matcher, decide, module_name
from ..layouts.read import CheckpointView, QuantizedWeight, open_view
from .carry import can_carry, carried_scheme, share_global_scales
from ..layouts.source_checks import refuse_bad_sources
from ..io.safetensors import OutEntry, TensorInfo
from ..io.untrusted import printable
from .scheme import Scheme
from .records import ConversionPlan, OutShard
from .checks import check_headers, engine_preflight, refuse_groups, refuse_microscale_shapes


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
    check_headers(plan.shards)
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


def _stored_overrides(layout: Layout, scheme: Scheme, overrides: tuple[tuple[Matcher, Scheme], ...],
                      arch: Architecture) -> list[tuple[Matcher, Scheme]]:
    """The --scheme PATTERN=SPEC overrides as the layout stores them; raises where the layout cannot write them."""
    if overrides and not layout.per_module_schemes:
        writers = " or ".join(n for n, lay in Layout.registry.items() if lay.per_module_schemes)
        raise SchemeError(f"--scheme needs --layout {writers} (several config_groups); "
                          f"--layout {layout.name} describes one scheme")
    if overrides and (scheme.microscale or any(o.microscale for _, o in overrides)):
        raise SchemeError("--scheme does not mix NVFP4 / MXFP4 / MXFP8 with other schemes yet (their config "
                          "groups carry global / e8m0 scales fp8conv does not write per group)")
    for _, override in overrides:
        layout.check(override)
    return [(matcher, layout.stored_scheme(override, composite=arch.vision)) for matcher, override in overrides]


def _output_specs(decisions: dict[str, Decision], tensors: dict[str, TensorInfo], source_quant: dict,
                  layout: Layout, scheme_of) -> tuple[dict[str, Scheme], dict]:
    """Each quantized weight's scheme and the tensors the layout writes for it; raises where one of those
    names is already a (kept) source tensor."""
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
    return schemes, outputs


def _unquantized_modules(decisions: dict[str, Decision], tensors: dict[str, TensorInfo], arch: Architecture,
                         layout: Layout) -> tuple[list[str], dict[str, str]]:
    """The modules loaders must keep in high precision (loader names and, where the layout takes them, ignore
    patterns), and the tied heads among them with the reason."""
    tensorless = {
        module: "tied to the input embedding (no tensor of its own); listed as ignored so loaders keep it "
                "in high precision instead of expecting a scale that does not exist"
        for module in arch.tied_heads(tensors)
    }
    kept = unquantized_linear_modules({n: d for n, d in decisions.items() if d.action != DROP}, tensors)
    kept_experts = _kept_expert_modules(decisions, tensors, arch)
    patterns = [arch.experts_ignore_pattern(o) for o in kept_experts] if layout.regex_ignore else []
    modules = sorted({n for m in (*kept, *kept_experts, *tensorless) for n in arch.loader_names(m)} | set(patterns))
    return modules, tensorless


def _plan_warnings(plan: ConversionPlan, arch: Architecture, matchers: tuple[Matcher, ...]) -> None:
    """Patterns that matched nothing, and a vision config without a known vision tensor."""
    names = list(plan.tensors)
    for matcher in matchers:
        plan.warnings += matcher.unmatched_warnings(names)
    if arch.vision and not any(d.reason.startswith("vision tower") for d in plan.decisions.values()):
        plan.warnings.append("config.json describes a vision tower (vision_config) but no tensor has a known vision "
                             "prefix (visual., vision_tower., vision_model., multi_modal_projector., mm_projector.): "
                             "check the dry run, and --ignore the tower if it is quantized")


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
    stored = _stored_overrides(layout, scheme, overrides, arch)
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
    schemes, outputs = _output_specs(decisions, tensors, source_quant, layout, scheme_of)
    unquantized, tensorless = _unquantized_modules(decisions, tensors, arch, layout)
    plan = ConversionPlan(
        scheme=scheme, layout=layout, tensors=tensors, decisions=decisions,
        source_shard={name: path.name for name, path in checkpoint.shard_of().items()},
        shards=[], outputs=outputs, schemes=schemes, source_quant=source_quant, warnings=[],
        unquantized_modules=unquantized, tensorless_modules=tensorless,
        scheme_groups=_scheme_groups(schemes, scheme, stored, source_quant, arch),
    )
    refuse_groups(plan)
    refuse_microscale_shapes(plan, scheme)
    plan = _finish(checkpoint, plan, max_shard_size)
    _plan_warnings(plan, arch, (ignore, include, *(m for m, _ in overrides)))
    engine_preflight(plan, arch, tp, engines)
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

