"""Sharded pre-tokenization (minitx.shards, minitx-prepare): the shards hold exactly the stream the in-memory
tokenization wrote, windows read across shards as from one array, an interrupted preparation resumes without
redoing shards, concurrent preparations agree, and training reads what minitx-prepare wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, make_text

from minitx import shards
from minitx.config import DataConfig, PrepareConfig, TokenizerConfig
from minitx.data import RandomWindows, TokenStream, hold_out_tail, load_corpus, prepare_data, tokenize_documents


def write_stream(folder: Path, tokens: np.ndarray, sizes: list[int]) -> TokenStream:
    """`tokens` cut into shard files of `sizes` tokens."""
    paths, at = [], 0
    for i, size in enumerate(sizes):
        paths.append(folder / f"s{i}.bin")
        tokens[at:at + size].tofile(paths[-1])
        at += size
    return TokenStream(paths, sizes, tokens.dtype)


def test_windows_across_shards_equal_one_array(tmp_path: Path) -> None:
    """Global positions: a window straddling one or two shard boundaries reads as from one contiguous array, and
    RandomWindows draws the same batches from shards as from one file; a shard is mapped only when a window needs it."""
    tokens = np.random.default_rng(0).integers(0, 60_000, size=1000).astype(np.uint16)
    (tmp_path / "one").mkdir()
    sharded = write_stream(tmp_path, tokens, [300, 7, 450, 243])
    one = write_stream(tmp_path / "one", tokens, [1000])
    length = 40
    np.testing.assert_array_equal(sharded.windows(np.array([0, 10, 250]), length).numpy(),
                                  one.windows(np.array([0, 10, 250]), length).numpy())
    assert sharded._maps[0] is not None and sharded._maps[1:] == [None, None, None]  # opened lazily
    straddling = np.array([280, 290, 300, 299, 305, 306, 307, 740, 756, 960])  # over 1 or 2 boundaries, at them
    starts = np.concatenate([straddling, np.random.default_rng(1).integers(0, 1000 - length, size=200)])
    expected = tokens[starts[:, None] + np.arange(length)].astype(np.int64)
    np.testing.assert_array_equal(sharded.windows(starts, length).numpy(), expected)
    np.testing.assert_array_equal(one.windows(starts, length).numpy(), expected)
    for step in range(3):  # the same (seed, rank, step) batches whatever the shards
        for a, b in zip(RandomWindows(sharded, 32, 8, seed=3, rank=1, world_size=2).batch(step),
                        RandomWindows(one, 32, 8, seed=3, rank=1, world_size=2).batch(step), strict=True):
            assert (a == b).all()


def corpus_dir(tmp_path: Path) -> Path:
    """Documents of different sizes, one of them longer than the (lowered) longest document read whole."""
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(12):
        (folder / f"doc{i:02d}.txt").write_text(make_text(20 + 15 * i, seed=i))
    (folder / "long.txt").write_text(make_text(400, seed=99) + "\n\n\nand then   spaces\n  indented\n" * 3
                                     + "le chat été là, über straße.\nñandú 猫.\n" * 40)
    return folder


def reference(cfg: DataConfig, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """The streams as minitx wrote them before shards: the whole split tokenized in memory at once."""
    corpus = load_corpus(cfg)
    train, val, cut = hold_out_tail(corpus.train, corpus.text_column, cfg.val_fraction)
    return (tokenize_documents(train, corpus.text_column, tokenizer, last_ends=not cut),
            tokenize_documents(val, corpus.text_column, tokenizer))


@pytest.mark.parametrize(("kind", "num_proc"),
                         [("char", 1), ("bpe", 1), pytest.param("bpe", 2, marks=pytest.mark.slow)])
def test_shards_hold_the_reference_stream(tmp_path: Path, kind: str, num_proc: int,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Many shards, a long document read in line-cut parts: the same tokens, EOTs and dtype as one in-memory pass
    (the held-out tail cuts a document, so the last training document has no EOT). With 2 processes (spawned: they
    read the module's own limits, so there the long document is read whole) the same."""
    monkeypatch.setattr(shards, "MAX_DOCUMENT_BYTES", 700)  # the long document is read in ~25 parts
    monkeypatch.setattr(shards, "ROWS_PER_BATCH", 5)
    cfg = DataConfig(path=str(corpus_dir(tmp_path)), cache_dir=str(tmp_path / "cache"))
    data = prepare_data(cfg, TokenizerConfig(kind=kind, vocab_size=300), 17,
                        prepare_cfg=PrepareConfig(shard_bytes=3000, num_proc=num_proc))
    assert len(data.train.paths) > 5
    train, val = reference(cfg, data.tokenizer)
    assert data.train.tokens.dtype == train.dtype == np.uint16
    np.testing.assert_array_equal(data.train.tokens, train)
    np.testing.assert_array_equal(data.val.tokens, val)
    manifest = json.loads((data.cache_dir / shards.MANIFEST).read_text())
    assert manifest["splits"]["train"]["tokens"] == len(train)
    assert sum(s["tokens"] for s in manifest["splits"]["train"]["shards"]) == len(train)


