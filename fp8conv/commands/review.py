"""The commands that read a checkpoint or an output and report on it: inspect, verify, report, eval, card."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ..plan.engines import DEFAULT_ENGINES, ENGINES
from .console import EXIT_CODES_HELP, emit, handle_errors, progress_bar, say
from .options import eval_options, finite


@click.command(epilog=EXIT_CODES_HELP)
@click.argument("path", type=click.Path(path_type=Path, readable=False))
@click.option("--tensors", "pattern", is_flag=False, flag_value="*", default=None, metavar="[PATTERN]",
              help="List tensors (all, or those whose name or module matches the glob / re:REGEX).")
@click.option("--stats", is_flag=True, help="Also read the data: min/max/absmax, NaN/Inf counts, zero fraction.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@handle_errors
def inspect(path, pattern, stats, as_json, quiet) -> None:
    """Show what is in a checkpoint: shards, tensors, dtypes, sizes and quantization scheme."""
    from ..commands import inspection
    from ..report import text as render
    from ..io.hub import resolve

    path = resolve(path)
    total = 0
    if stats:
        from ..io.checkpoint import open_checkpoint

        total = open_checkpoint(path).total_bytes
    with progress_bar(total, quiet or not stats, "inspect") as bar:
        summary = inspection.inspect_checkpoint(path, pattern, stats, progress=bar.update)
    emit(json.dumps(summary, indent=2) if as_json else render.inspect_summary(summary))


@click.command(epilog=EXIT_CODES_HELP)
@click.argument("path", type=click.Path(path_type=Path, readable=False))
@click.option("--against", type=click.Path(path_type=Path, readable=False), default=None,
              help="The source checkpoint: dequantize every tensor and compare (others must be bit-identical).")
@click.option("--max-rel-error", type=click.FloatRange(0, min_open=True), default=None, callback=finite,
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
    from ..report import text as render
    from ..errors import EXIT_CHECK_FAILED
    from ..commands.verify import VerifyOptions, total_work, verify_checkpoint

    if html_path is not None and str(html_path) == "-":
        raise click.UsageError("--html - would mix the page with the summary on stdout; give a file name")
    from ..io.hub import resolve

    path, against = resolve(path), (resolve(against) if against is not None else None)
    if run_eval and against is None:
        raise click.UsageError("--eval needs --against SRC (the model to compare with)")
    options = VerifyOptions(against=against, max_rel_error=max_rel_error, tp=tp, engines=tuple(engines))
    with progress_bar(total_work(path, against), quiet, "verify") as bar:
        result = verify_checkpoint(path, options, progress=bar.update).to_json()
    if run_eval:
        from ..evaluate.quality import summary_text

        result["eval"] = _evaluate(path, against, text, tokens, window, eval_engine, max_kl, min_top1, min_cosine, quiet,
                                   record=False)
        result["passed"] = result["passed"] and result["eval"]["passed"]
    emit(json.dumps(result, indent=2) if as_json else render.verify_summary(result)
         + ("\n" + summary_text(result["eval"]) if run_eval else ""))
    if html_path is not None:
        from ..report import html_page as html_report

        conversion = html_report.load_report(path) if html_report.has_report(path) else None
        _emit_page(html_report.render_verification(result, conversion), html_path)
    if not result["passed"]:
        sys.exit(EXIT_CHECK_FAILED)


@click.command(epilog=EXIT_CODES_HELP)
@click.argument("out", type=click.Path(path_type=Path, readable=False))
@click.option("--html", "html_path", type=click.Path(path_type=Path), default=None, metavar="FILE",
              help="Where to write the page ('-' for stdout) [default: OUT/fp8conv.report.html].")
@handle_errors
def report(out, html_path) -> None:
    """Render the HTML page of an fp8conv output OUT again, from its fp8conv.report.json (and fp8conv.eval.json,
    fp8conv.sensitivity.json)."""
    from ..evaluate.quality import read_eval
    from ..evaluate.sensitivity import read_sensitivity
    from ..report import html_page as html_report

    folder = Path(out).is_dir()
    page = html_report.render_conversion(html_report.load_report(out), read_eval(out) if folder else None,
                                         read_sensitivity(out) if folder else None)
    _emit_page(page, html_path if html_path is not None else html_report.default_page_path(out))


def _evaluate(out: Path, against: Path, text, tokens, window, eval_engine, max_kl, min_top1, min_cosine, quiet,
              record: bool = True) -> dict:
    """Run the eval (library), record it in OUT (not for verify: it reads only), return its JSON; exit 2 with one
    line when the extra is missing."""
    from ..evaluate.quality import default_engine, require_eval_extra

    require_eval_extra()
    eval_engine = eval_engine or default_engine()
    from ..evaluate import models as evaluation
    from ..report import annotate

    gate = {k: v for k, v in (("max_kl", max_kl), ("min_top1", min_top1), ("min_cosine", min_cosine)) if v is not None}
    result = evaluation.evaluate(against, out, text, tokens, window, eval_engine, gate,
                                 progress=lambda m: quiet or say(f"fp8conv: eval: {m}"))
    data = result.to_json()
    if record:
        annotate.record_eval(out, data)
    return data


@click.command("eval", epilog=EXIT_CODES_HELP)
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
    from ..errors import EXIT_CHECK_FAILED
    from ..evaluate.quality import summary_text

    data = _evaluate(out, against, text, tokens, window, eval_engine, max_kl, min_top1, min_cosine, quiet)
    emit(json.dumps(data, indent=2) if as_json else summary_text(data))
    if not data["passed"]:
        sys.exit(EXIT_CHECK_FAILED)


@click.command(epilog=EXIT_CODES_HELP)
@click.argument("out", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--source", type=click.Path(path_type=Path, exists=True, file_okay=False), default=None,
              help="Take the original card from this folder's README.md [default: the one kept in OUT's card].")
@click.option("--base-model", default=None, help="base_model in the front matter (a Hub id) [default: kept, or SRC's name].")
@handle_errors
def card(out, source, base_model) -> None:
    """Render OUT/README.md, the model card, again from OUT's manifest, report and eval result."""
    from ..report.card import write_card

    say(f"fp8conv: wrote {write_card(out, source, '', base_model)}")


def _emit_page(page: str, target: Path) -> None:
    from ..report import html_page as html_report

    if str(target) == "-":
        emit(page, nl=False)
        return
    html_report.write_page(target, page)
    say(f"fp8conv: wrote {target}")
