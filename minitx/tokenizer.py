"""Tokenizers, all Hugging Face `tokenizers` objects: char-level, byte-level BPE, or a tokenizer.json.

Every tokenizer minitx trains starts its vocabulary with the same special tokens, so the end-of-text
separator and the unknown token have the same ids whatever the corpus.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from minitx.config import ConfigError, TokenizerConfig

EOT = "<|endoftext|>"  # joins documents in the token stream; an empty prompt starts from it
UNK = "[UNK]"  # a character the char vocabulary has never seen
PAD, MASK, CLS, SEP = "[PAD]", "[MASK]", "[CLS]", "[SEP]"
SPECIAL_TOKENS = [EOT, UNK]
ENCODER_TOKENS = [PAD, MASK, CLS, SEP]  # added after SPECIAL_TOKENS for encoder tasks (masked LM, classification)


def train_char_tokenizer(texts: Iterable[str], specials: list[str] = SPECIAL_TOKENS) -> Tokenizer:
    """One token per character seen in `texts`; others become [UNK] (prompts refuse them, see unknown_chars)."""
    chars: set[str] = set()
    for text in texts:
        chars.update(text)
    vocab = {token: i for i, token in enumerate(specials + sorted(chars))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    # "[\s\S]" is any character, newlines included ("." drops them)
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()  # join characters back without spaces
    tokenizer.add_special_tokens(specials)
    return tokenizer


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, specials: list[str] = SPECIAL_TOKENS) -> Tokenizer:
    """Byte-level BPE (GPT-2 style): never meets an unknown character."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def build_tokenizer(cfg: TokenizerConfig, texts: Iterable[str], encoder: bool = False) -> Tokenizer:
    """Load `tokenizer.path`, or train the configured kind on the first `tokenizer.sample_chars` characters of
    `texts` (the training split): a bounded sample, so that training a tokenizer does not grow with the corpus.
    Encoder tasks get [PAD] [MASK] [CLS] [SEP] as well."""
    specials = SPECIAL_TOKENS + ENCODER_TOKENS * encoder
    if cfg.path is not None:
        return load_tokenizer_file(cfg.path, specials)
    texts = first_chars(texts, cfg.sample_chars)
    if cfg.kind == "char":
        return train_char_tokenizer(texts, specials)
    return train_bpe_tokenizer(texts, cfg.vocab_size, specials)


def first_chars(texts: Iterable[str], limit: int) -> Iterator[str]:
    """The texts up to `limit` characters in all (the last one cut), then nothing more is read."""
    left = limit
    for text in texts:
        yield text[:left]
        left -= len(text)
        if left <= 0:
            return


def load_tokenizer_file(path: str, specials: list[str] = SPECIAL_TOKENS) -> Tokenizer:
    if not Path(path).is_file():
        raise ConfigError(f"tokenizer.path={path!r}: no such file")
    try:
        tokenizer = Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        raise ConfigError(f"tokenizer.path={path!r}: not a tokenizer.json ({e})") from None
    missing = [t for t in specials if tokenizer.token_to_id(t) is None]
    if missing:
        tokenizer.add_special_tokens(missing)  # the token stream needs a separator, encoders need [MASK] and co.
    return tokenizer


def tokenizer_spec(cfg: TokenizerConfig, encoder: bool = False) -> str:
    """What decides the trained tokenizer, besides the corpus: part of the token cache's key."""
    if cfg.path is not None:
        spec = "file:" + hashlib.sha256(Path(cfg.path).read_bytes()).hexdigest()
    else:
        spec = f"{cfg.kind}:{cfg.vocab_size}" if cfg.kind == "bpe" else "char"
        spec += f":{cfg.sample_chars}"
    return spec + ":encoder" * encoder


def tokenizer_hash(tokenizer: Tokenizer) -> str:
    return hashlib.sha256(tokenizer.to_str().encode()).hexdigest()[:16]


def special_ids(tokenizer: Tokenizer) -> list[int]:
    """Ids of the special tokens, wherever the tokenizer put them (a loaded tokenizer.json gets them appended)."""
    return sorted(i for i, token in tokenizer.get_added_tokens_decoder().items() if token.special)


def id_limit(tokenizer: Tokenizer) -> int:
    """Largest token id + 1: what an embedding table and a token dtype must hold (a tokenizer.json may skip ids)."""
    return max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1


def is_char_level(tokenizer: Tokenizer) -> bool:
    return isinstance(tokenizer.model, models.WordLevel) and isinstance(tokenizer.pre_tokenizer, pre_tokenizers.Split)


def token_bytes(tokenizer: Tokenizer) -> np.ndarray | None:
    """UTF-8 bytes of text each token id stands for (int64, indexed by id): what bits per byte divide by, so that
    models with different tokenizers compare on the same text. Special tokens ([UNK] included) stand for no text:
    0 bytes. A byte-level BPE token is a string over the byte-level alphabet, one character per byte; a char token is
    its character. None for any other tokenizer (Metaspace, WordPiece...): its tokens decoded one by one do not add up
    to the text (spaces are dropped or added), so there is no table to count with."""
    byte_level = isinstance(tokenizer.decoder, decoders.ByteLevel)
    if not (byte_level or is_char_level(tokenizer)):
        return None
    table = np.zeros(id_limit(tokenizer), dtype=np.int64)
    special = set(special_ids(tokenizer))
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    for token, i in tokenizer.get_vocab(with_added_tokens=True).items():
        if i in special:
            continue
        # a byte-level token is one alphabet character per byte; an added token of that vocabulary, and a char
        # token, are plain text
        table[i] = len(token) if byte_level and set(token) <= alphabet else len(token.encode())
    return table


def unknown_chars(tokenizer: Tokenizer, text: str) -> list[str]:
    """Characters of `text` that a char-level tokenizer would turn into [UNK]; special tokens written whole
    (<|endoftext|>, [MASK]) encode as themselves, so they are not characters to check."""
    if not is_char_level(tokenizer):
        return []
    specials = sorted((t.content for t in tokenizer.get_added_tokens_decoder().values()), key=len, reverse=True)
    if specials:  # longest first, so that no special token is cut by a shorter one inside it
        text = re.sub("|".join(map(re.escape, specials)), "", text)
    vocab = tokenizer.get_vocab()
    return sorted({ch for ch in text if ch not in vocab})


def stream_decode(tokenizer: Tokenizer, ids: Iterable[int]) -> Iterator[str]:
    """Text pieces as ids arrive; byte-level pieces are held back until they form whole characters."""
    stream = decoders.DecodeStream(skip_special_tokens=False)
    for token_id in ids:
        piece = stream.step(tokenizer, token_id)
        if piece:
            yield piece
