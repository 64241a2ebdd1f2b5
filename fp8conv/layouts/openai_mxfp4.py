"""openai-mxfp4: the form gpt-oss ships in (`quant_method: mxfp4`), for fused 3-D experts only: `<x>`
[E, in, out] becomes `<x>_blocks` uint8 [E, out, in/32, 16] (the transpose [E, out, in], e2m1 codes two
per byte, element 2k in the low nibble) and `<x>_scales` uint8 [E, out, in/32] (E8M0, 2^(s-127));
every other tensor is kept as in the source. Same numerics as compressed-tensors mxfp4."""
from __future__ import annotations

import math

from ..errors import SchemeError
from ..formats import MICROSCALE
from ..formats.names import MXFP4  # the one microscaled format it holds
from ..plan.scheme import Scheme
from .base import CODES, SCALE, Layout, TensorSpec

OPENAI_BLOCKS, OPENAI_SCALES = "_blocks", "_scales"


class OpenAIMXFP4(Layout, name="openai-mxfp4"):
    label = "OpenAI MXFP4 (quant_method mxfp4, gpt-oss experts)"
    transformers_loader = "Mxfp4Config(dequantize=True)"
    quant_method = MXFP4  # gpt-oss's config names the method after the format
    scale_suffix = OPENAI_SCALES
    fused_experts_only = True
    transposes = True
    hint = "gpt-oss experts"
    microscale = MXFP4

    def tensors(self, scheme: Scheme, weight_name: str, shape: tuple[int, ...]) -> list[TensorSpec]:
        return openai_mxfp4_tensors(weight_name, shape)

    def accepts_microscale(self, scheme: Scheme) -> bool:
        return scheme.microscale == MXFP4

    def check(self, scheme: Scheme) -> None:
        if scheme.microscale != MXFP4:
            raise SchemeError(f"--layout {self.name} writes OpenAI's MXFP4 (the form gpt-oss ships in) and takes "
                              f"--format {MXFP4} only, not {scheme.describe()}")

    def quantization_config(self, scheme: Scheme, unquantized_modules: list[str],
                            groups: list[tuple[Scheme, list[str]]] = ()) -> dict:
        # transformers (Mxfp4Config) and vLLM (Mxfp4Config) read these two keys; both quantize only the
        # fused experts, transformers skipping the modules listed (gpt-oss's own config lists attention,
        # router, embeddings and head the same way, as globs).
        return {"quant_method": self.quant_method, "modules_to_not_convert": unquantized_modules}

    def reads_blocks(self, name: str) -> bool:
        return name.endswith(OPENAI_BLOCKS)


def openai_mxfp4_tensors(weight_name: str, shape: tuple[int, ...]) -> list[TensorSpec]:
    """OpenAI MXFP4 (gpt-oss): fused experts `<x>` [E, in, out] -> `<x>_blocks` uint8 [E, out, in/32, 16] and
    `<x>_scales` uint8 [E, out, in/32] (what transformers' Mxfp4HfQuantizer and vLLM's gpt_oss loader read)."""
    *lead, rows_in, cols_out = shape
    matrices = math.prod(lead)
    group = MICROSCALE[MXFP4].group
    return [TensorSpec(weight_name + OPENAI_BLOCKS, CODES, "U8", (*lead, cols_out, rows_in // group, group // 2), 1,
                       matrices),
            TensorSpec(weight_name + OPENAI_SCALES, SCALE, "U8", (*lead, cols_out, rows_in // group), 1, matrices)]
