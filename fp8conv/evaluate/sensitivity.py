"""Layer sensitivity, torch-free: the module groups of a quantization plan, their exact bytes under the base and
the promoted scheme, the --scheme override list that fits a bits-per-weight budget, results, rendering, the file.

A group is what one `--scheme` override may change on its own: a fused set an engine loads as one matrix
(q/k/v, gate/up: plan.fusion) or one other quantized weight. Bits per weight are counted as the report counts
them (report.manifest.quantized_footprint: 8 x bytes of every tensor the layout writes for a quantized weight
-- codes, scales, zero points, global scales, weight_shape -- over its elements), from two plans of SRC: the
base scheme everywhere, and the promoted scheme everywhere. A weight's bytes depend on its own scheme only,
so a mix costs the sum; `check_overrides` plans the suggested mix itself and compares.
The measuring (torch) is evaluate.probe's.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..errors import InputError, SchemeError
from ..io.untrusted import load_json_file
from ..layouts import DEFAULT_LAYOUT
from ..plan.engines import DEFAULT_ENGINES
from ..plan.fusion import fused_sets
from ..plan.recipe import Recipe
from ..plan.scheme import Scheme, mse_refusal, parse_override, parse_spec
from ..report.findings import natural_key
from ..report.manifest import quantized_footprint

SENSITIVITY_NAME = "fp8conv.sensitivity.json"
SENSITIVITY_SCHEMA = 1
DEFAULT_PROMOTE = "int8:channel:asym"  # weight-only (W8A16): the probe and an engine run the same weights
DEFAULT_TOKENS = 512
DEFAULT_WINDOW = 512


@dataclass
class Group:
    """One module group: its tensors, elements and output bytes under the base and the promoted scheme."""

    label: str
    tensors: tuple[str, ...]
    elements: int
    base_bytes: int
    promoted_bytes: int
    kl: float | None = None      # mean KL(source || only this group quantized), nats per token
    top1: float | None = None

    @property
    def pattern(self) -> str:
        """The --scheme PATTERN (--ignore syntax) that matches exactly this group's modules."""
        modules = [_module(t) for t in self.tensors]
        if len(modules) == 1:
            return "re:" + re.escape(modules[0])
        prefix = modules[0].rsplit(".", 1)[0]
        return "re:" + re.escape(prefix) + r"\.(" + "|".join(re.escape(m.rsplit(".", 1)[1]) for m in modules) + ")"

    @property
    def extra_bytes(self) -> int:
        return self.promoted_bytes - self.base_bytes


def _module(tensor: str) -> str:
    return tensor[: -len(".weight")] if tensor.endswith(".weight") else tensor


def _label(tensors: tuple[str, ...]) -> str:
    modules = [_module(t) for t in tensors]
    if len(modules) == 1:
        return modules[0]
    prefix = modules[0].rsplit(".", 1)[0]
    return prefix + ".{" + ",".join(m.rsplit(".", 1)[1] for m in modules) + "}"


def groups_of(names: list[str]) -> list[tuple[str, ...]]:
    """Quantized tensor names -> groups (fused sets, then every other weight alone), in natural name order."""
    sets = fused_sets(names)
    fused = {n for s in sets for n in s}
    groups = sets + [(n,) for n in names if n not in fused]
    return sorted(groups, key=lambda g: natural_key(g[0]))


@dataclass
class Candidates:
    """What the probe measures and the budget chooses from (two plans of SRC, headers only)."""

    scheme: Scheme                       # the base scheme as the run would use it (default tile fitted)
    promote: str | None                  # SPEC of the promoted scheme, or None (ranking only)
    groups: list[Group]
    schemes: dict[str, Scheme]           # tensor -> base scheme (scale format resolved)
    promoted_schemes: dict[str, Scheme] = field(default_factory=dict)
    note: str = ""                       # the fitted-tile warning, if any

    @property
    def elements(self) -> int:
        return sum(g.elements for g in self.groups)

    def bits(self, promoted: set[str]) -> float:
        """Bits per quantized weight with the groups labelled in `promoted` at the promoted scheme."""
        total = sum(g.promoted_bytes if g.label in promoted else g.base_bytes for g in self.groups)
        return 8 * total / self.elements


