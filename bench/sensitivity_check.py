"""Does the KL-ranked override list beat simpler choices at the same budget, on texts it was not ranked on?

    PYTHONPATH=$PWD python3 -m fp8conv sensitivity SRC --format int4 --group-size 64 --budget 4.5 --tokens 512 \
        --json > bench/out/sensitivity/rank.json                       # ranked on the built-in CC0 corpus
    PYTHONPATH=$PWD python3 bench/sensitivity_check.py SRC bench/out/sensitivity/rank.json \
        --uniform bench/out/sensitivity/uniform-g64 --text /usr/share/common-licenses/LGPL-2.1 \
        --text /usr/share/common-licenses/GPL-2 --tokens 1024

Three override lists fill the same budget (the rank file's) with the same greedy rule and the same byte counts
(the rank file's base_bytes / promoted_bytes per group, as the report counts them), ordered by:
- kl: the sensitivity command's suggestion (measured KL per extra byte);
- weight-error: the weight-space estimate of bench/sensitivity.py (the group's mean squared relative RMS error,
  weighted by elements, from the uniform output's fp8conv.report.json), largest first;
- position: the groups in model order, first layers first.
Each is quantized with `fp8conv quantize ... --scheme ...` and evaluated with `fp8conv eval` (the engine's
loader, not the probe) on every --text; results go to bench/out/sensitivity/check.jsonl and a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out" / "sensitivity"


def fill(groups: list[dict], order: list[dict], budget: float) -> list[dict]:
    """The sensitivity command's fill rule with another order: take each group while the budget still holds."""
    elements = sum(g["elements"] for g in groups)
    allowed = math.floor(budget * elements / 8 + 1e-9)
    spent = sum(g["base_bytes"] for g in groups)
    chosen = []
    for g in order:
        extra = g["promoted_bytes"] - g["base_bytes"]
        if extra > 0 and spent + extra <= allowed:
            spent += extra
            chosen.append(g)
    return chosen


def weight_error_order(groups: list[dict], report: dict) -> list[dict]:
    r2 = {t["name"]: t["rel_rms_error"] ** 2 for t in report["tensors"]}
    sizes = {t["name"]: math.prod(t["shape"]) for t in report["tensors"]}

    def score(g: dict) -> float:
        return sum(r2[t] * sizes[t] for t in g["tensors"]) / sum(sizes[t] for t in g["tensors"])

    return sorted(groups, key=lambda g: -score(g))


def position_order(groups: list[dict]) -> list[dict]:
    def layer(g: dict) -> tuple:
        parts = g["tensors"][0].split(".")
        numbers = [int(p) for p in parts if p.isdigit()]
        return (numbers[0] if numbers else -1, g["tensors"][0])

    return sorted(groups, key=layer)


def run(cmd: list) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "fp8conv", *map(str, cmd)], env=env, capture_output=True, text=True)
    if proc.returncode not in (0, 1):
        sys.exit(f"failed: {cmd}\n{proc.stderr}")
    return proc.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("src", type=Path)
    parser.add_argument("rank", type=Path, help="fp8conv sensitivity --json output (with --budget)")
    parser.add_argument("--uniform", type=Path, required=True, help="the uniform-scheme output of SRC (its report)")
    parser.add_argument("--text", type=Path, action="append", required=True)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--choices", default="kl,weight-error,position")
    parser.add_argument("--quantize", nargs=argparse.REMAINDER, default=["--format", "int4", "--group-size", "64"])
    args = parser.parse_args()
    rank = json.loads(args.rank.read_text())
    groups, budget, promote = rank["groups"], rank["budget"], rank["promote"]
    report = json.loads((args.uniform / "fp8conv.report.json").read_text())
    by_label = {g["group"]: g for g in groups}
    orders = {"kl": lambda: [by_label[label] for label in rank["suggestion"]["groups"]],
              "weight-error": lambda: fill(groups, weight_error_order(groups, report), budget),
              "position": lambda: fill(groups, position_order(groups), budget)}
    choices = {name: orders[name]() for name in args.choices.split(",")}
    rows = []
    for name, chosen in choices.items():
        out = OUT / f"mix-{name}"
        if not (out / "fp8conv.report.json").exists():
            flags = [a for g in chosen for a in ("--scheme", f"{g['pattern']}={promote}")]
            run(["quantize", args.src, "-o", out, "-q", "--overwrite", *args.quantize, *flags])
        bits = json.loads((out / "fp8conv.report.json").read_text())["bits_per_weight"]
        for text in args.text:
            data = json.loads(run(["eval", out, "--against", args.src, "--text", text, "--tokens", args.tokens,
                                   "--window", args.window, "--json", "-q"]))
            row = {"choice": name, "groups": len(chosen), "bits_per_weight": bits, "text": text.name,
                   "kl": data["overall"]["kl"], "top1": data["overall"]["top1"],
                   "promoted": [g["group"] for g in chosen]}
            rows.append(row)
            with (OUT / "check.jsonl").open("a") as log:
                log.write(json.dumps(row) + "\n")
            print(f"| {name} | {len(chosen)} | {bits:.4f} | {text.name} | {row['kl']:.5f} | {row['top1']:.4f} |",
                  flush=True)


if __name__ == "__main__":
    main()
