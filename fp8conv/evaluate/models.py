"""Run the source and the quantized model as a user's engine loads them, and compare their outputs.

Needs the `eval` extra (torch, transformers, compressed-tensors); import it only after
`quality.require_eval_extra()`. The quantized checkpoint is loaded by transformers' own quantizers,
dequantizing on load (compressed-tensors' decompressors, the fine-grained FP8 loader, the MXFP4
loader), never by fp8conv's dequantize, so a checkpoint an engine misreads fails here.

Decoder metrics per predicted token: KL(source || quantized) of the next-token distributions (nats),
top-1 agreement, both perplexities, NaN/Inf logits. Encoder metrics per sentence: cosine of the
mean-pooled embeddings. Both models run in float32 after loading in the checkpoint's own dtype, and
are loaded one after the other: the source's log-probs wait in a temporary file, one window in memory.

Engines: `transformers` (here) and `vllm` (vllm_engine.py: SRC and OUT run by vLLM in a child process, the same
token windows, the same compare_window on its full-vocabulary log-probs).

Library API (#28 uses it for per-layer sensitivity): `evaluate(src, out, ...) -> EvalResult`,
`evaluate_many(src, outs, ...)` (one vLLM process for SRC and every OUT); for a model already in memory,
`window_logprobs(model, ids)` and `compare_window(ref_logp, logp, ids)`.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import resource
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from ..errors import InputError, SchemeError
from ..io.untrusted import load_json_file
from ..layouts.base import Layout
from . import vllm_engine
from .quality import DEFAULT_SENTENCES, DEFAULT_TOKENS, DEFAULT_WINDOW, EvalResult, WindowStats, default_gate

CORPUS = Path(__file__).resolve().parent / "data" / "eval_corpus.txt"
CORPUS_NAME = "built-in (fp8conv/evaluate/data/eval_corpus.txt, CC0-1.0)"


# ---- the models ---------------------------------------------------------------------------------


def model_kind(path: Path) -> str:
    """'decoder' when config.json names a *ForCausalLM architecture, else 'encoder'."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = _config(path)
    archs = config.get("architectures")
    if archs:  # what the checkpoint says it is wins (a BERT encoder's model type also has an LM head class)
        return "decoder" if any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in archs) else "encoder"
    return "decoder" if config.get("model_type") in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES else "encoder"


def _config(path: Path) -> dict:
    config = load_json_file(Path(path) / "config.json", "cannot be read as the model's config")
    if not isinstance(config, dict):
        raise InputError(f"{Path(path) / 'config.json'}: the model's config is not a JSON object")
    return config


def loader_config(path: Path):
    """The quantization_config object a user passes to transformers to run OUT on any device (dequantize on load):
    the one its layout names (layouts/*.py, transformers_loader)."""
    import transformers

    quant_config = _config(path).get("quantization_config")
    layout = Layout.detect(quant_config, {}) if isinstance(quant_config, dict) else None
    if layout is None or layout.transformers_loader is None:
        method = quant_config.get("quant_method") if isinstance(quant_config, dict) else None
        raise InputError(f"{path}: config.json has no quantization_config an engine loads (quant_method {method!r}); "
                         "fp8conv's own layout is for fp8conv only: quantize with an engine's layout (--layout)")
    name, _ = layout.transformers_loader.split("(", 1)
    return getattr(transformers, name)(dequantize=True)


def load_model(path: Path, kind: str, quantized: bool):
    """The model in float32 on CPU, loaded in its checkpoint's dtype as transformers loads it for a user."""
    import transformers

    cls = transformers.AutoModelForCausalLM if kind == "decoder" else transformers.AutoModel
    kwargs = {"quantization_config": loader_config(path)} if quantized else {}
    with _quiet():
        model = cls.from_pretrained(path, dtype="auto", **kwargs)
    return model.float().eval()


