"""Export g4 to an ExecuTorch `.pte` that ExecuTorch's stock LLM runner can run.

Pipeline: parameters (quantized leaf by leaf) -> `Shim` (buffers) -> `torch.export` with a dynamic
prefill length -> tanh-GELU kept as tanh arithmetic -> `to_edge_transform_and_lower` with the XNNPACK
partitioners -> `to_executorch` -> written to a temporary file and renamed.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import attrs
import torch
from executorch.exir.dialects._ops import ops as exir_ops
from executorch.exir.pass_base import ExportPass, PassResult

from g4.audio import FRAME, HOP, MAX_SAMPLES, encoder_blocks, encoder_frames, frames
from g4.checkpoint import atomic_write, trim_heap
from g4.config import AssistantConfig, Config
from g4.export.fuse import fuse
from g4.export.lean import free_lowered, freed_once_packed, lean_lowering
from g4.export.quant import (
    EMBEDDING_BITS,
    EMBEDDING_TABLES,
    FLOAT_LINEARS,
    LINEAR_MODES,
    chunked,
    quantize_embedding,
    quantize_linear,
    row_blocks,
)
from g4.export.shim import KV_CACHES, DraftSpec, Shim, buffer_name
from g4.image import SOFT_TOKENS
from g4.params import AUDIO_TOWER, VISION_TOWER, Assistant, Params, leaves_with_path, param_shapes, tree_map_with_path

DTYPES = ("fp32", "bf16")


def _opt(default: Any, help: str, choices: tuple | None = None) -> Any:
    """An export option; the CLI takes its flag, type, choices, default and help from here."""
    return attrs.field(default=default, metadata={"help": help, "choices": choices})


@attrs.frozen(kw_only=True)
class ExportOptions:
    """What to export: context, chunk, dtype, quantization."""

    max_seq_len: int = _opt(1024, "KV cache slots: the longest context (get_max_context_len)")
    max_chunk: int | None = _opt(None, "longest prefill per call (get_max_seq_len); default min(max_seq_len, 256)")
    dtype: str = _opt("fp32", "activations and unquantized weights", DTYPES)
    quantize: str = _opt("none", "linear layers", LINEAR_MODES)
    group_size: int = _opt(32, "int4 weight group size (8da4w, 4-bit embeddings)")
    embedding_quantize: int = _opt(0, "bits for the token and per-layer embedding tables (0: none)", EMBEDDING_BITS)
    kv_cache: str = _opt("fp32", "KV cache dtype (int8: per token and head, fp32 activations only)", KV_CACHES)
    lean: bool = _opt(True, "lower with g4's fixes to ExecuTorch's memory and time (g4/export/lean.py)")
    fuse: bool = _opt(True, "q/k/v of KV-owning layers as one GEMM (g4/export/fuse.py)")
    head_rows: int = _opt(32768, "LM head rows per XNNPACK delegate (a lower peak while a program loads)")
    vision: bool = _opt(False, "add the vision tower: `vision_encoder` and `text_decoder` methods")
    vision_quantize: str = _opt("none", "the vision tower's linear layers", LINEAR_MODES)
    max_soft_tokens: int = _opt(280, "most soft tokens per image (its patches: 9 times as many)", SOFT_TOKENS)
    audio: bool = _opt(False, "add the audio tower: `audio_encoder`, `speech_transform` and `text_decoder` methods")
    audio_quantize: str = _opt("none", "the audio tower's linear layers", LINEAR_MODES)

    def __attrs_post_init__(self) -> None:
        for f in attrs.fields(type(self)):
            if (choices := f.metadata["choices"]) and getattr(self, f.name) not in choices:
                raise ValueError(f"{f.name} must be one of {choices}, got {getattr(self, f.name)!r}")
        if self.kv_cache == "int8" and self.dtype != "fp32":
            raise ValueError("kv_cache int8 needs dtype fp32 (ExecuTorch's quantized sdpa is fp32-only)")
        if self.max_seq_len < 2:
            raise ValueError(f"max_seq_len must be >= 2, got {self.max_seq_len}")
        if self.max_chunk is not None and not 1 <= self.max_chunk <= self.max_seq_len:
            raise ValueError(f"max_chunk must be in [1, max_seq_len={self.max_seq_len}], got {self.max_chunk}")
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")
        if self.head_rows < 1:
            raise ValueError(f"head_rows must be >= 1, got {self.head_rows}")
        if (self.vision or self.audio) and (self.dtype != "fp32"):
            raise ValueError("vision / audio: the towers are exported with fp32 activations (--dtype fp32)")

    def check(self, cfg: Config) -> None:
        """Raises ValueError if a weight of `cfg` cannot take the quantization (int4 groups must divide widths)."""
        shapes = param_shapes(cfg)
        for path, s in shapes.items():
            if (
                self.linear_mode(path) == "8da4w"
                and len(s) == 2
                and path not in EMBEDDING_TABLES
                and not path.endswith(FLOAT_LINEARS)
                and s[1] % self.group_size
            ):
                raise ValueError(f"group_size {self.group_size} does not divide the input width {s[1]} of {path}")
        if self.embedding_quantize == 4:
            for path in EMBEDDING_TABLES:
                if path in shapes and shapes[path][1] % self.group_size:
                    raise ValueError(
                        f"group_size {self.group_size} does not divide the width {shapes[path][1]} of {path}"
                    )

    def linear_mode(self, path: str) -> str:
        """The linear scheme of the weight at `path`: a tower's own for a tower and its embedder."""
        if path.startswith(VISION_TOWER):
            return self.vision_quantize
        return self.audio_quantize if path.startswith(AUDIO_TOWER) else self.quantize

    @property
    def towers(self) -> tuple[str, ...]:
        """The towers to export: "vision", "audio"."""
        return ("vision",) * self.vision + ("audio",) * self.audio

    @property
    def chunk(self) -> int:
        """The longest prefill chunk the .pte accepts."""
        return self.max_chunk or min(self.max_seq_len, 256)

    @property
    def torch_dtype(self) -> torch.dtype:
        """The export dtype as a torch dtype."""
        return torch.float32 if self.dtype == "fp32" else torch.bfloat16


