"""The options shared by several commands, defined once: the scheme, how a conversion runs, the evaluation;
and the scheme built from them."""
from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import click

from ..formats import DEFAULT_FORMAT, MICROSCALE, format_choices
from ..plan.architecture import DEFAULT_RULES
from ..plan.scheme import (ACTIVATIONS, GRANULARITIES, MAX_TILE, OBSERVERS, Scheme, default_granularity, mse_refusal,
                           microscale_scheme, parse_block_size)
from ..evaluate.quality import DEFAULT_TOKENS, DEFAULT_WINDOW, ENGINES
from .console import RegistryChoice


SKIP_HELP = "; ".join(f"{rule.kind}: {' '.join(rule.globs)}" for rule in DEFAULT_RULES)


def scheme_options(func):
    """--format/--granularity/--block-size/--group-size, shared by the commands that quantize."""
    options = [
        click.option("--format", "fmt", type=RegistryChoice(format_choices), default=DEFAULT_FORMAT, show_default=True,
                     help="Target format (qmax 448 for e4m3, 57344 for e5m2, 127 for int8, 7 for int4; int4 is "
                          "weight-only). nvfp4 / mxfp4 / mxfp8: compressed-tensors nvfp4-pack-quantized / "
                          "mxfp4-pack-quantized / mxfp8-quantized, weight-only, groups of 16 / 32 / 32 fixed by the "
                          "format."),
        click.option("--granularity", type=click.Choice(GRANULARITIES), default=None,
                     help="block: 2-D tiles; channel: one scale per output row; group: 1-D groups along the last dim; "
                          "tensor: one scale. [default: group for int4, block otherwise]"),
        click.option("--activations", type=click.Choice(ACTIVATIONS), default=None,
                     help="dynamic: W8A8 (engines quantize activations per token at run time); none: weight-only "
                          "(int4 / int8 as compressed-tensors pack-quantized W4A16 / W8A16). [default: none for int4, "
                          "dynamic otherwise]"),
        click.option("--asymmetric", is_flag=True,
                     help="Integer weight-only schemes: a zero point per tile, scale = (max - min) / (qmax - qmin)."),
        click.option("--block-size", default="128", show_default=True, help="Block tile: N or NxM (rows x cols)."),
        click.option("--group-size", type=click.IntRange(1, MAX_TILE), default=128, show_default=True,
                     help="Group length along the input dim (e.g. 32 like gguf Q8_0)."),
        click.option("--observer", type=click.Choice(OBSERVERS), default="minmax", show_default=True,
                     help="How each tile's scale is chosen, without calibration data: minmax (from the tile's range); "
                          "hqq (--asymmetric integer groups: scale and zero point fitted by HQQ's half-quadratic "
                          "solver, kept per group only where the squared error is lower; groups not already on a "
                          "4-bit grid also try their range shrunk 0.99..0.81 and a solve from the best of it); expanded (nvfp4: e4m3 "
                          "group scale codes min-max -3..+7, above the group's range as well as below, the one with "
                          "the smallest squared error, under a global scale from 1.25x the amax); mse (nvfp4: codes -2..+6; mxfp4 / mxfp8: min-max's exponent; "
                          "symmetric int4 groups: range shrunk 1.00..0.90, smallest sum |error|^3; refused "
                          "elsewhere, where it lost to min-max end to end: bench/QUALITY.md)."),
    ]
    return _apply(options, func)


def _apply(options: list, func):
    for option in reversed(options):
        func = option(func)
    return func


