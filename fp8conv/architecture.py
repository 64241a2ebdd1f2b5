"""What a model family looks like to the engines: read from config.json and the tensor names.

The one place that knows model families: which modules exist in memory without a tensor of their
own (tied heads), and, later in this module, which tensors each family keeps in high precision.
"""
from __future__ import annotations

from dataclasses import dataclass

# Architectures (config.json "architectures") whose class holds an output head module `lm_head`.
HEAD_SUFFIXES = ("ForCausalLM", "ForConditionalGeneration", "LMHeadModel", "ForImageTextToText")
HEAD_MODULE = "lm_head"


def _sub_configs(config: dict) -> list[dict]:
    """The config itself and its nested text / language-model configs (VLMs keep flags there)."""
    found = [config]
    for key in ("text_config", "language_config", "llm_config"):
        sub = config.get(key)
        if isinstance(sub, dict):
            found.append(sub)
    return found


@dataclass(frozen=True)
class Architecture:
    """Facts about a model family that decide what engines expect in each module."""

    model_type: str | None = None
    architectures: tuple[str, ...] = ()
    tie_word_embeddings: bool | None = None

    @classmethod
    def from_config(cls, config: dict | None) -> "Architecture":
        if not isinstance(config, dict):
            return cls()
        archs = config.get("architectures")
        tied = [c["tie_word_embeddings"] for c in _sub_configs(config) if isinstance(c.get("tie_word_embeddings"), bool)]
        return cls(
            model_type=config.get("model_type") if isinstance(config.get("model_type"), str) else None,
            architectures=tuple(a for a in archs if isinstance(a, str)) if isinstance(archs, list) else (),
            tie_word_embeddings=tied[0] if tied else None,
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