class Quantizer:
    """Quantizes weights one at a time as they are loaded or generated (`__call__(path, w)`).

    The tied embedding is split: the lookup table gets the embedding scheme, and the LM head (which
    reads the whole table every token) a copy with the linear scheme, kept in `lm_head`.
    """

    def __init__(self, opts: ExportOptions):
        self.opts = opts
        self.lm_head: torch.Tensor | None = None

    def __call__(self, path: str, w: torch.Tensor) -> torch.Tensor:
        """The weight at tree `path` (any float dtype), in the export dtype and quantized per the options."""
        o = self.opts
        name = path.rsplit(".", 1)[-1]
        if name == "embed_tokens" and (o.quantize != "none" or o.embedding_quantize):
            self.lm_head = self.linear(path, w)
        if name in EMBEDDING_TABLES:  # lookup tables take the embedding scheme only
            if not o.embedding_quantize:
                return w.to(o.torch_dtype)
            return chunked(lambda x: quantize_embedding(x, o.embedding_quantize, o.group_size), w, o.torch_dtype)
        if w.dim() != 2 or path.endswith(FLOAT_LINEARS):  # 3-D experts too
            return w.to(o.torch_dtype)
        return self.linear(path, w)

    def linear(self, path: str, w: torch.Tensor) -> torch.Tensor:
        """The linear scheme (`ExportOptions.check` has made sure the shape takes it)."""
        o, mode = self.opts, self.opts.linear_mode(path)
        if mode == "none":
            return w.to(o.torch_dtype)
        return chunked(lambda x: quantize_linear(x, mode, o.group_size), w, o.torch_dtype)

    def finish(self, params: Params) -> Params:
        """The tree with the untied, quantized LM head (if any), in blocks of `head_rows` rows, and a
        quantized vision tower's position tables in int8."""
        w, self.lm_head = self.lm_head, None
        vt = params.vision_tower
        if vt is not None and self.opts.vision_quantize != "none":
            pe = vt.patch_embedder
            tables = position_tables(cast(torch.Tensor, pe.position_embedding_table), self.opts.torch_dtype)
            pe = attrs.evolve(pe, position_embedding_table=tables)
            params = attrs.evolve(params, vision_tower=attrs.evolve(vt, patch_embedder=pe))
        if w is None or w.shape[0] <= self.opts.head_rows:
            return attrs.evolve(params, lm_head=w)
        return attrs.evolve(params, lm_head=row_blocks(w, self.opts.head_rows))


