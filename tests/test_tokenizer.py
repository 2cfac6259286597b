"""Tokenizers round-trip text, keep their special tokens, and refuse what they cannot encode."""

from __future__ import annotations

from pathlib import Path

import pytest

from minitx.config import ConfigError, TokenizerConfig
from minitx.tokenizer import (
    ENCODER_TOKENS,
    EOT,
    SPECIAL_TOKENS,
    build_tokenizer,
    is_char_level,
    stream_decode,
    train_bpe_tokenizer,
    train_char_tokenizer,
    unknown_chars,
)

TEXT = "def f(x):\n    return x  # héllo, wörld ✓\n\n\tend\r\n"


def test_char_round_trip_keeps_newlines_tabs_and_unicode() -> None:
    tok = train_char_tokenizer([TEXT])
    ids = tok.encode(TEXT).ids
    assert len(ids) == len(TEXT)  # one token per character
    assert tok.decode(ids) == TEXT
    assert "".join(stream_decode(tok, ids)) == TEXT
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1]
    assert is_char_level(tok)


def test_char_unknown_characters_are_listed() -> None:
    tok = train_char_tokenizer(["abc"])
    assert unknown_chars(tok, "abz€") == ["z", "€"]
    assert tok.encode("z").ids == [tok.token_to_id("[UNK]")]


def test_bpe_round_trip_and_vocab_size() -> None:
    corpus = [TEXT * 3, "the quick brown fox jumps over the lazy dog " * 50]
    tok = train_bpe_tokenizer(corpus, vocab_size=300)
    assert tok.get_vocab_size() <= 300
    ids = tok.encode(TEXT).ids
    assert len(ids) < len(TEXT.encode())  # merges learned
    assert tok.decode(ids) == TEXT
    # streaming holds back partial UTF-8 bytes until a whole character is there
    assert "".join(stream_decode(tok, ids)) == TEXT
    assert tok.token_to_id(EOT) == 0
    assert not is_char_level(tok)
    assert unknown_chars(tok, "anything €") == []


def test_tokenizer_json_path(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    train_bpe_tokenizer(["hello world " * 100], vocab_size=270).save(str(path))
    tok = build_tokenizer(TokenizerConfig(path=str(path)), texts=[])
    assert tok.decode(tok.encode("hello world").ids) == "hello world"


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (TokenizerConfig(kind="wordpiece"), "tokenizer.kind='wordpiece'"),
        (TokenizerConfig(kind="bpe", vocab_size=100), "tokenizer.vocab_size=100"),
    ],
)
def test_bad_tokenizer_config(cfg: TokenizerConfig, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        cfg.validate()


def test_bad_tokenizer_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        build_tokenizer(TokenizerConfig(path=str(tmp_path / "missing.json")), texts=[])
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"not a tokenizer\.json"):
        build_tokenizer(TokenizerConfig(path=str(tmp_path / "bad.json")), texts=[])


def test_special_tokens_in_a_prompt_are_not_unknown_characters() -> None:
    tok = train_char_tokenizer(["the cat"], SPECIAL_TOKENS + ENCODER_TOKENS)
    assert unknown_chars(tok, "<|endoftext|>the [MASK] cat[SEP]") == []
    assert unknown_chars(tok, "<|endoftext|>thez<|") == ["<", "z", "|"]  # half a special token is characters
    assert tok.encode("<|endoftext|>the").ids == [tok.token_to_id(EOT), *tok.encode("the").ids]


def test_special_ids_of_a_tokenizer_json_are_where_it_put_them(tmp_path: Path) -> None:
    """A tokenizer.json without minitx's special tokens gets them appended after its own ids."""
    from minitx.tokenizer import special_ids

    path = tmp_path / "tokenizer.json"
    train_bpe_tokenizer(["hello world " * 100], vocab_size=270, specials=[]).save(str(path))
    tok = build_tokenizer(TokenizerConfig(path=str(path)), texts=[], encoder=True)
    own = train_bpe_tokenizer(["hello world " * 100], vocab_size=270, specials=[]).get_vocab_size()
    assert special_ids(tok) == list(range(own, own + 6))
    assert special_ids(train_char_tokenizer(["ab"])) == [0, 1]


def test_tokenizer_trains_on_a_bounded_sample() -> None:
    """tokenizer.sample_chars: characters past the sample are never read, so a char tokenizer does not know them."""
    from minitx.config import TokenizerConfig
    from minitx.tokenizer import build_tokenizer

    read = []

    def texts():
        for t in ("abc", "def", "xyz"):
            read.append(t)
            yield t

    tok = build_tokenizer(TokenizerConfig(kind="char", sample_chars=4), texts())
    vocab = tok.get_vocab()
    assert {"a", "b", "c", "d"} <= vocab.keys() and "e" not in vocab and "x" not in vocab
    assert read == ["abc", "def"]  # the third text is never drawn from the corpus
