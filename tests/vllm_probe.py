"""Run by test_vllm.py with the vLLM CPU interpreter: load a checkpoint, print prompt log-probs and a greedy continuation."""
from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
PROMPT = [1, 5, 9, 33, 100, 200, 300, 7, 42, 11, 64, 128]


def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=sys.argv[1], skip_tokenizer_init=True, enforce_eager=True, dtype="bfloat16",
              max_model_len=128, max_num_seqs=1)
    params = SamplingParams(max_tokens=4, temperature=0.0, prompt_logprobs=0, detokenize=False)
    out = llm.generate([TokensPrompt(prompt_token_ids=PROMPT)], params)[0]
    logprobs = [d[token].logprob for d, token in zip(out.prompt_logprobs[1:], PROMPT[1:])]
    print("RESULT " + json.dumps({"prompt_logprobs": logprobs, "generated": list(out.outputs[0].token_ids)}))


if __name__ == "__main__":
    main()
