"""Hugging Face checkpoint names <-> parameter-tree paths (the one place that maps them)."""

from __future__ import annotations

from torch import Tensor

from g4.params import Params, leaves_with_path

TEXT_PREFIX = "model."  # Gemma4ForCausalLM
MM_PREFIX = "model.language_model."  # Gemma4ForConditionalGeneration (hub -it and base checkpoints)


def hf_name(path: str) -> str:
    """Tree path -> text-decoder key without prefix: `layers.0.self_attn.q_proj` -> `...q_proj.weight`."""
    return path if path.endswith("layer_scalar") else path + ".weight"


def to_hf_state_dict(params: Params, prefix: str = TEXT_PREFIX) -> dict[str, Tensor]:
    """The tree as a Hugging Face state dict (tied lm_head not included)."""
    return {prefix + hf_name(p): t for p, t in leaves_with_path(params)}