def position_tables(w: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The vision tower's `[2, P, Hv]` position embeddings as an x and a y int8 embedding table (a scale
    per row), as the official example stores them; `g4.fn.vision.encode` indexes the pair as the 3-D table."""
    x, y = (chunked(lambda rows: quantize_embedding(rows, 8, 0), table, dtype) for table in w)
    return x, y


def quantize_params(params: Params, opts: ExportOptions) -> Params:
    """The tree with linear weights and embedding tables quantized per `opts`."""
    q = Quantizer(opts)
    return q.finish(tree_map_with_path(q, attrs.evolve(params, lm_head=None)))


def check_drafter(opts: ExportOptions, tokens: int) -> None:
    """Raises ValueError if a drafter of `tokens` draft tokens cannot go into a program of `opts`."""
    if tokens < 1:
        raise ValueError(f"draft tokens must be >= 1, got {tokens}")
    if opts.dtype != "fp32" or opts.kv_cache != "fp32":
        raise ValueError("a drafter is exported with fp32 activations and an fp32 KV cache (--dtype, --kv-cache)")
    if tokens + 1 > opts.chunk:
        raise ValueError(f"a verify step of 1 + {tokens} draft tokens does not fit a prefill chunk of {opts.chunk}")


def check_towers(cfg: Config, params: Params | None, opts: ExportOptions) -> None:
    """Raises ValueError unless the towers `opts` asks for (of `params`, if given) can go into the program."""
    t, towers = cfg.towers, opts.towers
    for kind in towers:
        if t is None or getattr(t, kind) is None or (params is not None and getattr(params, f"{kind}_tower") is None):
            raise ValueError(f"{kind}: the model has no {kind} tower (a multimodal checkpoint, towers=True)")
    if opts.vision and t is not None and t.bidirectional_vision and opts.max_soft_tokens > opts.chunk:
        raise ValueError(
            f"max_soft_tokens {opts.max_soft_tokens} > the prefill chunk {opts.chunk} (max_chunk): this model's "
            "images attend both ways (use_bidirectional_attention 'vision'), so an image goes into one call"
        )


def only_towers(cfg: Config, params: Params, towers: tuple[str, ...]) -> tuple[Config, Params]:
    """`cfg` and `params` without the towers not in `towers` (their weights would be buffers nothing reads)."""
    t = None if cfg.towers is None else cfg.towers.only("vision" in towers, "audio" in towers)
    drop: dict[str, Any] = dict.fromkeys(
        [*VISION_TOWER * ("vision" not in towers), *AUDIO_TOWER * ("audio" not in towers)]
    )
    return attrs.evolve(cfg, towers=t), attrs.evolve(params, **drop)


def quantize_assistant(acfg: AssistantConfig, a: Assistant, opts: ExportOptions) -> Assistant:
    """The drafter's linear weights in the linear scheme where its group size divides their width; the
    rest in the export dtype: its norms, the centroids (which choose the tokens scored), and a table
    the ordered head gathers rows of."""
    q = Quantizer(opts)

    def one(path: str, w: torch.Tensor) -> torch.Tensor:
        if not w.is_floating_point():
            return w  # token_ordering
        gather = path == "centroids" or (path == "embed_tokens" and acfg.use_ordered_embeddings)
        if w.dim() != 2 or gather or (opts.quantize == "8da4w" and w.shape[1] % opts.group_size):
            return w.to(opts.torch_dtype)
        return q.linear(path, w)

    return tree_map_with_path(one, a)


def metadata(cfg: Config, opts: ExportOptions, drafter: DraftSpec | None = None) -> dict[str, Any]:
    """Constant methods the ExecuTorch LLM runner reads (and g4's own: `get_draft_tokens`)."""
    extra: dict[str, Any] = {"get_draft_tokens": drafter.tokens} if drafter else {}
    t = cfg.towers
    if opts.vision and t is not None and (v := t.vision) is not None:
        extra |= {  # what a runner needs to cut images into patches and lay out the prompt
            "get_image_token_id": t.image_token_id,
            "get_boi_token_id": t.boi_token_id,
            "get_eoi_token_id": t.eoi_token_id,
            "get_patch_size": v.patch_size,
            "get_pooling_kernel_size": v.pooling_kernel_size,
            "get_max_soft_tokens": opts.max_soft_tokens,
            "get_bidirectional_vision": int(t.bidirectional_vision),  # 1: feed each image in one call
        }
    if opts.audio and t is not None and t.audio is not None:
        extra |= {  # a clip's prompt: boa, one audio token per soft token, eoa
            "get_audio_token_id": t.audio_token_id,
            "get_boa_token_id": t.boa_token_id,
            "get_eoa_token_id": t.eoa_token_id,
            "get_max_audio_samples": MAX_SAMPLES,
            "get_audio_chunk_size": t.audio.attention_chunk_size,  # clips are padded to `encoder_frames`
        }
    return extra | {
        "get_max_seq_len": opts.chunk,
        "get_max_context_len": opts.max_seq_len,
        "get_vocab_size": cfg.vocab_size,
        "get_bos_id": cfg.bos_token_id,
        "get_eos_ids": list(cfg.eos_token_id),
        "get_n_layers": cfg.num_hidden_layers,
        "use_kv_cache": True,
        "use_sdpa_with_kv_cache": True,
        "enable_dynamic_shape": True,
        "get_g4_config": 1,  # marks a g4 program
    }


def _pow(x: torch.Tensor, exponent: float) -> torch.Tensor:
    """RMSNorm's x**2 and (.)**-0.5 as mul and rsqrt, which XNNPACK lowers (it takes pow only for 2)."""
    if exponent == 2:
        return x * x
    if exponent == -0.5:
        return torch.rsqrt(x)
    raise NotImplementedError(f"pow with exponent {exponent} in the export graph")


def _mean(x: torch.Tensor, dim: list[int] | None, keepdim: bool = False, *, dtype: Any = None) -> torch.Tensor:
    """RMSNorm's mean over the last dim as an average pool over a 4-D `[N, 1, 1, C]` view (XNNPACK takes
    mean.dim only over the two innermost dims of a 4-D tensor)."""
    if dim is None or [d % x.dim() for d in dim] != [x.dim() - 1] or dtype is not None:
        raise NotImplementedError(f"mean over {dim} in the export graph")
    C = x.shape[-1]
    out = torch.nn.functional.avg_pool2d(x.reshape(-1, 1, 1, C), kernel_size=(1, C)).reshape(*x.shape[:-1], 1)
    return out if keepdim else out.squeeze(-1)


# Export-only rewrites of the traced graph (the eager forward keeps HF's exact ops).
DECOMPOSITIONS = {
    torch.ops.aten.gelu.default: lambda x, approximate="none": _gelu_tanh(x, approximate),
    torch.ops.aten.pow.Tensor_Scalar: _pow,
    torch.ops.aten.mean.dim: _mean,
}


def _gelu_tanh(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """tanh-GELU as tanh arithmetic: XNNPACK (executorch 1.5.1) lowers `gelu` as exact erf-GELU."""
    if approximate != "tanh":
        return x * 0.5 * (1.0 + torch.erf(x * 0.7071067811865476))
    inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)  # sqrt(2/pi)
    return 0.5 * x * (1.0 + torch.tanh(inner))


class InferOneViewDim(ExportPass):
    """view_copy with exactly one symbolic size (the prefill length) -> the same view with -1 there.

    XNNPACK takes reshapes whose sizes are ints with at most one -1; torch.export records the
    symbolic size instead, which would leave every such reshape outside the delegate.
    """

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        """Rewrites the view sizes in place."""
        changed = False
        for n in gm.graph.nodes:
            if n.op == "call_function" and n.target == exir_ops.edge.aten.view_copy.default:
                size = list(n.args[1])
                sym = [i for i, d in enumerate(size) if not isinstance(d, int)]
                if len(sym) == 1 and -1 not in size:
                    size[sym[0]] = -1
                    n.args = (n.args[0], size, *n.args[2:])
                    changed = True
        gm.graph.eliminate_dead_code()
        gm.recompile()
        return PassResult(gm, changed)


def memory() -> str:
    """Resident set size now and its peak so far (Linux; empty elsewhere), for the progress lines."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return ""
    kb = {k: int(v.split()[0]) for k, v in (ln.split(":", 1) for ln in status.splitlines() if ln.startswith("Vm"))}
    return f" (RSS {kb['VmRSS'] / 2**20:.1f} GiB, peak {kb['VmHWM'] / 2**20:.1f} GiB)"


def _partitioner_configs() -> list[Any]:
    """XNNPACK's op configs but `cat`: its cats are the sliding layers' `new ++ ring` keys, whose new
    rows come from the split of the fused q/k/v outside the delegate (a portable cat copies the same
    bytes and saves a delegate call per sliding layer), and RoPE's and the mask's small tables."""
    from executorch.backends.xnnpack.partition.config import ALL_PARTITIONER_CONFIGS
    from executorch.backends.xnnpack.partition.config.generic_node_configs import CatConfig

    return [c for c in ALL_PARTITIONER_CONFIGS if c is not CatConfig]


def _head_linears(ep: Any) -> set[torch.fx.Node]:
    """The linears whose weight comes from one of the LM head's row blocks (its buffers, through a dequantize)."""
    sources = {**ep.graph_signature.inputs_to_buffers, **ep.graph_signature.inputs_to_parameters}
    head = buffer_name("params", "lm_head")
    found = set()
    for n in ep.graph_module.graph.nodes:
        if n.op != "call_function" or "linear" not in str(n.target) or len(n.args) < 2:
            continue
        todo, seen = [n.args[1]], set()
        while todo:
            x = todo.pop()
            if not isinstance(x, torch.fx.Node) or x in seen:
                continue
            seen.add(x)
            if x.op == "placeholder" and head in sources.get(x.name, ""):
                found.add(n)
                break
            todo.extend(x.all_input_nodes)
    return found


def _partitioners() -> list[Any]:
    """The LM head's row blocks, each its own XNNPACK delegate; then everything else.

    XNNPACK keeps a delegate's unpacked weights until it has packed all of them, so a delegate's
    weights are resident twice while a program loads: one block of the head at a time, not all of it.
    One partitioner takes the rest: XnnpackPartitioner takes the dynamically quantized linears too.
    Adding XnnpackDynamicallyQuantizedPartitioner in front (ExecuTorch's llama recipe) cuts every
    linear into its own delegate, for a slower export and the same run-time speed (README, Performance).
    """
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    class HeadBlocks(XnnpackPartitioner):
        def get_matched_nodes_from_configs(self, ep: Any) -> list[list[torch.fx.Node]]:
            head = _head_linears(ep)
            return [m for m in super().get_matched_nodes_from_configs(ep) if head.intersection(m)]

    configs = _partitioner_configs()
    return [HeadBlocks(configs=configs, per_op_mode=True), XnnpackPartitioner(configs=configs)]


def lower(shim: Shim, opts: ExportOptions, log: Callable[[str], None]) -> Any:
    """torch.export -> edge -> XNNPACK -> ExecuTorch program.

    The weights XNNPACK has copied are freed as it goes and before `to_executorch` (the shim's
    buffers, and so the tree they came from, become unusable).
    """
    weights = dict(leaves_with_path(shim.params()))
    if shim.drafter:
        weights |= {f"draft.{p}": t for p, t in leaves_with_path(shim.drafter.params)}
    # Lookup tables run in portable kernels and are never packed; quantized linears are freed once packed.
    linear = [t for path, t in weights.items() if path not in EMBEDDING_TABLES and hasattr(t, "qdata")]
    with lean_lowering(on=opts.lean):
        return _lower(shim, opts, log, list(weights.values()), linear)


def _lower(
    shim: Shim, opts: ExportOptions, log: Callable[[str], None], weights: list[torch.Tensor], linear: list[torch.Tensor]
) -> Any:
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass

    t0 = time.perf_counter()
    n = min(2, opts.chunk)
    example = (torch.zeros(1, n, dtype=torch.int64), torch.zeros(1, dtype=torch.int64))
    dyn = ({1: torch.export.Dim("T", min=1, max=opts.chunk)}, None)
    with torch.no_grad():
        eps = {
            "forward": torch.export.export(
                shim,
                example,
                dynamic_shapes=dyn,
                strict=False,
                # A drafter's forward returns min(T, N + 1) rows: torch.export cannot prove that a reshape
                # of them (in torchao's quantized linear) takes one path for every T, T = 1 included, and
                # refuses. It may, as an assert; ExecuTorch does not run those (tested: T = 1 .. chunk).
                prefer_deferred_runtime_asserts_over_guards=shim.drafter is not None,
            )
        }
        # Other methods of the same module keep the same buffer names: ExecuTorch shares them across methods.
        # Example inputs are distinct tensors (torch.export aliases one object passed twice).
        more: dict[str, tuple[Any, ...]] = {}
        if shim.drafter:
            more["draft"] = (tuple(torch.ones(s, dtype=torch.int64) for s in ((1, 1), (1,), (1,))), None)
        if opts.towers:
            more |= _tower_methods(shim, opts)
        for name, (args, shapes) in more.items():
            shim.forward = getattr(shim, name)  # type: ignore[method-assign]
            try:
                rows = shim.drafter is not None and name == "text_decoder"  # min(T, N + 1) rows, as forward's
                eps[name] = torch.export.export(
                    shim, args, dynamic_shapes=shapes, strict=False, prefer_deferred_runtime_asserts_over_guards=rows
                )
            finally:
                del shim.forward
        eps = {name: ep.run_decompositions(DECOMPOSITIONS) for name, ep in eps.items()}
    log(f"  export: {time.perf_counter() - t0:.1f} s{memory()}")
    t0 = time.perf_counter()
    with freed_once_packed(linear, list(eps.values())) if opts.lean else contextlib.nullcontext():
        edge = to_edge_transform_and_lower(
            eps,
            partitioner=_partitioners(),
            compile_config=EdgeCompileConfig(_check_ir_validity=False),
            transform_passes=[InferOneViewDim()],
            constant_methods=metadata(shim.cfg, opts, shim.drafter),
        )
    methods = len(eps)
    del eps
    freed = free_lowered(weights, [edge.exported_program(name) for name in edge.methods])
    trim_heap()
    log(f"  lower: {time.perf_counter() - t0:.1f} s, {freed / 2**30:.2f} GiB of delegated weights freed{memory()}")
    t0 = time.perf_counter()
    prog = edge.to_executorch(
        ExecutorchBackendConfig(
            extract_delegate_segments=True,
            do_quant_fusion_and_const_prop=True,  # dequantize+embedding -> quantized embedding kernels
            # a drafter's and a text_decoder method read forward's cache buffers: one allocation for all
            memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False, share_mutable_buffers=methods > 1),
            emit_mutable_buffer_names=methods > 1,
            sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass(),
        )
    )
    log(f"  to_executorch: {time.perf_counter() - t0:.1f} s{memory()}")
    return prog


