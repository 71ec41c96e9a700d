"""The vision tower and text with images, against transformers' Gemma4ForConditionalGeneration."""

import json

import attrs
import pytest
import torch
import transformers
from reference import hf_multimodal

import g4
from g4.checkpoint import CheckpointError
from g4.fn.multimodal import image_blocks, image_features, merge, multimodal_logits
from g4.fn.vision import pool

TOWERS = g4.config.TOWERS["tiny"]  # every feature on: grouped KV heads, clipped linears, standardisation
IMG, VISION = TOWERS.image_token_id, TOWERS.vision  # patches of 4 x 4 pixels
MAX_PATCHES = 81  # 9 soft tokens at most


def config(bidirectional: bool, name: str = "tiny") -> g4.Config:
    return attrs.evolve(g4.CONFIGS[name], towers=attrs.evolve(TOWERS, bidirectional_vision=bidirectional))


def image(h: int, w: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An h x w-patch image as HF's processor lays it out: raster patches, then padding to MAX_PATCHES."""
    n, P = h * w, 3 * VISION.patch_size**2
    pixels = torch.rand(MAX_PATCHES, P, generator=torch.Generator().manual_seed(seed))
    pixels[n:] = 0
    gx, gy = torch.meshgrid(torch.arange(w), torch.arange(h), indexing="xy")
    pos = torch.cat([torch.stack([gx, gy], -1).reshape(n, 2), torch.full((MAX_PATCHES - n, 2), -1)])
    return pixels, pos


def batch(*images):
    return torch.stack([p for p, _ in images]), torch.stack([q for _, q in images])


def prompt(*soft: int) -> list[int]:
    """Text, then each image as begin / soft tokens / end (any ids stand in for <|image> and <image|>)."""
    ids = [2, 5, 7]
    for n in soft:
        ids += [300] + [IMG] * n + [301, 9, 10]
    return ids


@pytest.fixture(scope="module", params=[False, True], ids=["causal", "bidirectional"])
def case(request):
    cfg = config(request.param)
    params = g4.init_params(cfg, seed=3)
    return cfg, params, hf_multimodal(cfg, params)


def hf_logits(model, ids, pixels=None, pos=None):
    with torch.no_grad():
        kw = {} if pixels is None else dict(pixel_values=pixels, image_position_ids=pos)
        return model(input_ids=ids, mm_token_type_ids=(ids == IMG).long(), use_cache=False, **kw).logits


# 6x9 patches (6 soft tokens, 27 padding patches), 9x3 (3 soft tokens), 9x9 (9, no padding)
IMAGES = {"one": [(6, 9)], "two": [(6, 9), (9, 3)], "full": [(9, 9)]}


@pytest.mark.parametrize("images", IMAGES)
@torch.no_grad()
def test_image_logits_equal_transformers(case, images):
    cfg, params, ref = case
    sizes = IMAGES[images]
    pixels, pos = batch(*(image(h, w, i) for i, (h, w) in enumerate(sizes)))
    ids = torch.tensor([prompt(*(h * w // 9 for h, w in sizes))])
    got = multimodal_logits(params, cfg, ids, pixel_values=pixels, image_position_ids=pos)
    assert torch.equal(got, hf_logits(ref, ids, pixels, pos))  # same ops in the same order, bit for bit


@torch.no_grad()
def test_batch_of_prompts_with_images_equals_transformers(case):
    cfg, params, ref = case
    pixels, pos = batch(image(6, 9, 0), image(9, 3, 1), image(3, 3, 2))
    ids = torch.tensor([prompt(6, 3), prompt(1) + [12] * 12])  # images of row 0, then row 1
    got = multimodal_logits(params, cfg, ids, pixel_values=pixels, image_position_ids=pos)
    assert torch.equal(got, hf_logits(ref, ids, pixels, pos))


@torch.no_grad()
def test_text_only_with_towers_equals_transformers(case):
    cfg, params, ref = case
    ids = torch.tensor([prompt() + list(range(20, 36))])  # 19 tokens
    assert torch.equal(multimodal_logits(params, cfg, ids), hf_logits(ref, ids))


@torch.no_grad()
def test_image_features_equal_transformers(case):
    cfg, params, ref = case
    pixels, pos = batch(image(6, 9, 0), image(9, 3, 1))
    want = torch.cat(ref.model.get_image_features(pixels, pos).pooler_output)
    assert torch.equal(image_features(params, cfg, pixels, pos), want)


def test_clipping_and_padding_matter(case):
    # The parity above would not notice a tower that ignored its clip bounds or leaked padding patches.
    cfg, params, _ = case
    pixels, pos = batch(image(6, 9, 0))
    base = image_features(params, cfg, pixels, pos)
    unclipped = g4.params.tree_map_with_path(
        lambda p, t: t * 100 if p.endswith(("_min", "_max")) else t, params.vision_tower
    )
    assert not torch.allclose(image_features(attrs.evolve(params, vision_tower=unclipped), cfg, pixels, pos), base)
    noisy = pixels.clone()
    noisy[0, 54:] = torch.rand(27, 48)  # only padding patches change
    assert torch.equal(image_features(params, cfg, noisy, pos), base)


def test_image_blocks_equal_transformers():
    from transformers.models.gemma4.modeling_gemma4 import get_block_sequence_ids_for_mask

    ids = torch.tensor([prompt(2, 3) + [0] * 2, prompt(1, 1, 1)])
    want = get_block_sequence_ids_for_mask((ids == IMG).long(), ids.device)
    assert torch.equal(image_blocks(ids == IMG), want)


def test_pool_averages_each_block_in_raster_order():
    h = torch.arange(36.0).reshape(1, 36, 1)  # a 6 x 6 grid, value = raster index
    gx, gy = torch.meshgrid(torch.arange(6), torch.arange(6), indexing="xy")
    out, real = pool(h, torch.stack([gx, gy], -1).reshape(1, 36, 2), 3)
    assert real.all()
    # block (bx, by) averages rows 3by..3by+2, columns 3bx..3bx+2: mean raster index = 18 by + 3 bx + 7
    assert torch.allclose(out.flatten(), torch.tensor([7.0, 10.0, 25.0, 28.0]))


@pytest.mark.parametrize("bidirectional", [False, True])
@torch.no_grad()
def test_cached_prefill_with_image_then_decode_equals_no_cache(bidirectional):
    # Prefill in chunks (the image inside one), then one token at a time: the plain forward's logits.
    cfg = config(bidirectional)
    params = g4.init_params(cfg, seed=4)
    pixels, pos = batch(image(6, 9, 0))
    ids = torch.tensor([prompt(6) + list(range(20, 50))])  # 43 tokens: the decode passes the window (16)
    want = multimodal_logits(params, cfg, ids, pixel_values=pixels, image_position_ids=pos)
    tokens, (where, values), blocks = merge(cfg, ids, image_features(params, cfg, pixels, pos))
    cache, out = g4.init_cache(cfg, max_seq_len=64), []
    for a, b in [(0, 3), (3, 14), *((t, t + 1) for t in range(14, ids.shape[1]))]:
        part = None if blocks is None else blocks[:, a:b]
        logits, cache = g4.forward(
            params, cfg, tokens[:, a:b], torch.arange(a, b), cache, soft=(where[:, a:b], values[:, a:b]), blocks=part
        )
        out.append(logits)
    got = torch.cat(out, 1)
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-5


def test_bidirectional_blocks_change_the_logits():
    # On sliding layers an image's soft tokens also see its later ones: from the first soft token on, the
    # logits move; the text before the image does not.
    cfg = config(True)
    params = g4.init_params(cfg, seed=4)
    pixels, pos = batch(image(6, 9, 0))
    ids = torch.tensor([prompt(6)])
    with torch.no_grad():
        both = multimodal_logits(params, cfg, ids, pixel_values=pixels, image_position_ids=pos)
        causal = multimodal_logits(
            params, attrs.evolve(cfg, towers=config(False).towers), ids, pixel_values=pixels, image_position_ids=pos
        )
    first = prompt(6).index(IMG)
    assert torch.equal(both[:, :first], causal[:, :first])
    assert not torch.allclose(both[:, first:], causal[:, first:])


# --- checkpoints ------------------------------------------------------------------------------------


def test_load_towers_from_save_pretrained(tmp_path, case):
    cfg, params, ref = case
    ref.save_pretrained(tmp_path, max_shard_size="200KB")
    loaded_cfg, loaded = g4.load_checkpoint(tmp_path, towers=True)
    assert loaded_cfg == cfg
    for (p, a), (q, b) in zip(g4.params.leaves_with_path(loaded), g4.params.leaves_with_path(params), strict=True):
        assert p == q and torch.equal(a, b), p
    # Without towers=True: today's text-only load, towers ignored.
    text_cfg, text = g4.load_checkpoint(tmp_path)
    assert text_cfg == attrs.evolve(cfg, towers=None) and text.vision_tower is None and text.embed_vision is None


def test_random_multimodal_checkpoint_loads_in_transformers(tmp_path):
    cfg = config(False)
    g4.write_random_checkpoint(cfg, tmp_path, seed=5, dtype=torch.float32, multimodal=True)
    model, info = transformers.Gemma4ForConditionalGeneration.from_pretrained(
        tmp_path, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    loaded_cfg, params = g4.load_checkpoint(tmp_path, towers=True)
    assert loaded_cfg == cfg
    pixels, pos = batch(image(6, 9, 0))
    ids = torch.tensor([prompt(6)])
    with torch.no_grad():
        got = multimodal_logits(params, cfg, ids, pixel_values=pixels, image_position_ids=pos)
    assert torch.equal(got, hf_logits(model.eval(), ids, pixels, pos))


def test_an_unexpected_vision_tensor_is_an_error_with_towers(tmp_path):
    from safetensors.torch import load_file, save_file

    g4.write_random_checkpoint(config(False), tmp_path, dtype=torch.float32, multimodal=True)
    shard = next(tmp_path.glob("*.safetensors"))
    save_file(load_file(shard) | {"model.vision_tower.extra": torch.zeros(2)}, shard)
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(
        index.read_text().replace('"weight_map": {', f'"weight_map": {{"model.vision_tower.extra": "{shard.name}", ')
    )
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model.vision_tower.extra'"):
        g4.load_checkpoint(tmp_path, towers=True)
    g4.load_checkpoint(tmp_path)  # text only: the towers' tensors are not looked at


def test_towers_of_a_text_only_checkpoint_is_an_error(tmp_path):
    g4.write_random_checkpoint(g4.CONFIGS["tiny"], tmp_path, dtype=torch.float32)
    with pytest.raises(CheckpointError, match=r"config\.json: towers need a multimodal"):
        g4.load_checkpoint(tmp_path, towers=True)


# --- bad input ----------------------------------------------------------------------------------------


def test_bad_image_inputs_name_the_argument(case):
    cfg, params, _ = case
    pixels, pos = batch(image(6, 9, 0))
    ids = torch.tensor([prompt(6)])
    with pytest.raises(ValueError, match=r"input_ids: 6 image placeholder tokens, but the images give no soft tokens"):
        multimodal_logits(params, cfg, ids)
    with pytest.raises(ValueError, match=r"input_ids: 7 image placeholder tokens, but the images give 6 soft"):
        multimodal_logits(params, cfg, torch.tensor([prompt(7)]), pixel_values=pixels, image_position_ids=pos)
    with pytest.raises(ValueError, match=r"image_position_ids: needed with pixel_values"):
        multimodal_logits(params, cfg, ids, pixel_values=pixels)
    with pytest.raises(ValueError, match=r"pixel_values must be \[B, N, 48\]"):
        multimodal_logits(params, cfg, ids, pixel_values=pixels[..., :47], image_position_ids=pos)
    with pytest.raises(ValueError, match=r"image_position_ids must be int64 \[B, N, 2\]"):
        multimodal_logits(params, cfg, ids, pixel_values=pixels, image_position_ids=pos.float())
    with pytest.raises(ValueError, match=r"80 patches is no multiple of 3\^2"):
        multimodal_logits(params, cfg, ids, pixel_values=pixels[:, :80], image_position_ids=pos[:, :80])
    text = attrs.evolve(params, vision_tower=None, embed_vision=None)
    with pytest.raises(ValueError, match=r"pixel_values: this model has no vision tower"):
        multimodal_logits(text, cfg, ids, pixel_values=pixels, image_position_ids=pos)
    with pytest.raises(ValueError, match=r"cfg: no towers"):
        multimodal_logits(params, attrs.evolve(cfg, towers=None), ids)


# --- the .pte (`g4.export --vision`) ----------------------------------------------------------------------

PTE_TOL = 1e-5  # fp32 .pte vs eager: XNNPACK's GEMMs and ExecuTorch's attention round differently


def tiny_vision():
    """The weights `python -m g4.export tiny --vision` draws (seed 0)."""
    cfg = attrs.evolve(g4.CONFIGS["tiny"], towers=TOWERS)
    return cfg, g4.init_params(cfg, seed=0)


def test_pte_towers_encoder_equals_eager(pte_towers):
    pte, (cfg, params) = g4.PteModel(pte_towers), tiny_vision()
    for i, (h, w) in enumerate([(6, 9), (9, 9), (3, 3), (21, 30)]):  # padded, full, one block, 70 soft tokens
        n = max(MAX_PATCHES, h * w)
        pixels, pos = batch(image(h, w, i) if n == MAX_PATCHES else full(h, w, i))
        got, want = pte.encode(pixels, pos), image_features(params, cfg, pixels, pos)
        assert got.shape == want.shape == (h * w // 9, cfg.hidden_size)
        assert (got - want).abs().max() <= PTE_TOL * want.abs().max()


def test_a_quantized_vision_tower_keeps_its_position_tables_in_int8():
    from g4.export import ExportOptions, position_tables, quantize_params

    cfg, params = tiny_vision()
    vt = params.vision_tower
    table = vt.patch_embedder.position_embedding_table  # [2, P, Hv]
    fp32 = quantize_params(params, ExportOptions(vision=True)).vision_tower.patch_embedder
    assert torch.equal(fp32.position_embedding_table, table)
    got = quantize_params(params, ExportOptions(vision=True, vision_quantize="8da8w")).vision_tower
    pair = got.patch_embedder.position_embedding_table
    assert isinstance(pair, tuple) and [t.qdata.dtype for t in pair] == [torch.int8, torch.int8]
    for t, w in zip(pair, table, strict=True):  # symmetric, one scale per row: within half a step
        assert ((t.dequantize() - w).abs() <= w.abs().amax(1, keepdim=True) / 127 / 2 * (1 + 1e-6)).all()
    # the encoder runs on the pair; with only the tables in int8, its soft tokens move this little:
    pe = attrs.evolve(vt.patch_embedder, position_embedding_table=position_tables(table, torch.float32))
    only = attrs.evolve(params, vision_tower=attrs.evolve(vt, patch_embedder=pe))
    pixels, pos = batch(image(6, 9, 0), full(9, 9, 1))
    want = image_features(params, cfg, pixels, pos)
    err = (image_features(only, cfg, pixels, pos) - want).abs().max() / want.abs().max()
    print(f"int8 position tables: soft tokens within {err:.1e} of the largest")
    assert 0 < err <= 5e-3


@pytest.fixture(scope="module")
def pte_vision_8da8w(tmp_path_factory):
    """tiny (seed 0) whose images attend both ways (31B's `use_bidirectional_attention: "vision"`), from the
    checkpoint transformers saves, with the vision tower quantized 8da8w (int8 position tables), text fp32."""
    from g4.export.__main__ import main as export_main

    ck = tmp_path_factory.mktemp("vq")
    cfg = config(True)
    hf_multimodal(cfg, g4.init_params(cfg, seed=0)).save_pretrained(ck)
    out = ck / "tiny-vision-8da8w.pte"
    flags = ["--max-seq-len", "128", "--max-chunk", "70", "--vision", "--vision-quantize", "8da8w"]
    assert export_main([str(out), "--checkpoint", str(ck), *flags, "--max-soft-tokens", "70"]) == 0
    return out


def test_pte_quantized_vision_tower_equals_eager_on_the_same_weights(pte_vision_8da8w):
    from g4.export import ExportOptions, quantize_params

    cfg, params = tiny_vision()
    q = quantize_params(params, ExportOptions(vision=True, vision_quantize="8da8w"))
    pte, errs = g4.PteModel(pte_vision_8da8w), []
    for i, (h, w) in enumerate([(6, 9), (9, 9), (21, 30)]):
        pixels, pos = batch(image(h, w, i) if h * w <= MAX_PATCHES else full(h, w, i))
        got, want = pte.encode(pixels, pos), image_features(q, cfg, pixels, pos)
        errs.append(float((got - want).abs().max() / want.abs().max()))
    print("8da8w vision .pte vs eager on the same quantized weights: " + ", ".join(f"{e:.1e}" for e in errs))
    # XNNPACK's and torchao's dynamic int8 activations round alike but for a few values at 70 soft tokens
    assert max(errs[:2]) <= 1e-6 and errs[2] <= 7e-3


@torch.no_grad()
def test_pte_images_attend_both_ways_as_eager(pte_vision_8da8w):
    """Bidirectional image attention in a .pte: the prompt puts a prefill-call boundary (70) inside the image,
    so `text_decoder` is fed the text before it, then the image whole; the same tokens and logits as eager."""
    pte, cfg = g4.PteModel(pte_vision_8da8w), config(True)
    assert pte.vision is not None and pte.vision.bidirectional and pte.max_chunk == 70
    eager = g4.EagerModel(cfg, g4.init_params(cfg, seed=0), max_context=128)
    pixels, pos = batch(image(6, 9, 0))
    prompt = [2, *range(60, 124), *pte.vision.placeholders(6), 9, 10]  # soft tokens at positions 66..71
    soft = pte.encode(pixels, pos)  # the same soft tokens on both: the decoder's attention is what is compared
    generates_as_eager(pte, eager, prompt, soft, soft)


def test_prefill_calls_keep_an_image_whole():
    from g4.generation import GenerateError, calls

    ids = [1, 2, 7, 7, 7, 3]
    assert calls(ids, 3) == [(0, 3), (3, 6)]
    assert calls(ids, 3, whole=7) == [(0, 2), (2, 5), (5, 6)]
    with pytest.raises(GenerateError, match="an image of more than 2 soft tokens does not fit one call of 2"):
        calls(ids, 2, whole=7)


def full(h, w, seed):
    """An h x w-patch image without padding."""
    pixels = torch.rand(h * w, 3 * VISION.patch_size**2, generator=torch.Generator().manual_seed(seed))
    gx, gy = torch.meshgrid(torch.arange(w), torch.arange(h), indexing="xy")
    return pixels, torch.stack([gx, gy], -1).reshape(h * w, 2)


@torch.no_grad()
def test_pte_image_prompt_generates_as_eager(pte_towers):
    # The image's placeholders straddle a prefill chunk boundary (20): text_decoder feeds both chunks, then
    # forward decodes on the cache text_decoder wrote.
    pte, (cfg, params) = g4.PteModel(pte_towers), tiny_vision()
    eager = g4.EagerModel(cfg, params, max_context=160)
    pixels, pos = batch(image(6, 9, 0))
    prompt = [2, *range(20, 35), *pte.vision.placeholders(6), 9, 10]  # soft tokens at positions 17..22
    want = generates_as_eager(pte, eager, prompt, pte.encode(pixels, pos), eager.encode(pixels, pos))
    # and the eager prefill is the no-cache forward with the image (multimodal_logits)
    ref = multimodal_logits(params, cfg, torch.tensor([prompt]), pixel_values=pixels, image_position_ids=pos)
    assert (want.logits[0] - ref[0, -1]).abs().max() <= 1e-5 * ref.abs().max()


def generates_as_eager(pte, eager, prompt, pte_soft, eager_soft):
    """Asserts the .pte and eager generate the same 24 greedy tokens from `prompt` with their soft tokens,
    every step's logits within PTE_TOL relative; returns eager's generation."""
    got = g4.generate(pte, prompt, 24, soft=pte_soft, stop=(), keep_logits=True)
    want = g4.generate(eager, prompt, 24, soft=eager_soft, stop=(), keep_logits=True)
    assert got.ids == want.ids and len(got.ids) == 24
    for a, b in zip(got.logits, want.logits, strict=True):
        assert (a - b).abs().max() <= PTE_TOL * b.abs().max()
    return want


def test_g4_run_with_an_image_on_the_pte_and_eager(pte_towers, tmp_path, capsys):
    from PIL import Image

    Image.fromarray((torch.rand(30, 44, 3) * 255).byte().numpy()).save(tmp_path / "photo.png")
    errs = run_three_ways(pte_towers, ["--image", str(tmp_path / "photo.png")], capsys)
    for err in errs:
        assert "vision: 1 image(s), 60 soft tokens" in err, err  # 72 x 120 pixels: 6 x 10 blocks
        assert "| 8 tokens |" in err, err
    assert "| accepted" in errs[0] and "| accepted" in errs[2]  # the .pte drafts (its drafter), eager does not


def test_g4_run_puts_the_image_in_the_last_user_turn_of_a_messages_file(pte_towers, tmp_path, capsys):
    from PIL import Image

    from g4.run import main as run_main

    Image.fromarray((torch.rand(30, 44, 3) * 255).byte().numpy()).save(tmp_path / "photo.png")
    conv = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "yes"},
        {"role": "user", "content": "hi"},
    ]
    (tmp_path / "conv.json").write_text(json.dumps(conv))
    (tmp_path / "first.json").write_text(json.dumps(conv[:2]))
    media = ["--image", str(tmp_path / "photo.png"), "--max-new-tokens", "8"]
    assert run_main([str(pte_towers), "--messages", str(tmp_path / "conv.json"), *media]) == 0
    from_file = capsys.readouterr()
    assert run_main([str(pte_towers), "--messages", str(tmp_path / "first.json"), "--prompt", "hi", *media]) == 0
    from_prompt = capsys.readouterr()
    assert "vision: 1 image(s), 60 soft tokens" in from_file.err and "| 8 tokens |" in from_file.err
    assert from_file.out == from_prompt.out  # the same prompt: the image opens the last user turn


def run_three_ways(pte, media: list[str], capsys) -> list[str]:
    """`g4.run` with `media` flags on the .pte, eager and the .pte with --chat: each one's stderr; asserts
    the .pte and eager print the same text (random weights: mostly newlines)."""
    from g4.run import main as run_main

    out, errs = {}, []
    for name, args in {
        "pte": [str(pte)],
        "eager": ["--eager", "--size", "tiny", "--max-seq-len", "160", "--max-soft-tokens", "70"],
        "chat": [str(pte), "--chat"],
    }.items():
        assert run_main([*args, *media, "--prompt", "hi", "--max-new-tokens", "8"]) == 0
        o = capsys.readouterr()
        out[name] = o.out
        errs.append(o.err)
    assert out["pte"] == out["eager"]
    return errs


def test_cli_writes_a_random_checkpoint_with_the_vision_tower(tmp_path, capsys):
    from g4.checkpoint.__main__ import main as checkpoint_main

    assert checkpoint_main(["random", "tiny", str(tmp_path / "ck"), "--vision", "--dtype", "float32"]) == 0
    cfg, params = g4.load_checkpoint(tmp_path / "ck", towers=True)
    assert cfg.towers == attrs.evolve(TOWERS, audio=None) and params.vision_tower is not None
    assert params.audio_tower is None
    assert checkpoint_main(["random", "tiny", str(tmp_path / "ck2"), "--vision", "--audio", "--dtype", "float32"]) == 0
    cfg, params = g4.load_checkpoint(tmp_path / "ck2", towers=True)
    assert cfg.towers == TOWERS and params.audio_tower is not None
    assert checkpoint_main(["random", "tiny-31b", str(tmp_path / "no"), "--vision"]) == 2
    assert (
        capsys.readouterr().err.strip().endswith("error: --vision: no vision tower for tiny-31b (have: tiny, e2b, e4b)")
    )
    assert not (tmp_path / "no").exists()
    assert checkpoint_main(["random", "tiny-31b", str(tmp_path / "no"), "--audio"]) == 2
    assert (
        capsys.readouterr().err.strip().endswith("error: --audio: no audio tower for tiny-31b (have: tiny, e2b, e4b)")
    )
    assert not (tmp_path / "no").exists()
