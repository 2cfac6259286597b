"""Training straight from a streaming `datasets` source (data.streaming=true): a corpus of any size, never held whole.

Documents are read lazily (`load_dataset(..., streaming=True)`), tokenized on the fly with batched `encode_batch`,
joined by <|endoftext|> as the cached stream joins them, and packed into consecutive (block_size + 1)-token windows
(the last token of one window is the first of the next, so every token is a target once). Each rank reads its own
documents (`datasets.distributed.split_dataset_by_node`), each DataLoader worker its own files (datasets splits the
shards across workers). The position (the `datasets` state dict and the tokens read but not yet trained on) is
saved in every checkpoint through the data module's state_dict, so a resumed run trains on exactly the windows an
uninterrupted run would have. Validation is fixed: the dataset's validation split, else the first data.val_documents
documents of the stream, which the training stream leaves out; either is tokenized once and cached.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from minitx.config import ConfigError, DataConfig, TokenizerConfig, fail
from minitx.data import DataError, TokenStream, _read_error, _source_fingerprint, default_cache_dir, load_splits
from minitx.datamodules import TokenDataModule
from minitx.tokenizer import EOT, build_tokenizer, tokenizer_hash, tokenizer_spec

if TYPE_CHECKING:
    import datasets
    from tokenizers import Tokenizer

log = logging.getLogger(__name__)

STREAM_CACHE_FORMAT = 1  # part of the cache key of a stream's tokenizer and validation tokens
ENCODE_BATCH = 256  # documents per encode_batch call: the tokenizer's threads get enough work, little is held


@dataclass
class StreamingData:
    """A corpus to stream: the training documents (all ranks', not yet split), fixed validation tokens."""

    tokenizer: Tokenizer
    train: datasets.IterableDataset
    val: TokenStream
    text_column: str
    description: str
    cache_dir: Path


def document_key(text: str | None) -> bytes:
    return hashlib.blake2b((text or "").encode(), digest_size=16).digest()


def _not_held_out(batch: dict[str, list], column: str, held_out: frozenset[bytes]) -> list[bool]:
    return [document_key(t) not in held_out for t in batch[column]]


def _encode(batch: dict[str, list], column: str, tokenizer: Tokenizer, eot: int) -> dict[str, list]:
    """Each document's ids followed by <|endoftext|>, as tokenize_documents joins the cached stream."""
    encoded = tokenizer.encode_batch([t or "" for t in batch[column]], add_special_tokens=False)
    return {"ids": [[*e.ids, eot] for e in encoded]}


def prepare_stream(cfg: DataConfig, tok_cfg: TokenizerConfig, min_tokens: int, encoder: bool = False,
                   tokenizer: Tokenizer | None = None) -> StreamingData:
    """Open the stream, fix its validation documents, and train (or load, or take) the tokenizer on the first
    tokenizer.sample_chars characters of the training stream. The tokenizer and validation tokens are cached by the
    source's fingerprint, so reruns, resumes and every rank use the same ones without reading the stream again."""
    from tokenizers import Tokenizer


    splits, description = load_splits(cfg)
    train = splits["train"] if "train" in splits else splits[next(iter(splits))]
    if cfg.max_documents:
        train = train.take(cfg.max_documents)
    has_val = cfg.val_split in splits
    spec = tokenizer_hash(tokenizer) if tokenizer is not None else tokenizer_spec(tok_cfg, encoder)
    parts = [_source_fingerprint(cfg), cfg.text_column, cfg.val_split if has_val else "held-out",
             str(cfg.val_documents), spec, str(STREAM_CACHE_FORMAT)]
    key = hashlib.sha256("|".join(parts).encode()).hexdigest()[:20]
    cache = (Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()) / f"stream-{key}"
    done = cache / "done.json"
    if cfg.max_documents and not has_val and cfg.max_documents <= cfg.val_documents:
        fail("data.max_documents", cfg.max_documents, f"the first data.val_documents={cfg.val_documents} documents "
             "are held out for validation, leaving none to train on; raise it or lower data.val_documents")
    try:
        if not done.exists():  # every rank (and every torchrun/srun process) gets here: one prepares, others wait
            from filelock import FileLock

            cache.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(str(cache.parent / f"stream-{key}.lock")):
                if not done.exists():
                    _write_stream_cache(cache, cfg, tok_cfg, encoder, tokenizer, splits, train, has_val, description)
        meta = json.loads(done.read_text())
        held_out = frozenset(bytes.fromhex(h) for h in meta["held_out"])
        tokenizer = Tokenizer.from_file(str(cache / "tokenizer.json"))
        val_tokens = np.load(cache / "val.npy")
    except DataError:
        raise
    except Exception as e:  # a stream reads its files only now
        if cfg.path is None:
            raise
        raise _read_error(cfg.path, cfg.val_split, e) from e
    if tokenizer is None or tokenizer.token_to_id(EOT) is None:
        raise DataError(f"the tokenizer has no {EOT}, which separates the streamed documents")
    if len(val_tokens) < min_tokens:
        which = f"the {cfg.val_split} split's first" if has_val else "the held-out"
        raise DataError(f"{description}: {which} data.val_documents={cfg.val_documents} documents make "
                        f"{len(val_tokens)} tokens, fewer than model.block_size + 1 = {min_tokens}; "
                        "raise data.val_documents or lower model.block_size")
    held = f"{cfg.val_split} split" if has_val else "held out from the stream's start"
    description += (f", streamed{f' (first {cfg.max_documents} documents)' if cfg.max_documents else ''}; "
                    f"validation: {cfg.val_documents} documents {held}")
    return StreamingData(tokenizer, _training_documents(train, cfg.text_column, held_out),
                         TokenStream.in_memory(val_tokens), cfg.text_column, description, cache)


def _write_stream_cache(cache: Path, cfg: DataConfig, tok_cfg: TokenizerConfig, encoder: bool,
                        tokenizer: Tokenizer | None, splits: Any, train: datasets.IterableDataset, has_val: bool,
                        description: str) -> None:
    """The stream's cache: its validation documents' tokens, the tokenizer (trained on the start of the training
    stream unless given), and done.json (the held-out documents' keys) last; each file written whole, then renamed."""
    import datasets

    from minitx.data import tokenize_documents

    first = next(iter(train.take(1)), None)
    if first is None:
        raise DataError(f"{description}: the stream has no documents")
    if cfg.text_column not in first:
        raise DataError(f"data.text_column={cfg.text_column!r} is not a column of {description}; "
                        f"its columns are {sorted(first)}")
    source = splits[cfg.val_split] if has_val else train
    val_texts = [row[cfg.text_column] for row in source.take(cfg.val_documents)]
    held_out = frozenset() if has_val else frozenset(document_key(t) for t in val_texts)
    if tokenizer is None:
        texts = (row[cfg.text_column] for row in _training_documents(train, cfg.text_column, held_out))
        tokenizer = build_tokenizer(tok_cfg, (t for t in texts if t), encoder)
    val = datasets.Dataset.from_dict({cfg.text_column: val_texts})
    val_tokens = tokenize_documents(val, cfg.text_column, tokenizer)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f"tokenizer.json.tmp{os.getpid()}"
    tokenizer.save(str(tmp))
    os.replace(tmp, cache / "tokenizer.json")
    with open(tmp := cache / f"val.npy.tmp{os.getpid()}", "wb") as f:
        np.save(f, val_tokens)
    os.replace(tmp, cache / "val.npy")
    tmp = cache / f"done.json.tmp{os.getpid()}"
    tmp.write_text(json.dumps({"held_out": sorted(h.hex() for h in held_out), "source": description}))
    os.replace(tmp, cache / "done.json")


def _training_documents(train: datasets.IterableDataset, column: str,
                        held_out: frozenset[bytes]) -> datasets.IterableDataset:
    """The training stream without the held-out validation documents: filtered by content, not by position, so
    that it holds however the stream is later split across ranks and workers (and a duplicate of a validation
    document elsewhere in the corpus is not trained on either)."""
    if not held_out:
        return train
    return train.filter(functools.partial(_not_held_out, column=column, held_out=held_out), batched=True,
                        batch_size=ENCODE_BATCH)


def rank_documents(data: StreamingData, rank: int, world_size: int) -> datasets.IterableDataset:
    """The training documents of one of `world_size` processes: whole files per rank when the number of files is a
    multiple of the world size, else every world_size-th document (datasets' split_dataset_by_node)."""
    from datasets.distributed import split_dataset_by_node

    return split_dataset_by_node(data.train, rank=rank, world_size=world_size)


class StreamWindows(IterableDataset):
    """(x, y, (worker, state)) batches of consecutive windows from this rank's (this worker's) documents, endless:
    at the end of the documents the stream starts over. `state`, the position after the batch (a pass number, the
    `datasets` state dict and the tokens read but not yet used), is what `resume` takes back, per worker."""

    def __init__(self, documents: datasets.IterableDataset, column: str, tokenizer: Tokenizer, block_size: int,
                 batch_size: int, resume: dict[int, dict[str, Any]] | None = None):
        self.documents, self.column, self.tokenizer = documents, column, tokenizer
        self.block_size, self.batch_size = block_size, batch_size
        self.resume = resume or {}

    def token_documents(self) -> datasets.IterableDataset:
        encode = functools.partial(_encode, column=self.column, tokenizer=self.tokenizer,
                                   eot=self.tokenizer.token_to_id(EOT))
        return self.documents.map(encode, batched=True, batch_size=ENCODE_BATCH,
                                  remove_columns=list(self.documents.column_names or [self.column]))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, tuple[int, dict[str, Any]]]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        state = self.resume.get(worker)
        step = self.batch_size * self.block_size  # tokens consumed per batch; a batch reads one more
        passes = state["pass"] if state else 0
        pending = [np.asarray(state["leftover"], dtype=np.int64)] if state else []
        have = sum(len(p) for p in pending)
        while True:
            docs = self.token_documents()
            resumed = state is not None and passes == state["pass"]  # mid-pass: it may resume at the pass's end
            if resumed:
                docs.load_state_dict(state["source"])
            read_any = False
            for doc in docs:
                read_any = True
                pending.append(np.asarray(doc["ids"], dtype=np.int64))
                have += len(pending[-1])
                if have < step + 1:
                    continue
                tokens, at = np.concatenate(pending), 0
                position = copy.deepcopy(docs.state_dict())
                while len(tokens) - at >= step + 1:
                    w = torch.from_numpy(tokens[at: at + step + 1])
                    at += step
                    x, y = w[:-1].view(self.batch_size, self.block_size), w[1:].view(self.batch_size, self.block_size)
                    yield x, y, (worker, {"pass": passes, "source": position, "leftover": tokens[at:]})
                pending, have = [tokens[at:]], len(tokens) - at
            if not read_any and not resumed:
                raise DataError("the training stream has no documents (data.val_documents may hold out all of "
                                "them, or data.max_documents be too small); use a larger corpus")
            passes += 1


