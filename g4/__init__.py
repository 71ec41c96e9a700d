"""g4: a functional Gemma 4 (text decoder, vision and audio towers) with an ExecuTorch exporter."""

from g4.checkpoint import (
    CheckpointError,
    load_assistant,
    load_checkpoint,
    write_random_assistant,
    write_random_checkpoint,
)
from g4.config import ASSISTANTS, CONFIGS, AssistantConfig, Config, ConfigError, LayerSpec
from g4.fn import EAGER, Q8, Cache, Hooks, forward, init_cache
from g4.fn.multimodal import multimodal_logits
from g4.generation import Drafter, EagerModel, PteDrafter, PteModel, Sampler, generate
from g4.params import Params, init_params, tree_map

__all__ = [
    "ASSISTANTS",
    "CONFIGS",
    "AssistantConfig",
    "Drafter",
    "EAGER",
    "Cache",
    "CheckpointError",
    "Config",
    "ConfigError",
    "EagerModel",
    "Hooks",
    "LayerSpec",
    "Params",
    "PteDrafter",
    "PteModel",
    "Q8",
    "Sampler",
    "forward",
    "generate",
    "init_cache",
    "init_params",
    "load_assistant",
    "load_checkpoint",
    "multimodal_logits",
    "tree_map",
    "write_random_assistant",
    "write_random_checkpoint",
]
