"""The converting commands: quantize, dequantize and merge (the shared tail: plan, dry run, one part, a Ray run
or the whole run, then the report)."""
from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import click

from ..plan.engines import DEFAULT_ENGINES, ENGINES
from ..errors import EXIT_USAGE
from ..formats import HIGH_PRECISION
from ..layouts import DEFAULT_LAYOUT, layout_names
from ..plan.scheme import Scheme, default_granularity, parse_override
from .console import EXIT_CODES_HELP, RegistryChoice, emit, handle_errors, parse_size, progress_bar, say
from .options import SKIP_HELP, build_scheme, offered, run_options, scheme_options


@click.command(epilog=EXIT_CODES_HELP)
@click.argument("src", type=click.Path(path_type=Path, readable=False))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path, readable=False), help="Output folder (written atomically).")
@scheme_options
@click.option("--layout", type=RegistryChoice(layout_names), default=DEFAULT_LAYOUT, show_default=True,
              help="compressed-tensors (<m>.weight_scale; vLLM, transformers), fp8-native (<m>.weight_scale_inv; "
                   "DeepSeek-V3 / transformers fine-grained FP8), fp8conv (our own, for combinations no engine defines), "
                   "openai-mxfp4 (with --format mxfp4: gpt-oss fused experts as <x>_blocks/<x>_scales, as gpt-oss ships).")
@click.option("--ignore", multiple=True, metavar="PATTERN",
              help="Keep matching tensors in high precision. A glob must match the whole tensor name or its module "
                   "name (name without .weight); 're:REGEX' must match the whole name too. Repeatable.")
@click.option("--include", multiple=True, metavar="PATTERN",
              help=f"Quantize tensors skipped by default that match (same syntax). Skipped by default: {SKIP_HELP}.")
@click.option("--allow-nonfinite", is_flag=True, help="Quantize tensors holding NaN/Inf: NaN -> 0, Inf -> +-qmax.")
@click.option("--scheme", "overrides", multiple=True, metavar="PATTERN=SPEC",
              help="Quantize tensors matching PATTERN (--ignore syntax) with SPEC = FORMAT[:GRANULARITY[:SIZE]][:asym] "
                   "instead of the default scheme, e.g. 're:.*down_proj=int8:channel', '*.mlp.*=int4:group:32'. "
                   "Repeatable, first match wins; compressed-tensors only (one config group per scheme).")
@click.option("--tp", type=click.IntRange(1, 1024), default=1, show_default=True,
              help="Tensor-parallel size the output must split over (vLLM partition and block divisibility).")
@click.option("--engine", "engines", multiple=True, type=click.Choice(list(ENGINES)),
              help="Refuse (exit 2, nothing written) what this engine could not load; the others only warn. Repeatable. "
                   f"[default: {' '.join(DEFAULT_ENGINES)}, as verify] A default block / group that the engines cannot "
                   "load is made smaller (64, 32, then channel scales) and the run says so.")
@click.option("--no-card", is_flag=True, help="Do not write the model card OUT/README.md (SRC's README.md is copied as is).")
@run_options
@handle_errors
def quantize(src, out, fmt, granularity, block_size, group_size, activations, asymmetric, observer, layout, ignore,
             include, allow_nonfinite, overrides, tp, engines, no_card, workers, max_shard_size, overwrite, resume, dry_run,
             as_json, quiet, partition, ray_address, parts) -> None:
    """Quantize the checkpoint SRC (a .safetensors file, a folder, or a Hugging Face hub id org/name) into OUT.

    \b
    SRC may itself be quantized (compressed-tensors, fine-grained FP8, fp8conv): its weights are
    dequantized in float32 and re-quantized, or carried over unchanged when the scheme is the same.
    """
    from ..io.hub import resolve
    from ..plan.recipe import Recipe

    _refuse_conflicts(default_granularity(fmt, granularity), overwrite, resume)
    given, src = str(src), resolve(src)
    hub_id = given if Path(given) != src else None  # the card names a hub id as the model's base
    ctx = click.get_current_context()
    tile_is_default = all(ctx.get_parameter_source(p) in (None, click.core.ParameterSource.DEFAULT)
                          for p in ("block_size", "group_size"))
    recipe = Recipe(scheme=build_scheme(fmt, granularity, block_size, group_size, activations, asymmetric, observer),
                    layout=layout, ignore=ignore, include=include, allow_nonfinite=allow_nonfinite,
                    max_shard_size=parse_size(max_shard_size), tp=tp, engines=tuple(engines) or DEFAULT_ENGINES,
                    schemes=tuple(_with_observer(parse_override(text), observer) for text in overrides))
    if _run(recipe, src, out, workers, overwrite, resume, dry_run, as_json, quiet, partition, ray_address, parts,
            tile_is_default):
        from ..report import card

        if no_card:
            card.keep_source_card(out, src)
        else:
            card.write_card(out, src, _command_line(), base_model=hub_id)