class StreamLoader:
    """What the Trainer iterates: (x, y) batches in a fixed order (worker n % num_workers gives batch n), keeping the
    stream state after each batch so that a checkpoint records the position after the last batch trained on, not
    after the ones Lightning or the DataLoader fetched ahead."""

    def __init__(self, windows: StreamWindows, num_workers: int, start: int, trained: Callable[[], int],
                 pin_memory: bool = False):
        """`start`: batches drawn before (a resumed run's); `trained()`: batches trained on so far."""
        self.windows, self.num_workers, self.start, self.pin_memory = windows, num_workers, start, pin_memory
        self.trained = trained
        self.committed: dict[int, dict[str, Any]] = dict(windows.resume)  # per worker, after the batches trained on
        self.pending: deque[tuple[int, int, dict[str, Any]]] = deque()  # (batch number, worker, state after it)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        workers = max(1, self.num_workers)
        source: Iterable = self.windows if self.num_workers == 0 else DataLoader(
            self.windows, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
            persistent_workers=False)
        waiting: dict[int, deque] = {w: deque() for w in range(workers)}
        n = self.start  # batches drawn so far
        for x, y, (worker, state) in source:
            waiting[worker].append((x, y, state))
            while waiting[n % workers]:  # a resumed run's first batch is worker start % workers's, not worker 0's
                x, y, state = waiting[n % workers].popleft()
                self.pending.append((n + 1, n % workers, state))
                self.commit(self.trained())  # keeps `pending` as short as the batches fetched ahead
                n += 1
                if self.pin_memory and self.num_workers == 0:
                    x, y = x.pin_memory(), y.pin_memory()
                yield x, y

    def commit(self, batches_seen: int) -> None:
        while self.pending and self.pending[0][0] <= batches_seen:
            _, worker, state = self.pending.popleft()
            self.committed[worker] = state

    def state_at(self, batches_seen: int) -> dict[int, dict[str, Any]]:
        """Each worker's position after the first `batches_seen` batches of the run."""
        self.commit(batches_seen)
        return {w: s | {"leftover": torch.from_numpy(np.asarray(s["leftover"]))} for w, s in self.committed.items()}


