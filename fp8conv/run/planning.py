"""Planning a run: open SRC, refuse what cannot be written, and build the plan for a recipe (headers only)."""
from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from ..io.checkpoint import Checkpoint, open_checkpoint
from ..io.outdir import JOURNAL_NAME
from ..io.sidefiles import not_carried_warning
from ..io.untrusted import printable
from ..layouts import get_layout
from ..plan.conversion import build_dequantize_plan, build_plan
from ..plan.decisions import Matcher
from ..plan.recipe import DEQUANTIZE as DEQUANTIZE_COMMAND
from ..plan.recipe import Recipe
from ..plan.records import ConversionPlan
from .options import QuantizeOptions


def recipe_of(options: QuantizeOptions) -> Recipe:
    return Recipe(scheme=options.scheme, layout=options.layout, ignore=tuple(options.ignore),
                  include=tuple(options.include), allow_nonfinite=options.run.allow_nonfinite,
                  max_shard_size=options.max_shard_size, tp=options.tp, engines=tuple(options.engines),
                  schemes=tuple(options.schemes))


def plan_recipe(source: Path, recipe: Recipe) -> tuple[Checkpoint, ConversionPlan]:
    """Open SRC and decide every tensor and output byte range for the recipe (reads headers only)."""
    checkpoint = open_checkpoint(source)
    _refuse_reserved(checkpoint)
    if recipe.command == DEQUANTIZE_COMMAND:
        plan = build_dequantize_plan(checkpoint, recipe.out_dtype, recipe.max_shard_size)
        plan.warnings += _skipped_warnings(checkpoint)
        return checkpoint, plan
    plan = build_plan(checkpoint, recipe.scheme, get_layout(recipe.layout), Matcher(recipe.ignore, "--ignore"),
                      Matcher(recipe.include, "--include"), recipe.max_shard_size, recipe.tp, recipe.engines,
                      tuple((Matcher((pattern,), "--scheme"), scheme) for pattern, scheme in recipe.schemes))
    if recipe.note:
        plan.warnings.insert(0, recipe.note)
    if not plan.layout.engine_loadable:
        plan.warnings.append(f"--layout {recipe.layout} is fp8conv's own layout: no inference engine loads it")
    plan.warnings += _skipped_warnings(checkpoint)
    return checkpoint, plan


def _refuse_reserved(checkpoint: Checkpoint) -> None:
    """A side file named like our journal would be silently dropped from the output."""
    for path in checkpoint.extra_files:
        if path.name == JOURNAL_NAME:
            raise InputError(f"{printable(str(path))}: a source file named like fp8conv's own journal would be lost; "
                             "rename or remove it (is SRC an interrupted run's staging folder?)")


def _skipped_warnings(checkpoint: Checkpoint) -> list[str]:
    return not_carried_warning(checkpoint.root, checkpoint.skipped)


def make_plan(source: Path, options: QuantizeOptions) -> tuple[Checkpoint, ConversionPlan]:
    return plan_recipe(source, recipe_of(options))


def make_dequantize_plan(source: Path, out_dtype: str, max_shard_size: int | None = None) -> tuple[Checkpoint, ConversionPlan]:
    return plan_recipe(source, Recipe(DEQUANTIZE_COMMAND, out_dtype=out_dtype, max_shard_size=max_shard_size))
