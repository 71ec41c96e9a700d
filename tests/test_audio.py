"""The audio tower, text with audio, and WAV features, against transformers' Gemma 4."""

import wave

import attrs
import numpy as np
import pytest
import torch
from reference import hf_multimodal
from test_vision import PTE_TOL, batch, generates_as_eager, image, run_three_ways

import g4
from g4.audio import MAX_SAMPLES, features, load_wav, mel_filters, soft_tokens
from g4.checkpoint import CheckpointError
from g4.fn import audio as A
from g4.fn.multimodal import audio_features, in_order, merge, multimodal_logits

TOWERS = g4.config.TOWERS["tiny"]  # audio: blocks of 4 frames, 5 back and 1 ahead, a cap and clamps that act
AUD, IMG, AC = TOWERS.audio_token_id, TOWERS.image_token_id, TOWERS.audio
CFG = attrs.evolve(g4.CONFIGS["tiny"], towers=TOWERS)


@pytest.fixture(scope="module")
def model():
    params = g4.init_params(CFG, seed=3)
    return params, hf_multimodal(CFG, params)


def clips(*frames: int, total: int | None = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random log-mel frames `[n, F, 128]`, the i-th clip real for its first `frames[i]` (padding zeroed)."""
    F = total or max(frames)
    x = torch.randn(len(frames), F, AC.mel_bins, generator=torch.Generator().manual_seed(seed))
    real = torch.arange(F)[None] < torch.tensor(frames)[:, None]
    return x * real[..., None], real


def prompt(*items: tuple[str, int]) -> list[int]:
    """Text, then each ("audio" | "image", soft tokens) between its begin and end ids."""
    ids = [2, 5, 7]
    for kind, n in items:
        t = TOWERS
        begin, token, end = (
            (t.boa_token_id, AUD, t.eoa_token_id) if kind == "audio" else (t.boi_token_id, IMG, t.eoi_token_id)
        )
        ids += [begin] + [token] * n + [end, 9, 10]
    return ids


def hf_logits(ref, ids, **kw):
    with torch.no_grad():
        return ref(input_ids=ids, mm_token_type_ids=(ids == IMG).long(), use_cache=False, **kw).logits


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# --- the tower -----------------------------------------------------------------------------------------------


@torch.no_grad()
def test_audio_soft_tokens_match_transformers(model):
    # 26 lengths x a clip alone and beside a shorter one: 52 shapes, masks equal; soft tokens bit-identical in
    # 49 of them, the other 3 within 3.3e-7 of the largest value (measured; BLAS takes another path for some
    # shapes of the linear after the light convolution, whose input is a transposed view as in transformers).
    params, ref = model
    g, worst, exact = torch.Generator().manual_seed(0), 0.0, 0
    for F in range(4, 80, 3):
        for n in (1, 2):
            lens = [F, int(torch.randint(1, F + 1, (1,), generator=g))][:n]
            x, real = clips(*lens, total=F, seed=F)
            want = ref.model.get_audio_features(x, real, return_dict=True)
            got, valid = A.audio_soft(params.audio_tower, params.embed_audio, AC, x, real)
            assert torch.equal(valid, want.attention_mask)
            worst, exact = max(worst, rel(got, want.pooler_output)), exact + torch.equal(got, want.pooler_output)
    assert worst <= 1e-6 and exact >= 40, (worst, exact)


def test_block_mask_equals_transformers(model):
    from transformers.masking_utils import create_bidirectional_mask
    from transformers.models.gemma4.modeling_gemma4 import sliding_window_mask_function

    tower = model[1].model.audio_tower
    for T, lens in [(3, [3, 1]), (8, [8, 5]), (13, [13, 13]), (30, [30, 17])]:
        valid = torch.arange(T)[None] < torch.tensor(lens)[:, None]
        window = sliding_window_mask_function((AC.attention_context_left - 1, AC.attention_context_right))
        m4 = create_bidirectional_mask(
            config=tower.config, inputs_embeds=torch.zeros(2, T, 1), attention_mask=valid, and_mask_function=window
        )
        assert torch.equal(A.block_mask(AC, valid), tower._convert_4d_mask_to_blocked_5d(m4) != 0), T


def test_relative_shift_puts_each_distance_at_its_key():
    # Scores by distance (C/2 .. 0, as `relative_positions` orders them) land at the key that far back: query
    # i of a block and key slot j (slot 0 is `past` frames before the block) are past + i - j apart.
    C, past = A.context(AC)
    chunk, P = AC.attention_chunk_size, C // 2 + 1
    assert C // 2 == past  # the tiny tower's context is centred as E2B's (12 + 12 + 0)
    shifted = A.rel_shift(torch.arange(C // 2, -1, -1).float().expand(chunk, P), C)  # the score is the distance
    for i in range(chunk):
        for j in range(i, min(C, i + P)):
            assert shifted[i, j] == past + i - j, (i, j)


def test_clipping_and_padding_matter(model):
    # Parity alone would not notice a tower that ignored its clip bounds or read padding frames.
    params, _ = model
    x, real = clips(30, 19)
    base = audio_features(params, CFG, x, real)
    unclipped = g4.params.tree_map_with_path(
        lambda p, t: t * 100 if p.endswith(("_min", "_max")) else t, params.audio_tower
    )
    assert not torch.allclose(audio_features(attrs.evolve(params, audio_tower=unclipped), CFG, x, real), base)
    noisy = x.clone()
    noisy[1, 19:] = torch.randn(11, AC.mel_bins)  # only the second clip's padding frames change
    assert torch.equal(audio_features(params, CFG, noisy, real), base)


# --- text with audio ------------------------------------------------------------------------------------------

# soft tokens: a clip of 37 frames gives 10, one of 21 frames 6
CASES = {
    "one clip": ([37], [("audio", 10)]),
    "two clips": ([37, 21], [("audio", 10), ("audio", 6)]),
    "image then clip": ([21], [("image", 6), ("audio", 6)]),
    "clip then image": ([21], [("audio", 6), ("image", 6)]),
}


@pytest.mark.parametrize("case", CASES)
@torch.no_grad()
def test_audio_logits_equal_transformers(model, case):
    params, ref = model
    lens, items = CASES[case]
    x, real = clips(*lens, total=37)
    ids = torch.tensor([prompt(*items)])
    kw = dict(input_features=x, input_features_mask=real)
    if any(k == "image" for k, _ in items):
        pixels, pos = batch(image(6, 9, 0))
        kw |= dict(pixel_values=pixels, image_position_ids=pos)
    got = multimodal_logits(params, CFG, ids, **kw)
    assert torch.equal(got, hf_logits(ref, ids, **kw))  # bit for bit at these shapes


@torch.no_grad()
def test_batch_of_prompts_with_audio_equals_transformers(model):
    params, ref = model
    x, real = clips(37, 21, 9)  # 10, 6 and 3 soft tokens
    ids = torch.tensor([prompt(("audio", 10), ("audio", 6)), prompt(("audio", 3)) + [12] * 17])
    kw = dict(input_features=x, input_features_mask=real)
    assert torch.equal(multimodal_logits(params, CFG, ids, **kw), hf_logits(ref, ids, **kw))


@torch.no_grad()
def test_cached_prefill_with_audio_then_decode_equals_no_cache():
    # Prefill in chunks (the clip inside one), then a token at a time: the no-cache forward's logits.
    params = g4.init_params(CFG, seed=4)
    x, real = clips(37)
    ids = torch.tensor([prompt(("audio", 10)) + list(range(20, 50))])  # 47 tokens: decode passes the window
    want = multimodal_logits(params, CFG, ids, input_features=x, input_features_mask=real)
    soft = in_order(CFG, ids, None, audio_features(params, CFG, x, real))
    tokens, (where, values), _ = merge(CFG, ids, soft)
    cache, out = g4.init_cache(CFG, max_seq_len=64), []
    for a, b in [(0, 3), (3, 18), *((t, t + 1) for t in range(18, ids.shape[1]))]:
        logits, cache = g4.forward(
            params, CFG, tokens[:, a:b], torch.arange(a, b), cache, soft=(where[:, a:b], values[:, a:b])
        )
        out.append(logits)
    assert rel(torch.cat(out, 1), want) <= 1e-5


# --- features from samples --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "lengths", [[16000], [16000, 7000], [481, 1000], [MAX_SAMPLES + 20000], [12345, 3, 40000]], ids=str
)
def test_features_equal_transformers(lengths):
    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor

    r = np.random.RandomState(len(lengths))
    samples = [(r.randn(n) * 0.1).astype(np.float32) for n in lengths]
    want = Gemma4AudioFeatureExtractor()(samples, return_tensors="np")
    x, real = features(samples)
    assert np.array_equal(x.numpy(), want["input_features"]) and np.array_equal(
        real.numpy(), want["input_features_mask"]
    )


def test_mel_filters_equal_transformers():
    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor

    assert np.array_equal(mel_filters(), Gemma4AudioFeatureExtractor().mel_filters)


def test_soft_tokens_count_the_encoders_real_outputs(model):
    # The placeholders a prompt needs for a clip of n samples = the encoder's real soft tokens (= HF's
    # processor: the mask through two stride-2 convolutions; 750 for 30 s, 40 ms each).
    params, _ = model
    lengths = [481, 799, 800, 16000, 16001, 23456]
    x, real = features([np.ones(n, np.float32) * 0.01 for n in lengths])
    _, valid = A.subsample(params.audio_tower.subsample_conv_projection, AC, x, real)
    assert valid.sum(1).tolist() == [soft_tokens(n) for n in lengths]
    assert soft_tokens(MAX_SAMPLES) == soft_tokens(MAX_SAMPLES + 999) == 750


def write_wav(path, data: np.ndarray, rate: int = 16000, width: int = 2) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1 if data.ndim == 1 else data.shape[1])
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(data.astype({1: "u1", 2: "<i2", 4: "<i4"}[width]).tobytes())


def test_load_wav_reads_pcm_as_floats(tmp_path):
    r = np.random.RandomState(0)
    pcm = r.randint(-32768, 32768, size=(1000, 2))
    write_wav(tmp_path / "s.wav", pcm)
    assert np.array_equal(load_wav(tmp_path / "s.wav"), (pcm / 32768).astype(np.float32).mean(1, dtype=np.float32))
    u8 = r.randint(0, 256, size=500)
    write_wav(tmp_path / "u.wav", u8, width=1)
    assert np.array_equal(load_wav(tmp_path / "u.wav"), ((u8 - 128) / 128).astype(np.float32))


def test_bad_wav_files_name_the_file(tmp_path):
    write_wav(tmp_path / "44k.wav", np.zeros(100), rate=44100)
    with pytest.raises(ValueError, match=r"44k.wav: 44100 Hz; the audio tower takes 16000 Hz"):
        load_wav(tmp_path / "44k.wav")
    (tmp_path / "x.wav").write_bytes(b"not a wav")
    with pytest.raises(ValueError, match=r"x.wav: not a PCM WAV file"):
        load_wav(tmp_path / "x.wav")
    with pytest.raises(ValueError, match=r"audio: 128 samples make no 320-sample frame"):
        features([np.zeros(100, np.float32)])


# --- checkpoints and bad input ------------------------------------------------------------------------------


def test_towers_can_be_chosen_when_loading(tmp_path):
    g4.write_random_checkpoint(CFG, tmp_path, seed=5, dtype=torch.float32, multimodal=True)
    cfg, params = g4.load_checkpoint(tmp_path, towers=("audio",))
    assert cfg.towers == attrs.evolve(TOWERS, vision=None) and params.vision_tower is None
    assert params.audio_tower is not None and params.embed_audio is not None
    cfg, params = g4.load_checkpoint(tmp_path, towers=("vision",))
    assert cfg.towers == attrs.evolve(TOWERS, audio=None) and params.audio_tower is None
    with pytest.raises(ValueError, match=r"towers: unknown \['video'\]"):
        g4.load_checkpoint(tmp_path, towers=("video",))
    vision_only = tmp_path / "v"
    g4.write_random_checkpoint(attrs.evolve(CFG, towers=cfg.towers), vision_only, dtype=torch.float32, multimodal=True)
    with pytest.raises(CheckpointError, match=r"config.json: no audio_config \(this checkpoint has no audio tower\)"):
        g4.load_checkpoint(vision_only, towers=("audio",))


def test_bad_audio_inputs_name_the_argument(model):
    params, _ = model
    x, real = clips(37)
    ids = torch.tensor([prompt(("audio", 10))])
    with pytest.raises(ValueError, match=r"input_ids: 10 audio placeholder tokens, but the clips give no soft tokens"):
        multimodal_logits(params, CFG, ids)
    with pytest.raises(ValueError, match=r"input_ids: 11 audio placeholder tokens, but the clips give 10 soft"):
        multimodal_logits(
            params, CFG, torch.tensor([prompt(("audio", 11))]), input_features=x, input_features_mask=real
        )
    with pytest.raises(ValueError, match=r"input_features_mask: needed with input_features"):
        multimodal_logits(params, CFG, ids, input_features=x)
    with pytest.raises(ValueError, match=r"input_features must be \[B, F, 128\], got \(1, 37, 80\)"):
        multimodal_logits(params, CFG, ids, input_features=x[..., :80], input_features_mask=real)
    with pytest.raises(ValueError, match=r"input_features_mask must be bool \[B, F\] = \(1, 37\), got torch.int64"):
        multimodal_logits(params, CFG, ids, input_features=x, input_features_mask=real.long())
    no_audio = attrs.evolve(CFG, towers=attrs.evolve(TOWERS, audio=None))
    with pytest.raises(ValueError, match=r"input_features: this model has no audio tower"):
        multimodal_logits(params, no_audio, ids, input_features=x, input_features_mask=real)


# --- the .pte ---------------------------------------------------------------------------------------------------

LENGTHS = [3000, 16000, 48000]  # samples: a clip shorter than the encoder's smallest grid, 1 s, 3 s


def tiny_towers():
    """The weights `python -m g4.export tiny --vision --audio` draws (seed 0)."""
    return CFG, g4.init_params(CFG, seed=0)


def test_pte_audio_encoder_equals_eager(pte_towers):
    pte, (cfg, params) = g4.PteModel(pte_towers), tiny_towers()
    r = np.random.RandomState(1)
    for n in LENGTHS:
        x, real = features([(r.randn(n) * 0.1).astype(np.float32)])
        got, want = pte.encode_audio(x, real), audio_features(params, cfg, x, real)
        assert got.shape == want.shape == (soft_tokens(n), cfg.hidden_size)
        assert (got - want).abs().max() <= PTE_TOL * want.abs().max(), n


def test_pte_speech_transform_equals_features(pte_towers):
    # The official runner's mel: samples padded to a multiple of 128 (as the feature extractor pads them).
    from executorch.runtime import Runtime

    method = Runtime.get().load_program(str(pte_towers)).load_method("speech_transform")
    r = np.random.RandomState(2)
    for n in [*LENGTHS, MAX_SAMPLES]:
        samples = (r.randn(-(-n // 128) * 128) * 0.1).astype(np.float32)
        want = features([samples])[0][0]
        got = method.execute([torch.from_numpy(samples)])[0]
        assert got.shape == want.shape and (got - want).abs().max() <= PTE_TOL * want.abs().max(), n


@torch.no_grad()
def test_pte_audio_prompt_generates_as_eager(pte_towers):
    # The clip's placeholders straddle a prefill chunk boundary (20): text_decoder feeds both chunks, then
    # forward decodes on the cache text_decoder wrote.
    pte, (cfg, params) = g4.PteModel(pte_towers), tiny_towers()
    eager = g4.EagerModel(cfg, params, max_context=160)
    x, real = features([(np.random.RandomState(3).randn(4000) * 0.1).astype(np.float32)])  # 6 soft tokens
    prompt = [2, *range(20, 35), *pte.audio.placeholders(6), 9, 10]  # soft tokens at positions 17..22
    want = generates_as_eager(pte, eager, prompt, pte.encode_audio(x, real), eager.encode_audio(x, real))
    ref = multimodal_logits(params, cfg, torch.tensor([prompt]), input_features=x, input_features_mask=real)
    assert (want.logits[0] - ref[0, -1]).abs().max() <= 1e-5 * ref.abs().max()


def test_g4_run_with_audio_and_an_image_on_the_pte_and_eager(pte_towers, tmp_path, capsys):
    from PIL import Image

    write_wav(tmp_path / "clip.wav", (np.sin(np.arange(24000) * 0.05) * 8000).astype(np.int64))  # 1.5 s
    Image.fromarray((torch.rand(30, 44, 3) * 255).byte().numpy()).save(tmp_path / "photo.png")
    media = ["--audio", str(tmp_path / "clip.wav"), "--image", str(tmp_path / "photo.png")]
    for err in run_three_ways(pte_towers, media, capsys):
        assert "audio: 1 clip(s), 1.5 s, 38 soft tokens" in err and "vision: 1 image(s), 60 soft" in err, err
