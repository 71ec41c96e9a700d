"""Gemma 4's audio tower (`Gemma4AudioModel` + `Gemma4MultimodalEmbedder`) as pure functions.

Log-mel frames in, soft tokens in the text model's width out: two stride-2 convolutions (a soft token
per 4 frames: 40 ms), then conformer layers (half-step feed-forward, chunked local attention with
relative positions, a causal depthwise "light" convolution, half-step feed-forward), an output
projection, and the embedder's weightless RMSNorm and projection.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from g4.audio import FFT, FRAME, HOP, MEL_FLOOR, frames, hann, mel_filters
from g4.config import AudioConfig
from g4.fn.ops import rms_norm
from g4.fn.vision import clipped, embed_soft
from g4.params import AudioAttention, AudioFeedForward, AudioLayer, AudioTower, Embedder, LightConv, Subsample

NORM_EPS = 1e-6  # transformers builds the feed-forward and layer norms without the config's epsilon
MAX_TIMESCALE = 10_000.0  # of the relative-position sinusoids
K_SCALE = math.log(1 + math.e) / math.log(
    2
)  # keys: softplus(1) / ln 2; queries: d**-0.5 / ln 2 * softplus(per_dim_scale)


def subsample(p: Subsample, ac: AudioConfig, features: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Frames `[B, F, mel]` and which are real `[B, F]` -> `[B, F/4, Ha]` and `[B, F/4]` (odd counts round up)."""
    x = features[:, None]  # [B, 1, F, mel]: one input channel
    for layer in (p.layer0, p.layer1):
        x = F.conv2d(x * valid[:, None, :, None], layer.conv, stride=2, padding=1)  # padding frames zeroed first
        x = F.relu(F.layer_norm(x.permute(0, 2, 3, 1), layer.norm.shape, layer.norm, None, ac.rms_norm_eps))
        x = x.permute(0, 3, 1, 2).contiguous()  # [B, C, F/2, mel/2] as HF hands it on (the next conv's path)
        valid = valid[:, torch.arange(x.shape[2]) * 2]  # every other frame: `::2`, sized by the conv's output
    return F.linear(x.permute(0, 2, 3, 1).flatten(2), p.input_proj_linear), valid  # [B, F/4, mel/4 * C1]


def context(ac: AudioConfig) -> tuple[int, int]:
    """Keys a block of `attention_chunk_size` queries reads, and how many of them precede the block."""
    past = ac.attention_context_left - 1
    return ac.attention_chunk_size + past + ac.attention_context_right, past


