"""What a model family looks like to the engines, read from config.json and the tensor names.

The one place that knows model families: which tensors each family keeps in high precision by
default and why, which 3-D tensors are expert stacks, which modules exist in memory without a
tensor of their own (tied heads), which layers are MTP / NextN layers, and how transformers names a
checkpoint's modules in memory (the names an `ignore` list must use).
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

from ..io.safe_regex import PatternError, compile_pattern

# Architectures (config.json "architectures") whose class holds an output head module `lm_head`.
HEAD_SUFFIXES = ("ForCausalLM", "ForConditionalGeneration", "LMHeadModel", "ForImageTextToText")
HEAD_MODULE = "lm_head"
LAYER_INDEX = re.compile(r"(?:^|\.)layers\.([0-9]{1,18})\.")  # ASCII digits only: int() of '①' or 5000 digits raises


@dataclass(frozen=True)
class Rule:
    """A default: tensors of this kind stay in high precision, for `reason`."""

    kind: str
    globs: tuple[str, ...]
    reason: str
    includable: bool = True  # --include may quantize it anyway

    def matches(self, module: str) -> bool:
        return any(fnmatch.fnmatchcase(module, g) for g in self.globs)


EMBEDDING = Rule("embedding", ("*embed_tokens", "*embeddings", "*_embeddings", "*.wte", "*.wpe", "wte", "wpe"),
                 "a lookup table (nn.Embedding), not a Linear; engines load it unquantized")
LM_HEAD = Rule("lm_head", ("lm_head", "*.lm_head", "*.shared_head.head"),
               "engines keep the output head unquantized (the most error-sensitive matrix)")
ROUTER = Rule("MoE router", ("*.gate", "*.router", "*.router.*", "*.shared_expert_gate"),
              "vLLM builds routers without a quantization method (tiny; routing is accuracy-critical)")
VISION = Rule("vision tower", (
    "visual.*", "model.visual.*", "vision_tower.*", "model.vision_tower.*", "vision_model.*", "model.vision_model.*",
    "multi_modal_projector.*", "model.multi_modal_projector.*", "mm_projector.*", "model.mm_projector.*",
    "vision_encoder.*", "model.vision_encoder.*"),
    "vision towers and projectors are a small share of the weights and accuracy-sensitive; vLLM does not "
    "quantize most vision encoders")
MTP_PROJECTION = Rule("MTP projection", ("*.eh_proj",),
                      "the MTP (NextN) input projection eh_proj runs as a plain torch Linear in vLLM's DeepSeek "
                      "MTP, which cannot hold FP8")
DEFAULT_RULES = (MTP_PROJECTION, EMBEDDING, LM_HEAD, ROUTER, VISION)
CONV = ("conv / SSM weight", "3-D weight that is not an expert stack (e.g. a Mamba conv1d [C, 1, K]); convolution "
        "and SSM weights are not Linear layers, engines never quantize them")
FUSED_EXPERTS = ("fused experts", "fused 3-D experts stored [E, in, out] without .weight (gpt-oss): transformers "
                 "5.17 has no loader for quantized gpt-oss experts (a scale is UNEXPECTED, codes would be read as "
                 "weights), vLLM 0.32 reads them quantized only per expert and its CPU build has no quantized MoE "
                 "kernel for gpt-oss's swigluoai activation; in bf16 both engines load them")
ROUTING_BIAS = "expert-score correction bias (DeepSeek-V3 routing): 1-D, kept as shipped"

# Partitions that engines fuse into one layer: they must share one scheme (vLLM refuses otherwise).
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("q_a_proj", "kv_a_proj_with_mqa"))

# transformers 5.17 conversion_mapping.py: checkpoint name -> in-memory module name, per family.
_QWEN_VL = ((r"^visual", "model.visual"), (r"^model(?!\.(language_model|visual))", "model.language_model"))
_LLAVA = ((r"^language_model\.lm_head", "lm_head"), (r"^language_model\.model", "model.language_model"),
          (r"^language_model", "model.language_model"), (r"^vision_tower", "model.vision_tower"),
          (r"^multi_modal_projector", "model.multi_modal_projector"))
RENAMES = {
    "qwen2_vl": _QWEN_VL, "qwen2_5_vl": _QWEN_VL,
    **{t: _LLAVA for t in ("llava", "gemma3", "mistral3", "paligemma", "aya_vision", "internvl", "vipllava",
                           "got_ocr2", "llava_next", "llava_onevision", "llava_next_video")},
}
EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")  # the names vLLM's fused MoE checks per expert
# vLLM 0.32's checkpoint-name mappers that rewrite module names ending so (also in the ignore list), per family.
VLLM_RENAMED_SUFFIXES = {"gpt_oss": (".gate_up_proj", ".down_proj")}
# Families that ship fused experts in OpenAI's MXFP4 (`<x>_blocks` / `<x>_scales`, quant_method mxfp4), and the
# fused tensors that form takes: transformers 5.17 (Mxfp4HfQuantizer) and vLLM 0.32 (gpt_oss.py) read exactly these.
OPENAI_MXFP4_EXPERTS = {"gpt_oss": (".experts.gate_up_proj", ".experts.down_proj")}
EXPERT_COUNT_KEYS = ("num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts")
VISION_KEYS = ("vision_config", "vision_tower_config", "visual")


def _sub_configs(config: dict) -> list[dict]:
    """The config itself and its nested text / language-model configs (VLMs keep flags there)."""
    found = [config]
    for key in ("text_config", "language_config", "llm_config"):
        sub = config.get(key)
        if isinstance(sub, dict):
            found.append(sub)
    return found


def _first_int(configs: list[dict], keys: tuple[str, ...]) -> int | None:
    for config in configs:
        for key in keys:
            value = config.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def module_name(tensor_name: str) -> str:
    """'model.layers.0.mlp.down_proj.weight' -> 'model.layers.0.mlp.down_proj'."""
    return tensor_name[: -len(".weight")] if tensor_name.endswith(".weight") else tensor_name


@dataclass(frozen=True)
class Architecture:
    """Facts about a model family that decide what engines expect in each module."""

    model_type: str | None = None
    architectures: tuple[str, ...] = ()
    tie_word_embeddings: bool | None = None
    num_hidden_layers: int | None = None
    nextn_layers: int = 0
    num_experts: int | None = None
    vision: bool = False
    renames: tuple[tuple[str, str], ...] = field(default=())

    @classmethod
    def from_config(cls, config: dict | None) -> "Architecture":
        if not isinstance(config, dict):
            return cls()
        configs = _sub_configs(config)
        archs = config.get("architectures")
        tied = [c["tie_word_embeddings"] for c in configs if isinstance(c.get("tie_word_embeddings"), bool)]
        model_type = config.get("model_type") if isinstance(config.get("model_type"), str) else None
        return cls(
            model_type=model_type,
            architectures=tuple(a for a in archs if isinstance(a, str)) if isinstance(archs, list) else (),
            tie_word_embeddings=tied[0] if tied else None,
            num_hidden_layers=_first_int(configs, ("num_hidden_layers",)),
            nextn_layers=_first_int(configs, ("num_nextn_predict_layers",)) or 0,
            num_experts=_first_int(configs, EXPERT_COUNT_KEYS),
            vision=any(isinstance(config.get(k), dict) for k in VISION_KEYS),
            renames=RENAMES.get(model_type or "", ()),
        )

    @property
    def has_head(self) -> bool:
        return any(a.endswith(HEAD_SUFFIXES) for a in self.architectures)

    def tied_heads(self, tensor_names) -> list[str]:
        """Modules that exist in the loaded model but share another tensor (no tensor of their own).

        With tied embeddings the checkpoint stores only `*.embed_tokens.weight`; transformers still
        builds `lm_head` as a Linear, so a compressed-tensors config that does not ignore it makes the
        loader treat it as quantized with a scale that was never stored (uninitialised: garbage logits).
        """
        names = set(tensor_names)
        if any(n == f"{HEAD_MODULE}.weight" or n.endswith(f".{HEAD_MODULE}.weight") for n in names):
            return []
        tied = self.tie_word_embeddings
        if tied is None:  # not stated: a head class without a stored head shares the embedding
            tied = self.has_head
        if tied and (self.has_head or self.tie_word_embeddings):
            return [HEAD_MODULE]
        return []

    def mtp_layer(self, tensor_name: str) -> int | None:
        """The index of the MTP / NextN layer holding this tensor (layers past num_hidden_layers)."""
        if not self.nextn_layers or self.num_hidden_layers is None:
            return None
        match = LAYER_INDEX.search(tensor_name)
        if match and int(match.group(1)) >= self.num_hidden_layers:
            return int(match.group(1))
        return None

    def is_expert_stack(self, tensor_name: str, shape: tuple[int, ...]) -> bool:
        """A 3-D `[E, out, in]` stack of expert matrices (not a convolution kernel)."""
        if len(shape) != 3:
            return False
        if ".experts." in f".{tensor_name}":
            return True
        return self.num_experts is not None and shape[0] == self.num_experts and min(shape[1:]) > 1

    def rule_for(self, tensor_name: str, shape: tuple[int, ...]) -> Rule | None:
        """The default that keeps a floating `.weight` tensor (2-D or 3-D) in high precision, if any."""
        module = module_name(tensor_name)
        for rule in DEFAULT_RULES:
            if rule.matches(module):
                return rule
        if len(shape) == 3 and not self.is_expert_stack(tensor_name, shape):
            return Rule(CONV[0], (), CONV[1], includable=False)
        return None

    def fused_experts_rule(self, tensor_name: str, shape: tuple[int, ...]) -> Rule | None:
        """gpt-oss style fused experts `*.experts.gate_up_proj` / `*.experts.down_proj` (no `.weight`)."""
        if len(shape) == 3 and re.search(r"\.experts\.(gate_up_proj|down_proj|up_proj|gate_proj)$", tensor_name):
            return Rule(FUSED_EXPERTS[0], (), FUSED_EXPERTS[1], includable=False)
        return None

    def openai_mxfp4_expert(self, tensor_name: str, shape: tuple[int, ...]) -> bool:
        """A fused 3-D experts tensor this family ships in OpenAI MXFP4 (gpt-oss gate_up_proj / down_proj)."""
        suffixes = OPENAI_MXFP4_EXPERTS.get(self.model_type or "")
        return bool(suffixes) and len(shape) == 3 and tensor_name.endswith(suffixes)

    def copy_reason(self, tensor_name: str) -> str | None:
        """A family-specific reason for a tensor that is copied anyway (1-D, not a weight)."""
        if tensor_name.endswith("e_score_correction_bias"):
            return ROUTING_BIAS
        return None

    def mtp_reason(self, tensor_name: str) -> str | None:
        layer = self.mtp_layer(tensor_name)
        if layer is None:
            return None
        return (f"MTP (NextN) layer {layer}: kept, never dropped; quantized like the decoder layers "
                "(vLLM's MTP block uses the model's quantization config)")

    def loader_names(self, module: str) -> list[str]:
        """The module's checkpoint name and, where transformers renames it in memory, that name too."""
        names = [module]
        for pattern, target in self.renames:
            renamed, n = re.subn(pattern, target, module, count=1)
            if n:
                if renamed != module:
                    names.append(renamed)
                break
        return names

    def experts_module(self, tensor_name: str) -> str | None:
        """`model.layers.0.mlp.experts` for any tensor of that layer's experts: vLLM loads all of them as
        one fused MoE layer, so they share one scheme and are ignored (or not) together."""
        index = tensor_name.find(".experts.")
        return tensor_name[: index + len(".experts")] if index > 0 else None

    def experts_ignore_pattern(self, owner: str) -> str:
        """The compressed-tensors `ignore` entry, besides `owner` itself, that keeps the experts layer `owner`
        in high precision in vLLM.

        vLLM 0.32 (CompressedTensorsMoEMethod.get_moe_method) decides whether a fused MoE layer is ignored from
        the names of its expert 0 projections `<owner>.0.gate_proj / up_proj / down_proj`, after rewriting the
        ignore list with the model's checkpoint-name mapper: gpt-oss's maps any name ending in `.down_proj` to
        `.w2_weight`, so an explicit `<owner>.0.down_proj` stops matching (vLLM then refuses the layer: "All
        MoE projections need to have same quantization scheme"). `re:` patterns are left alone by the mapper;
        compressed-tensors reads them too. (vLLM's fine-grained FP8 loader matches the layer name itself.)"""
        return "re:" + re.escape(owner) + r"\.\d+\.(" + "|".join(EXPERT_PROJECTIONS) + ")$"

    def vllm_sees_ignored(self, module: str, ignore: list[str]) -> bool:
        """Whether vLLM, after its name mapper rewrote `ignore`, finds `module` in it (`re:` entries: re.match)."""
        for entry in ignore:
            if entry.startswith("re:"):
                try:
                    if compile_pattern(entry[3:]).match(module):
                        return True
                except PatternError:
                    continue
            elif entry == module and not entry.endswith(VLLM_RENAMED_SUFFIXES.get(self.model_type or "", ())):
                return True
        return False

    def fused_group(self, module: str) -> list[str] | None:
        """The sibling module names an engine fuses with this one (q/k/v, gate/up, MLA q_a/kv_a)."""
        prefix, _, leaf = module.rpartition(".")
        for group in FUSED_GROUPS:
            if leaf in group:
                return [f"{prefix}.{part}" if prefix else part for part in group]
        return None
