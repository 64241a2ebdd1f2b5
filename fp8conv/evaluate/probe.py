"""Layer sensitivity, measured: KL(source || source with one module group quantized) for every group.

Needs the `eval` extra (import it after `quality.require_eval_extra()`). SRC is loaded once in transformers
(float32, as `fp8conv eval` runs it); its next-token log-probs are computed once (kept in a temporary file).
Then for each group (evaluate.sensitivity.groups_of) its weights are replaced by what a checkpoint of the
scheme holds, read back -- fp8conv's own quantize then dequantize (numerics.api.reconstruct_array: the codes,
scales, zero points and NVFP4 global scales quantize writes, rounded into SRC's dtype as an engine's
dequantize-on-load gives them) -- the text is run again, KL measured, and the group's weights restored from a
backup. Memory: one model plus one group's backup and reconstruction. Weight-only: the activation rounding of a
W8A8 scheme is not simulated (`fp8conv eval` on the written checkpoint measures it).
"""
from __future__ import annotations

import resource
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import InputError
from ..io.safetensors import TensorReader
from ..numerics.api import reconstruct_array
from ..plan.scheme import Scheme
from .models import (CORPUS_NAME, compare_window, load_model, load_tokenizer, model_kind, read_text, token_windows,
                     window_logprobs)
from .quality import WindowStats
from .sensitivity import (DEFAULT_TOKENS, DEFAULT_WINDOW, check_budget, check_overrides, choose, plan_candidates,
                          result_json, total)


class Probe:
    """SRC in memory with its reference log-probs; `kl(replacements)` runs the text with some weights replaced."""

    def __init__(self, src: Path, checkpoint, tensors: list[str], windows: list[torch.Tensor]) -> None:
        self.src, self.checkpoint, self.windows, self.store = src, checkpoint, windows, None
        self.model = load_model(src, "decoder", quantized=False)
        self.params = {}
        for name in tensors:
            try:
                param = self.model.get_parameter(name)
            except AttributeError:
                raise InputError(f"{src}: tensor {name} is no parameter of the model transformers builds (renamed "
                                 "on load?): the probe cannot replace it") from None
            if tuple(param.shape) != tuple(checkpoint.tensors[name].shape):
                raise InputError(f"{src}: tensor {name} has shape {tuple(checkpoint.tensors[name].shape)} in the "
                                 f"checkpoint but {tuple(param.shape)} in the model")
            self.params[name] = param

    def reference(self, folder: Path) -> None:
        """The source's log-probs, once, into a file in `folder` (one window in memory)."""
        for i, ids in enumerate(self.windows):
            logp = window_logprobs(self.model, ids).numpy()
            if self.store is None:
                self.store = np.lib.format.open_memmap(folder / "ref.npy", "w+", np.float32, (len(self.windows), *logp.shape))
            self.store[i] = logp

    def put(self, weights: dict[str, np.ndarray]) -> None:
        """Replace these tensors' weights (float32 arrays of their shapes) in the model."""
        with torch.no_grad():
            for name, values in weights.items():
                self.params[name].copy_(torch.from_numpy(values))

    def run(self) -> WindowStats:
        """KL(source || the model as it now is) and top-1 agreement over the text."""
        stats = WindowStats()
        for i, ids in enumerate(self.windows):
            stats.add(compare_window(torch.from_numpy(np.array(self.store[i])), window_logprobs(self.model, ids), ids))
        return stats

    def run_with(self, weights: dict[str, np.ndarray]) -> WindowStats:
        """run() with these weights in place, the originals restored afterwards from a backup of just them."""
        backup = {name: self.params[name].detach().clone() for name in weights}
        try:
            self.put(weights)
            return self.run()
        finally:
            with torch.no_grad():
                for name, values in backup.items():
                    self.params[name].copy_(values)


