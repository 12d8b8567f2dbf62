"""A tokenizer made on the spot, for random-weight models on a machine with no network.

A byte-level BPE is trained in about a second on generated pseudo-English, then padded with extra merges of
its own ASCII tokens until it has exactly `vocab_size` tokens, so that every id a random model samples
decodes to text (an id past the vocabulary would decode to nothing, and SGLang-style clients that time
tokens by their text would miss them). Saved as tokenizer.json plus a tokenizer_config.json with a small
ChatML template, so `AutoTokenizer.from_pretrained(folder)` and chat requests work.

    ids:  0 .. len(SPECIAL_TOKENS)-1     special tokens (BOS, EOS, chat markers)
          .. 256 more                    the byte alphabet
          .. trained size                trained merges
          .. vocab_size - 1              padding merges (never produced by encoding ordinary text)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

BOS, EOS, IM_START, IM_END = "<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (BOS, EOS, IM_START, IM_END)
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
MAX_TRAINED_VOCAB = 8192  # what a second of training on the generated text supports well
_ONSETS = ("", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "th",
           "st", "ch", "sh", "tr", "pl", "gr")
_VOWELS = ("a", "e", "i", "o", "u", "ea", "ou", "io", "ai")
_CODAS = ("", "", "n", "r", "s", "t", "l", "nd", "ng", "st", "ck")


def generated_text(num_words: int, seed: int = 0) -> list[str]:
    """Lines of pseudo-English: a few thousand syllable-built words with Zipf-like frequencies, punctuation
    and digits, so that the trained merges look like a natural-language vocabulary."""
    rng = np.random.default_rng(seed)
    words = []
    for _ in range(4000):
        syllables = rng.integers(1, 4)
        words.append("".join(str(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS))
                             for _ in range(syllables)))
    ranks = np.arange(1, len(words) + 1)
    probs = 1.0 / ranks
    picks = rng.choice(len(words), size=num_words, p=probs / probs.sum())
    lines, line = [], []
    for n, i in enumerate(picks):
        word = words[i]
        if n % 17 == 0:
            word = word.capitalize()
        if n % 23 == 0:
            word += rng.choice([",", ".", "?", "!", ":"])
        if n % 101 == 0:
            word = str(rng.integers(0, 10_000))
        line.append(word)
        if len(line) == 12:
            lines.append(" ".join(line))
            line = []
    return lines


def build_tokenizer(vocab_size: int, seed: int = 0):  # -> tokenizers.Tokenizer
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < len(SPECIAL_TOKENS) + 256 + 16:
        raise ValueError(f"vocab_size {vocab_size} is too small for a byte-level BPE")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(vocab_size, MAX_TRAINED_VOCAB),
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(generated_text(300_000, seed), trainer)
    if tokenizer.get_vocab_size() < vocab_size:
        tokenizer = _pad_vocab(tokenizer, vocab_size, seed)
    assert tokenizer.get_vocab_size() == vocab_size, (tokenizer.get_vocab_size(), vocab_size)
    return tokenizer


def _pad_vocab(tokenizer, vocab_size: int, seed: int):  # -> tokenizers.Tokenizer
    """Append merges of two ASCII tokens (a + b, new as a string) until the vocabulary is full."""
    from tokenizers import Tokenizer

    state = json.loads(tokenizer.to_str())
    model = state["model"]
    vocab: dict[str, int] = model["vocab"]
    merges: list = model["merges"]
    # Byte-level strings of ASCII text are the text itself, except that the space shows as "Ġ".
    ascii_tokens = [t for t in vocab if all(c.isascii() and c.isprintable() or c == "Ġ" for c in t)]
    rng = np.random.default_rng(seed + 1)
    next_id = max(vocab.values()) + 1
    while next_id < vocab_size:
        a, b = (ascii_tokens[i] for i in rng.integers(len(ascii_tokens), size=2))
        if a + b in vocab:
            continue
        vocab[a + b] = next_id
        merges.append([a, b] if isinstance(merges[0], list) else f"{a} {b}")
        next_id += 1
    return Tokenizer.from_str(json.dumps(state))


def save_tokenizer(folder: Path, vocab_size: int, model_max_length: int, seed: int = 0) -> dict[str, int]:
    """Write tokenizer.json and tokenizer_config.json into `folder`; return the special tokens' ids."""
    tokenizer = build_tokenizer(vocab_size, seed)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": IM_END,
        "pad_token": EOS,
        "add_bos_token": False,
        "model_max_length": model_max_length,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    ids = {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}
    assert all(i is not None for i in ids.values())
    return ids  # type: ignore[return-value]