def test_interrupted_preparation_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A preparation that fails after 3 shards leaves them finished; the rerun keeps those files (same inode and
    mtime), writes the rest, and gives what an uninterrupted run gives."""
    docs = corpus_dir(tmp_path)
    tok, prep = TokenizerConfig(kind="bpe", vocab_size=300), PrepareConfig(shard_bytes=3000)
    cfg = DataConfig(path=str(docs), cache_dir=str(tmp_path / "cache"))
    real, written = shards.write_piece, []

    def fails_after_three(*args, **kwargs):
        if len(written) == 3:
            raise KeyboardInterrupt  # what a Ctrl-C in the middle of a piece raises
        written.append(args[3])
        return real(*args, **kwargs)

    monkeypatch.setattr(shards, "write_piece", fails_after_three)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(cfg, tok, 17, prepare_cfg=prep)
    monkeypatch.setattr(shards, "write_piece", real)
    assert len(written) == 3 and all(p.exists() for p in written)
    cache = written[0].parent
    assert not (cache / shards.MANIFEST).exists()
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in written}

    resumed = prepare_data(cfg, tok, 17, prepare_cfg=prep)
    assert not resumed.from_cache and resumed.cache_dir == cache
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in written} == before
    fresh = prepare_data(DataConfig(path=str(docs), cache_dir=str(tmp_path / "fresh")), tok, 17, prepare_cfg=prep)
    assert resumed.tokenizer.to_str() == fresh.tokenizer.to_str()
    np.testing.assert_array_equal(resumed.train.tokens, fresh.train.tokens)
    np.testing.assert_array_equal(resumed.val.tokens, fresh.val.tokens)
    assert not list(cache.glob("*.tmp*"))


@pytest.mark.slow
def test_two_prepares_at_once_then_train_reads_the_cache(tmp_path: Path) -> None:
    """Two minitx-prepare processes on the same corpus at once: one prepares, the other waits and reads the same
    result; minitx-train with the same arguments then reads the cache instead of tokenizing."""
    lines = make_text(3000).splitlines(keepends=True)
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": "".join(lines[i:i + 30])}) + "\n"
                                                   for i in range(0, len(lines), 30)))
    args = ["data.path=corpus.jsonl", f"data.cache_dir={tmp_path / 'cache'}", "tokenizer=bpe",
            "tokenizer.vocab_size=300", "prepare.shard_bytes=20000", "model.block_size=32", "model.n_layer=1",
            "model.n_head=2", "model.n_embd=32", "data.batch_size=4", "data.val_batches=2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
    procs = [subprocess.Popen([sys.executable, "-m", "minitx.prepare", *args], cwd=tmp_path, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(2)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert sum("(token cache)" in out for out in outputs) == 1, outputs  # one prepared, the other read its result
    caches = list((tmp_path / "cache").iterdir())
    folder = next(c for c in caches if c.is_dir())
    stream = TokenStream.from_manifest(folder, json.loads((folder / shards.MANIFEST).read_text())["splits"]["train"])
    assert len(stream.paths) > 1

    train = subprocess.run(["minitx-train", *args, "trainer.max_steps=2", "trainer.val_check_interval=2",
                            "logger=none", "sample.max_new_tokens=0", f"hydra.run.dir={tmp_path / 'run'}"],
                           cwd=tmp_path, env=env, text=True, capture_output=True, timeout=180)
    assert train.returncode == 0, train.stderr[-3000:]
    assert "(token cache)" in train.stdout + train.stderr
    assert not list(folder.glob("*.tmp*"))


def test_prepare_composes_the_training_config() -> None:
    """minitx-prepare reads minitx-train's config (experiments included), and refuses a bad prepare.* in one line."""
    from minitx.config import ConfigError
    from minitx.prepare import compose

    config = compose(["experiment=shakespeare_char", "prepare.num_proc=4"])
    assert config.data.hub_id == "karpathy/tiny_shakespeare" and config.tokenizer.kind == "char"
    assert config.prepare.num_proc == 4
    with pytest.raises(ConfigError, match=r"^prepare\.num_proc=0: must be > 0$"):
        compose(["prepare.num_proc=0"])
    with pytest.raises(ConfigError, match=r"prepare\.shard_size"):
        compose(["prepare.shard_size=5"])


def test_a_long_document_is_read_in_parts() -> None:
    """Parts of at most max_bytes, cut after a newline between text where there is one, else at a character
    boundary; together they are the document."""
    import pyarrow as pa

    text = "é" * 1000 + "\nab\ncd\n\n\nef" * 50
    parts = [p for texts, ends in shards.document_parts(pa.chunked_array([["x", text]]), max_bytes=301)
             for p in zip(texts, ends, strict=True)]
    assert parts[0] == ("x", True) and [end for _, end in parts[1:]] == [False] * (len(parts) - 2) + [True]
    assert "".join(t for t, _ in parts[1:]) == text
    assert all(len(t.encode()) <= 301 for t, _ in parts)
    lines = [t for t, end in parts if "ab" in t and not end]
    assert lines and all(t[-2:] in ("b\n", "d\n", "f\n") for t in lines)  # between lines of text, not blank lines


def rss_file_kb() -> int:
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("RssFile:")).split()[1])


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_pages_read_from_the_arrow_cache_are_unmapped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pass over a memory-mapped corpus does not leave it counted in RSS (drop_mapped_pages), and what is read
    after the pages are dropped is the same text."""
    import datasets

    text = make_text(200)
    datasets.Dataset.from_dict({"text": [f"{i} {text}" for i in range(4000)]}).save_to_disk(tmp_path / "ds")
    column = datasets.load_from_disk(str(tmp_path / "ds")).data.column("text")  # ~30 MB, memory-mapped
    size_kb = column.nbytes // 1024
    before = rss_file_kb()
    first = column.to_pylist()  # reads every page
    assert rss_file_kb() - before > size_kb // 2
    shards.drop_mapped_pages()
    assert rss_file_kb() - before < size_kb // 4
    monkeypatch.setattr(shards, "RELEASE_BYTES", 1 << 20)
    monkeypatch.setattr(shards, "ROWS_PER_BATCH", 100)  # ~0.6 MB: what stays mapped is the last batch or two
    again = [t for texts, _ in shards.document_parts(column) for t in texts]  # dropping as it goes, and at its end
    assert rss_file_kb() - before < size_kb // 4
    assert again == first and first[7] == f"7 {text}"