def load_tokenizer(*paths: Path):
    """The first folder's tokenizer that loads (OUT carries SRC's)."""
    from transformers import AutoTokenizer

    for path in paths:
        if any((Path(path) / name).exists() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
            with _quiet():
                return AutoTokenizer.from_pretrained(path)
    raise InputError(f"no tokenizer in {' or '.join(str(p) for p in paths)}: the eval needs the model's tokenizer files")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """transformers' and compressed-tensors' progress bars and advice stay off the user's stderr (tqdm reads
    TQDM_DISABLE only when imported, so their Python-level stderr is swallowed while a model loads)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    loguru = _loguru()  # compressed-tensors logs through loguru, whose handler holds the real stderr
    if loguru is not None:
        loguru.disable("compressed_tensors")
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)
        if loguru is not None:
            loguru.enable("compressed_tensors")


def _loguru():
    try:
        from loguru import logger
    except ImportError:
        return None
    return logger


# ---- text ---------------------------------------------------------------------------------------


def read_text(text: Path | None) -> str:
    path = CORPUS if text is None else Path(text)
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read the eval text as UTF-8 ({exc})") from None


def token_windows(tokenizer, text: str, tokens: int, window: int) -> list[torch.Tensor]:
    """The first `tokens` tokens of the text cut into windows of `window` (a shorter text: fewer windows;
    a text shorter than one window: one window of all its tokens)."""
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)[:tokens]
    if len(ids) < 2:
        raise InputError("the eval text has fewer than 2 tokens")
    if len(ids) < window:
        return [ids]
    return list(ids[: len(ids) // window * window].reshape(-1, window))


def sentences(text: str, count: int) -> list[str]:
    """Up to `count` sentences of at least 6 words, whitespace collapsed (the encoder's inputs)."""
    flat = re.sub(r"\s+", " ", text)
    found = [s.strip() for s in re.split(r"(?<=[.;:!?])\s", flat) if len(s.split()) >= 6]
    if not found:
        raise InputError("the eval text has no sentence of 6 words or more")
    return found[:count]


# ---- metrics on in-memory models ---------------------------------------------------------------


def window_logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    """(T,) token ids -> (T-1, vocab) float32 next-token log-probs of a causal LM."""
    with torch.inference_mode(), _quiet():
        logits = model(ids[None]).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1)


def compare_window(ref_logp: torch.Tensor, logp: torch.Tensor, ids: torch.Tensor, rows: int = 64) -> WindowStats:
    """KL(source || quantized) summed over positions, top-1 agreement, NLLs, in float64 `rows` positions at a
    time (bounded memory at a 150k vocabulary); NaN/Inf logits are counted and make KL NaN."""
    stats = WindowStats()
    for start in range(0, ref_logp.shape[0], rows):
        ref, q = ref_logp[start:start + rows].double(), logp[start:start + rows].double()
        target = ids[1 + start:1 + start + len(ref), None]
        bad = ~torch.isfinite(q)
        stats.add(WindowStats(
            tokens=len(ref), kl_sum=float((ref.exp() * (ref - q)).sum()),
            agree=int(((ref.argmax(-1) == q.nan_to_num(-torch.inf).argmax(-1)) & ~bad.any(-1)).sum()),
            nll_source=-float(ref.gather(1, target).sum()), nll_quantized=-float(q.gather(1, target).sum()),
            nonfinite=int(bad.sum())))
    return stats


def pooled_embeddings(model, batch: dict) -> torch.Tensor:
    """Mean-pooled (over the attention mask), L2-normalised float64 sentence embeddings."""
    with torch.inference_mode(), _quiet():
        hidden = model(**batch).last_hidden_state.double()
    mask = batch["attention_mask"][..., None].double()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def compare_embeddings(ref: torch.Tensor, emb: torch.Tensor) -> WindowStats:
    nonfinite = int((~torch.isfinite(emb)).sum())
    cos = (ref * emb).sum(-1).nan_to_num(-1.0)
    return WindowStats(tokens=int(cos.shape[0]), cos_sum=float(cos.sum()), cos_min=float(cos.min()),
                       nonfinite=nonfinite)


# ---- the whole eval ------------------------------------------------------------------------------


def checkpoint_schemes(out: Path) -> list[str]:
    """Scheme labels of OUT's quantized weights ('int8 channel', 'nvfp4', ...) from config.json's
    quantization_config, as an engine sees them (so llm-compressor's outputs get a gate too)."""
    qc = _config(out).get("quantization_config") or {}
    if "weight_block_size" in qc:  # fine-grained FP8: e4m3 in blocks, dynamic activations
        return ["fp8_e4m3 block"]
    labels = set()
    for group in (qc.get("config_groups") or {}).values():
        weights = group.get("weights") if isinstance(group, dict) else None
        if isinstance(weights, dict):
            labels.add(_ct_label(weights, bool(group.get("input_activations"))))
    return sorted(labels)


def _ct_label(weights: dict, activations: bool) -> str:
    bits, kind, strategy = weights.get("num_bits"), weights.get("type"), weights.get("strategy")
    if kind == "int":  # INT8 W8A8 also rounds every activation to int8 per token: its own gate
        return f"int{bits} w4a16" if bits == 4 else f"int{bits} {strategy}" + (" w8a8" if activations else "")
    if bits == 4:  # 16-element groups with an e4m3 scale (NVFP4) or 32 with E8M0 (MXFP4)
        return "nvfp4 w4a16" if weights.get("group_size") == 16 else "mxfp4 w4a16"
    if strategy == "group" and weights.get("group_size") == 32 and weights.get("scale_dtype") not in (None, "float32"):
        return "mxfp8 w8a16"
    return f"fp8_e4m3 {strategy}"


def evaluate(src: Path, out: Path, text: Path | None = None, tokens: int = DEFAULT_TOKENS,
             window: int = DEFAULT_WINDOW, engine: str = "transformers", gate: dict | None = None,
             progress: Callable[[str], None] = lambda message: None) -> EvalResult:
    """Load SRC, then OUT, on `engine`; compare on the text; judge against `gate` (per-scheme default)."""
    if engine == "vllm":
        return evaluate_many(src, [out], text, tokens, window, engine, gate, progress)[0]
    start = time.monotonic()
    kind = model_kind(src)
    result = _new_result(kind, engine, src, out, text, window, gate)
    torch.set_grad_enabled(False)
    run = _run_decoder if kind == "decoder" else _run_encoder
    run(Path(src), Path(out), read_text(text), tokens, window, result, progress)
    result.seconds = time.monotonic() - start
    result.peak_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result.judge()
    return result


def _new_result(kind: str, engine: str, src: Path, out: Path, text: Path | None, window: int,
                gate: dict | None) -> EvalResult:
    schemes = checkpoint_schemes(out)
    return EvalResult(kind, engine, str(src), str(out), CORPUS_NAME if text is None else str(text), window, schemes,
                      {**default_gate(schemes), **(gate or {})})


def evaluate_many(src: Path, outs: list[Path], text: Path | None = None, tokens: int = DEFAULT_TOKENS,
                  window: int = DEFAULT_WINDOW, engine: str = "transformers", gate: dict | None = None,
                  progress: Callable[[str], None] = lambda message: None) -> list[EvalResult]:
    """evaluate() for each OUT against one SRC; with vLLM, SRC and every OUT run in one vLLM process (one start-up)
    and each result's seconds / peak RSS are the whole run's (peak: this process's or vLLM's, the larger)."""
    if engine != "vllm":
        return [evaluate(src, out, text, tokens, window, engine, gate, progress) for out in outs]
    start = time.monotonic()
    if model_kind(src) != "decoder":
        raise SchemeError(f"{src}: --eval-engine vllm compares next-token log-probs of causal LMs; this model is an "
                          "encoder: use --eval-engine transformers (embedding cosine)")
    vllm_engine.require_vllm()
    for out in outs:
        loader_config(out)  # the same refusal as transformers' for a layout no engine loads
    results = [_new_result("decoder", engine, src, out, text, window, gate) for out in outs]
    windows = token_windows(load_tokenizer(outs[0], src), read_text(text), tokens, window)
    progress(f"vLLM: {len(windows)} window(s) of {len(windows[0])} tokens, the source then {len(outs)} checkpoint(s) "
             "in one process")
    child_rss = _run_vllm(Path(src), [Path(o) for o in outs], windows, results, progress)
    own_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for result in results:
        result.seconds, result.peak_rss_bytes = time.monotonic() - start, max(own_rss, child_rss)
        result.judge()
    return results


def _run_vllm(src: Path, outs: list[Path], windows: list[torch.Tensor], results: list[EvalResult], progress) -> int:
    """SRC and OUTs through vLLM; fills each result's windows or load_error. Returns vLLM's peak RSS."""
    refs: dict[int, np.ndarray] = {}
    source_error: list[str] = []

    def on_window(model: int, j: int, logp: np.ndarray) -> None:
        if model == 0:
            refs[j] = logp  # memory-mapped, on disk until the run ends
            return
        result = results[model - 1]
        if logp.shape != refs[j].shape:
            result.load_error = f"vLLM gave {logp.shape} log-probs for window {j + 1}, the source {refs[j].shape}"
        elif result.load_error is None:
            result.windows.append(compare_window(torch.from_numpy(np.array(refs[j])), torch.from_numpy(np.array(logp)),
                                                 windows[j]))

    def on_failure(model: int, reason: str) -> None:
        if model == 0:
            source_error.append(reason)
        else:
            results[model - 1].load_error, results[model - 1].windows = reason, []

    rss = vllm_engine.run_models([src, *outs], torch.stack(windows).numpy(), on_window, on_failure, progress)
    if source_error:
        raise InputError(f"{src}: vLLM could not run the source model: {source_error[0]}")
    return rss


def _load_quantized(out: Path, kind: str, result: EvalResult):
    """The quantized model, or None with result.load_error set (that is an eval failure, not a crash)."""
    try:
        return load_model(out, kind, quantized=True)
    except InputError:
        raise
    except Exception as exc:  # whatever the engine raises is the finding
        result.load_error = _one_line(exc)
        return None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}"


