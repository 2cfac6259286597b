"""data.streaming=true: a run killed and resumed trains on the same batches as one run straight through, ranks read
disjoint documents, validation is fixed and never trained on, the loss falls, and the corpus is never held whole."""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path
from typing import Any

import datasets
import lightning as L
import numpy as np
import pytest
from conftest import make_text
from test_train import compose_config

from minitx.checkpoint import read_checkpoint
from minitx.config import ConfigError, DataConfig, TokenizerConfig
from minitx.data import DataError
from minitx.streaming import StreamingData, StreamLoader, StreamWindows, prepare_stream, rank_documents
from minitx.tokenizer import EOT
from minitx.train import parse_config, train

RUN = [
    "model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32", "data.batch_size=8",
    "data.val_batches=4", "trainer.max_steps=16", "trainer.val_check_interval=8", "trainer.enable_progress_bar=false",
    "optim.warmup_steps=5", "checkpoint.every_n_steps=5", "sample.max_new_tokens=0", "logger=csv",
    "tokenizer.kind=char", "data.streaming=true", "data.val_documents=40",
]


def write_corpus(root: Path, files: int, docs_per_file: int, name: str = "part") -> list[str]:
    """`files` jsonl files of short documents (two sentences each); the documents in stream order."""
    root.mkdir(parents=True, exist_ok=True)
    lines = make_text(2 * files * docs_per_file, seed=len(name)).splitlines()
    docs = [f"{i}: {lines[2 * i]} {lines[2 * i + 1]}" for i in range(files * docs_per_file)]  # numbered: all distinct
    for f in range(files):
        with open(root / f"{name}-{f}.jsonl", "w") as out:
            out.writelines(json.dumps({"text": d}) + "\n" for d in docs[f * docs_per_file:(f + 1) * docs_per_file])
    return docs


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    write_corpus(tmp_path / "corpus", files=2, docs_per_file=400)
    return tmp_path / "corpus"


def stream(path: Path, cache: Path, min_tokens: int = 33, **data: Any) -> StreamingData:
    cfg = DataConfig(path=str(path), streaming=True, cache_dir=str(cache), **{"val_documents": 40, **data}).validate()
    return prepare_stream(cfg, TokenizerConfig(kind="char").validate(), min_tokens=min_tokens)


def documents_of(tokens: np.ndarray, data: StreamingData) -> set[str]:
    """The whole documents in a token sequence (those between two <|endoftext|>)."""
    eot = data.tokenizer.token_to_id(EOT)
    cuts = np.flatnonzero(tokens == eot)
    return {data.tokenizer.decode(tokens[a + 1:b].tolist()) for a, b in itertools.pairwise(cuts)}


class RecordBatches(L.Callback):
    """Each training batch's hash and loss, in order; raises after step `kill_at` (the fault)."""

    def __init__(self, kill_at: int = 0):
        self.hashes: list[str] = []
        self.losses: list[float] = []
        self.kill_at = kill_at

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, i: int) -> None:
        self.hashes.append(hashlib.sha1(batch[0].numpy().tobytes() + batch[1].numpy().tobytes()).hexdigest())

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, out: Any, batch: Any,
                           i: int) -> None:
        self.losses.append(float(out["loss"] if isinstance(out, dict) else out))
        if trainer.global_step == self.kill_at:
            raise RuntimeError(f"fault injected at step {self.kill_at}")


