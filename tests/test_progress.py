"""Progress on a stderr that is not a terminal: plain lines (no escape codes), none for a short run, one from
the timer thread even while no tensor finishes, and a last line when the work ends."""
from __future__ import annotations

import io

from fp8conv.commands.console import LineProgress, progress_bar

from conftest import SAMPLES
from helpers import run_cli


def test_no_line_for_a_run_shorter_than_the_first_delay():
    stream = io.StringIO()
    with LineProgress(1000, "quantize", stream, first=3600.0) as bar:
        bar.update(1000)
    assert stream.getvalue() == ""


def test_timer_thread_prints_while_no_work_is_reported_and_a_last_line_at_the_end():
    stream = io.StringIO()
    with LineProgress(4_000_000_000, "quantize", stream, first=0.0, every=3600.0) as bar:
        assert bar.first_line.wait(30)  # printed by the timer, no update yet
        bar.update(1_000_000_000)
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("fp8conv: quantize 0 B of 4.00 GB (0%), ")
    assert lines[-1].startswith("fp8conv: quantize 1.00 GB of 4.00 GB (25%), ") and lines[-1].endswith(", done")
    assert "\r" not in stream.getvalue() and "\x1b" not in stream.getvalue()


def test_no_last_line_when_the_work_failed():
    stream = io.StringIO()
    try:
        with LineProgress(10, "verify", stream, first=0.0, every=3600.0) as bar:
            assert bar.first_line.wait(30)
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert stream.getvalue().count("\n") == 1 and "done" not in stream.getvalue()


def test_a_closed_stderr_stops_the_lines_without_an_error():
    stream = io.StringIO()
    stream.close()
    with LineProgress(10, "quantize", stream, first=0.0, every=0.0) as bar:
        bar._thread.join(30)  # the timer stops itself on the first failed write
        assert not bar._thread.is_alive() and bar.lines == 0


def test_mode_is_chosen_by_the_environment(monkeypatch):
    monkeypatch.setenv("FP8CONV_PROGRESS", "off")
    assert not isinstance(progress_bar(10, False, "x"), LineProgress)
    monkeypatch.setenv("FP8CONV_PROGRESS", "auto")  # pytest's stderr is not a terminal
    assert isinstance(progress_bar(10, False, "x"), LineProgress)
    assert not isinstance(progress_bar(10, True, "x"), LineProgress)  # --quiet wins


def test_quantize_reports_progress_by_bytes_when_stderr_is_not_a_terminal(tmp_path, monkeypatch):
    """The command's wiring: the lines count the bytes of the tensors converted, up to 100%."""
    from fp8conv.commands import console

    class AtOnce(console.LineProgress):
        def __init__(self, total, desc, stream):
            super().__init__(total, desc, stream, first=0.0, every=3600.0)

    monkeypatch.setenv("FP8CONV_PROGRESS", "auto")
    monkeypatch.setattr(console, "LineProgress", AtOnce)
    result = run_cli("quantize", SAMPLES / "llama-tiny", "-o", tmp_path / "out")
    progress = [line for line in result.stderr.splitlines() if line.startswith("fp8conv: quantize ")]
    assert progress and progress[-1].endswith(", done") and "(100%)" in progress[-1]
    assert "\x1b" not in result.stderr and "\r" not in result.stderr