def _tower_methods(shim: Shim, opts: ExportOptions) -> dict[str, tuple[Any, ...]]:
    """Example inputs and dynamic shapes of `text_decoder` (up to a chunk), `vision_encoder` (up to
    `max_soft_tokens` per image), `audio_encoder` and `speech_transform` (up to 30 s)."""
    t, n, Dim = shim.cfg.towers, min(2, opts.chunk), torch.export.Dim
    assert t is not None
    T = Dim("T", min=1, max=opts.chunk)
    decoder = (torch.zeros(1, n, dtype=torch.int64), torch.arange(n), torch.zeros(1, n, shim.cfg.hidden_size))
    methods: dict[str, tuple[Any, ...]] = {"text_decoder": (decoder, ({1: T}, {0: T}, {1: T}))}
    if opts.vision and (v := t.vision) is not None:
        kk = v.pooling_kernel_size**2
        N = kk * Dim("soft", min=1, max=opts.max_soft_tokens)
        pixels = (torch.zeros(1, 2 * kk, 3 * v.patch_size**2), torch.zeros(1, 2 * kk, 2, dtype=torch.int64))
        methods["vision_encoder"] = (pixels, ({1: N}, {1: N}))
    if opts.audio and (a := t.audio) is not None:
        # frames on the example's grid (`encoder_frames`): block counts torch.export can prove for every length
        c = a.attention_chunk_size
        F = 4 * c * Dim("audio_blocks", min=2, max=encoder_blocks(c, frames(MAX_SAMPLES))) - (2 * c + 1)
        n = encoder_frames(c, 1)
        clip = (torch.zeros(1, n, a.mel_bins), torch.ones(1, n, dtype=torch.bool))
        methods["audio_encoder"] = (clip, ({1: F}, {1: F}))
        S = Dim("samples", min=FRAME + HOP // 2 + 1, max=MAX_SAMPLES)
        methods["speech_transform"] = ((torch.zeros(4000),), ({0: S},))
    return methods


def export_pte(
    cfg: Config,
    params: Params,
    out: str | os.PathLike,
    opts: ExportOptions = ExportOptions(),
    log: Callable[[str], None] | None = None,
    drafter: DraftSpec | None = None,
) -> Path:
    """Exports `params`, already quantized per `opts` (`quantize_params` or a `Quantizer` while loading), to `out`.

    With a `drafter` (its weights quantized by `quantize_assistant`) the program gets a `draft` method.
    Each weight is freed once XNNPACK has copied it, so `params` is unusable afterwards.
    """
    say = log or (lambda s: print(s, file=sys.stderr, flush=True))
    out = Path(out)
    if not out.parent.is_dir():
        raise FileNotFoundError(f"output folder {out.parent} does not exist")
    if opts.fuse:
        params = fuse(params, cfg)
    if drafter:
        check_drafter(opts, drafter.tokens)
    check_towers(cfg, params, opts)
    cfg, params = only_towers(cfg, params, opts.towers)
    custom = opts.dtype == "fp32"
    shim = Shim(cfg, params, opts.max_seq_len, opts.chunk, custom_ops=custom, kv_cache=opts.kv_cache, drafter=drafter)
    del params
    prog = lower(shim, opts, say)
    t0 = time.perf_counter()

    def serialize(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            prog.write_to_file(f)

    atomic_write(out, serialize)  # never a partial or clobbered .pte
    say(f"  serialize: {time.perf_counter() - t0:.1f} s{memory()}")
    return out
