"""Token shards on disk: a split's documents tokenized piece by piece into files of token ids, and read back as one
stream.

A split (a `datasets.Dataset` of documents) is cut with `Dataset.shard(n, i, contiguous=True)` into pieces of about
`prepare.shard_chars` characters; each piece's documents are encoded in batches and appended to its shard file, each
followed by <|endoftext|>, so memory holds one batch whatever the corpus size. A shard file is written to a temporary
name and renamed when whole: a file under its final name is finished, and an interrupted preparation redoes only the
pieces that have none. The shards concatenated are exactly the stream one pass over the documents would give.

This module imports no torch: the processes that tokenize pieces (prepare.num_proc > 1) start light.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import datasets
    import pyarrow as pa
    from tokenizers import Tokenizer

MANIFEST = "manifest.json"  # written last: a cache directory with one is complete
PLAN = "plan.json"  # how the splits were cut into pieces: shards on disk belong to it
ROWS_PER_BATCH = 1000  # documents encoded per encode_batch call
BATCH_CHARS = 4_000_000  # ... or fewer, so that a batch of long documents stays a few MB
MAX_DOCUMENT_CHARS = 1_000_000  # a longer document is encoded in parts cut after a newline (see document_parts)


def token_dtype(id_limit: int) -> np.dtype:
    """uint16 when every id fits (vocabularies up to 65,536), else uint32."""
    return np.dtype(np.uint16 if id_limit <= 2**16 else np.uint32)


def document_parts(column: pa.ChunkedArray | pa.Array, max_chars: int | None = None
                   ) -> Iterator[tuple[list[str], list[bool]]]:
    """The column's texts in batches of (texts, whether each ends its document). A document longer than `max_chars`
    (a whole file read as one document, sample_by="document") is cut into parts of at most `max_chars` characters,
    sliced by Arrow so that it never becomes one Python string (see line_cut for where)."""
    import pyarrow.compute as pc

    max_chars = max_chars or MAX_DOCUMENT_CHARS
    texts: list[str] = []
    ends: list[bool] = []
    size = 0
    for start in range(0, len(column), ROWS_PER_BATCH):
        rows = pc.fill_null(column.slice(start, ROWS_PER_BATCH), "")
        lengths = pc.utf8_length(rows).to_numpy(zero_copy_only=False)
        if lengths.max(initial=0) <= max_chars:  # the common case: whole documents, converted in one call
            parts: Iterator[tuple[str, bool]] = ((t, True) for t in rows.to_pylist())
        else:
            parts = (part for i in range(len(rows)) for part in _cut(rows.slice(i, 1), int(lengths[i]), max_chars))
        for text, end in parts:
            texts.append(text)
            ends.append(end)
            size += len(text)
            if size >= BATCH_CHARS or len(texts) >= ROWS_PER_BATCH:
                yield texts, ends
                texts, ends, size = [], [], 0
    if texts:
        yield texts, ends


def line_cut(text: str) -> int:
    """Where to cut `text` so that the tokens do not change: after a newline between two non-space characters
    ("word\nWord"). A char-level tokenizer and byte-level BPE (GPT-2's pre-tokenizer, which always isolates such a
    newline) give the same tokens for the two parts as for the whole; a run of blank lines is not such a place (BPE
    merges it). Without one (a text with no line breaks), the end of `text`: the cut may then change a token or two."""
    i = len(text) - 1
    while (i := text.rfind("\n", 1, i)) > 0:
        if i + 1 < len(text) and not text[i - 1].isspace() and not text[i + 1].isspace():
            return i + 1
    return len(text)


def _cut(row: pa.Array, length: int, max_chars: int) -> Iterator[tuple[str, bool]]:
    """One document (a 1-row array) as parts of at most `max_chars` characters, each cut by line_cut."""
    import pyarrow.compute as pc

    start = 0
    while length - start > max_chars:
        # one character beyond the part, so that a newline at its end can be seen to be followed by text
        text = pc.utf8_slice_codeunits(row, start, start + max_chars + 1)[0].as_py()
        cut = min(line_cut(text), max_chars)
        yield text[:cut], False
        start += cut
    yield pc.utf8_slice_codeunits(row, start, length)[0].as_py(), True


def text_column(ds: datasets.Dataset, column: str) -> pa.ChunkedArray:
    """The column as Arrow data (memory-mapped from the datasets cache, not read); a dataset with an indices mapping
    (select of scattered rows) is flattened first."""
    if ds._indices is not None:
        ds = ds.flatten_indices()
    return ds.data.column(column)


def write_piece(ds: datasets.Dataset, column: str, tokenizer: Tokenizer, path: Path, dtype: np.dtype,
                eot: int, last_ends: bool = True) -> int:
    """Tokenize `ds`'s documents into the shard file `path`: doc EOT doc EOT ... (no EOT after the last document
    unless `last_ends`: the held-out slice continues it). Written to a temporary file, renamed when whole; returns
    the number of tokens."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    count = 0
    pending: np.ndarray | None = None  # the last batch, held back until we know whether it ends the piece
    with tmp.open("wb") as f:
        for texts, ends in document_parts(text_column(ds, column)):
            if pending is not None:
                pending.tofile(f)
            pending = _join(tokenizer.encode_batch(texts, add_special_tokens=False), ends, dtype, eot)
            count += len(pending)
        if pending is not None:
            if not last_ends and len(pending) and pending[-1] == eot:
                pending, count = pending[:-1], count - 1
            pending.tofile(f)
    os.replace(tmp, path)
    return count


