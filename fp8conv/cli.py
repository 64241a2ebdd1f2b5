"""The command line: parses arguments, calls the library, formats output. Nothing else.

Exit codes (API): 0 success; 1 a verify check failed; 2 usage error (bad option or combination);
3 input unreadable, corrupt or refused; 4 output cannot be written; 70 internal error; 71 a worker
process died; 129 / 130 / 143 SIGHUP / SIGINT / SIGTERM; 141 stdout closed by its reader.
"""
from __future__ import annotations

import functools
import json
import math
import os
import sys
from dataclasses import replace
from pathlib import Path

import click

from . import __version__
from .plan.engines import DEFAULT_ENGINES, ENGINES
from .errors import EXIT_BAD_INPUT, EXIT_BROKEN_PIPE, EXIT_INTERNAL, EXIT_OUTPUT, EXIT_SIGINT, EXIT_USAGE, FP8ConvError
from .formats import DEFAULT_FORMAT, HIGH_PRECISION, MICROSCALE, format_choices
from .layouts import DEFAULT_LAYOUT, layout_names
from .plan.architecture import DEFAULT_RULES
from .plan.scheme import (ACTIVATIONS, GRANULARITIES, MAX_TILE, OBSERVERS, Scheme, default_granularity, mse_refusal,
                          microscale_scheme, parse_block_size, parse_override)
from .evaluate.quality import DEFAULT_TOKENS, DEFAULT_WINDOW
from .io.untrusted import printable

EXIT_CODES_HELP = (
    "\b\nExit codes: 0 ok; 1 a check failed; 2 usage error; 3 input unreadable, corrupt or refused; "
    "4 output not writable (exists, read-only, disk full, another run writing it); 70 internal error (a bug); "
    "71 a worker process died (killed, crashed); 129 / 130 / 143 stopped by SIGHUP / SIGINT / SIGTERM; "
    "141 stdout closed by its reader."
)
SKIP_HELP = "; ".join(f"{rule.kind}: {' '.join(rule.globs)}" for rule in DEFAULT_RULES)


class RegistryChoice(click.Choice):
    """A choice among what a registry holds when the command line is parsed (a codec registered after
    import is accepted too)."""

    def __init__(self, source) -> None:
        self._source = source
        super().__init__(source())

    @property
    def choices(self):
        return self._source()

    @choices.setter
    def choices(self, value) -> None:
        pass


def say(message: str) -> None:
    """One diagnostic line on stderr, escaped (names in it are untrusted); a closed or broken
    stderr never stops the work."""
    try:
        click.echo(printable(message), err=True)
    except (OSError, ValueError):
        pass


def emit(text: str, nl: bool = True) -> None:
    """Data on stdout. A reader that went away (`... | head -c 10`) ends the command quietly with
    exit 141, as a CLI killed by SIGPIPE would; the work itself is complete."""
    try:
        click.echo(text, nl=nl)
        sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the interpreter's last flush must not complain
        os.close(devnull)
        sys.exit(EXIT_BROKEN_PIPE)
    except OSError as exc:  # stdout on a full disk: the output's fault, with its own code
        fail(f"cannot write to stdout ({exc.strerror or exc})", EXIT_OUTPUT)


def fail(message: str, code: int) -> None:
    say(f"fp8conv: error: {message}")
    sys.exit(code)


def _guard_std_streams() -> None:
    """Started with stdin/stdout/stderr closed (`2>&-`): put /dev/null there, so no file this run
    opens gets descriptor 1 or 2 (where a stray write would land in an output shard)."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)  # takes the lowest free descriptor: this one
    if sys.stdout is None:
        sys.stdout = open(os.devnull, "w")
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w")


def handle_errors(func):
    """Turn library errors into one line on stderr and a documented exit code; never a traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except FP8ConvError as exc:
            fail(str(exc), exc.exit_code)
        except BrokenPipeError:
            emit("")  # only stdout can break here: stderr writes never raise
        except KeyboardInterrupt:
            fail("interrupted", EXIT_SIGINT)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise  # usage errors: click prints them and exits 2
        except MemoryError:
            fail("out of memory; try fewer --workers", EXIT_INTERNAL)
        except OSError as exc:
            code = _blame(func.__name__, kwargs, exc)
            if code is None:
                if os.environ.get("FP8CONV_DEBUG"):
                    raise
                fail(f"internal error ({type(exc).__name__}: {exc}); rerun with FP8CONV_DEBUG=1 for the traceback "
                     "and please report it", EXIT_INTERNAL)
            fail(f"{printable(os.fsdecode(exc.filename))}: {exc.strerror or exc}", code)
        except Exception as exc:  # a bug: one line for the user, the traceback on request
            if os.environ.get("FP8CONV_DEBUG"):
                raise
            fail(f"internal error ({type(exc).__name__}: {exc}); rerun with FP8CONV_DEBUG=1 for the traceback "
                 "and please report it", EXIT_INTERNAL)

    return wrapper


