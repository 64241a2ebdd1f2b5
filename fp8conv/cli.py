"""The command line: parses arguments, calls the library, formats output. Nothing else.

Exit codes (API): 0 success; 1 a verify check failed; 2 usage error (bad option or combination);
3 input unreadable, corrupt or refused; 4 output cannot be written; 70 internal error; 71 a worker
process died; 129 / 130 / 143 SIGHUP / SIGINT / SIGTERM; 141 stdout closed by its reader.
"""
from __future__ import annotations

import sys

import click

from .commands.console import numpy_without_blas_threads

numpy_without_blas_threads()  # before the commands' imports load numpy

from . import __version__  # noqa: E402
from .commands.console import EXIT_CODES_HELP, guard_std_streams, say  # noqa: E402
from .commands.convert import dequantize, merge, quantize  # noqa: E402
from .commands.review import card, eval_, inspect, report, verify  # noqa: E402
from .commands.sensitivity import sensitivity  # noqa: E402
from .errors import EXIT_SIGINT, EXIT_USAGE  # noqa: E402


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
    guard_std_streams()


for command in (quantize, dequantize, merge, inspect, verify, report, eval_, sensitivity, card):
    main.add_command(command)


if __name__ == "__main__":  # pragma: no cover
    main()