def _command_line() -> str:
    """The command as typed (argv, shell-quoted), for the model card."""
    import shlex

    return " ".join(["fp8conv", *(shlex.quote(a) for a in click.get_current_context().meta["fp8conv.argv"])])


def _with_observer(override: tuple[str, Scheme], observer: str) -> tuple[str, Scheme]:
    """--observer applies to --scheme overrides too (their SPEC has no observer field)."""
    from dataclasses import replace

    pattern, scheme = override
    return pattern, offered(replace(scheme, observer=observer))


def _refuse_conflicts(granularity: str | None, overwrite: bool, resume: bool) -> None:
    """Options that would be silently ignored or that contradict each other are usage errors."""
    ctx = click.get_current_context()

    def given(name: str) -> bool:
        return ctx.get_parameter_source(name) not in (None, click.core.ParameterSource.DEFAULT)

    if granularity is not None and given("group_size") and granularity != "group":
        raise click.UsageError(f"--group-size applies to --granularity group, not {granularity}; drop it or use group")
    if granularity is not None and given("block_size") and granularity != "block":
        raise click.UsageError(f"--block-size applies to --granularity block, not {granularity}; drop it or use block")
    if overwrite and resume:
        raise click.UsageError("--resume keeps an interrupted run's shards and --overwrite discards them: pass one")
    if given("partition") and given("ray_address"):
        raise click.UsageError("--ray runs every partition itself: drop --partition (or --ray to run one part here)")
    if given("parts") and not given("ray_address"):
        raise click.UsageError("--parts applies to --ray; for one part of a manual split use --partition I/N")


def _check_output(src: Path, out: Path, overwrite: bool, resume: bool) -> None:
    """Everything about OUT that can be refused is refused before a byte of SRC is read."""
    from ..io.outdir import Staging

    Staging(out, src, overwrite, resume, "").check()


def _dry_run(checkpoint, plan, src: Path, out: Path, run, as_json: bool) -> None:
    """--dry-run: OUT checked, the plan printed (text or JSON), its refusals said; exits 2 where there are any."""
    from ..io.outdir import Staging
    from ..report import text as render
    from ..report.manifest import scheme_summary

    Staging(out, src, run.overwrite, run.resume, "", checkpoint.files).check()
    emit(json.dumps({"decisions": {n: d.__dict__ for n, d in plan.decisions.items()},
                     "modules_without_tensors": plan.tensorless_modules, "warnings": plan.warnings,
                     "refusals": plan.refusals, "findings": plan.findings,
                     "schemes": scheme_summary(plan)}, indent=2) if as_json
         else render.dry_run_plan(plan))
    for refusal in plan.refusals:
        say(f"fp8conv: error: {refusal}")
    if plan.refusals:
        sys.exit(EXIT_USAGE)