# The path arguments a command writes (errors there: exit 4); every other path argument is read (exit 3).
OUTPUT_PARAMS = {"quantize": ("out",), "dequantize": ("out",), "merge": ("out",), "verify": ("html_path",),
                 "report": ("html_path",)}
PATH_PARAMS = ("src", "out", "path", "against", "source", "html_path")


def _blame(command: str, kwargs: dict, exc: OSError) -> int | None:
    """The exit code of an OSError that escaped the library's own checks (a name past the file-name limit,
    no search permission on a folder): 4 when it names a path under an output argument or one of its
    hidden siblings (staging, lock, parts), 3 under an input argument, None (a bug) otherwise."""
    if exc.filename is None:
        return None
    failed = os.path.abspath(os.fsdecode(exc.filename))
    for param in PATH_PARAMS:
        given = kwargs.get(param)
        if given is None or str(given) in ("", "-"):
            continue
        root = os.path.abspath(str(given))
        sibling = os.path.join(os.path.dirname(root), "." + os.path.basename(root) + ".")
        if failed == root or failed.startswith(root + os.sep) or failed.startswith(sibling):
            return EXIT_OUTPUT if param in OUTPUT_PARAMS.get(command, ()) else EXIT_BAD_INPUT
    return None


def parse_size(text: str | None) -> int | None:
    """'5GB' / '500MB' / '123' (bytes) -> bytes."""
    if text is None:
        return None
    units = {"TB": 10**12, "GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}
    upper = text.strip().upper()
    for unit, factor in units.items():
        if upper.endswith(unit):
            number = upper[: -len(unit)]
            break
    else:
        number, factor = upper, 1
    try:
        value = float(number) * factor
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise click.BadParameter(f"{text!r} is not a size like 5GB or 500MB")
    value = int(value)
    if value <= 0:
        raise click.BadParameter("must be positive")
    return value


class _NoBar:
    """The progress bar of a quiet run or a redirected stderr (tqdm not even imported: ~20 ms)."""

    def __enter__(self) -> "_NoBar":
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, n: int) -> None:
        pass


def progress_bar(total: int, quiet: bool, desc: str):
    """Bytes done of `total`, on a terminal's stderr, shown once the work has taken a second (a run that
    ends sooner prints nothing); no bar with --quiet or a redirected stderr."""
    if quiet or not sys.stderr.isatty():
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, file=sys.stderr, leave=False, delay=1.0)


