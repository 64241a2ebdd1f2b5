"""What an end-to-end eval measured and whether it passes: results, thresholds, the eval file in OUT.

Torch-free: the CLI, the model card and the HTML report read results through this module; running
the models is fp8conv.evaluation's job (the optional `eval` extra).
"""
from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError, MissingExtra
from ..io.untrusted import load_json_file
from .vllm_engine import vllm_python

EVAL_NAME = "fp8conv.eval.json"
EVAL_SCHEMA = 1
INSTALL_HINT = "fp8conv eval needs the eval extra: python3 -m pip install 'fp8conv[eval]' (torch==2.13.0, transformers, compressed-tensors)"
DEFAULT_TOKENS = 2048
DEFAULT_WINDOW = 512
DEFAULT_SENTENCES = 64

# Per-scheme gates, derived from measurements (bench/EVAL.md has the runs): SmolLM2-135M-Instruct on the
# built-in corpus (the development text; 2,048 tokens, windows of 512) for KL and top-1, all-MiniLM-L6-v2
# on the built-in corpus's sentences for cosine, each min-max output as transformers runs it:
#   max_kl = 3 x measured KL, min_top1 = 1 - 2 x measured top-1 miss rate, min_cosine = 1 - 4 x measured
#   cosine distance, each rounded to the looser side;
# then checked, unchanged, on a held-out text (GPL-3) and a tiny random Llama. Labels: evaluate.models.
# checkpoint_schemes; a mixed checkpoint is held to its loosest group's gate, an unmeasured one to FALLBACK_GATE.
DEFAULT_GATES = {  # measured KL / top-1 (SmolLM2) and cosine (MiniLM) of the min-max output in the comments
    "int8 channel": {"max_kl": 0.01, "min_top1": 0.92, "min_cosine": 0.985},       # W8A16: 0.0030 / 0.961 / -
    "int8 channel w8a8": {"max_kl": 0.09, "min_top1": 0.78, "min_cosine": 0.985},  # 0.0294 / 0.891 / 0.99719
    "fp8_e4m3 channel": {"max_kl": 0.07, "min_top1": 0.80, "min_cosine": 0.99},    # 0.0224 / 0.901 / 0.99770
    "fp8_e4m3 block": {"max_kl": 0.07, "min_top1": 0.80, "min_cosine": 0.99},      # (channel's: SmolLM2 cannot run it) / 0.99775
    "int4 w4a16": {"max_kl": 1.25, "min_top1": 0.25, "min_cosine": 0.77},          # group 64: 0.415 / 0.630 / 0.94334
    "nvfp4 w4a16": {"max_kl": 0.65, "min_top1": 0.44, "min_cosine": 0.89},         # 0.210 / 0.724 / 0.97474
    "mxfp4 w4a16": {"max_kl": 1.25, "min_top1": 0.24, "min_cosine": 0.84},         # 0.412 / 0.623 / 0.96197
}
FALLBACK_GATE = {"max_kl": 1.5, "min_top1": 0.4, "min_cosine": 0.77}


def eval_available() -> bool:
    """True when torch, transformers and compressed-tensors can be imported (checked without importing)."""
    try:
        return all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers", "compressed_tensors"))
    except (ImportError, ValueError):  # a broken or blocked install counts as missing
        return False


ENGINES = ("transformers", "vllm")  # the default is the first available (the eval extra makes transformers so)


def default_engine() -> str:
    """The first of ENGINES that can run here: transformers with the eval extra, else vLLM where an interpreter
    imports it (the eval extra is still needed for the tokenizer and the metrics: require_eval_extra says so)."""
    if eval_available() or vllm_python() is None:
        return ENGINES[0]
    return ENGINES[1]


def require_eval_extra() -> None:
    if not eval_available():
        raise MissingExtra(INSTALL_HINT)


def default_gate(labels: list[str]) -> dict:
    """The loosest gate among the scheme labels present (unknown labels get FALLBACK_GATE)."""
    gates = [DEFAULT_GATES.get(label, FALLBACK_GATE) for label in labels] or [FALLBACK_GATE]
    return {"max_kl": max(g["max_kl"] for g in gates), "min_top1": min(g["min_top1"] for g in gates),
            "min_cosine": min(g["min_cosine"] for g in gates)}