class StreamDataModule(TokenDataModule):
    """TokenDataModule's fixed validation windows; training batches from the stream, whose position (every rank's,
    every worker's) Lightning saves in each checkpoint through state_dict and gives back through load_state_dict."""

    data: StreamingData

    def __init__(self, data: StreamingData, cfg: DataConfig, block_size: int, seed: int):
        super().__init__(data, cfg, block_size, seed)
        self.loader: StreamLoader | None = None
        self.resume: dict[str, Any] | None = None

    def setup(self, stage: str) -> None:
        """This process's documents, and a check (before the first evaluation) that its workers each get a file."""
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        self.documents = rank_documents(self.data, rank, world)
        if self.cfg.num_workers > self.documents.num_shards:
            raise ConfigError(f"data.num_workers={self.cfg.num_workers}: this process's stream has "
                              f"{self.documents.num_shards} shard(s) (files) and a worker reads whole shards; set "
                              f"data.num_workers<={self.documents.num_shards} or split the corpus into more files")

    def train_dataloader(self) -> StreamLoader:
        rank = self.trainer.global_rank if self.trainer else 0
        resume = self.resume["ranks"][rank] if self.resume else {}
        windows = StreamWindows(self.documents, self.data.text_column, self.data.tokenizer, self.block_size,
                                self.cfg.batch_size, resume)
        module = self.trainer.lightning_module if self.trainer else None
        self.loader = StreamLoader(windows, self.cfg.num_workers, getattr(module, "batches_seen", 0),
                                   lambda: getattr(module, "batches_seen", 0), pin_memory=torch.cuda.is_available())
        return self.loader

    def state_dict(self) -> dict[str, Any]:
        if self.loader is None:
            return {}
        mine = self.loader.state_at(self.trainer.lightning_module.batches_seen)
        ranks = [mine]
        if self.trainer.world_size > 1:  # every rank is in this call (checkpoints are dumped on all ranks)
            ranks = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(ranks, mine)
        return {"world_size": self.trainer.world_size, "num_workers": self.cfg.num_workers, "ranks": ranks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        world = self.trainer.world_size if self.trainer else 1
        if state and (state["world_size"], state["num_workers"]) != (world, self.cfg.num_workers):
            raise ConfigError(f"resume: the stream's position was saved with {state['world_size']} process(es) and "
                              f"data.num_workers={state['num_workers']}; resume a streaming run with the same ones")
        self.resume = state or None