@pytest.mark.slow
@pytest.mark.parametrize(("workers", "kill_at", "saved_at"), [(0, 13, 10), (2, 7, 5)])  # 2: worker 1 comes next
def test_killed_streaming_run_resumes_on_the_same_batches(tmp_path: Path, corpus: Path, workers: int, kill_at: int,
                                                          saved_at: int) -> None:
    overrides = [*RUN, f"data.path={corpus}", f"data.num_workers={workers}", f"data.cache_dir={tmp_path / 'cache'}"]
    straight = RecordBatches()
    train(parse_config(compose_config(*overrides)), tmp_path / "straight", callbacks=[straight])
    assert len(straight.hashes) == 16 and len(set(straight.hashes)) == 16
    assert np.mean(straight.losses[-4:]) < straight.losses[0] - 0.5  # it learns from the stream

    killed = RecordBatches(kill_at=kill_at)  # checkpoints every 5 steps: the last one is step `saved_at`'s
    with pytest.raises(RuntimeError, match=f"fault injected at step {kill_at}"):
        train(parse_config(compose_config(*overrides)), tmp_path / "killed", callbacks=[killed])
    assert killed.hashes == straight.hashes[:kill_at]
    assert read_checkpoint(tmp_path / "killed" / "checkpoints" / "last.ckpt")["global_step"] == saved_at

    resumed = RecordBatches()
    train(parse_config(compose_config(*overrides, f"resume={tmp_path / 'killed'}")), tmp_path / "resumed",
          callbacks=[resumed])
    assert resumed.hashes == straight.hashes[saved_at:]  # the same windows as the uninterrupted run
    assert resumed.losses[-1] == pytest.approx(straight.losses[-1], abs=1e-5)


def test_resuming_the_windows_from_any_batch_continues_them_exactly(tmp_path: Path) -> None:
    """The dataset class alone, on a corpus read about twice over: from the state saved after a batch (inside a
    document, in the first pass or the second, or at the very end of a pass) the next batches are those of the
    straight run."""
    write_corpus(tmp_path / "tiny", files=2, docs_per_file=15)
    data = stream(tmp_path / "tiny", tmp_path / "cache", val_documents=5)
    # 4 x 16 tokens a batch: a pass is ~20 batches; 1 x 4 tokens: every document ends a batch, the last one the pass
    for block_size, batch_size in ((16, 4), (4, 1)):
        windows = StreamWindows(rank_documents(data, 0, 1), "text", data.tokenizer, block_size=block_size,
                                batch_size=batch_size)
        batches = []
        for batch in windows:  # until a few batches into the second pass
            batches.append(batch)
            if batch[2][1]["pass"] == 1 and len(batches) % 7 == 0:
                break
        assert {b[2][1]["pass"] for b in batches} == {0, 1}  # (with 1 x 4: pass 0's last batch ends the pass)
        for k in range(1, len(batches) - 1):
            again = StreamWindows(rank_documents(data, 0, 1), "text", data.tokenizer, block_size=block_size,
                                  batch_size=batch_size, resume={0: batches[k - 1][2][1]})
            for (x, y, _), (x0, y0, _) in zip(again, batches[k:], strict=False):
                assert np.array_equal(x, x0) and np.array_equal(y, y0), (block_size, k)


def test_ranks_read_disjoint_documents(tmp_path: Path) -> None:
    """Two files: a file per rank; three: every other document (datasets' split_dataset_by_node either way)."""
    for files in (2, 3):
        docs = write_corpus(tmp_path / f"c{files}", files=files, docs_per_file=30)
        data = stream(tmp_path / f"c{files}", tmp_path / "cache", val_documents=5)
        ranks = [[row["text"] for row in rank_documents(data, rank, 2)] for rank in (0, 1)]
        assert not set(ranks[0]) & set(ranks[1])
        assert sorted(ranks[0] + ranks[1]) == sorted(docs[5:])  # every training document once; held-out ones never
        # and the windows each rank trains on hold only its own documents
        windows = StreamWindows(rank_documents(data, 1, 2), "text", data.tokenizer, block_size=32, batch_size=4)
        tokens = np.concatenate([x.flatten().numpy() for x, _, _ in (next(iter(windows)) for _ in range(1))])
        assert documents_of(tokens, data) <= set(ranks[1])


def test_validation_is_fixed_and_never_trained_on(tmp_path: Path, corpus: Path) -> None:
    first = stream(corpus, tmp_path / "cache-a")
    again = stream(corpus, tmp_path / "cache-b")  # tokenized again from the stream, not read from the cache
    assert np.array_equal(first.val.tokens, again.val.tokens)
    assert first.tokenizer.to_str() == again.tokenizer.to_str()
    held_out = documents_of(np.concatenate([[first.tokenizer.token_to_id(EOT)], first.val.tokens]), first)
    assert len(held_out) == 40
    training = {row["text"] for row in first.train}
    assert len(training) == 760 and not held_out & training

    # a validation split of its own: its first documents, and the whole training split is trained on
    write_corpus(corpus, files=1, docs_per_file=50, name="validation")
    split = stream(corpus, tmp_path / "cache-c")
    assert len(documents_of(np.concatenate([[split.tokenizer.token_to_id(EOT)], split.val.tokens]), split)) == 40
    assert sum(1 for _ in split.train) == 800