@dataclass
class WindowStats:
    """One window of a decoder eval (sums, so windows add up), or one batch of sentences of an encoder eval."""

    tokens: int = 0          # predicted tokens (decoder) or sentences (encoder)
    kl_sum: float = 0.0      # sum over tokens of KL(source || quantized), nats
    agree: int = 0           # tokens whose argmax is the same
    nll_source: float = 0.0  # sum of -log p(next token), source
    nll_quantized: float = 0.0
    nonfinite: int = 0       # NaN/Inf logits (or embedding values) of the quantized model
    cos_sum: float = 0.0     # encoder: sum of cosines of pooled embeddings
    cos_min: float = 1.0

    def add(self, other: "WindowStats") -> None:
        for name in ("tokens", "kl_sum", "agree", "nll_source", "nll_quantized", "nonfinite", "cos_sum"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.cos_min = min(self.cos_min, other.cos_min)

    def metrics(self, kind: str) -> dict:
        n = max(self.tokens, 1)
        if kind == "encoder":
            return {"sentences": self.tokens, "mean_cosine": _finite(self.cos_sum / n), "min_cosine": _finite(self.cos_min),
                    "nonfinite": self.nonfinite}
        return {"tokens": self.tokens, "kl": _finite(self.kl_sum / n), "top1": self.agree / n,
                "ppl_source": _exp(self.nll_source / n), "ppl_quantized": _exp(self.nll_quantized / n),
                "nonfinite": self.nonfinite}


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _exp(x: float) -> float | None:
    return _finite(math.exp(x)) if math.isfinite(x) and x < 700 else None


@dataclass
class EvalResult:
    """Everything `fp8conv eval` reports; `passed` and `reasons` come from `judge`."""

    kind: str                      # "decoder" or "encoder"
    engine: str
    source: str
    quantized: str
    text: str                      # "built-in" or the file given
    window: int
    schemes: list[str]
    gate: dict
    windows: list[WindowStats] = field(default_factory=list)
    load_error: str | None = None  # the engine could not load the quantized checkpoint
    peak_rss_bytes: int | None = None
    seconds: float | None = None
    passed: bool = False
    reasons: list[str] = field(default_factory=list)

    def overall(self) -> WindowStats:
        total = WindowStats()
        for w in self.windows:
            total.add(w)
        return total

    def judge(self) -> None:
        """Fill passed/reasons from the gate: any load error, NaN/Inf, or a metric past its threshold fails."""
        reasons = []
        if self.load_error is not None:
            reasons.append(f"{self.engine} could not run the quantized checkpoint: {self.load_error}")
        else:
            m = self.overall().metrics(self.kind)
            if m["nonfinite"]:
                reasons.append(f"{m['nonfinite']} NaN/Inf values in the quantized model's outputs")
            if self.kind == "encoder":
                if m["mean_cosine"] is None or m["mean_cosine"] < self.gate["min_cosine"]:
                    reasons.append(f"mean embedding cosine {_show(m['mean_cosine'])} < {self.gate['min_cosine']}")
            else:
                if m["kl"] is None or m["kl"] > self.gate["max_kl"]:
                    reasons.append(f"mean KL(source || quantized) {_show(m['kl'])} nats/token > {self.gate['max_kl']}")
                if m["top1"] < self.gate["min_top1"]:
                    reasons.append(f"top-1 agreement {m['top1']:.4f} < {self.gate['min_top1']}")
        self.reasons, self.passed = reasons, not reasons

    def to_json(self) -> dict:
        return {
            "schema_version": EVAL_SCHEMA, "tool": "fp8conv", "kind": self.kind, "engine": self.engine,
            "source": self.source, "quantized": self.quantized, "text": self.text, "window": self.window,
            "schemes": self.schemes, "gate": self.gate, "passed": self.passed, "reasons": self.reasons,
            "load_error": self.load_error,
            "overall": None if self.load_error else self.overall().metrics(self.kind),
            "windows": [w.metrics(self.kind) for w in self.windows],
            "peak_rss_bytes": self.peak_rss_bytes, "seconds": self.seconds,
        }


def _show(x: float | None) -> str:
    return "NaN/Inf" if x is None else f"{x:.5f}"


def read_eval(out: Path) -> dict | None:
    """OUT's fp8conv.eval.json, or None when eval never ran; InputError when it is not ours."""
    path = Path(out) / EVAL_NAME
    if not path.exists():
        return None
    data = load_json_file(path, "is not readable JSON")
    if not isinstance(data, dict) or data.get("schema_version") != EVAL_SCHEMA or "passed" not in data:
        raise InputError(f"{path} is not an eval result written by this version of fp8conv")
    return data


def summary_text(data: dict) -> str:
    """The eval result as the few lines a terminal shows (JSON data from EvalResult.to_json)."""
    verdict = "PASS" if data["passed"] else "FAIL"
    lines = [f"eval {verdict}: {data['quantized']} against {data['source']} ({data['engine']}, {data['kind']}, "
             f"text: {data['text']})"]
    if data["overall"] is not None:
        lines += [eval_table(data), ""]
    gate = data["gate"]
    lines.append("gate: " + (f"mean cosine >= {gate['min_cosine']}" if data["kind"] == "encoder"
                             else f"KL <= {gate['max_kl']}, top-1 >= {gate['min_top1']}")
                 + f", no NaN/Inf (schemes: {', '.join(data['schemes']) or 'unknown'})")
    lines += [f"  - {reason}" for reason in data["reasons"]]
    return "\n".join(lines)


def eval_table(data: dict) -> str:
    """A Markdown table: one row per window and the overall row."""
    rows = [(str(i + 1), w) for i, w in enumerate(data["windows"])] + [("all", data["overall"])]
    if data["kind"] == "encoder":
        head = "| sentences | mean cosine | min cosine | NaN/Inf |\n| ---: | ---: | ---: | ---: |"
        body = [f"| {m['sentences']} | {_num(m['mean_cosine'], 6)} | {_num(m['min_cosine'], 6)} | {m['nonfinite']} |"
                for _, m in rows[-1:]]
        return "\n".join([head, *body])
    head = ("| window | tokens | KL(source \\|\\| quantized) nats/token | top-1 agreement | perplexity source | "
            "perplexity quantized | NaN/Inf |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    body = [f"| {label} | {m['tokens']} | {_num(m['kl'], 5)} | {m['top1']:.4f} | {_num(m['ppl_source'], 3)} | "
            f"{_num(m['ppl_quantized'], 3)} | {m['nonfinite']} |" for label, m in rows]
    return "\n".join([head, *body])


def _num(x: float | None, digits: int) -> str:
    return "NaN/Inf" if x is None else f"{x:.{digits}f}"
