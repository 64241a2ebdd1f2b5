"""Layer sensitivity, WEIGHT-SPACE ESTIMATE (not CI, not measured end to end): which quantized tensors lose
the most, and a --scheme override list that keeps them at higher precision within a bits-per-weight budget.

    PYTHONPATH=$PWD python3 bench/sensitivity.py OUT --budget 4.6 [--promote fp8_e4m3:channel] [--top 15]

OUT is an `fp8conv quantize` output; its fp8conv.report.json gives each quantized tensor's relative RMS
error r and shape. The estimate of a tensor's damage is its share of the model's squared weight error
measured relative to each tensor's own size, r^2 (the noise-to-signal power of the layer's output for
inputs uncorrelated with the error). This is a proxy: `fp8conv sensitivity` measures the KL each group's
quantization moves; bench/sensitivity_check.py uses this estimate as the naive baseline that the measured
ranking is compared with (bench/QUALITY.md, *Layer sensitivity*).

Promotion: tensors in descending r^2 are moved to --promote (default FP8 e4m3 channel: 8 bits plus one
float32 scale per row) while the whole model's bits per quantized weight stays within --budget.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path


def promoted_bits(spec: str, shape: list[int]) -> float:
    """Bits per weight of a promoted tensor: element bits plus its scales (channel: one float32 per row)."""
    fmt = spec.split(":")[0]
    bits = 4 if fmt in ("int4", "nvfp4", "mxfp4") else 8
    return bits + (32.0 / shape[-1] if "channel" in spec else 0.0)


def suggest(report: dict, budget: float, promote: str) -> tuple[list[dict], float]:
    rows = [t for t in report["tensors"] if t.get("path") == "quantize" and "rel_rms_error" in t]
    base = float(report["bits_per_weight"])
    sizes = {t["name"]: t["shape"][0] * t["shape"][-1] for t in rows}
    total = sum(sizes.values())
    bits = base * total
    chosen = []
    for t in sorted(rows, key=lambda t: -t["rel_rms_error"] ** 2):
        extra = (promoted_bits(promote, t["shape"]) - base) * sizes[t["name"]]
        if (bits + extra) / total > budget:
            continue
        bits += extra
        chosen.append(t)
    return chosen, bits / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--budget", type=float, required=True, help="bits per quantized weight, scales included")
    parser.add_argument("--promote", default="fp8_e4m3:channel", help="SPEC of --scheme for the promoted tensors")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    report = json.loads((args.out / "fp8conv.report.json").read_text())
    rows = sorted((t for t in report["tensors"] if t.get("path") == "quantize" and "rel_rms_error" in t),
                  key=lambda t: -t["rel_rms_error"])
    print(f"weight-space estimate (relative squared error per tensor; not KL), base "
          f"{report['bits_per_weight']:.3f} bits per weight")
    print("| tensor | rel. RMS error | r^2 |\n| --- | ---: | ---: |")
    for t in rows[: args.top]:
        print(f"| {t['name']} | {t['rel_rms_error']:.4%} | {t['rel_rms_error'] ** 2:.5f} |")
    chosen, bpw = suggest(report, args.budget, args.promote)
    print(f"\n{len(chosen)} tensors promoted to {args.promote}: {bpw:.3f} bits per weight (budget {args.budget})")
    for t in chosen:
        print(f"  --scheme 're:^{re.escape(t['name'][: -len('.weight')])}$={args.promote}' \\")


if __name__ == "__main__":
    main()
