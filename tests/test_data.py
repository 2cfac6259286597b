"""Corpora load through `datasets`, tokenize once, and serve deterministic windows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import make_text

from minitx.config import DataConfig, TokenizerConfig
from minitx.data import DataError, FixedWindows, RandomWindows, prepare_data
from minitx.tokenizer import EOT


def prepare(tmp_path: Path, **data: object) -> object:
    cfg = DataConfig(cache_dir=str(tmp_path / "cache"), **data)  # type: ignore[arg-type]
    return prepare_data(cfg, TokenizerConfig(kind="char"), min_tokens=17)


def test_text_file_is_one_document_and_cache_is_reused(tmp_path: Path, text_file: Path) -> None:
    first = prepare(tmp_path, path=str(text_file))
    assert not first.from_cache
    text = text_file.read_text()
    n = len(text) + 1  # one document + EOT
    assert len(first.train) + len(first.val) == n
    assert len(first.val) == int(len(text) * 0.1) + 1  # held-out tail: the last 10% of the text, then EOT
    stream = np.concatenate([first.train.tokens, first.val.tokens])
    assert first.tokenizer.decode(stream[:-1].tolist()) == text
    assert stream[-1] == first.tokenizer.token_to_id(EOT)
    files = sorted(first.cache_dir.iterdir())
    mtimes = [f.stat().st_mtime_ns for f in files]

    second = prepare(tmp_path, path=str(text_file))
    assert second.from_cache and second.cache_dir == first.cache_dir
    assert [f.stat().st_mtime_ns for f in sorted(second.cache_dir.iterdir())] == mtimes  # nothing rewritten
    np.testing.assert_array_equal(second.train.tokens, first.train.tokens)
    assert second.train.tokens.dtype == np.uint16


def test_changed_corpus_gets_a_new_cache(tmp_path: Path, text_file: Path) -> None:
    first = prepare(tmp_path, path=str(text_file))
    text_file.write_text(text_file.read_text() + "one more line\n")
    os.utime(text_file, (time.time() + 5, time.time() + 5))
    second = prepare(tmp_path, path=str(text_file))
    assert second.cache_dir != first.cache_dir and not second.from_cache


def test_jsonl_many_rows_joined_by_separator(tmp_path: Path) -> None:
    rows = [{"body": f"document number {i}", "id": i} for i in range(300)]
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    data = prepare(tmp_path, path=str(path), text_column="body")
    stream = np.concatenate([data.train.tokens, data.val.tokens])
    eot = data.tokenizer.token_to_id(EOT)
    assert (stream == eot).sum() == 300
    first_doc = stream[: int(np.argmax(stream == eot))]
    assert data.tokenizer.decode(first_doc.tolist()) == "document number 0"


def test_directory_with_a_validation_file_uses_it(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train.jsonl").write_text("\n".join(json.dumps({"text": f"train val {i}"}) for i in range(50)))
    (tmp_path / "d" / "validation.jsonl").write_text("\n".join(json.dumps({"text": f"val {i}"}) for i in range(9)))
    data = prepare(tmp_path, path=str(tmp_path / "d"))
    assert len(data.val) == sum(len(f"val {i}") + 1 for i in range(9))
    assert len(data.train) == sum(len(f"train val {i}") + 1 for i in range(50))
    assert data.tokenizer.decode(data.val.tokens[:5].tolist()) == "val 0"


def test_windows_depend_only_on_seed_rank_step(tmp_path: Path, text_file: Path) -> None:
    data = prepare(tmp_path, path=str(text_file))
    a = RandomWindows(data.train, 16, 4, seed=1)
    b = RandomWindows(data.train, 16, 4, seed=1, start_step=5)
    x5, y5 = a.batch(5)
    xb, _ = next(iter(b))  # resuming at step 5 draws step 5's batch
    assert np.array_equal(x5, xb)
    assert np.array_equal(x5[:, 1:], y5[:, :-1])  # targets are inputs shifted by one
    assert x5.shape == (4, 16)
    other_rank = RandomWindows(data.train, 16, 4, seed=1, rank=1, world_size=2)
    assert not np.array_equal(other_rank.batch(5)[0], x5)
    assert not np.array_equal(a.batch(6)[0], x5)
    v1, v2 = FixedWindows(data.val, 16, 4, 3), FixedWindows(data.val, 16, 4, 3)
    assert len(v1) == 3 and np.array_equal(v1[2][0], v2[2][0])


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data\.path=.*no such file or directory"):
        prepare(tmp_path, path=str(tmp_path / "nope.txt"))


def test_missing_text_column(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"body": "x"}\n')
    with pytest.raises(DataError, match=r"data.text_column='text' is not a column.*\['body'\]"):
        prepare(tmp_path, path=str(path))


def test_corpus_shorter_than_a_window(tmp_path: Path) -> None:
    path = tmp_path / "tiny.txt"
    path.write_text("abcdefghij" * 5)
    with pytest.raises(DataError, match=r"fewer than model.block_size \+ 1 = 17"):
        prepare(tmp_path, path=str(path))


@pytest.mark.parametrize(
    "env",
    [{"HF_ENDPOINT": "http://127.0.0.1:9"}, {"HF_HUB_OFFLINE": "1"}],
    ids=["hub-unreachable", "hf-offline"],
)
def test_hub_without_network_fails_fast(tmp_path: Path, env: dict[str, str]) -> None:
    code = (
        "from minitx.config import DataConfig, TokenizerConfig\n"
        "from minitx.data import prepare_data\n"
        "from minitx.cli import exit_on_user_error\n"
        "with exit_on_user_error():\n"
        "    prepare_data(DataConfig(hub_id='karpathy/tiny_shakespeare'), TokenizerConfig(), 65)\n"
    )
    t0 = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, **env, "HF_HOME": str(tmp_path / "hf")})
    assert result.returncode == 2, result.stderr
    assert time.perf_counter() - t0 < 30
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: data.hub_id='karpathy/tiny_shakespeare'")
    assert "data.path=" in line


def test_streaming_needs_no_limit_but_checks_its_keys() -> None:
    from minitx.config import ConfigError

    DataConfig(path="x", streaming=True).validate()  # max_documents=0: the whole stream
    with pytest.raises(ConfigError, match=r"data\.val_documents=0: must be > 0"):
        DataConfig(path="x", streaming=True, val_documents=0).validate()
    with pytest.raises(ConfigError, match=r"data\.num_workers=-1: must be >= 0"):
        DataConfig(path="x", streaming=True, num_workers=-1).validate()
    with pytest.raises(ConfigError, match=r"^data\.max_documents=10: is for data\.streaming=true; set that too"):
        DataConfig(path="x", max_documents=10).validate()


def test_directory_keeps_every_file_and_holds_out_only_validation_files(tmp_path: Path) -> None:
    """File names do not pick splits (datasets' inference would keep train.py only and drop or test the rest)."""
    src = tmp_path / "src"
    (src / "tests").mkdir(parents=True)
    names = ["train.py", "model.py", "data.py", "util.py", "eval_metrics.py", "tests/test_a.py"]
    for i, name in enumerate(names):
        (src / name).write_text(f"# file {name}\n" + make_text(40, seed=i))
    data = prepare(tmp_path, path=str(src))
    train_text = data.tokenizer.decode(data.train.tokens.tolist(), skip_special_tokens=False)
    assert all(f"# file {name}\n" in train_text for name in names)

    (src / "validation.py").write_text("# held out\n" + make_text(30, seed=9))
    data = prepare(tmp_path, path=str(src))
    assert data.tokenizer.decode(data.val.tokens[:-1].tolist()) == (src / "validation.py").read_text()
    train_text = data.tokenizer.decode(data.train.tokens.tolist(), skip_special_tokens=False)
    assert all(f"# file {name}\n" in train_text for name in names) and "# held out" not in train_text

    (src / "test.py").write_text("# a test split\n" + make_text(30, seed=8))  # a Hub layout's test split
    data = prepare(tmp_path, path=str(src))
    train_text = data.tokenizer.decode(data.train.tokens.tolist(), skip_special_tokens=False)
    assert all(f"# file {name}\n" in train_text for name in names) and "# a test split" not in train_text


def test_tokenizer_never_sees_the_held_out_text(tmp_path: Path) -> None:
    """The held-out slice (the corpus's end) is cut before the tokenizer is trained: characters and merges that occur
    only there are not in the vocabulary."""
    path = tmp_path / "corpus.txt"
    path.write_text(make_text(900) + "zebra Ω quux\n" * 100)  # the tail is well inside the last 10%
    data = prepare(tmp_path, path=str(path))
    vocab = data.tokenizer.get_vocab()
    assert "Ω" not in vocab and "z" not in vocab
    assert data.tokenizer.token_to_id("[UNK]") in data.val.tokens
    cfg = DataConfig(cache_dir=str(tmp_path / "cache"), path=str(path))
    bpe = prepare_data(cfg, TokenizerConfig(kind="bpe", vocab_size=500), min_tokens=17).tokenizer
    assert not [t for t in bpe.get_vocab() if "eb" in t or "uu" in t]


def test_single_document_is_cut_without_a_separator(tmp_path: Path, text_file: Path) -> None:
    data = prepare(tmp_path, path=str(text_file))
    text = text_file.read_text()
    n_val = int(len(text) * 0.1)
    assert len(data.val) == n_val + 1  # the last 10% of the characters and the closing EOT
    assert data.tokenizer.decode(data.train.tokens.tolist(), skip_special_tokens=False) == text[:-n_val]


def test_token_ids_above_uint16_keep_their_value(tmp_path: Path) -> None:
    """dtype and vocabulary follow the largest id, not the number of tokens (70000 was stored as 4464)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    from minitx.tokenizer import id_limit

    vocab = {"[UNK]": 0, **{c: i + 1 for i, c in enumerate("abcdefghijklmnopqrstuvwxy \n")}, "z": 70000}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "c.txt").write_text("abc z\n" * 300)
    cfg = DataConfig(cache_dir=str(tmp_path / "cache"), path=str(tmp_path / "c.txt"))
    data = prepare_data(cfg, TokenizerConfig(path=str(tmp_path / "tokenizer.json")), min_tokens=17)
    assert id_limit(data.tokenizer) == 70001
    assert data.train.tokens.dtype == np.uint32
    assert data.train.tokens[4] == 70000 and 4464 not in data.train.tokens


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"c.txt": b""}, r"data\.path=.*c\.txt: c\.txt holds no text \(it is empty\); "),
        ({"c.txt": b"\n\n  \t\n"}, r"c\.txt holds no text \(only whitespace\)"),
        ({"c.jsonl": b""}, r"c\.jsonl holds no text \(it is empty\)"),
        ({"c.csv": b""}, r"c\.csv holds no text \(it is empty\)"),
        ({"c.txt": b"the cat\n" * 50 + b"caf\xe9\n"}, r"c\.txt is not UTF-8 text \(byte 0xe9 at offset 403\); convert"),
        ({"c.jsonl": b'{"text": "the cat"}\n' * 30 + b'{"text": "caf\xe9"}\n'},  # the json reader does not check
         r"c\.jsonl is not UTF-8 text \(byte 0xe9 at offset 613\)"),
        ({"d/train.txt": b"the cat\n" * 50, "d/validation.txt": b""},
         r"data\.path=.*d: the validation split \(validation\.txt\) holds no text \(it is empty\)"),
    ],
    ids=["empty", "whitespace", "empty-jsonl", "empty-csv", "latin1", "latin1-jsonl", "empty-validation"],
)
def test_files_without_text_are_refused_and_a_fixed_file_loads(tmp_path: Path, files: dict[str, bytes],
                                                                message: str) -> None:
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(content)
    path = tmp_path / next(iter(files)).split("/")[0]
    with pytest.raises(DataError, match=message):
        prepare(tmp_path, path=str(path))
    for name in files:  # fixed in place: nothing cached from the failed run gets in the way
        text = make_text(200, seed=len(name))
        (tmp_path / name).write_text("\n".join(json.dumps({"text": t}) for t in text.splitlines())
                                     if name.endswith(".jsonl") else
                                     "text\n" + text if name.endswith(".csv") else text)
    data = prepare(tmp_path, path=str(path))
    assert len(data.train) > 100 and len(data.val) > 17


def test_a_streamed_file_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    path = tmp_path / "c.txt"
    path.write_bytes(b"the cat\n" * 50 + b"\xff")
    with pytest.raises(DataError, match=r"c\.txt is not UTF-8 text \(byte 0xff at offset 400\)"):
        prepare(tmp_path, path=str(path), streaming=True, max_documents=10)


def test_data_modules_still_import_from_minitx_data_and_only_when_asked() -> None:
    """A user's own task may `from minitx.data import TokenDataModule` (its home before minitx.datamodules); importing
    minitx.data itself still imports no Lightning."""
    code = ("import sys; import minitx.data\n"
            "print(any(k.split('.')[0] == 'lightning' for k in sys.modules))\n"
            "from minitx.data import LabelledDataModule, TokenDataModule\n"
            "import minitx.datamodules as m\n"
            "print(TokenDataModule is m.TokenDataModule and LabelledDataModule is m.LabelledDataModule)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["False", "True"]
    import minitx.data

    assert not hasattr(minitx.data, "NoSuchThing")  # any other name is still an AttributeError