def _reconstruct(checkpoint, names, schemes: dict[str, Scheme], scales: dict[str, list]) -> dict[str, np.ndarray]:
    """tensor -> float32 weights as the quantized checkpoint holds them (rounded into the source dtype)."""
    out = {}
    for name in names:
        info = checkpoint.tensors[name]
        with TensorReader(checkpoint.shard_of()[name]) as reader:
            weight = reader.read_rows(info)
        rounded = reconstruct_array(weight, schemes[name], scales.get(name), name, out_dtype=weight.dtype)
        out[name] = rounded.astype(np.float32)
    return out


def _metrics(stats: WindowStats) -> tuple[float | None, float]:
    """(mean KL, None where a logit went NaN/Inf; top-1 agreement)."""
    m = stats.metrics("decoder")
    return m["kl"], m["top1"]


def measure(src: Path, scheme: Scheme, promote: str | None = None, budget: float | None = None,
            text: Path | None = None, tokens: int = DEFAULT_TOKENS, window: int = DEFAULT_WINDOW, tile_is_default: bool = True,
            progress: Callable[[str], None] = lambda message: None) -> dict:
    """Rank SRC's module groups by the KL their quantization under `scheme` causes alone; with `budget`, the
    groups to keep at `promote` within it. Returns the result JSON (evaluate.sensitivity.result_json)."""
    from ..run.global_scales import global_scales
    from ..run.options import RunOptions

    start = time.monotonic()
    checkpoint, plan, candidates = plan_candidates(src, scheme, promote if budget is not None else None, tile_is_default)
    check_budget(candidates, budget)
    if model_kind(src) != "decoder":
        raise InputError(f"{src}: sensitivity ranks decoders (KL of next-token distributions); this model has no LM head")
    names = [n for g in candidates.groups for n in g.tensors]
    scales = global_scales(checkpoint, plan, RunOptions())
    torch.set_grad_enabled(False)
    windows = token_windows(load_tokenizer(src), read_text(text), tokens, window)
    with tempfile.TemporaryDirectory(prefix="fp8conv-sensitivity-") as tmp:
        probe = Probe(src, checkpoint, names, windows)
        probe.reference(Path(tmp))
        for i, group in enumerate(candidates.groups):
            weights = _reconstruct(checkpoint, group.tensors, candidates.schemes, scales)
            group.kl, group.top1 = _metrics(probe.run_with(weights))
            progress(f"{i + 1}/{len(candidates.groups)} {group.label}: KL {_show(group.kl)}")
        chosen = choose(candidates, budget) if budget is not None else None
        kl_mix = None
        # From here the model is changed in place, a group at a time (no backup of the whole model).
        if chosen:
            for group in candidates.groups:
                promoted = group.label in {g.label for g in chosen}
                schemes = candidates.promoted_schemes if promoted else candidates.schemes
                probe.put(_reconstruct(checkpoint, group.tensors, schemes, {} if promoted else scales))
            kl_mix = _metrics(probe.run())[0]
        for group in (chosen or candidates.groups):
            probe.put(_reconstruct(checkpoint, group.tensors, candidates.schemes, scales))
        kl_all, top1_all = _metrics(probe.run())
        del probe
    checked = check_overrides(src, candidates, chosen) if chosen is not None else None
    measured = {"text": CORPUS_NAME if text is None else str(text), "tokens": sum(len(w) - 1 for w in windows),
                "window": len(windows[0]), "kl_all": kl_all, "top1_all": top1_all,
                "kl_sum": total(g.kl for g in candidates.groups), "seconds": time.monotonic() - start,
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    data = result_json(src, candidates, measured, budget, chosen, checked)
    if data["suggestion"] is not None:
        data["suggestion"]["kl_mix"] = kl_mix
        data["suggestion"]["lowers_kl"] = kl_mix is not None and kl_all is not None and kl_mix < kl_all
    return data


def _show(kl: float | None) -> str:
    return "NaN/Inf" if kl is None else f"{kl:.6f}"
