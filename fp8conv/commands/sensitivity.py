"""`fp8conv sensitivity SRC`: which module groups' quantization moves KL most, and the --scheme overrides that keep
the most sensitive ones at a wider scheme within a bits-per-weight budget."""
from __future__ import annotations

import json
from pathlib import Path

import click

from .console import EXIT_CODES_HELP, emit, handle_errors, say
from .options import build_scheme, finite, scheme_options
from ..evaluate.sensitivity import DEFAULT_PROMOTE, DEFAULT_TOKENS, DEFAULT_WINDOW


@click.command(epilog=EXIT_CODES_HELP)
@click.argument("src", type=click.Path(path_type=Path, exists=True, file_okay=False))
@scheme_options
@click.option("--budget", type=click.FloatRange(0, min_open=True), default=None, callback=finite, metavar="BITS",
              help="Bits per quantized weight (scales and zero points included, as the report counts them) the "
                   "suggested --scheme overrides may reach, e.g. 4.5.")
@click.option("--promote", default=DEFAULT_PROMOTE, show_default=True, metavar="SPEC",
              help="The wider scheme (--scheme SPEC syntax) the most sensitive groups are kept at.")
@click.option("--text", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="UTF-8 text to rank on [default: the built-in corpus, original prose, CC0-1.0].")
@click.option("--tokens", type=click.IntRange(2, 10**7), default=DEFAULT_TOKENS, show_default=True,
              help="Tokens of the text (one forward pass per module group).")
@click.option("--window", type=click.IntRange(2, 10**6), default=DEFAULT_WINDOW, show_default=True,
              help="Tokens per forward pass.")
@click.option("--record", "record", type=click.Path(path_type=Path, exists=True, file_okay=False), default=None,
              metavar="OUT", help="Also write the result into OUT, an fp8conv output of SRC (fp8conv.sensitivity.json, "
                                  "listed in the manifest, shown in the HTML report).")
@click.option("--top", type=click.IntRange(1, 10**6), default=20, show_default=True, help="Groups shown in the table.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines.")
@handle_errors
def sensitivity(src, fmt, granularity, block_size, group_size, activations, asymmetric, observer, budget, promote, text,
                tokens, window, record, top, as_json, quiet) -> None:
    """Quantize one module group of SRC at a time (q/k/v and gate/up together, every other weight alone), measure
    KL(source || that model) on a text, rank the groups; with --budget, the --scheme overrides for quantize that
    keep the most KL-sensitive groups at --promote within the budget.

    \b
    The weights are fp8conv's own quantize -> dequantize (the codes quantize writes), rounded into SRC's dtype;
    weight-only (a W8A8 scheme's activation rounding is not simulated). Needs `pip install 'fp8conv[eval]'`.
    """
    from ..evaluate.quality import require_eval_extra

    require_eval_extra()
    from ..evaluate import probe
    from ..evaluate.sensitivity import summary_text

    ctx = click.get_current_context()
    tile_is_default = all(ctx.get_parameter_source(p) in (None, click.core.ParameterSource.DEFAULT)
                          for p in ("block_size", "group_size"))
    if record is not None:
        from ..report.annotate import check_recordable

        check_recordable(record)
    scheme = build_scheme(fmt, granularity, block_size, group_size, activations, asymmetric, observer)
    data = probe.measure(src, scheme, promote, budget, text, tokens, window, tile_is_default,
                         progress=lambda m: quiet or say(f"fp8conv: sensitivity: {m}"))
    if data["suggestion"] is not None and not data["suggestion"]["lowers_kl"]:
        from ..evaluate.sensitivity import UNHELPFUL

        say(f"fp8conv: warning: {UNHELPFUL}")
    if record is not None:
        from ..report import annotate

        annotate.record_sensitivity(record, data)
    emit(json.dumps(data, indent=2) if as_json else summary_text(data, top))