def _run_decoder(src: Path, out: Path, text: str, tokens: int, window: int, result: EvalResult, progress) -> None:
    windows = token_windows(load_tokenizer(out, src), text, tokens, window)
    progress(f"source: {len(windows)} window(s) of {len(windows[0])} tokens")
    model = load_model(src, "decoder", quantized=False)
    with tempfile.TemporaryDirectory(prefix="fp8conv-eval-") as tmp:
        store = None
        for i, ids in enumerate(windows):
            logp = window_logprobs(model, ids).numpy()
            if store is None:
                store = np.lib.format.open_memmap(Path(tmp) / "ref.npy", "w+", np.float32, (len(windows), *logp.shape))
            store[i] = logp
        del model
        progress("quantized model")
        model = _load_quantized(out, "decoder", result)
        if model is None:
            return
        for i, ids in enumerate(windows):
            try:
                logp = window_logprobs(model, ids)
            except Exception as exc:  # the engine failed to run what it loaded
                result.load_error = _one_line(exc)
                return
            result.windows.append(compare_window(torch.from_numpy(np.array(store[i])), logp, ids))
        del store


def _run_encoder(src: Path, out: Path, text: str, tokens: int, window: int, result: EvalResult, progress) -> None:
    tokenizer = load_tokenizer(out, src)
    batch = dict(tokenizer(sentences(text, DEFAULT_SENTENCES), padding=True, truncation=True, max_length=256,
                           return_tensors="pt"))
    progress(f"source: {len(batch['input_ids'])} sentences")
    ref = pooled_embeddings(load_model(src, "encoder", quantized=False), batch)
    model = _load_quantized(out, "encoder", result)
    if model is None:
        return
    try:
        result.windows.append(compare_embeddings(ref, pooled_embeddings(model, batch)))
    except Exception as exc:
        result.load_error = _one_line(exc)
