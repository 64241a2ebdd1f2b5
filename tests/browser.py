"""Headless Chromium for the HTML report tests, and the script that makes the README screenshot.

    python3 tests/browser.py docs/report-llama-tiny.png     # converts the Llama sample, screenshots its page
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
         "--disable-extensions", "--mute-audio"]
TIMEOUT_S = 120


def chromium() -> str | None:
    """The browser binary (Debian's `chromium` package), or None."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _run(args: list[str]) -> subprocess.CompletedProcess:
    binary = chromium()
    assert binary is not None, "chromium is not installed"
    with tempfile.TemporaryDirectory(prefix="fp8conv-chromium-") as profile:
        return subprocess.run([binary, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                              text=True, timeout=TIMEOUT_S, check=False)


def dump_dom(page: Path) -> str:
    """The DOM after the browser parsed (and would have run scripts in) the page, serialized."""
    done = _run(["--dump-dom", page.resolve().as_uri()])
    assert done.returncode == 0 and "<html" in done.stdout, f"chromium --dump-dom failed: {done.stderr[-2000:]}"
    return done.stdout


def screenshot(page: Path, png: Path, width: int = 1100, height: int = 1600, dark: bool = False) -> Path:
    """A PNG of the top width x height pixels of the page as the browser renders it (dark: the user
    prefers a dark colour scheme)."""
    extra = ["--force-dark-mode"] if dark else []
    done = _run([*extra, f"--window-size={width},{height}", f"--screenshot={png.resolve()}", page.resolve().as_uri()])
    assert done.returncode == 0 and png.is_file(), f"chromium --screenshot failed: {done.stderr[-2000:]}"
    return png


def print_pdf(page: Path, pdf: Path) -> bytes:
    """The page printed to PDF (print media: the @media print rules apply)."""
    done = _run(["--no-pdf-header-footer", f"--print-to-pdf={pdf.resolve()}", page.resolve().as_uri()])
    assert done.returncode == 0 and pdf.is_file(), f"chromium --print-to-pdf failed: {done.stderr[-2000:]}"
    return pdf.read_bytes()


def pixel_stats(png: Path) -> tuple[int, float, float]:
    """(number of distinct colours, mean and variance of the grey levels) of a PNG."""
    from PIL import Image, ImageStat

    with Image.open(png) as image:
        rgb = image.convert("RGB")
        colours = rgb.getcolors(maxcolors=1 << 24)
        grey = ImageStat.Stat(rgb.convert("L"))
        return len(colours or []), grey.mean[0], grey.var[0]


def readme_screenshot(target: Path) -> Path:
    """Convert the Llama sample and save a small (palette, optimised) PNG of its page for the README."""
    from PIL import Image

    root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "llama-tiny-fp8"
        subprocess.run([sys.executable, "-m", "fp8conv", "quantize", str(root / "sample_models" / "llama-tiny"),
                        "-o", str(out), "--workers", "1", "--quiet"], check=True, cwd=root, stdout=subprocess.DEVNULL)
        raw = screenshot(out / "fp8conv.report.html", Path(tmp) / "page.png", 1000, 1500)
        with Image.open(raw) as image:
            small = image.convert("RGB").resize((750, 1125), Image.LANCZOS).quantize(colors=256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
            small.save(target, optimize=True)
    return target


if __name__ == "__main__":
    print(readme_screenshot(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/report-llama-tiny.png")))