def plan_candidates(src: Path, scheme: Scheme, promote: str | None, tile_is_default: bool = True) -> tuple[object, object, Candidates]:
    """Plan SRC with `scheme` (the default tile fitted as quantize fits it) and, with `promote`, with the promoted
    scheme on every quantized weight; returns (checkpoint, base plan, candidates). Raises SchemeError for a
    scheme or a promotion quantize would refuse, InputError for a source that is not a high-precision model."""
    from ..run.fitting import plan_fitted
    from ..run.planning import plan_recipe

    recipe, checkpoint, plan = plan_fitted(src, Recipe(scheme=scheme, layout=DEFAULT_LAYOUT, engines=DEFAULT_ENGINES), tile_is_default)
    if plan.refusals:
        raise SchemeError(f"quantize would refuse this scheme for {src}: {plan.refusals[0]}")
    if plan.source_quant:
        raise InputError(f"{src}: is already quantized; sensitivity compares a high-precision source with its quantization")
    names = [n for n, d in plan.decisions.items() if d.quantized]
    if not names:
        raise InputError(f"{src}: no weight that quantize would quantize")
    base = _tensor_bytes(plan, names)
    promoted, promoted_schemes = dict(base), {}
    if promote is not None:
        override = _promoted_scheme(promote, recipe.scheme)
        _, wide = plan_recipe(src, replace(recipe, schemes=(("re:.*", override),)))
        if wide.refusals:
            raise SchemeError(f"--promote {promote}: quantize would refuse it for {src}: {wide.refusals[0]}")
        promoted, promoted_schemes = _tensor_bytes(wide, names), {n: wide.schemes[n] for n in names}
    groups = [Group(_label(g), g, sum(plan.tensors[n].numel for n in g), sum(base[n] for n in g),
                    sum(promoted[n] for n in g)) for g in groups_of(names)]
    candidates = Candidates(recipe.scheme, promote, groups, {n: plan.schemes[n] for n in names}, promoted_schemes,
                            recipe.note)
    if promote is not None and candidates.bits({g.label for g in groups}) <= candidates.bits(set()):
        raise SchemeError(f"--promote {promote} costs no more bits per weight than {recipe.scheme.describe()} "
                          f"({candidates.bits(set()):.4f}): promote to a wider scheme")
    return checkpoint, plan, candidates


def _promoted_scheme(spec: str, base: Scheme) -> Scheme:
    if base.microscale:
        raise SchemeError("quantize's --scheme does not mix NVFP4 / MXFP4 / MXFP8 with other schemes yet: rank "
                          f"{base.microscale} without --budget, or rank a base scheme that is not microscaled")
    scheme = replace(parse_spec(spec), observer=base.observer)  # quantize's --observer applies to overrides too
    if mse_refusal(scheme):
        raise SchemeError(mse_refusal(scheme))
    if scheme.microscale:
        raise SchemeError("quantize's --scheme does not mix NVFP4 / MXFP4 / MXFP8 with other schemes yet: rank "
                          "without --budget, or rank a base scheme that is not microscaled")
    return scheme


def _tensor_bytes(plan, names: list[str]) -> dict[str, int]:
    """Output bytes of every tensor the layout writes for each quantized weight (the report's count)."""
    sizes = {entry.name: entry.nbytes for shard in plan.shards for entry in shard.entries}
    return {n: sum(sizes[spec.name] for spec in plan.outputs[n]) for n in names}


# ---- the budget -----------------------------------------------------------------------------------


def check_budget(candidates: Candidates, budget: float | None) -> None:
    """Refuse a budget the base scheme alone exceeds (raised before any model is loaded)."""
    base = candidates.bits(set())
    if budget is not None and budget < base:
        raise SchemeError(f"--budget {budget} is below the {base:.4f} bits per weight of {candidates.scheme.describe()} "
                          "itself (scales included): give at least that")


def choose(candidates: Candidates, budget: float) -> list[Group]:
    """Groups to promote within `budget` bits per weight: measured groups by KL per extra byte, largest first
    (the greedy answer to the knapsack: keep the most KL out of the model per bit spent), each taken when it
    still fits. Ties (equal KL per byte) go to the earlier group in name order, so the choice is deterministic."""
    allowed = math.floor(budget * candidates.elements / 8 + 1e-9)  # bytes the budget allows, as the report counts
    spent = sum(g.base_bytes for g in candidates.groups)
    order = sorted((g for g in candidates.groups if (g.kl is None or g.kl > 0) and g.extra_bytes > 0),
                   key=lambda g: -_severity(g) / g.extra_bytes)
    chosen = []
    for group in order:
        if spent + group.extra_bytes <= allowed:
            spent += group.extra_bytes
            chosen.append(group)
    return sorted(chosen, key=lambda g: natural_key(g.tensors[0]))


def _severity(group: Group) -> float:
    """A group's KL; one whose quantization alone gives NaN/Inf logits (KL None) counts as infinitely sensitive."""
    return math.inf if group.kl is None else group.kl


def total(values) -> float | None:
    """The sum of measured KLs, None when one is NaN/Inf (JSON holds no infinity)."""
    values = list(values)
    return None if any(v is None for v in values) else sum(values)


def overrides(groups: list[Group], promote: str) -> list[str]:
    """The --scheme PATTERN=SPEC values that promote exactly these groups."""
    return [f"{g.pattern}={promote}" for g in groups]


