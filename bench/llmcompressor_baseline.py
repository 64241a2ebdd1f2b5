"""llm-compressor's model-free PTQ, FP8_BLOCK on CPU, with the same tensors left in high precision.

    python bench/llmcompressor_baseline.py SRC OUT [WORKERS]
"""
from __future__ import annotations

import sys

from llmcompressor import model_free_ptq

if __name__ == "__main__":
    model_free_ptq(
        model_stub=sys.argv[1],
        save_directory=sys.argv[2],
        scheme="FP8_BLOCK",
        ignore=["lm_head", "re:.*embed_tokens$", "re:.*mlp.gate$"],
        max_workers=int(sys.argv[3]) if len(sys.argv) > 3 else 1,
        device="cpu",
    )