def _run(recipe, src: Path, out: Path, workers: int, overwrite: bool, resume: bool, dry_run: bool, as_json: bool,
         quiet: bool, partition: str | None, ray_address: str | None, parts: int | None,
         tile_is_default: bool = False) -> bool:
    """Shared tail of quantize and dequantize: plan, warnings, then a dry run, one part, a Ray run or
    the whole run, and the report. True when OUT is complete."""
    from ..accel import native
    from ..run import pipeline
    from ..report import text as render

    verb = recipe.command
    part = _parse_partition(partition)
    if ray_address is not None and workers is None:
        workers = 1  # per Ray task; Ray spreads the tasks over the cluster's CPUs
    # A part or a Ray run leaves OUT's own staging alone (parts live beside it): as --resume there.
    _check_output(src, out, overwrite, resume or part is not None or ray_address is not None)
    if verb == "quantize":
        from ..run.fitting import plan_fitted

        recipe, checkpoint, plan = plan_fitted(src, recipe, tile_is_default)
    else:
        checkpoint, plan = pipeline.plan_recipe(src, recipe)
    fallback = native.fallback_warning()
    if fallback and verb == "quantize":
        say(f"fp8conv: {fallback}")
    for warning in plan.warnings:
        say(f"fp8conv: warning: {warning}")
    if workers is None:
        workers = pipeline.default_workers(len(pipeline.shards_to_write(plan, part)),
                                           hash_bound=verb == "quantize" and pipeline.hash_bound(plan))
    run = pipeline.RunOptions(workers, overwrite, resume, recipe.allow_nonfinite)
    if dry_run:
        _dry_run(checkpoint, plan, src, out, run, as_json)
        return False
    if ray_address is not None:
        from ..run.distributed import run_on_ray

        pipeline.refuse_flagged(plan)
        result = run_on_ray(src, out, recipe, parts or len(plan.shards), run, ray_address or None,
                            on_part=lambda label: quiet or say(f"fp8conv: part {label} done"))
    else:
        with progress_bar(sum(i.nbytes for i in plan.tensors.values()), quiet, verb) as bar:
            result = pipeline.run_plan(checkpoint, plan, src, out, run, bar.update, part, recipe)
    for note in result.notes:
        say(f"fp8conv: warning: {note}")
    if result.part is not None:
        summary = {"partition": result.part.label, "shards": result.shards, "out": str(out)}
        emit(json.dumps(summary, indent=2) if as_json else render.part_summary(summary))
        return False
    emit(json.dumps(result.report, indent=2) if as_json else render.conversion_report(result.report, verb, str(src), str(out)))
    return True


def _parse_partition(text: str | None):
    from ..errors import SchemeError
    from ..run.partition import Partition

    if text is None:
        return None
    try:
        return Partition.parse(text)
    except SchemeError as exc:
        raise click.BadParameter(str(exc), param_hint="--partition") from None


@click.command(epilog=EXIT_CODES_HELP)
@click.argument("src", type=click.Path(path_type=Path, readable=False))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path, readable=False), help="Output folder (written atomically).")
@click.option("--dtype", type=click.Choice(list(HIGH_PRECISION)), default="bf16", show_default=True,
              help="Output dtype: w = q * scale is computed in float32, then rounded to nearest even.")
@run_options
@handle_errors
def dequantize(src, out, dtype, workers, max_shard_size, overwrite, resume, dry_run, as_json, quiet, partition,
               ray_address, parts) -> None:
    """Turn a quantized checkpoint (compressed-tensors, fine-grained FP8, fp8conv) back into bf16/fp16/fp32."""
    from ..io.hub import resolve
    from ..plan.recipe import DEQUANTIZE, Recipe

    _refuse_conflicts(None, overwrite, resume)
    src = resolve(src)
    recipe = Recipe(DEQUANTIZE, out_dtype=HIGH_PRECISION[dtype], max_shard_size=parse_size(max_shard_size))
    if _run(recipe, src, out, workers, overwrite, resume, dry_run, as_json, quiet, partition, ray_address, parts):
        from ..report.card import keep_source_card

        keep_source_card(out, src)


@click.command(epilog=EXIT_CODES_HELP)
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--source", type=click.Path(path_type=Path), default=None,
              help="SRC as seen from this host [default: the path the parts recorded].")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty OUT.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@click.option("--no-card", is_flag=True, help="Do not write the model card OUT/README.md (SRC's README.md is copied as is).")
@handle_errors
def merge(out, source, overwrite, as_json, no_card) -> None:
    """Assemble OUT from the N parts of a partitioned run (--partition I/N): checks every part is
    present and from the same run, then writes index, config, manifest, report and model card and moves
    OUT into place atomically. Same bytes as a single-machine run (the card names this command)."""
    from ..plan.recipe import QUANTIZE
    from ..report import card
    from ..report import text as render
    from ..run import pipeline
    from ..run.partition import parts_dir

    area = parts_dir(out)
    result = pipeline.merge_parts(out, source, overwrite)
    emit(json.dumps(result.report, indent=2) if as_json
         else render.conversion_report(result.report, "merge", str(area), str(out)))
    if no_card or result.command != QUANTIZE:  # a dequantized OUT keeps SRC's card, as dequantize does
        card.keep_source_card(out, result.source)
    else:
        card.write_card(out, result.source, _command_line())
