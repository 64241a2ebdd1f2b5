"""Run checkpoints through vLLM and write the full-vocabulary next-token log-probs of each token window.

Started by fp8conv/evaluate/vllm_engine.py as a script, with an interpreter that imports vLLM (this one, or
FP8CONV_VLLM_PYTHON's): it imports only the standard library, numpy and vLLM, never fp8conv, so it runs in
vLLM's own virtual environment. One process loads the checkpoints one after the other.

Why not vLLM's prompt log-probs alone: they carry the target token and the top k, and k = vocabulary size
turns every position into a Python dict of 50k-150k objects. The log-probs here are the ones vLLM computes
for its prompt log-probs: the engine core runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), the
model's compute_logits, which the model runner calls on the prompt's hidden states, is wrapped to keep its
output, and log_softmax in float32 is what vLLM's sampler applies. Each window is checked against the
prompt log-probs vLLM returns for its own tokens: a mismatch is an error, not a silent number.

Usage: python vllm_worker.py SPEC.json. SPEC: {"models": [dir, ...], "ids": "windows.npy" ((W, T) int64),
"out": dir, "max_model_len": int, "gpu_memory_utilization": float}. Stdout: one line per event,
"FP8CONV_VLLM " + JSON: {"event": "loaded" | "window" | "done" | "failed", "model": i, ...}; window files are
out/m{i}-w{j}.npy, float32 (T-1, vocab).
"""
from __future__ import annotations

import gc
import json
import os
import sys
import time

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core (and the model) in this process
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB: a few windows of KV cache need far less
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PREFIX = "FP8CONV_VLLM "
CHECK_TOLERANCE = 1e-3  # nats: our log_softmax of the kept logits against vLLM's own prompt log-prob


def say(event: str, model: int, **fields) -> None:
    print(PREFIX + json.dumps({"event": event, "model": model, **fields}), flush=True)


class Capture:
    """Wraps model.compute_logits: every call's logits kept (float32, on CPU) until taken."""

    def __init__(self) -> None:
        self.calls = []

    def install(self, model) -> None:
        original = model.compute_logits

        def compute_logits(hidden_states, *args, **kwargs):
            logits = original(hidden_states, *args, **kwargs)
            if logits is not None:
                self.calls.append(logits.detach().float().cpu())
            return logits

        model.compute_logits = compute_logits

    def take(self):
        calls, self.calls = self.calls, []
        return calls


def root_cause(exc: BaseException) -> str:
    """The innermost exception's one-line text (vLLM wraps engine failures)."""
    while exc.__cause__ is not None or (exc.__context__ is not None and not exc.__suppress_context__):
        exc = exc.__cause__ or exc.__context__
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:600]}"


def window_logprobs(llm, capture: Capture, ids) -> "numpy.ndarray":
    """(T,) ids -> (T-1, vocab) float32 log-probs of tokens 1..T-1, checked against vLLM's prompt log-probs."""
    import numpy as np
    import torch
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
    capture.take()
    out = llm.generate([TokensPrompt(prompt_token_ids=[int(t) for t in ids])], params, use_tqdm=False)[0]
    rows = len(ids) - 1
    # The runner computes the sampled position's logits first, then the prompt's (one chunk: max_num_batched_tokens
    # >= the window): the prompt's are the last call with T-1 rows.
    prompt = [c for c in capture.take() if c.shape[0] == rows]
    if not prompt:
        raise RuntimeError(f"vLLM computed no prompt logits of {rows} rows")
    logp = torch.log_softmax(prompt[-1], dim=-1)
    theirs = torch.tensor([d[int(t)].logprob for d, t in zip(out.prompt_logprobs[1:], ids[1:])], dtype=torch.float32)
    ours = logp.gather(1, torch.as_tensor(np.asarray(ids[1:], dtype=np.int64))[:, None])[:, 0]
    both = torch.isfinite(theirs) & torch.isfinite(ours)
    if not torch.equal(torch.isfinite(theirs), torch.isfinite(ours)) or \
            (both.any() and float((theirs[both] - ours[both]).abs().max()) > CHECK_TOLERANCE):
        raise RuntimeError("the logits kept are not the ones vLLM computed its prompt log-probs from")
    return logp.numpy()


def run_model(index: int, path: str, windows, spec: dict) -> bool:
    """Load one checkpoint, write its windows; False (after a "failed" event) when vLLM refused or failed it."""
    import numpy as np
    from vllm import LLM

    start = time.monotonic()
    try:
        llm = LLM(model=path, skip_tokenizer_init=True, enforce_eager=True, dtype="auto",
                  max_model_len=spec["max_model_len"], max_num_batched_tokens=max(spec["max_model_len"], 2048),
                  max_num_seqs=1, enable_prefix_caching=False,
                  gpu_memory_utilization=spec.get("gpu_memory_utilization", 0.25))
    except Exception as exc:  # the engine's refusal is the finding
        say("failed", index, stage="load", reason=root_cause(exc))
        release()
        return False
    say("loaded", index, seconds=round(time.monotonic() - start, 2))
    capture = Capture()
    llm.apply_model(capture.install)
    try:
        for j, ids in enumerate(windows):
            target = os.path.join(spec["out"], f"m{index}-w{j}.npy")
            np.save(target, window_logprobs(llm, capture, ids))
            say("window", index, window=j, path=target)
    except Exception as exc:
        say("failed", index, stage="run", reason=root_cause(exc))
        return False
    finally:
        del llm
        release()
    say("done", index)
    return True


def release() -> None:
    """Free the engine so the next checkpoint loads in the same process."""
    gc.collect()
    try:
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        destroy_model_parallel()
        destroy_distributed_environment()
    except Exception:  # nothing was initialised (a load that failed early)
        pass
    gc.collect()


def main() -> None:
    import numpy as np

    with open(sys.argv[1], encoding="utf-8") as f:
        spec = json.load(f)
    windows = np.load(spec["ids"])
    for index, path in enumerate(spec["models"]):
        if not run_model(index, path, windows, spec) and index == 0:
            return  # the source is every other model's reference


if __name__ == "__main__":
    main()
