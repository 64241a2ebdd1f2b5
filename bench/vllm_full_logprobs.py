"""What vLLM's own full-vocabulary prompt log-probs cost (#27: why --eval-engine vllm reads the logits instead).

    /path/to/vllm-venv/bin/python bench/vllm_full_logprobs.py MODEL_DIR [--tokens 64]

vLLM 0.32 accepts prompt_logprobs=-1 (the whole vocabulary) when the engine's max_logprobs is -1; it returns a
Python dict of Logprob objects per position. Prints seconds and the process's peak RSS before and after one
request with prompt_logprobs=0 (what the eval asks) and one with -1, on the first --tokens ids 0..N-1 of a
fixed pseudo-random draw (the cost does not depend on the text).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import time

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def main() -> None:
    import numpy as np
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    llm = LLM(model=args.model, skip_tokenizer_init=True, enforce_eager=True, max_model_len=args.tokens + 8,
              max_num_seqs=1, max_logprobs=-1, gpu_memory_utilization=0.25, enable_prefix_caching=False)
    vocab = llm.llm_engine.model_config.get_vocab_size()
    ids = np.random.default_rng(0).integers(0, vocab, args.tokens).tolist()
    for k in (0, -1):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
        start = time.monotonic()
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=k, detokenize=False)
        out = llm.generate([TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)[0]
        print(json.dumps({"prompt_logprobs": k, "positions": len(ids) - 1, "seconds": round(time.monotonic() - start, 2),
                          "entries": sum(len(d) for d in out.prompt_logprobs[1:]), "peak_rss_mb_before": before,
                          "peak_rss_mb_after": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}), flush=True)


if __name__ == "__main__":
    main()
