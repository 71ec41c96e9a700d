"""A 512-token byte-level BPE tokenizer for the tiny size, every piece printable ASCII."""

import random
import string

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]  # ids 0..3, as Gemma's pad/eos/bos/unk


def build(vocab_size: int = 512) -> Tokenizer:
    rng = random.Random(0)
    words = ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 7))) for _ in range(600)]
    corpus = [" ".join(rng.choice(words) for _ in range(12)) + "." for _ in range(4000)] + [string.printable] * 5
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = sorted(set(string.printable.strip()) | {"Ġ", "Ċ"})  # byte-level space and newline
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=alphabet, limit_alphabet=len(alphabet)
    )
    tok.train_from_iterator(corpus, trainer)
    assert tok.get_vocab_size() == vocab_size
    return tok
