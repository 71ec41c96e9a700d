"""The tiny size's 512-token tokenizer, built the way Gemma 4's is (transformers' `GemmaTokenizer`).

BPE with byte fallback over text whose spaces become "▁", Gemma 4's control tokens at Gemma 4's ids
(`<bos>` 2, `<|turn>` 105, `<turn|>` 106, ...) and a post-processor that puts `<bos>` first.
"""

import random
import string

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

# Gemma 4's control tokens, at Gemma 4's ids; the other ids below 107 are unused placeholders.
SPECIALS = {
    0: "<pad>",
    1: "<eos>",
    2: "<bos>",
    3: "<unk>",
    4: "<mask>",
    46: "<|tool>",
    47: "<tool|>",
    48: "<|tool_call>",
    49: "<tool_call|>",
    50: "<|tool_response>",
    51: "<tool_response|>",
    52: '<|"|>',
    98: "<|think|>",
    100: "<|channel>",
    101: "<channel|>",
    105: "<|turn>",
    106: "<turn|>",
}
FIRST_PIECE = 107  # "\n", as in Gemma 4


def build(vocab_size: int = 512) -> Tokenizer:
    """The tokenizer, trained on a fixed random corpus: the same file every time."""
    rng = random.Random(0)
    words = ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 7))) for _ in range(600)]
    corpus = [" ".join(rng.choice(words) for _ in range(12)) + "." for _ in range(4000)] + [string.printable] * 5
    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    specials = [SPECIALS.get(i, f"<unused{i}>") for i in range(FIRST_PIECE)]
    alphabet = sorted((set(string.printable) - set(" \t\r\x0b\x0c")) | {"▁"})  # "\n" first: id 107
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[AddedToken(s, special=True, normalized=False) for s in specials],
        initial_alphabet=alphabet,
        limit_alphabet=len(alphabet),
    )
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B:1", special_tokens=[("<bos>", 2)]
    )
    assert tok.get_vocab_size() == vocab_size
    assert all(tok.token_to_id(s) == i for i, s in SPECIALS.items()) and tok.token_to_id("\n") == FIRST_PIECE
    return tok