class _Group(click.Group):
    """Keeps the arguments as given, for the model card's exact command; click's usage errors in
    fp8conv's one style: `fp8conv: error: ...` on one line, exit 2 (click's own is three lines:
    Usage / Try / Error)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["fp8conv.argv"] = list(args)
        return super().parse_args(ctx, args)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as exc:
            sub = exc.ctx.info_name if exc.ctx is not None and exc.ctx.parent is not None else None
            hint = f" (see fp8conv {sub + ' ' if sub else ''}--help)"
            say(f"fp8conv: error: {' '.join(exc.format_message().split())}{hint}")
            code = EXIT_USAGE
        except click.ClickException as exc:
            say(f"fp8conv: error: {' '.join(exc.format_message().split())}")
            code = exc.exit_code
        except click.Abort:
            say("fp8conv: error: aborted")
            code = EXIT_SIGINT
        if not standalone_mode:
            return code
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=_Group, epilog=EXIT_CODES_HELP)
@click.version_option(__version__, prog_name="fp8conv")
def main() -> None:
    """Convert bf16/fp16/fp32 safetensors checkpoints to FP8, INT8, INT4, NVFP4, MXFP4 and MXFP8, inspect them and verify them."""
    _guard_std_streams()


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
                          "solver, kept per group only where the squared error is lower); expanded (nvfp4: e4m3 "
                          "group scale codes min-max -3..+7, above the group's range as well as below, the one with "
                          "the smallest squared error); mse (nvfp4: codes -2..+6; mxfp4 / mxfp8: min-max's exponent; "
                          "refused elsewhere, where it lost to min-max end to end: bench/QUALITY.md)."),
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


def eval_options(func):
    """--text/--tokens/--window/--engine/--max-kl/--min-top1/--min-cosine, shared by eval and verify --eval."""
    options = [
        click.option("--text", type=click.Path(path_type=Path, dir_okay=False), default=None,
                     help="UTF-8 text to evaluate on [default: the built-in corpus, original prose, CC0-1.0]."),
        click.option("--tokens", type=click.IntRange(2, 10**7), default=DEFAULT_TOKENS, show_default=True,
                     help="Tokens of the text to use (decoders)."),
        click.option("--window", type=click.IntRange(2, 10**6), default=DEFAULT_WINDOW, show_default=True,
                     help="Tokens per forward pass; metrics are given per window and overall."),
        click.option("--eval-engine", "eval_engine", type=click.Choice(["transformers"]), default="transformers",
                     show_default=True, help="Engine that runs both models."),
        click.option("--max-kl", type=click.FloatRange(0, min_open=True), default=None, callback=_finite,
                     help="Largest mean KL(source || quantized) per token, nats [default: per scheme, see README]."),
        click.option("--min-top1", type=click.FloatRange(0, 1), default=None,
                     help="Smallest top-1 agreement [default: per scheme]."),
        click.option("--min-cosine", type=click.FloatRange(-1, 1), default=None,
                     help="Encoders: smallest mean cosine of pooled embeddings [default: per scheme]."),
    ]
    return _apply(options, func)


def build_scheme(fmt: str, granularity: str | None, block_size: str, group_size: int, activations: str | None = None,
                 asymmetric: bool = False, observer: str = "minmax") -> Scheme:
    from .errors import SchemeError

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
        return _offered(replace(microscale_scheme(fmt), observer=observer))

    try:
        block = parse_block_size(block_size)
    except SchemeError as exc:
        raise click.BadParameter(str(exc), param_hint="--block-size") from None
    return _offered(Scheme(format=fmt, granularity=default_granularity(fmt, granularity), block_size=block,
                           group_size=group_size, symmetric=not asymmetric, activations=activations, observer=observer))


def _offered(scheme: Scheme) -> Scheme:
    """The scheme, unless the command line does not offer its observer for it (plan/scheme.py mse_refusal)."""
    reason = mse_refusal(scheme)
    if reason:
        raise click.UsageError(reason)
    return scheme


@main.command(epilog=EXIT_CODES_HELP)
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
    from .io.hub import resolve
    from .plan.recipe import Recipe

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
        from .report import card

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
    return pattern, _offered(replace(scheme, observer=observer))


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
    from .io.outdir import Staging

    Staging(out, src, overwrite, resume, "").check()


def _dry_run(checkpoint, plan, src: Path, out: Path, run, as_json: bool) -> None:
    """--dry-run: OUT checked, the plan printed (text or JSON), its refusals said; exits 2 where there are any."""
    from .io.outdir import Staging
    from .report import text as render
    from .report.manifest import scheme_summary

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
    from .accel import native
    from .run import pipeline
    from .report import text as render

    verb = recipe.command
    part = _parse_partition(partition)
    if ray_address is not None and workers is None:
        workers = 1  # per Ray task; Ray spreads the tasks over the cluster's CPUs
    # A part or a Ray run leaves OUT's own staging alone (parts live beside it): as --resume there.
    _check_output(src, out, overwrite, resume or part is not None or ray_address is not None)
    if verb == "quantize":
        from .run.fitting import plan_fitted

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
        from .run.distributed import run_on_ray

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
    from .errors import SchemeError
    from .run.partition import Partition

    if text is None:
        return None
    try:
        return Partition.parse(text)
    except SchemeError as exc:
        raise click.BadParameter(str(exc), param_hint="--partition") from None


@main.command(epilog=EXIT_CODES_HELP)
@click.argument("src", type=click.Path(path_type=Path, readable=False))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path, readable=False), help="Output folder (written atomically).")
@click.option("--dtype", type=click.Choice(list(HIGH_PRECISION)), default="bf16", show_default=True,
              help="Output dtype: w = q * scale is computed in float32, then rounded to nearest even.")
@run_options
@handle_errors
def dequantize(src, out, dtype, workers, max_shard_size, overwrite, resume, dry_run, as_json, quiet, partition,
               ray_address, parts) -> None:
    """Turn a quantized checkpoint (compressed-tensors, fine-grained FP8, fp8conv) back into bf16/fp16/fp32."""
    from .io.hub import resolve
    from .plan.recipe import DEQUANTIZE, Recipe

    _refuse_conflicts(None, overwrite, resume)
    src = resolve(src)
    recipe = Recipe(DEQUANTIZE, out_dtype=HIGH_PRECISION[dtype], max_shard_size=parse_size(max_shard_size))
    if _run(recipe, src, out, workers, overwrite, resume, dry_run, as_json, quiet, partition, ray_address, parts):
        from .report.card import keep_source_card

        keep_source_card(out, src)


@main.command(epilog=EXIT_CODES_HELP)
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--source", type=click.Path(path_type=Path), default=None,
              help="SRC as seen from this host [default: the path the parts recorded].")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty OUT.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@handle_errors
def merge(out, source, overwrite, as_json) -> None:
    """Assemble OUT from the N parts of a partitioned run (--partition I/N): checks every part is
    present and from the same run, then writes index, config, manifest and report and moves OUT
    into place atomically. Same bytes as a single-machine run."""
    from .run import pipeline
    from .report import text as render
    from .run.partition import parts_dir

    area = parts_dir(out)
    result = pipeline.merge_parts(out, source, overwrite)
    emit(json.dumps(result.report, indent=2) if as_json
         else render.conversion_report(result.report, "merge", str(area), str(out)))


@main.command(epilog=EXIT_CODES_HELP)
@click.argument("path", type=click.Path(path_type=Path, readable=False))
@click.option("--tensors", "pattern", is_flag=False, flag_value="*", default=None, metavar="[PATTERN]",
              help="List tensors (all, or those whose name or module matches the glob / re:REGEX).")
@click.option("--stats", is_flag=True, help="Also read the data: min/max/absmax, NaN/Inf counts, zero fraction.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@handle_errors
def inspect(path, pattern, stats, as_json, quiet) -> None:
    """Show what is in a checkpoint: shards, tensors, dtypes, sizes and quantization scheme."""
    from .commands import inspection
    from .report import text as render
    from .io.hub import resolve

    path = resolve(path)
    total = 0
    if stats:
        from .io.checkpoint import open_checkpoint

        total = open_checkpoint(path).total_bytes
    with progress_bar(total, quiet or not stats, "inspect") as bar:
        summary = inspection.inspect_checkpoint(path, pattern, stats, progress=bar.update)
    emit(json.dumps(summary, indent=2) if as_json else render.inspect_summary(summary))


def _finite(ctx, param, value: float | None) -> float | None:
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number")
    return value


@main.command(epilog=EXIT_CODES_HELP)
@click.argument("path", type=click.Path(path_type=Path, readable=False))
@click.option("--against", type=click.Path(path_type=Path, readable=False), default=None,
              help="The source checkpoint: dequantize every tensor and compare (others must be bit-identical).")
@click.option("--max-rel-error", type=click.FloatRange(0, min_open=True), default=None, callback=_finite,
              help="Relative RMS error limit per tensor [default: 0.08 fp8_e4m3, 0.15 fp8_e5m2, 0.10 int8, 0.40 int4].")
@click.option("--tp", type=click.IntRange(1, 1024), default=1, show_default=True,
              help="Tensor-parallel size to check vLLM's partition constraints for.")
@click.option("--engine", "engines", multiple=True, type=click.Choice(list(ENGINES)), default=DEFAULT_ENGINES,
              show_default=True, help="Engines whose load constraints fail the check (others only warn). Repeatable.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@click.option("--html", "html_path", type=click.Path(path_type=Path), default=None, metavar="FILE",
              help="Also write the HTML page of the result (with --against: the measured errors) to FILE.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@click.option("--eval", "run_eval", is_flag=True, help="Also run `fp8conv eval PATH --against SRC` (needs --against).")
@eval_options
@handle_errors
def verify(path, against, max_rel_error, tp, engines, as_json, html_path, quiet, run_eval, text, tokens, window,
           eval_engine, max_kl, min_top1, min_cosine) -> None:
    """Check integrity, structure, numerics and engine compatibility; exit 1 when a check fails,
    and for a checkpoint with nothing quantized in it (a source folder given by mistake)."""
    from .report import text as render
    from .errors import EXIT_CHECK_FAILED
    from .commands.verify import VerifyOptions, total_work, verify_checkpoint

    if html_path is not None and str(html_path) == "-":
        raise click.UsageError("--html - would mix the page with the summary on stdout; give a file name")
    from .io.hub import resolve

    path, against = resolve(path), (resolve(against) if against is not None else None)
    if run_eval and against is None:
        raise click.UsageError("--eval needs --against SRC (the model to compare with)")
    options = VerifyOptions(against=against, max_rel_error=max_rel_error, tp=tp, engines=tuple(engines))
    with progress_bar(total_work(path, against), quiet, "verify") as bar:
        result = verify_checkpoint(path, options, progress=bar.update).to_json()
    if run_eval:
        from .evaluate.quality import summary_text

        result["eval"] = _evaluate(path, against, text, tokens, window, eval_engine, max_kl, min_top1, min_cosine, quiet,
                                   record=False)
        result["passed"] = result["passed"] and result["eval"]["passed"]
    emit(json.dumps(result, indent=2) if as_json else render.verify_summary(result)
         + ("\n" + summary_text(result["eval"]) if run_eval else ""))
    if html_path is not None:
        from .report import html_page as html_report

        conversion = html_report.load_report(path) if html_report.has_report(path) else None
        _emit_page(html_report.render_verification(result, conversion), html_path)
    if not result["passed"]:
        sys.exit(EXIT_CHECK_FAILED)


@main.command(epilog=EXIT_CODES_HELP)
@click.argument("out", type=click.Path(path_type=Path, readable=False))
@click.option("--html", "html_path", type=click.Path(path_type=Path), default=None, metavar="FILE",
              help="Where to write the page ('-' for stdout) [default: OUT/fp8conv.report.html].")
@handle_errors
def report(out, html_path) -> None:
    """Render the HTML page of an fp8conv output OUT again, from its fp8conv.report.json (and fp8conv.eval.json)."""
    from .evaluate.quality import read_eval
    from .report import html_page as html_report

    evaluation = read_eval(out) if Path(out).is_dir() else None
    page = html_report.render_conversion(html_report.load_report(out), evaluation)
    _emit_page(page, html_path if html_path is not None else html_report.default_page_path(out))


def _evaluate(out: Path, against: Path, text, tokens, window, eval_engine, max_kl, min_top1, min_cosine, quiet,
              record: bool = True) -> dict:
    """Run the eval (library), record it in OUT (not for verify: it reads only), return its JSON; exit 2 with one
    line when the extra is missing."""
    from .evaluate.quality import require_eval_extra

    require_eval_extra()
    from .evaluate import models as evaluation
    from .report import annotate

    gate = {k: v for k, v in (("max_kl", max_kl), ("min_top1", min_top1), ("min_cosine", min_cosine)) if v is not None}
    result = evaluation.evaluate(against, out, text, tokens, window, eval_engine, gate,
                                 progress=lambda m: quiet or say(f"fp8conv: eval: {m}"))
    data = result.to_json()
    if record:
        annotate.record_eval(out, data)
    return data


@main.command("eval", epilog=EXIT_CODES_HELP)
@click.argument("out", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--against", required=True, type=click.Path(path_type=Path, exists=True, file_okay=False),
              help="The source checkpoint folder (config and tokenizer too).")
@eval_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines.")
@handle_errors
def eval_(out, against, text, tokens, window, eval_engine, max_kl, min_top1, min_cosine, as_json, quiet) -> None:
    """Run SRC and the quantized OUT as an engine loads them and compare their outputs; exit 1 when the gate fails.

    \b
    Decoders: mean KL(source || quantized) per token, top-1 agreement, both perplexities, NaN/Inf count;
    encoders: cosine of mean-pooled embeddings. Writes OUT/fp8conv.eval.json (listed in the manifest,
    shown in the HTML report and the model card). Needs `pip install 'fp8conv[eval]'`.
    """
    from .errors import EXIT_CHECK_FAILED
    from .evaluate.quality import summary_text

    data = _evaluate(out, against, text, tokens, window, eval_engine, max_kl, min_top1, min_cosine, quiet)
    emit(json.dumps(data, indent=2) if as_json else summary_text(data))
    if not data["passed"]:
        sys.exit(EXIT_CHECK_FAILED)


@main.command(epilog=EXIT_CODES_HELP)
@click.argument("out", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--source", type=click.Path(path_type=Path, exists=True, file_okay=False), default=None,
              help="Take the original card from this folder's README.md [default: the one kept in OUT's card].")
@click.option("--base-model", default=None, help="base_model in the front matter (a Hub id) [default: kept, or SRC's name].")
@handle_errors
def card(out, source, base_model) -> None:
    """Render OUT/README.md, the model card, again from OUT's manifest, report and eval result."""
    from .report.card import write_card

    say(f"fp8conv: wrote {write_card(out, source, '', base_model)}")


def _emit_page(page: str, target: Path) -> None:
    from .report import html_page as html_report

    if str(target) == "-":
        emit(page, nl=False)
        return
    html_report.write_page(target, page)
    say(f"fp8conv: wrote {target}")


if __name__ == "__main__":  # pragma: no cover
    main()