def run_options(func):
    """--workers/--max-shard-size/--overwrite/--resume/--dry-run/--json/--quiet, shared by the converting commands."""
    options = [
        click.option("--workers", type=click.IntRange(1, 256), default=None,
                     show_default="CPU count less 2 per output shard hashed at a time (up to 4), at least 2",
                     help="Worker processes; the output bytes do not depend on it."),
        click.option("--max-shard-size", default=None, metavar="SIZE",
                     help="Re-shard the output (e.g. 5GB); default keeps the source's shards."),
        click.option("--overwrite", is_flag=True, help="Replace a non-empty OUT (or the leftovers of an interrupted run)."),
        click.option("--resume", is_flag=True, help="Reuse the shards an interrupted run finished (sha256-checked)."),
        click.option("--dry-run", is_flag=True, help="Print each tensor's decision and sizes; write nothing."),
        click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout."),
        click.option("-q", "--quiet", is_flag=True, help="No progress bar."),
        click.option("--partition", default=None, metavar="I/N",
                     help="Convert only part I of N (whole output shards, balanced by bytes) into OUT's parts area; "
                          "`fp8conv merge OUT` assembles OUT once all N parts are done. Any order, any host."),
        click.option("--ray", "ray_address", is_flag=False, flag_value="", default=None, metavar="[ADDRESS]",
                     help="Run one Ray task per partition on the Ray cluster at ADDRESS (default: RAY_ADDRESS, or a "
                          "local one), then merge. Needs `pip install 'fp8conv[ray]'`; SRC and OUT on shared storage."),
        click.option("--parts", type=click.IntRange(1, 100000), default=None,
                     help="With --ray: number of partitions (Ray tasks) [default: one per output shard]."),
    ]
    return _apply(options, func)


def finite(ctx, param, value: float | None) -> float | None:
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number")
    return value


def eval_options(func):
    """--text/--tokens/--window/--engine/--max-kl/--min-top1/--min-cosine, shared by eval and verify --eval."""
    options = [
        click.option("--text", type=click.Path(path_type=Path, dir_okay=False), default=None,
                     help="UTF-8 text to evaluate on [default: the built-in corpus, original prose, CC0-1.0]."),
        click.option("--tokens", type=click.IntRange(2, 10**7), default=DEFAULT_TOKENS, show_default=True,
                     help="Tokens of the text to use (decoders)."),
        click.option("--window", type=click.IntRange(2, 10**6), default=DEFAULT_WINDOW, show_default=True,
                     help="Tokens per forward pass; metrics are given per window and overall."),
        click.option("--eval-engine", "eval_engine", type=click.Choice(list(ENGINES)), default=None,
                     help="Engine that runs both models: transformers (dequantize on load, float32), or vllm (its own "
                          "kernels, in the checkpoint's dtype; vLLM from this Python or FP8CONV_VLLM_PYTHON's, in a "
                          "child process; decoders only) [default: the first available, transformers wherever the "
                          "eval extra is installed]."),
        click.option("--max-kl", type=click.FloatRange(0, min_open=True), default=None, callback=finite,
                     help="Largest mean KL(source || quantized) per token, nats [default: per scheme, see README]."),
        click.option("--min-top1", type=click.FloatRange(0, 1), default=None,
                     help="Smallest top-1 agreement [default: per scheme]."),
        click.option("--min-cosine", type=click.FloatRange(-1, 1), default=None,
                     help="Encoders: smallest mean cosine of pooled embeddings [default: per scheme]."),
    ]
    return _apply(options, func)


def build_scheme(fmt: str, granularity: str | None, block_size: str, group_size: int, activations: str | None = None,
                 asymmetric: bool = False, observer: str = "minmax") -> Scheme:
    from ..errors import SchemeError

    if fmt in MICROSCALE:
        ctx = click.get_current_context()
        given = [f"--{p.replace('_', '-')}" for p in ("granularity", "block_size", "group_size", "asymmetric",
                                                      "allow_nonfinite")
                 if p in ctx.params and ctx.get_parameter_source(p) not in (None, click.core.ParameterSource.DEFAULT)]
        if activations == "dynamic":
            given.append("--activations dynamic")
        if given:
            raise click.UsageError(f"--format {fmt} fixes its groups ({MICROSCALE[fmt].group} along the input dim), "
                                   f"symmetric weight-only scales and refuses NaN/Inf; drop {', '.join(given)}")
        return offered(replace(microscale_scheme(fmt), observer=observer))

    try:
        block = parse_block_size(block_size)
    except SchemeError as exc:
        raise click.BadParameter(str(exc), param_hint="--block-size") from None
    return offered(Scheme(format=fmt, granularity=default_granularity(fmt, granularity), block_size=block,
                           group_size=group_size, symmetric=not asymmetric, activations=activations, observer=observer))


def offered(scheme: Scheme) -> Scheme:
    """The scheme, unless the command line does not offer its observer for it (plan/scheme.py mse_refusal)."""
    reason = mse_refusal(scheme)
    if reason:
        raise click.UsageError(reason)
    return scheme
