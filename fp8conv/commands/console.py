"""What every command shares on the command line: stdout / stderr (data, one-line diagnostics), library errors
turned into documented exit codes, sizes, the progress bar, registry-backed choices."""
from __future__ import annotations

import functools
import math
import os
import sys

import click

from ..errors import EXIT_BAD_INPUT, EXIT_BROKEN_PIPE, EXIT_INTERNAL, EXIT_OUTPUT, EXIT_SIGINT, FP8ConvError
from ..io.untrusted import printable


EXIT_CODES_HELP = (
    "\b\nExit codes: 0 ok; 1 a check failed; 2 usage error; 3 input unreadable, corrupt or refused; "
    "4 output not writable (exists, read-only, disk full, another run writing it); 70 internal error (a bug); "
    "71 a worker process died (killed, crashed); 129 / 130 / 143 stopped by SIGHUP / SIGINT / SIGTERM; "
    "141 stdout closed by its reader."
)


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


def numpy_without_blas_threads() -> None:
    """Load numpy with one OpenBLAS thread, unless it is loaded already or the user set OPENBLAS_NUM_THREADS.
    fp8conv makes no BLAS call where speed matters, but numpy's OpenBLAS starts a thread per usable CPU
    when it loads, each spinning for a while for work that never comes: 0.15 s of CPU in a 2-core
    conversion, taken from the workers (bench/RESULTS.md). OpenBLAS reads the variable as it loads, so it
    is removed again at once: torch (eval, sensitivity) and child processes see the user's environment."""
    if "numpy" in sys.modules or "OPENBLAS_NUM_THREADS" in os.environ:
        return
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    try:
        import numpy  # noqa: F401
    finally:
        del os.environ["OPENBLAS_NUM_THREADS"]


def guard_std_streams() -> None:
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
    """The progress of a quiet run (tqdm not even imported: ~20 ms)."""

    def __enter__(self) -> "_NoBar":
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, n: int) -> None:
        pass


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


class LineProgress:
    """Progress for a stderr that is not a terminal (a CI log, a file): one plain line after `first` seconds,
    then one every `every` seconds from a timer thread (so a long tensor is not silent), and a last line when
    the work ends, if anything was printed. No escape codes, no carriage returns; nothing for a short run."""

    def __init__(self, total: int, desc: str, stream, first: float = 1.0, every: float = 10.0) -> None:
        import threading

        self.total, self.desc, self.stream = total, desc, stream
        self.first, self.every = first, every
        self.done = 0
        self.lines = 0
        self.first_line = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._tick, name="fp8conv-progress", daemon=True)

    def __enter__(self) -> "LineProgress":
        import time

        self._start = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, exc_type, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if self.lines and exc_type is None:
            self._line("done")

    def update(self, n: int) -> None:
        self.done += n

    def _tick(self) -> None:
        wait = self.first
        while not self._stop.wait(wait):
            self._line("")
            self.first_line.set()
            wait = self.every

    def _line(self, tail: str) -> None:
        import time

        share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        seconds = time.monotonic() - self._start
        text = f"fp8conv: {self.desc} {_size(self.done)} of {_size(self.total)}{share}, {seconds:.0f} s"
        try:
            print(text + (f", {tail}" if tail else ""), file=self.stream, flush=True)
        except (OSError, ValueError):  # stderr closed under us: progress is not worth a failure
            self._stop.set()
            return
        self.lines += 1


def progress_bar(total: int, quiet: bool, desc: str):
    """Bytes done of `total` on stderr, shown once the work has taken a second (a run that ends sooner prints
    nothing): a tqdm bar on a terminal, plain lines every 10 s otherwise (a CI log). FP8CONV_PROGRESS=off
    (or --quiet) silences it; `bar` / `lines` force one form."""
    mode = os.environ.get("FP8CONV_PROGRESS", "auto").strip().lower()
    if quiet or mode == "off":
        return _NoBar()
    if mode == "lines" or (mode != "bar" and not sys.stderr.isatty()):
        return LineProgress(total, desc, sys.stderr)
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, file=sys.stderr, leave=False, delay=1.0)
