"""Pure functions that define the Gemma 4 text forward (no modules, no hidden state)."""

from g4.fn.attention import ATTENTION_SCALE, mask, sdpa
from g4.fn.cache import Q8, Cache, init_cache
from g4.fn.model import EAGER, Hooks, embed, forward, per_layer_inputs
from g4.fn.ops import gelu, mlp, rms_norm, softcap
from g4.fn.rope import apply_rope, inv_freq, rope_table

__all__ = [
    "ATTENTION_SCALE",
    "EAGER",
    "Cache",
    "Hooks",
    "Q8",
    "apply_rope",
    "embed",
    "forward",
    "gelu",
    "init_cache",
    "inv_freq",
    "mask",
    "mlp",
    "per_layer_inputs",
    "rms_norm",
    "rope_table",
    "sdpa",
    "softcap",
]