def _join(encodings: list, ends: list[bool], dtype: np.dtype, eot: int) -> np.ndarray:
    """The batch's ids in one array, EOT after each part that ends its document."""
    ids = [np.asarray(e.ids, dtype=dtype) for e in encodings]
    eots = np.asarray([eot], dtype=dtype)
    return np.concatenate([a for part, end in zip(ids, ends, strict=True) for a in ((part, eots) if end else (part,))]
                          or [np.empty(0, dtype=dtype)])


@dataclass
class Piece:
    """One shard to write: rows [the index-th of n contiguous pieces] of a split."""

    split: str
    index: int
    n: int
    path: Path
    last_ends: bool


def plan_pieces(ds: datasets.Dataset, column: str, split: str, folder: Path, shard_chars: int,
                last_ends: bool) -> list[Piece]:
    """The split cut into ceil(characters / shard_chars) pieces of whole documents (at most one per document)."""
    import pyarrow.compute as pc

    if len(ds) == 0:
        return []
    chars = pc.sum(pc.utf8_length(pc.fill_null(text_column(ds, column), ""))).as_py() or 0
    n = max(1, min(len(ds), -(-chars // shard_chars)))
    return [Piece(split, i, n, folder / f"{split}-{i:05d}.bin", last_ends or i < n - 1) for i in range(n)]


_worker_tokenizer: Tokenizer | None = None  # a worker process's tokenizer (prepare.num_proc > 1)


def _start_worker(tokenizer_json: str) -> None:
    """A worker tokenizes with one thread, so that the processes, not the tokenizer's threads, share the cores (read
    when the tokenizer first encodes in parallel, after this); its tokenizer is built once."""
    from tokenizers import Tokenizer

    global _worker_tokenizer
    os.environ["RAYON_NUM_THREADS"] = "1"
    _worker_tokenizer = Tokenizer.from_str(tokenizer_json)


def _write(ds: datasets.Dataset, column: str, piece: Piece, dtype: str, eot: int) -> int:
    """A worker's task: one piece."""
    assert _worker_tokenizer is not None
    return write_piece(ds.shard(piece.n, piece.index, contiguous=True), column, _worker_tokenizer, piece.path,
                       np.dtype(dtype), eot, piece.last_ends)


def write_shards(splits: dict[str, tuple[datasets.Dataset, list[Piece]]], column: str, tokenizer: Tokenizer,
                 dtype: np.dtype, eot: int, num_proc: int, log) -> None:
    """Write every piece that has no finished shard file yet: in this process (num_proc=1, the tokenizer's own
    threads), else in `num_proc` spawned processes."""
    todo = [(name, piece) for name, (_, pieces) in splits.items() for piece in pieces if not piece.path.exists()]
    done = sum(len(pieces) for _, pieces in splits.values()) - len(todo)
    if done:
        log.info("resuming: %d shard(s) already written, %d to go", done, len(todo))
    if num_proc <= 1 or len(todo) <= 1:
        for name, piece in todo:
            ds = splits[name][0]
            write_piece(ds.shard(piece.n, piece.index, contiguous=True), column, tokenizer, piece.path, dtype, eot,
                        piece.last_ends)
        return
    with ProcessPoolExecutor(num_proc, mp_context=get_context("spawn"), initializer=_start_worker,
                             initargs=(tokenizer.to_str(),)) as pool:
        futures = [pool.submit(_write, splits[name][0], column, piece, dtype.name, eot)
                   for name, piece in todo]
        for future in futures:
            future.result()


def read_plan(folder: Path) -> dict | None:
    try:
        return json.loads((folder / PLAN).read_text())
    except (OSError, ValueError):
        return None


def write_json(path: Path, value: dict) -> None:
    """Atomically: a reader sees the whole file or none."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)


class ShardedTokens:
    """A split's token stream: its shard files end to end, each read through a memmap opened on first use.
    Positions are global (0 .. len-1 over all shards); a window may straddle two shards."""

    def __init__(self, paths: list[Path], lengths: list[int], dtype: np.dtype):
        self.paths, self.lengths, self.dtype = paths, lengths, np.dtype(dtype)
        self.offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])  # shard i holds offsets[i]:[i+1]
        self._maps: list[np.ndarray | None] = [None] * len(paths)

    @classmethod
    def from_manifest(cls, folder: Path, split: dict) -> ShardedTokens:
        shards = [s for s in split["shards"] if s["tokens"]]  # an empty file cannot be mapped
        return cls([folder / s["file"] for s in shards], [s["tokens"] for s in shards], split["dtype"])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def shard(self, i: int) -> np.ndarray:
        if self._maps[i] is None:
            self._maps[i] = np.memmap(self.paths[i], dtype=self.dtype, mode="r", shape=(self.lengths[i],))
        return self._maps[i]  # type: ignore[return-value]

    def gather(self, starts: np.ndarray, length: int) -> np.ndarray:
        """(len(starts), length) array of the windows starting at global positions `starts`."""
        idx = starts[:, None] + np.arange(length)
        if len(self.paths) == 1:
            return self.shard(0)[idx]
        which = np.searchsorted(self.offsets, idx, side="right") - 1
        out = np.empty(idx.shape, dtype=self.dtype)
        for i in np.unique(which):
            at = which == i
            out[at] = self.shard(int(i))[idx[at] - self.offsets[i]]
        return out

    @property
    def tokens(self) -> np.ndarray:
        """The whole stream as one array: reads every shard (for the validation split, or tests)."""
        if len(self.paths) == 1:
            return self.shard(0)
        return np.concatenate([self.shard(i) for i in range(len(self.paths))] or [np.empty(0, self.dtype)])
