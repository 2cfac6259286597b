"""Token shards on disk: a split's documents tokenized piece by piece into files of token ids, and read back as one
stream.

A split (a `datasets.Dataset` of documents) is cut with `Dataset.shard(n, i, contiguous=True)` into pieces of about
`prepare.shard_bytes` of text; each piece's documents are encoded in batches and appended to its shard file, each
followed by <|endoftext|>, so memory holds one batch whatever the corpus size. A shard file is written to a temporary
name and renamed when whole: a file under its final name is finished, and an interrupted preparation redoes only the
pieces that have none. The shards concatenated are exactly the stream one pass over the documents would give.

This module imports no torch: the processes that tokenize pieces (prepare.num_proc > 1) start light.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING, Self

import numpy as np

if TYPE_CHECKING:
    import datasets
    import pyarrow as pa
    from tokenizers import Tokenizer

MANIFEST = "manifest.json"  # written last: a cache directory with one is complete
PLAN = "plan.json"  # how the splits were cut into pieces: shards on disk belong to it
ROWS_PER_BATCH = 1000  # documents encoded per encode_batch call
BATCH_CHARS = 4_000_000  # ... or fewer, so that a batch of long documents stays a few MB
MAX_DOCUMENT_BYTES = 1 << 20  # a longer document is encoded in parts cut after a newline (see document_parts)
RELEASE_BYTES = 256 << 20  # text read between two drop_mapped_pages


def drop_mapped_pages() -> None:
    """Unmap from this process the pages it has read of read-only memory-mapped .arrow files (datasets' cache): a
    page of a mapped file once read stays counted in the process's RSS, so one pass over a corpus would make RSS as
    large as the corpus, though those pages are page cache the kernel can drop. madvise(MADV_DONTNEED) on a
    read-only file mapping loses nothing: a page read again is mapped again from the page cache or the file."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and fields[5].endswith(".arrow") and "w" not in fields[1]:
                start, end = (int(x, 16) for x in fields[0].split("-"))
                madvise(start, end - start, 4)  # MADV_DONTNEED


def released_chunks(column: pa.ChunkedArray) -> Iterator[pa.Array]:
    """The column's chunks, for a pass over all of it: every RELEASE_BYTES read, the pages read are dropped."""
    read = 0
    for chunk in column.chunks:
        yield chunk
        read += chunk.nbytes
        if read >= RELEASE_BYTES:
            drop_mapped_pages()
            read = 0


def token_dtype(id_limit: int) -> np.dtype:
    """uint16 when every id fits (vocabularies up to 65,536), else uint32."""
    return np.dtype(np.uint16 if id_limit <= 2**16 else np.uint32)


def document_parts(column: pa.ChunkedArray | pa.Array, max_bytes: int | None = None
                   ) -> Iterator[tuple[list[str], list[bool]]]:
    """The column's texts in batches of (texts, whether each ends its document). A document of more than
    `max_bytes` (a whole file read as one document, sample_by="document") is cut into parts of at most that many
    UTF-8 bytes, read from the Arrow buffer without ever becoming one Python string (see line_cut for where)."""
    import pyarrow.compute as pc

    max_bytes = max_bytes or MAX_DOCUMENT_BYTES
    texts: list[str] = []
    ends: list[bool] = []
    size = read = 0
    for start in range(0, len(column), ROWS_PER_BATCH):
        rows = column.slice(start, ROWS_PER_BATCH)
        if rows.null_count:
            rows = pc.fill_null(rows, "")
        sizes = pc.binary_length(rows).to_numpy(zero_copy_only=False)
        read += int(sizes.sum())
        if read >= RELEASE_BYTES:  # the previous batches' pages: RSS stays flat over the corpus
            drop_mapped_pages()
            read = 0
        if sizes.max(initial=0) <= max_bytes:  # the common case: whole documents, converted in one call
            parts: Iterator[tuple[str, bool]] = ((t, True) for t in rows.to_pylist())
        else:
            parts = (part for i in range(len(rows)) for part in _cut(_row_bytes(rows, i), max_bytes))
        for text, end in parts:
            texts.append(text)
            ends.append(end)
            size += len(text)
            if size >= BATCH_CHARS or len(texts) >= ROWS_PER_BATCH:
                yield texts, ends
                texts, ends, size = [], [], 0
    if texts:
        yield texts, ends
    drop_mapped_pages()  # a piece (shard) smaller than RELEASE_BYTES leaves its pages too: the next piece starts at 0


def _row_bytes(rows: pa.ChunkedArray | pa.Array, i: int) -> memoryview:
    """Row `i`'s UTF-8 bytes: a view of the Arrow data buffer (memory-mapped from the datasets cache), no copy."""
    import pyarrow as pa

    if isinstance(rows, pa.ChunkedArray):
        for chunk in rows.chunks:
            if i < len(chunk):
                break
            i -= len(chunk)
        rows = chunk
    _, offsets, data = rows.buffers()
    offsets = np.frombuffer(offsets, dtype=np.int64 if pa.types.is_large_string(rows.type) else np.int32)
    begin, end = offsets[rows.offset + i], offsets[rows.offset + i + 1]
    return memoryview(data)[begin:end] if data is not None else memoryview(b"")


def line_cut(chunk: bytes) -> int:
    """Where to cut UTF-8 `chunk` so that the tokens do not change (0: no such place): after a newline between two
    non-space characters ("word\nWord"). A char-level tokenizer and byte-level BPE (GPT-2's pre-tokenizer, which
    always isolates such a newline) give the same tokens for the two parts as for the whole; a run of blank lines is
    not such a place (BPE merges it)."""
    i = len(chunk) - 1
    while (i := chunk.rfind(b"\n", 1, i)) > 0:  # a newline byte is never inside a multi-byte character
        before = chunk[max(0, i - 4):i].decode("utf-8", "ignore")[-1:]
        after = chunk[i + 1:i + 5].decode("utf-8", "ignore")[:1]
        if before and after and not before.isspace() and not after.isspace():
            return i + 1
    return 0


def _cut(data: memoryview, max_bytes: int) -> Iterator[tuple[str, bool]]:
    """One document's bytes as parts of at most `max_bytes`, each cut by line_cut; a part without such a newline (a
    text without line breaks) is cut at a character boundary, where a BPE token or two may differ from the whole."""
    start = 0
    while len(data) - start > max_bytes:
        chunk = bytes(data[start:start + max_bytes + 1])  # one byte more: is a newline at the end followed by text?
        cut = line_cut(chunk)
        if not cut:
            cut = max_bytes
            while chunk[cut] & 0xC0 == 0x80:  # not inside a character
                cut -= 1
        yield chunk[:cut].decode(), False
        start += cut
    yield bytes(data[start:]).decode(), True


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


def plan_pieces(ds: datasets.Dataset, column: str, split: str, folder: Path, shard_bytes: int,
                last_ends: bool) -> list[Piece]:
    """The split cut into ceil(UTF-8 bytes / shard_bytes) pieces of whole documents (at most one per document). The
    bytes are counted from the Arrow offsets: the text itself is not read."""
    import pyarrow.compute as pc

    if len(ds) == 0:
        return []
    size = pc.sum(pc.binary_length(text_column(ds, column))).as_py() or 0
    n = max(1, min(len(ds), -(-size // shard_bytes)))
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
                 dtype: np.dtype, eot: int, num_proc: int, log: logging.Logger) -> None:
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
        try:
            for future in futures:
                future.result()
        except BaseException:  # the shards written so far are whole; the rest are not started
            pool.shutdown(wait=False, cancel_futures=True)
            raise


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
    def in_memory(cls, tokens: np.ndarray) -> Self:
        """Tokens already in memory (a bounded validation set) as a one-shard stream, served the same way."""
        stream = cls([Path("<memory>")] * bool(len(tokens)), [len(tokens)] * bool(len(tokens)), tokens.dtype)
        stream._maps = [tokens] * bool(len(tokens))
        return stream

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
        """(len(starts), length) array of the windows starting at global positions `starts`: one fancy index per
        shard for the windows inside it, piece by piece for the few that straddle a boundary."""
        if len(self.paths) == 1:
            return self.shard(0)[starts[:, None] + np.arange(length)]
        out = np.empty((len(starts), length), dtype=self.dtype)
        first = np.searchsorted(self.offsets, starts, side="right") - 1
        inside = starts + length <= self.offsets[first + 1]
        for i in np.unique(first[inside]):
            rows = np.flatnonzero(inside & (first == i))
            out[rows] = self.shard(int(i))[(starts[rows] - self.offsets[i])[:, None] + np.arange(length)]
        for row in np.flatnonzero(~inside):
            out[row] = self.read(int(starts[row]), length)
        return out

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens start .. start+length-1, across as many shards as they span."""
        parts, at, end = [], start, start + length
        i = int(np.searchsorted(self.offsets, start, side="right")) - 1
        while at < end:
            stop = min(end, int(self.offsets[i + 1]))
            parts.append(self.shard(i)[at - self.offsets[i]:stop - self.offsets[i]])
            at, i = stop, i + 1
        return np.concatenate(parts)

    @property
    def tokens(self) -> np.ndarray:
        """The whole stream as one array: reads every shard (for the validation split, or tests)."""
        if len(self.paths) == 1:
            return self.shard(0)
        return np.concatenate([self.shard(i) for i in range(len(self.paths))] or [np.empty(0, self.dtype)])
