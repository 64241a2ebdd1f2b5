"""The one exception family the library raises; the CLI maps each to a documented exit code."""
from __future__ import annotations

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_USAGE = 2
EXIT_BAD_INPUT = 3
EXIT_OUTPUT = 4
EXIT_INTERNAL = 70
EXIT_WORKER_DIED = 71
EXIT_SIGHUP = 129
EXIT_SIGINT = 130
EXIT_BROKEN_PIPE = 141
EXIT_SIGTERM = 143


class FP8ConvError(Exception):
    """Base class: a one-sentence message meant for the user, plus an exit code."""

    exit_code = EXIT_BAD_INPUT


class InputError(FP8ConvError):
    """The input checkpoint is unreadable, corrupt or hostile."""

    exit_code = EXIT_BAD_INPUT


class SchemeError(FP8ConvError):
    """The requested options cannot be combined (a usage error)."""

    exit_code = EXIT_USAGE


class TileError(SchemeError):
    """The block or group does not fit the model's shapes (fp8conv.fitting tries a smaller one)."""


class MissingExtra(FP8ConvError):
    """An option needs an optional dependency that is not installed (a usage error)."""

    exit_code = EXIT_USAGE


class OutputError(FP8ConvError):
    """The output cannot be written (exists, read-only, disk full)."""

    exit_code = EXIT_OUTPUT


class Interrupted(FP8ConvError):
    """A signal stopped the run; temporaries were removed."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class WorkerDied(FP8ConvError):
    """A worker process died without answering (SIGKILL by the OOM killer, a signal, a crash)."""

    exit_code = EXIT_WORKER_DIED