def relative_positions(ac: AudioConfig, dtype: torch.dtype) -> Tensor:
    """Sinusoids `[1, C/2 + 1, Ha]` of distances C/2 .. 0 (C = `context`), sines then cosines."""
    n = ac.hidden_size // 2
    inv = torch.exp(torch.arange(n) * -(math.log(MAX_TIMESCALE) / max(n - 1, 1)))
    t = torch.arange(context(ac)[0] // 2, -1, -1)[:, None] * inv[None, None]  # [1, P, n] as HF broadcasts
    return torch.cat([torch.sin(t), torch.cos(t)], -1).to(dtype)


def block_mask(ac: AudioConfig, valid: Tensor) -> Tensor:
    """Bool `[B, 1, nb, chunk, C]`, True where a query may not see a key of its block's context.

    A query sees real keys `left - 1` back (itself included: transformers' window, one frame short of
    the context it reads) and `right` ahead; the queries padding the last block see nothing.
    """
    T, chunk = valid.shape[1], ac.attention_chunk_size
    C, past = context(ac)
    nb = (T + chunk - 1) // chunk
    q = torch.arange(nb * chunk).view(nb, chunk, 1)  # [nb, chunk, 1]
    k = q - q % chunk - past + torch.arange(C)  # [nb, chunk, C]: the block's first frame - past + j
    d = q - k
    near = ((d >= 0) & (d < past)) | ((d < 0) & (-d < ac.attention_context_right))
    real = F.pad(valid, (0, nb * chunk - T))[:, k.clamp(0, nb * chunk - 1)] & (k >= 0) & (k < T)  # [B, nb, chunk, C]
    return ~(near & (q < T) & real)[:, None]


def blocks(x: Tensor, chunk: int, C: int, past: int) -> Tensor:
    """`[B, T, H, d]` -> each block's context `[B, nb, C, H, d]`: frames `block * chunk - past` onward."""
    nb = (x.shape[1] + chunk - 1) // chunk
    x = F.pad(x, (0, 0, 0, 0, past, C - past - 1))  # zeros before the first frame and after the last
    return x[:, torch.arange(nb)[:, None] * chunk + torch.arange(C)]


def rel_shift(x: Tensor, C: int) -> Tensor:
    """`[..., chunk, P]` scores by distance -> `[..., chunk, C]` by key slot (Transformer-XL's shift)."""
    *lead, chunk, P = x.shape
    x = F.pad(x, (0, C + 1 - P)).reshape(*lead, chunk * (C + 1))
    return x[..., : chunk * C].reshape(*lead, chunk, C)


def attention(p: AudioAttention, ac: AudioConfig, x: Tensor, pos: Tensor, masked: Tensor) -> Tensor:
    """Chunked local attention over `x [B, T, Ha]` in fp32; `pos` from `relative_positions`."""
    B, T, _ = x.shape
    H, d, chunk = ac.num_attention_heads, ac.head_dim, ac.attention_chunk_size
    C, past = context(ac)
    q, k, v = (clipped(w, x).float().unflatten(-1, (H, d)) for w in (p.q_proj, p.k_proj, p.v_proj))
    q = q * (d**-0.5 / math.log(2)) * F.softplus(p.per_dim_scale)
    k = k * K_SCALE
    nb = (T + chunk - 1) // chunk
    q = F.pad(q, (0, 0, 0, 0, 0, nb * chunk - T)).reshape(B, nb, chunk, H, d).permute(0, 3, 1, 2, 4)  # [B,H,nb,c,d]
    k, v = (blocks(t, chunk, C, past).permute(0, 3, 1, 2, 4) for t in (k, v))  # [B, H, nb, C, d]
    rel = F.linear(pos, p.relative_k_proj).reshape(-1, H, d).float()  # [P, H, d]
    by_distance = (q.reshape(B, H, nb * chunk, d) @ rel.permute(1, 2, 0)).reshape(B, H, nb, chunk, -1)
    s = q @ k.transpose(-1, -2) + rel_shift(by_distance, C)  # [B, H, nb, chunk, C]
    s = torch.tanh(s / ac.attention_logit_cap) * ac.attention_logit_cap
    s = s.masked_fill(masked, ac.attention_invalid_logits_value)
    o = torch.softmax(s, -1, dtype=torch.float32) @ v  # [B, H, nb, chunk, d]
    o = o.permute(0, 2, 3, 1, 4).reshape(B, nb * chunk, H * d)[:, :T]
    return clipped(p.post, o.to(x.dtype))


def clip(x: Tensor, ac: AudioConfig, dtype: torch.dtype | None = None) -> Tensor:
    """Clamps activations to +-`gradient_clipping` (at most the dtype's largest value)."""
    c = min(ac.gradient_clipping, torch.finfo(dtype or x.dtype).max)
    return torch.clamp(x, -c, c)


def feed_forward(p: AudioFeedForward, ac: AudioConfig, x: Tensor) -> Tensor:
    """A half-step feed-forward: `x + residual_weight * norm(ffw(norm(x)))`."""
    y = rms_norm(clip(x, ac), p.pre_layer_norm, NORM_EPS)
    y = clipped(p.ffw_layer_2, F.silu(clipped(p.ffw_layer_1, y)))
    return rms_norm(clip(y, ac), p.post_layer_norm, NORM_EPS) * ac.residual_weight + x


def light_conv(p: LightConv, ac: AudioConfig, x: Tensor) -> Tensor:
    """Gated projection, causal depthwise convolution over time, norm, SiLU, projection; plus `x`."""
    y = F.glu(clipped(p.linear_start, rms_norm(x, p.pre_layer_norm, ac.rms_norm_eps)), -1)
    K = p.depthwise_conv1d.shape[-1]
    y = F.conv1d(F.pad(y.transpose(1, 2), (K - 1, 0)), p.depthwise_conv1d, groups=y.shape[-1]).transpose(1, 2)
    y = F.silu(rms_norm(clip(y, ac), p.conv_norm, ac.rms_norm_eps))
    return clipped(p.linear_end, y) + x


def layer(p: AudioLayer, ac: AudioConfig, x: Tensor, pos: Tensor, masked: Tensor) -> Tensor:
    """One conformer layer over `x [B, T, Ha]`."""
    dt = p.norm_pre_attn.dtype  # transformers clamps by the weights' dtype here
    x = feed_forward(p.feed_forward1, ac, x)
    y = attention(p.self_attn, ac, rms_norm(clip(x, ac, dt), p.norm_pre_attn, NORM_EPS), pos, masked)
    x = rms_norm(clip(y, ac, dt), p.norm_post_attn, NORM_EPS) + x
    x = feed_forward(p.feed_forward2, ac, light_conv(p.lconv1d, ac, x))
    return rms_norm(clip(x, ac, dt), p.norm_out, NORM_EPS)


def encode(t: AudioTower, ac: AudioConfig, features: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Soft tokens `[B, F/4, output_proj_dims]` and which are real `[B, F/4]`, from log-mel frames
    `[B, F, mel]` and which are real `[B, F]` (HF's `input_features`, `input_features_mask`)."""
    x, valid = subsample(t.subsample_conv_projection, ac, features.to(t.output_proj.weight.dtype), valid)
    pos, masked = relative_positions(ac, x.dtype), block_mask(ac, valid)
    for p in t.layers:
        x = layer(p, ac, x, pos, masked)
    return F.linear(x, t.output_proj.weight, t.output_proj.bias), valid


def log_mel(waveform: Tensor) -> Tensor:
    """`g4.audio.features` of one clip `[N]` (no padding, no mask) as tensor ops an export lowers: the
    real DFT as two matmuls (fp32, where numpy's FFT and the filters run in fp64), `[F, MEL_BINS]`."""
    x = F.pad(waveform.float(), (FRAME // 2, 0))
    idx = torch.arange(frames(waveform.shape[0]))[:, None] * HOP + torch.arange(FRAME)  # [F, FRAME]
    chunks = x[idx] * torch.from_numpy(hann())
    k = torch.arange(FRAME, dtype=torch.float64)[:, None] * torch.arange(FFT // 2 + 1, dtype=torch.float64)
    angle = (2 * math.pi / FFT) * torch.remainder(k, FFT)  # [FRAME, FFT/2 + 1]: exact in fp64 before the cos
    re, im = chunks @ torch.cos(angle).float(), chunks @ torch.sin(angle).float()
    mel = torch.sqrt(re * re + im * im) @ torch.from_numpy(mel_filters()).float()
    return torch.log(mel + MEL_FLOOR)


def audio_soft(t: AudioTower, e: Embedder, ac: AudioConfig, features: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """`encode`, then the embedder: soft tokens in the text width `[B, F/4, H]` and which are real."""
    x, valid = encode(t, ac, features, valid)
    return embed_soft(e, x, ac.rms_norm_eps), valid