def endless_documents() -> Any:
    """A billion documents, and a failure if more than a few thousand are ever read."""
    for i in range(10**9):
        if i > 3000:
            raise RuntimeError("the stream was read far past what three batches need")
        yield {"text": f"the cat {i} sat on the mat."}


def test_the_stream_is_never_held_whole(tmp_path: Path, corpus: Path) -> None:
    data = stream(corpus, tmp_path / "cache", max_documents=0)
    assert isinstance(data.train, datasets.IterableDataset)  # a stream, not a Dataset in memory or on disk
    endless = datasets.IterableDataset.from_generator(endless_documents)
    windows = iter(StreamWindows(endless, "text", data.tokenizer, block_size=32, batch_size=4))
    for _ in range(3):
        x, y, _ = next(windows)
        assert x.shape == y.shape == (4, 32) and bool((x[:, 1:] == y[:, :-1]).all())


def test_a_wrong_column_or_too_little_validation_text_is_one_line(tmp_path: Path, corpus: Path) -> None:
    with pytest.raises(DataError, match=r"data\.text_column='body' is not a column of .*; its columns are \['text'\]"):
        stream(corpus, tmp_path / "cache", text_column="body")
    with pytest.raises(DataError, match=r"data\.val_documents=1 documents make \d+ tokens, fewer than model\.block"):
        stream(corpus, tmp_path / "cache", min_tokens=1025, val_documents=1)  # model.block_size=1024
    with pytest.raises(ConfigError, match=r"^data\.max_documents=5: the first data\.val_documents=5 documents are "
                                          r"held out for validation, leaving none to train on"):
        stream(corpus, tmp_path / "cache", max_documents=5, val_documents=5)


def test_the_loader_saves_the_position_after_the_batches_trained_on(tmp_path: Path, corpus: Path) -> None:
    """Lightning fetches a batch ahead of the one it trains on: the saved position is the trained one's, and the
    loader holds no more positions than the batches fetched ahead (not one per batch of the run)."""
    data = stream(corpus, tmp_path / "cache")

    def windows() -> StreamWindows:
        return StreamWindows(rank_documents(data, 0, 1), "text", data.tokenizer, block_size=32, batch_size=4)

    straight = [state for _, (_, _, (_, state)) in zip(range(30), windows(), strict=False)]
    trained = 0
    loader = StreamLoader(windows(), num_workers=0, start=0, trained=lambda: trained)
    batches = iter(loader)
    next(batches)
    for _ in range(29):
        next(batches)  # fetched ahead
        trained += 1  # the previous batch is trained on
        assert len(loader.pending) <= 2
        if trained % 10:
            continue  # a checkpoint every 10 batches
        saved = loader.state_at(trained)[0]
        assert saved["source"] == straight[trained - 1]["source"]
        assert np.array_equal(saved["leftover"].numpy(), straight[trained - 1]["leftover"])


def test_the_tokenizer_learns_from_the_start_of_the_training_stream_only(tmp_path: Path) -> None:
    """Char-level, so its vocabulary shows what it read: not the held-out first document ("Ω"), not past
    tokenizer.sample_chars ("Ж" in the last document)."""
    docs = write_corpus(tmp_path / "c", files=1, docs_per_file=60)
    docs[0], docs[-1] = docs[0] + " Ω", docs[-1] + " Ж"
    (tmp_path / "c" / "part-0.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    cfg = DataConfig(path=str(tmp_path / "c"), streaming=True, cache_dir=str(tmp_path / "cache"), val_documents=1)
    data = prepare_stream(cfg.validate(), TokenizerConfig(kind="char", sample_chars=2000).validate(), min_tokens=33)
    vocab = data.tokenizer.get_vocab()
    assert "Ω" not in vocab and data.tokenizer.token_to_id("[UNK]") in data.val.tokens  # validated on, unseen
    assert "Ж" not in vocab and "t" in vocab
    assert any("Ж" in row["text"] for row in data.train)  # it is trained on, as [UNK]
