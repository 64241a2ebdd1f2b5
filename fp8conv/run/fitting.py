"""The default tile fitted to the model: a default `quantize` never writes what `verify` then fails.

The block (128x128) and the INT4 group (128) are defaults, not promises: where a model's shapes do
not fit them for the engines that bind (fp8conv.engines.DEFAULT_ENGINES unless --engine is given),
the run takes the first of these that fits every weight, in this order, and says so in one line:

    block 128x128 -> 64x64 -> 32x32 -> channel scales
    group 128     -> 64    -> 32    -> channel scales

A tile the user gave (--block-size, --group-size, --granularity channel...) is never changed: a plan
the engines cannot load is refused before any byte is written, naming the flag that fixes it.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..errors import TileError
from ..io.checkpoint import Checkpoint
from ..plan.records import ConversionPlan
from ..plan.recipe import Recipe
from ..plan.scheme import Scheme
from . import pipeline

SMALLER_TILES = (64, 32)


def candidates(scheme: Scheme) -> list[tuple[Scheme, str]]:
    """The schemes tried after `scheme`, in order, each with the flag that asks for it."""
    if scheme.microscale:
        return []
    if scheme.granularity == "block":
        tiles = [(replace(scheme, block_size=(t, t)), f"--block-size {t}") for t in SMALLER_TILES
                 if t < min(scheme.block_size)]
    elif scheme.granularity == "group":
        tiles = [(replace(scheme, group_size=t), f"--group-size {t}") for t in SMALLER_TILES if t < scheme.group_size]
    else:
        return []
    return tiles + [(replace(scheme, granularity="channel"), "--granularity channel")]


def _attempt(source: Path, recipe: Recipe):
    """(checkpoint, plan, None) when the plan is accepted, else (checkpoint or None, plan or None, reason)."""
    try:
        checkpoint, plan = pipeline.plan_recipe(source, recipe)
    except TileError as exc:
        return None, None, str(exc)
    shapes = [f for f in plan.findings if f["refused"] and f["shape"]]
    return checkpoint, plan, f"{shapes[0]['engine']}: {shapes[0]['rule']}" if shapes else None


def plan_fitted(source: Path, recipe: Recipe, tile_is_default: bool) -> tuple[Recipe, Checkpoint, ConversionPlan]:
    """Plan `recipe`; where the engines refuse it, plan the first
    smaller tile that they accept: as the run's own recipe when the tile was a default (with a one-line
    warning), else only to name the flag in the refusal. Raises SchemeError / TileError like the planner."""
    checkpoint, plan, reason = _attempt(source, recipe)
    if reason is None:
        return recipe, checkpoint, plan
    tried = [recipe.scheme.describe()]
    for scheme, flag in candidates(recipe.scheme):
        note = (f"the default {recipe.scheme.describe()} does not fit this model ({reason.split('. ')[0]}); "
                f"using {scheme.describe()}, which every weight fits (as {flag} would; give --block-size / "
                "--group-size / --granularity to choose)")
        fitted = replace(recipe, scheme=scheme, note=note if tile_is_default else "")
        fit_checkpoint, fit_plan, fit_reason = _attempt(source, fitted)
        if fit_reason is not None:
            tried.append(scheme.describe())
            continue
        if tile_is_default:
            return fitted, fit_checkpoint, fit_plan  # the note is the plan's first warning
        return recipe, *_with_fix(checkpoint, plan, reason, f"{flag} fits every weight")
    hint = f"none of {', '.join(tried)} fits either; --ignore the tensors named, or see --dry-run"
    return recipe, *_with_fix(checkpoint, plan, reason, hint)


def _with_fix(checkpoint: Checkpoint | None, plan: ConversionPlan | None, reason: str, fix: str
              ) -> tuple[Checkpoint, ConversionPlan]:
    if plan is None or checkpoint is None:
        raise TileError(reason)  # the planner's own message names the sizes that fit
    first = next((i for i, line in enumerate(plan.refusals) if line.startswith(reason)), 0)
    plan.refusals[first] = f"{plan.refusals[first]}; {fix}"
    return checkpoint, plan