def check_overrides(src: Path, candidates: Candidates, chosen: list[Group]) -> float:
    """Plan SRC with the suggested overrides as quantize parses them; the bits per weight of that plan (the
    report's number). Raises (an internal error: the suggestion is wrong) where it is not what was chosen."""
    from ..run.planning import plan_recipe

    parsed = tuple(parse_override(text) for text in overrides(chosen, candidates.promote or ""))
    recipe = Recipe(scheme=candidates.scheme, layout=DEFAULT_LAYOUT, schemes=parsed, engines=DEFAULT_ENGINES)
    _, plan = plan_recipe(src, recipe)
    promoted = {n for g in chosen for n in g.tensors}
    for name, scheme in plan.schemes.items():
        want = candidates.promoted_schemes[name] if name in promoted else candidates.schemes[name]
        if scheme != want:
            raise ValueError(f"internal: the suggested overrides give {name} {scheme.describe()}, not {want.describe()}")
    if plan.refusals:
        raise ValueError(f"internal: quantize would refuse the suggested overrides: {plan.refusals[0]}")
    elements, stored = quantized_footprint(plan)
    return 8 * stored / elements


# ---- the result ------------------------------------------------------------------------------------


UNHELPFUL = ("on this text the suggestion's probe KL is not below the uniform scheme's: the groups' effects do not "
             "add up on this model, so the ranking does not pick the mix; check any mix with `fp8conv eval` first")


def result_json(src: Path, candidates: Candidates, measured: dict, budget: float | None, chosen: list[Group] | None,
                checked_bits: float | None) -> dict:
    """Everything `fp8conv sensitivity` reports (written as OUT/fp8conv.sensitivity.json with --record)."""
    ranked = sorted(candidates.groups, key=lambda g: (-_severity(g), natural_key(g.tensors[0])))
    data = {
        "schema_version": SENSITIVITY_SCHEMA, "tool": "fp8conv", "source": str(src),
        "scheme": candidates.scheme.describe(), "scheme_json": candidates.scheme.to_json(), "note": candidates.note,
        "promote": candidates.promote, **measured,
        "bits_per_weight_base": candidates.bits(set()),
        "bits_per_weight_promoted": candidates.bits({g.label for g in candidates.groups}) if candidates.promote else None,
        "groups": [{"rank": i + 1, "group": g.label, "tensors": list(g.tensors), "elements": g.elements,
                    "kl": g.kl, "top1": g.top1, "base_bytes": g.base_bytes, "promoted_bytes": g.promoted_bytes,
                    "pattern": g.pattern} for i, g in enumerate(ranked)],
        "budget": budget, "suggestion": None,
    }
    if chosen is not None:
        data["suggestion"] = {
            "groups": [g.label for g in chosen], "overrides": overrides(chosen, candidates.promote or ""),
            "bits_per_weight": candidates.bits({g.label for g in chosen}), "bits_per_weight_planned": checked_bits,
            "kl_sum_of_groups": total(g.kl for g in chosen),
        }
    return data


def read_sensitivity(out: Path) -> dict | None:
    """OUT's fp8conv.sensitivity.json, or None when none was recorded; InputError when it is not ours."""
    path = Path(out) / SENSITIVITY_NAME
    if not path.exists():
        return None
    data = load_json_file(path, "is not readable JSON")
    if not isinstance(data, dict) or data.get("schema_version") != SENSITIVITY_SCHEMA or "groups" not in data:
        raise InputError(f"{path} is not a sensitivity result written by this version of fp8conv")
    return data


def summary_text(data: dict, top: int = 20) -> str:
    """The result as a terminal shows it: the ranking (Markdown table), the probe's totals, the suggestion."""
    lines = [f"sensitivity: {data['source']} under {data['scheme']} ({data['tokens']} tokens of {data['text']}; "
             f"KL(source || one group quantized), nats/token)", "",
             "| rank | group | params | KL | top-1 |", "| ---: | --- | ---: | ---: | ---: |"]
    for row in data["groups"][:top]:
        lines.append(f"| {row['rank']} | {row['group']} | {row['elements']:,} | {_num(row['kl'], 6)} | "
                     f"{_num(row['top1'], 4)} |")
    if len(data["groups"]) > top:
        lines.append(f"({len(data['groups']) - top} more groups: --json lists all)")
    lines += ["", f"all groups quantized: KL {_num(data['kl_all'], 5)} (sum over groups {_num(data['kl_sum'], 5)}); "
              f"{data['bits_per_weight_base']:.4f} bits per weight"]
    suggestion = data.get("suggestion")
    if suggestion is not None:
        lines.append(f"budget {data['budget']}: promote {len(suggestion['groups'])} group(s) to {data['promote']}: "
                     f"{suggestion['bits_per_weight']:.4f} bits per weight, probe KL "
                     f"{_num(suggestion.get('kl_mix'), 5)} (uniform: {_num(data['kl_all'], 5)})")
        lines += [f"  --scheme '{o}'" for o in suggestion["overrides"]]
        if not suggestion.get("lowers_kl", True):
            lines.append(f"warning: {UNHELPFUL}")
    return "\n".join(lines)


def _num(x: float | None, digits: int) -> str:
    return "-" if x is None else f"{x:.{digits}f}"
