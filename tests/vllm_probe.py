"""Run by test_vllm.py with the vLLM CPU interpreter: load a checkpoint, print prompt log-probs and a greedy continuation.

With FP8CONV_VLLM_DUMP=path.npz it also saves, as float32, every parameter of the loaded model whose name
contains FP8CONV_VLLM_DUMP_MATCH (default "experts"): what vLLM's loader put where (the engine core then runs
in this process, so the model can be reached)."""
from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
DUMP = os.environ.get("FP8CONV_VLLM_DUMP")
if DUMP:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # apply_model then runs here, no pickling
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
PROMPT = [1, 5, 9, 33, 100, 200, 300, 7, 42, 11, 64, 128]


def loaded_parameters(model) -> dict:
    """name -> float32 values, "dtypes" -> JSON {name: torch dtype} (what the kernel holds), "schemes" -> JSON
    {module: compressed-tensors scheme class vLLM built it with}, "amx" -> whether this CPU has AMX tiles (vLLM's
    CPU kernels repack or release weights differently with and without it)."""
    match = os.environ.get("FP8CONV_VLLM_DUMP_MATCH", "experts")
    import numpy as np
    import torch

    found = {name: p for name, p in model.named_parameters() if match in name}
    values = {name: p.detach().float().cpu().numpy() for name, p in found.items()}
    values["dtypes"] = np.array(json.dumps({name: str(p.dtype) for name, p in found.items()}))
    schemes = {name: type(m.scheme).__name__ for name, m in model.named_modules()
               if match in name and getattr(m, "scheme", None) is not None}
    values["schemes"] = np.array(json.dumps(schemes))
    values["amx"] = np.array(bool(torch.cpu._is_amx_tile_supported()))
    return values


def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=sys.argv[1], skip_tokenizer_init=True, enforce_eager=True, dtype="bfloat16",
              max_model_len=128, max_num_seqs=1)
    if DUMP:
        import numpy as np

        np.savez(DUMP, **llm.apply_model(loaded_parameters)[0])
    params = SamplingParams(max_tokens=4, temperature=0.0, prompt_logprobs=0, detokenize=False)
    out = llm.generate([TokensPrompt(prompt_token_ids=PROMPT)], params)[0]
    logprobs = [d[token].logprob for d, token in zip(out.prompt_logprobs[1:], PROMPT[1:])]
    print("RESULT " + json.dumps({"prompt_logprobs": logprobs, "generated": list(out.outputs[0].token_ids)}))


if __name__ == "__main__":
    main()
