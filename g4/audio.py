"""WAV files to the audio tower's inputs, as transformers' `Gemma4AudioFeatureExtractor` makes them.

The standard library's `wave` and numpy only: 16 kHz samples, clips padded together to a multiple of
128 samples (at most 30 s each), 20 ms frames every 10 ms (the first centred on the first sample),
a periodic Hann window, |rfft| over 512 bins, 128 HTK mel filters from 0 to 8 kHz, log(mel + 0.001).
A frame is real when every sample under it is.
"""

from __future__ import annotations

import os
import wave

import numpy as np
import torch
from torch import Tensor

SAMPLE_RATE = 16_000
MAX_SAMPLES = 30 * SAMPLE_RATE  # longer clips are cut (the processor's max_length)
PAD_TO = 128  # samples: clips are padded to a multiple of this
FRAME, HOP, FFT = 320, 160, 512  # samples: 20 ms frames every 10 ms
MEL_BINS, MEL_FLOOR = 128, 1e-3
MS_PER_TOKEN = 40  # a soft token per 4 frames


def load_wav(path: str | os.PathLike) -> np.ndarray:
    """A 16 kHz PCM WAV file as float32 samples in [-1, 1], channels averaged."""
    try:
        with wave.open(os.fspath(path), "rb") as w:
            rate, width, channels, raw = w.getframerate(), w.getsampwidth(), w.getnchannels(), w.readframes(-1)
    except (OSError, EOFError, wave.Error) as e:
        raise ValueError(f"{path}: not a PCM WAV file ({e})") from None
    if rate != SAMPLE_RATE:
        raise ValueError(f"{path}: {rate} Hz; the audio tower takes {SAMPLE_RATE} Hz (ffmpeg -i IN -ar 16000 OUT.wav)")
    x: np.ndarray
    if width == 1:  # unsigned 8-bit
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128) / 128
    elif width in (2, 4):
        x = np.frombuffer(raw, f"<i{width}").astype(np.float32) / float(2 ** (8 * width - 1))
    else:
        raise ValueError(f"{path}: {8 * width}-bit samples; 8, 16 or 32-bit PCM is supported")
    return x.reshape(-1, channels).mean(1, dtype=np.float32)


def mel_filters() -> np.ndarray:
    """`[FFT/2 + 1, MEL_BINS]` triangular filters, centres evenly spaced on the HTK mel scale (no norm)."""
    mel = 2595.0 * np.log10(1.0 + np.array([0.0, SAMPLE_RATE / 2]) / 700.0)
    hz = 700.0 * (np.power(10, np.linspace(mel[0], mel[1], MEL_BINS + 2) / 2595.0) - 1.0)
    slopes = hz[None] - np.linspace(0, SAMPLE_RATE // 2, FFT // 2 + 1)[:, None]
    diff = np.diff(hz)
    return np.maximum(np.zeros(1), np.minimum(-slopes[:, :-2] / diff[:-1], slopes[:, 2:] / diff[1:]))


def hann() -> np.ndarray:
    """The periodic Hann window of a frame, float32 (`window_function` in transformers)."""
    return np.hanning(FRAME + 1)[:-1].astype(np.float32)


def frames(samples: int) -> int:
    """Mel frames of `samples` samples (after the half-frame of leading zeros)."""
    return max(0, (samples + FRAME // 2 - (FRAME + 1)) // HOP + 1)


def soft_tokens(samples: int) -> int:
    """Soft tokens of a clip of `samples` samples: its real frames after two stride-2 convolutions."""
    n = frames(min(samples, MAX_SAMPLES))
    for _ in range(2):
        n = (n + 1) // 2
    return n


def encoder_blocks(chunk: int, n: int) -> int:
    """The block count k of `encoder_frames` for `n` frames: at least 2, as few as hold them."""
    return max(2, -(-(n + 2 * chunk + 1) // (4 * chunk)))


def encoder_frames(chunk: int, n: int) -> int:
    """The frames an exported `audio_encoder` takes for `n` real frames (the rest padding, masked off):
    4c·k − (2c + 1) for attention blocks of c (48k − 25 for Gemma 4's 12, as ExecuTorch's Gemma 4 runner
    pads them). Its k blocks of queries after the 4x subsampling are then a length torch.export can prove."""
    return 4 * chunk * encoder_blocks(chunk, n) - (2 * chunk + 1)


def features(clips: list[np.ndarray]) -> tuple[Tensor, Tensor]:
    """HF's `input_features [n, F, 128]` (fp32 log-mel, zero where padding) and `input_features_mask [n, F]`
    for 16 kHz clips, padded together to the longest (rounded up to 128 samples)."""
    clips = [np.asarray(c, np.float32)[:MAX_SAMPLES] for c in clips]
    if not clips or any(c.ndim != 1 or c.size == 0 for c in clips):
        raise ValueError("audio: each clip must be a non-empty 1-D array of samples")
    n = -(-max(c.size for c in clips) // PAD_TO) * PAD_TO
    if frames(n) == 0:
        raise ValueError(f"audio: {n} samples make no {FRAME}-sample frame")
    window, filters, out, masks = hann(), mel_filters(), [], []
    for c in clips:
        x = np.pad(c, (FRAME // 2, n - c.size))  # [FRAME/2 zeros, clip, padding]
        real = np.pad(np.ones(c.size, bool), (FRAME // 2, n - c.size))
        F = frames(n)
        idx = np.arange(F)[:, None] * HOP + np.arange(FRAME)  # [F, FRAME]: HF takes FRAME + 1, drops the last
        spec = np.abs(np.fft.rfft(x[idx] * window, n=FFT, axis=-1))
        mel = np.log(spec @ filters + np.array(MEL_FLOOR, np.float64)).astype(np.float32)
        mask = real[np.arange(F) * HOP + FRAME]  # the frame's last sample (of FRAME + 1) is real
        out.append(mel * mask[:, None])
        masks.append(mask)
    return torch.from_numpy(np.stack(out)), torch.from_numpy(np.stack(masks))
