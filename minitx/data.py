"""Corpora through Hugging Face `datasets`, tokenized once into cached token shards, served as windows.

A corpus (Hub dataset, local files, or the built-in one) is tokenized piece by piece (minitx.shards), its
documents joined by the end-of-text token, into token shards plus a manifest in a cache directory keyed by the
corpus fingerprint and the tokenizer, so a second run (or `minitx-prepare` beforehand) reads them back without
tokenizing; memory stays flat whatever the corpus size, and an interrupted preparation resumes. Training batches
are random windows drawn with a generator seeded by (seed, global batch index): resuming at a step or adding a
rank needs no state beyond those numbers, and N processes draw what one process accumulating N batches draws.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import logging
import os
import socket
import sysconfig
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset

from minitx.config import DataConfig, MinitxError, PrepareConfig, TokenizerConfig, fail
from minitx.shards import (
    MANIFEST,
    PLAN,
    ShardedTokens,
    document_parts,
    drop_mapped_pages,
    plan_pieces,
    read_plan,
    released_chunks,
    text_column,
    token_dtype,
    write_json,
    write_shards,
)
from minitx.tokenizer import EOT, build_tokenizer, id_limit, tokenizer_hash, tokenizer_spec

if TYPE_CHECKING:
    import datasets
    import lightning as L
    from tokenizers import Tokenizer

log = logging.getLogger(__name__)


def __getattr__(name: str) -> Any:
    """`from minitx.data import TokenDataModule` (or LabelledDataModule), as before they moved to minitx.datamodules;
    imported only when asked for, so that importing minitx.data imports no Lightning."""
    if name in ("TokenDataModule", "LabelledDataModule"):
        from minitx import datamodules

        return getattr(datamodules, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class DataError(MinitxError):
    """A corpus that cannot be loaded or is unusable."""


# part of the token cache's key: changed whenever what goes into the cache changes, so no old cache is read back
# 2: the held-out slice is cut from the text before the tokenizer is trained; token dtype from the largest id
# 3: token shards and a manifest (minitx.shards)
TOKEN_CACHE_FORMAT = 3

# file suffix -> `datasets` builder
BUILDERS = {".txt": "text", ".text": "text", ".md": "text", ".py": "text",
            ".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class Corpus:
    """Training texts, validation texts if the source has a split for them, and a fingerprint of both."""

    train: datasets.Dataset
    val: datasets.Dataset | None
    text_column: str
    fingerprint: str
    description: str


def builtin_corpus_files() -> list[Path]:
    """The top-level modules of the running Python's standard library: a few MB of text on every machine."""
    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))


def load_corpus(cfg: DataConfig) -> Corpus:
    """The corpus to pre-tokenize into shards (data.streaming=true runs read it through minitx.streaming instead).
    Its text is checked (check_text, a pass over all of it) only when it is tokenized, not by every run or rank that
    finds its shards ready."""
    import dataclasses

    splits, description = load_splits(dataclasses.replace(cfg, streaming=False))
    train = splits["train"] if "train" in splits else splits[next(iter(splits))]
    val = splits.get(cfg.val_split)
    parts = [train._fingerprint, val._fingerprint if val is not None else "held-out", cfg.text_column]
    if val is None:
        parts.append(str(cfg.val_fraction))
    return Corpus(train, val, cfg.text_column, "-".join(parts), description)


def load_splits(cfg: DataConfig, builtin: bool = True) -> tuple[Any, str]:
    """The dataset's splits (data.path, else data.hub_id, else the built-in corpus) and a description."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    if cfg.path is not None:
        return _load_local(cfg.path, cfg.val_split, cfg.streaming), f"data.path={cfg.path}"
    if cfg.hub_id is not None:
        return _load_hub(cfg), f"data.hub_id={cfg.hub_id}"
    if not builtin:
        raise DataError("classification needs labelled data: set data.path=<csv/jsonl/parquet> or data.hub_id=")
    files = [str(f) for f in builtin_corpus_files()]
    splits = datasets.load_dataset("text", data_files={"train": files}, sample_by="document", keep_linebreaks=True)
    return splits, f"built-in corpus: {len(files)} standard-library modules"


def _source_fingerprint(cfg: DataConfig) -> str:
    """What identifies a streamed corpus: its source, and for local files their sizes and modification times."""
    parts = [str(cfg.hub_id), str(cfg.hub_config), str(cfg.path), str(cfg.max_documents)]
    if cfg.path is not None:
        parts += [f"{f}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in _local_files(cfg.path)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:20]


def _local_files(path: str) -> list[Path]:
    root = Path(path)
    if not root.exists():
        raise DataError(f"data.path={path!r}: no such file or directory")
    return [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.suffix in BUILDERS)


def _split_files(path: str, val_split: str) -> dict[str, list[Path]]:
    """Files per split. In a directory, files named for data.val_split (validation.txt,
    validation-00000-of-00001.parquet) are the validation split, a Hub layout's test split (test.jsonl,
    test-00000-of-00001.parquet) is left out, and every other file is training text (test_a.py included): datasets'
    own guess from file names keeps train.py alone as training text and drops or tests its neighbours."""
    files = _local_files(path)
    if not files:
        raise DataError(f"data.path={path!r}: no {'/'.join(sorted(BUILDERS))} files in it")
    if Path(path).is_file():
        return {"train": files}

    def named(f: Path, split: str) -> bool:
        return f.stem == split or f.stem.startswith(f"{split}-")

    held = [f for f in files if named(f, val_split)]
    tests = [f for f in files if named(f, "test") and f not in held]  # a Hub layout's test split: never trained on
    train = [f for f in files if f not in held and f not in tests]
    if not train:
        raise DataError(f"data.path={path!r}: only {val_split} files, no training text; add training files beside them")
    if tests:
        log.info("data.path=%s: %d test file(s) left out (%s)", path, len(tests), _shown(path, tests[0]))
    return {"train": train, val_split: held} if held else {"train": train}


def _load_local(path: str, val_split: str = "validation",
                streaming: bool = False) -> datasets.DatasetDict | datasets.IterableDatasetDict:
    import datasets

    splits = _split_files(path, val_split)
    files = [f for split in splits.values() for f in split]
    builders = {BUILDERS.get(f.suffix) for f in files}
    if None in builders or len(builders) > 1:
        raise DataError(
            f"data.path={path!r}: cannot tell the format from the suffix of {[f.name for f in files][:3]}; "
            f"use one kind of file among {sorted(BUILDERS)}"
        )
    builder = builders.pop()
    extra = {"sample_by": "document", "keep_linebreaks": True} if builder == "text" else {}
    data_files = {name: [str(f) for f in split] for name, split in splits.items()}
    try:
        return datasets.load_dataset(builder, data_files=data_files, streaming=streaming, **extra)
    except Exception as e:  # datasets wraps what its readers raise: find the file and the byte to name
        raise _read_error(path, val_split, e) from e


def _shown(path: str, file: Path) -> str:
    """A file as the user knows it: its name, or its path inside the data.path directory."""
    root = Path(path)
    return file.name if root.is_file() else str(file.relative_to(root))


def _first_non_utf8(file: Path) -> tuple[int, int] | None:
    """(offset, value) of the first byte that is not UTF-8, reading 1 MiB at a time; None for a UTF-8 file."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    consumed = 0
    with file.open("rb") as f:
        while True:
            chunk = f.read(1 << 20)
            pending = decoder.getstate()[0]  # the start of a character cut by the previous chunk
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                return consumed - len(pending) + e.start, (pending + chunk)[e.start]
            if not chunk:
                return None
            consumed += len(chunk)


def _read_error(path: str, val_split: str, error: Exception) -> DataError:
    """One line for a local corpus `datasets` could not read: an empty file, a byte that is not UTF-8, or what the
    reader said."""
    files = [f for split in _split_files(path, val_split).values() for f in split]
    for file in files:
        if file.stat().st_size == 0:
            fix = "give data.path a file with text in it" if Path(path).is_file() else "give it text or remove it"
            return DataError(f"data.path={path}: {_shown(path, file)} holds no text (it is empty); {fix}")
    for file in files if files[0].suffix != ".parquet" else []:
        if (bad := _first_non_utf8(file)) is not None:
            return DataError(
                f"data.path={path}: {_shown(path, file)} is not UTF-8 text (byte 0x{bad[1]:02x} at offset {bad[0]}); "
                "convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8) or remove it from data.path"
            )
    cause = error.__cause__ or error
    reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    return DataError(f"data.path={path}: could not be read as {BUILDERS[files[0].suffix]} ({reason[:200]})")


def load_split(cfg: DataConfig, split: str | None = None) -> tuple[datasets.Dataset, str]:
    """One split's text column, checked as training checks it, and its description: `split`, else data.val_split
    if the data has it, else its only split (a plain file's is "train"). What minitx-eval scores."""
    splits, description = load_splits(cfg)
    names = list(splits)
    if split is not None:
        if split not in splits:
            fail("split", split, f"{description} has no such split; its splits are {names}")
        name = split
    elif cfg.val_split in splits:
        name = cfg.val_split
    elif len(names) == 1:
        name = names[0]
    else:
        fail("split", None, f"{description} has splits {names} and no {cfg.val_split!r}: choose one with split=")
    texts = splits[name]
    check_text(cfg, name, texts, description)
    return texts.select_columns([cfg.text_column]), f"{description} ({name} split)"


def check_text(cfg: DataConfig, name: str, split: datasets.Dataset, description: str) -> None:
    """A split without data.text_column, or whose text is not UTF-8 (the json reader does not check) or has nothing
    but whitespace, is refused here, in one vectorised pass each, rather than with a traceback later or a model of
    blank lines. `name`: the split's name; `description`: the data's (load_splits)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if cfg.text_column not in split.column_names:
        raise DataError(f"data.text_column={cfg.text_column!r} is not a column of {description}; "
                        f"its columns are {split.column_names}")
    values = split.data.column(cfg.text_column)
    if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
        return
    try:
        for chunk in released_chunks(values):  # (a corpus larger than memory: see drop_mapped_pages)
            chunk.validate(full=True)
    except pa.ArrowInvalid as e:
        if cfg.path is None:
            raise DataError(f"data.hub_id={cfg.hub_id!r}: the {name} split holds text that is not UTF-8 ({e}); "
                            "choose another dataset") from None
        raise _read_error(cfg.path, cfg.val_split, e) from None
    if not any(pc.any(pc.match_substring_regex(chunk, r"\S")).as_py() for chunk in released_chunks(values)):
        raise DataError(_no_text_message(cfg, name))


def _no_text_message(cfg: DataConfig, split: str) -> str:
    if cfg.path is None:
        return f"data.hub_id={cfg.hub_id!r}: the {split} split holds no text; choose another dataset or data.hub_config"
    files = _split_files(cfg.path, cfg.val_split)[split]
    if all(f.stat().st_size == 0 for f in files):
        why = "it is empty" if len(files) == 1 else "its files are empty"
    elif BUILDERS[files[0].suffix] == "text":
        why = "only whitespace"
    else:
        why = f"data.text_column={cfg.text_column!r} is empty or whitespace in every row"
    if Path(cfg.path).is_file():
        return f"data.path={cfg.path}: {files[0].name} holds no text ({why}); give data.path a file with text in it"
    names = ", ".join(_shown(cfg.path, f) for f in files[:3]) + ", ..." * (len(files) > 3)
    fix = ("put text in it, or remove it to hold out the last data.val_fraction of the training text"
           if split == cfg.val_split else "add files with text in them")
    return f"data.path={cfg.path}: the {split} split ({names}) holds no text ({why}); {fix}"


def _hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def host_reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the URL's host opens within `timeout` seconds (DNS included)."""
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    result: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection((parsed.hostname, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=connect, daemon=True)  # getaddrinfo ignores socket timeouts
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def _offline_requested() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _load_hub(cfg: DataConfig) -> datasets.DatasetDict | datasets.IterableDatasetDict:
    import datasets

    endpoint = _hub_endpoint()
    advice = "use data.path=<a local text/jsonl/csv/parquet file>"
    if not _offline_requested() and not host_reachable(endpoint):
        raise DataError(
            f"data.hub_id={cfg.hub_id!r}: the Hugging Face Hub ({endpoint}) cannot be reached (no network?); "
            f"{advice}, or set HF_HUB_OFFLINE=1 to use a copy in the local datasets cache"
        )
    try:
        return datasets.load_dataset(cfg.hub_id, cfg.hub_config, streaming=cfg.streaming)
    except Exception as e:  # datasets raises many types: connection, not found, offline cache miss
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = "offline and not in the local datasets cache" if _offline_requested() else "could not be loaded"
        raise DataError(f"data.hub_id={cfg.hub_id!r}: {where} ({reason[:200]}); {advice}") from None


class TokenStream(ShardedTokens):
    """A split's token ids on disk (its shards, minitx.shards), served as windows for training."""

    def windows(self, starts: np.ndarray, length: int) -> torch.Tensor:
        """(len(starts), length) int64 tensor of the windows starting at global positions `starts`."""
        return torch.from_numpy(self.gather(starts, length).astype(np.int64))


@dataclass
class PreparedData:
    tokenizer: Tokenizer
    train: TokenStream
    val: TokenStream
    cache_dir: Path
    from_cache: bool
    description: str


def default_cache_dir() -> Path:
    return Path(os.environ.get("MINITX_CACHE", Path.home() / ".cache" / "minitx"))


def prepare_data(data_cfg: DataConfig, tok_cfg: TokenizerConfig, min_tokens: int, encoder: bool = False,
                 tokenizer: Tokenizer | None = None, prepare_cfg: PrepareConfig | None = None) -> PreparedData:
    """Load the corpus, train or load the tokenizer (or use `tokenizer`), and tokenize it into token shards in the
    cache (once per corpus and tokenizer; see write_cache). `encoder`: the tokenizer gets [PAD] [MASK] [CLS] [SEP]."""
    from filelock import FileLock

    corpus = load_corpus(data_cfg)
    spec = tokenizer_hash(tokenizer) if tokenizer is not None else tokenizer_spec(tok_cfg, encoder)
    key = hashlib.sha256(f"{corpus.fingerprint}|{spec}|{TOKEN_CACHE_FORMAT}".encode()).hexdigest()[:20]
    root = Path(data_cfg.cache_dir) if data_cfg.cache_dir else default_cache_dir()
    cache = root / key
    from_cache = (cache / MANIFEST).exists()
    if not from_cache:
        root.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(root / f"{key}.lock"))
        try:
            lock.acquire(timeout=0)
        except TimeoutError:  # another process (a DDP rank, a second minitx-prepare) is preparing it: wait, read
            log.info("waiting for another process preparing %s into %s", corpus.description, cache)
            lock.acquire()
        try:
            from_cache = (cache / MANIFEST).exists()
            if not from_cache:
                write_cache(cache, corpus, data_cfg, tok_cfg, encoder, tokenizer, prepare_cfg or PrepareConfig())
        finally:
            lock.release()
    manifest = json.loads((cache / MANIFEST).read_text())
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(cache / "tokenizer.json"))
    train, val = (TokenStream.from_manifest(cache, manifest["splits"][name]) for name in ("train", "val"))
    for name, stream in (("training", train), ("validation", val)):
        if len(stream) < min_tokens:
            raise DataError(
                f"{corpus.description}: the {name} split has {len(stream)} tokens, fewer than "
                f"model.block_size + 1 = {min_tokens}; lower model.block_size or use a larger corpus"
            )
    return PreparedData(tokenizer, train, val, cache, from_cache, corpus.description)


def write_cache(cache: Path, corpus: Corpus, data_cfg: DataConfig, tok_cfg: TokenizerConfig, encoder: bool,
                tokenizer: Tokenizer | None, prepare_cfg: PrepareConfig) -> None:
    """The cache directory: tokenizer.json, the shards of each split (minitx.shards), then manifest.json, last.
    Resumable: a tokenizer already saved there is reused, and shards already written are kept."""
    t0 = time.perf_counter()
    cache.mkdir(parents=True, exist_ok=True)
    for partial in cache.glob("*.tmp*"):  # what an interrupted preparation was writing (we hold the lock)
        partial.unlink()
    for name, split in (("train", corpus.train), (data_cfg.val_split, corpus.val)):
        if split is not None:
            check_text(data_cfg, name, split, corpus.description)
    train_texts, val_texts, cut_inside = corpus.train, corpus.val, False
    if val_texts is None:  # held out before the tokenizer is trained: it must learn nothing from that text
        train_texts, val_texts, cut_inside = hold_out_tail(corpus.train, corpus.text_column, data_cfg.val_fraction)
    saved = cache / "tokenizer.json"
    if saved.exists():  # an interrupted preparation: its shards were written with this one
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(saved))
    else:
        if tokenizer is None:
            tokenizer = build_tokenizer(tok_cfg, _texts(train_texts, corpus.text_column), encoder)
            drop_mapped_pages()  # the pages of its sample (tokenizer.sample_chars of text)
            log.info("tokenizer built in %.1f s", time.perf_counter() - t0)
        tmp = cache / f"tokenizer.json.tmp{os.getpid()}"
        tokenizer.save(str(tmp))
        os.replace(tmp, saved)
    dtype = token_dtype(id_limit(tokenizer))
    splits = {name: (texts, plan_pieces(texts, corpus.text_column, name, cache, prepare_cfg.shard_bytes, last_ends))
              for name, texts, last_ends in (("train", train_texts, not cut_inside), ("val", val_texts, True))}
    plan = {name: len(pieces) for name, (_, pieces) in splits.items()} | {"shard_bytes": prepare_cfg.shard_bytes}
    if read_plan(cache) != plan:  # shards cut another way (another prepare.shard_bytes) are not this plan's
        for old in cache.glob("*.bin"):
            old.unlink()
        write_json(cache / PLAN, plan)
    write_shards(splits, corpus.text_column, tokenizer, dtype, tokenizer.token_to_id(EOT), prepare_cfg.num_proc, log)
    manifest: dict[str, Any] = {"format": TOKEN_CACHE_FORMAT, "source": corpus.description,
                                "fingerprint": corpus.fingerprint, "tokenizer": tokenizer_hash(tokenizer), "splits": {}}
    for name, (_, pieces) in splits.items():
        shards = [{"file": p.path.name, "tokens": p.path.stat().st_size // dtype.itemsize} for p in pieces]
        manifest["splits"][name] = {"dtype": dtype.name, "tokens": sum(s["tokens"] for s in shards), "shards": shards}
    write_json(cache / MANIFEST, manifest)
    log.info("tokenized %s into %d + %d tokens (%d + %d shards) in %.1f s", corpus.description,
             manifest["splits"]["train"]["tokens"], manifest["splits"]["val"]["tokens"], len(splits["train"][1]),
             len(splits["val"][1]), time.perf_counter() - t0)


def hold_out_tail(ds: datasets.Dataset, column: str, fraction: float) -> tuple[datasets.Dataset, datasets.Dataset,
                                                                               bool]:
    """Split off the last `fraction` of the corpus's characters, as (training texts, held-out texts, whether the cut
    falls inside a document). The held-out slice is the end of the corpus, as nanoGPT holds out, and it is counted in
    characters, so one document (an input.txt) is cut the same way as many: the document at the cut is split in two."""
    import datasets
    import pyarrow.compute as pc

    ds = ds.select_columns([column])
    lengths = np.concatenate([pc.utf8_length(pc.fill_null(chunk, "")).to_numpy(zero_copy_only=False)
                              for chunk in released_chunks(ds.data.column(column))] or [np.empty(0, np.int64)])
    ends = np.cumsum(lengths)
    n_val = int(ends[-1] * fraction) if len(ends) else 0
    if n_val == 0:  # too little text to hold any out; the caller refuses the empty stream
        return ds, ds.select([]), False
    cut = int(ends[-1]) - n_val  # the first held-out character
    i = int(np.searchsorted(ends, cut, side="right"))  # the document that holds it
    offset = cut - int(ends[i] - lengths[i])
    if offset == 0:
        return ds.select(range(i)), ds.select(range(i, len(ds))), False
    text = ds[i][column]
    head, tail = (datasets.Dataset.from_dict({column: [part]}, features=ds.features)
                  for part in (text[:offset], text[offset:]))
    after = ds.select(range(i + 1, len(ds))) if i + 1 < len(ds) else ds.select([])  # range(n, n) is refused
    train = datasets.concatenate_datasets([ds.select(range(i)), head])
    return train, datasets.concatenate_datasets([tail, after]), True


def _texts(ds: datasets.Dataset, column: str) -> Iterator[str]:
    """The documents' texts, read lazily (a long one in parts, see minitx.shards.document_parts): the tokenizer is
    trained on the first tokenizer.sample_chars of them and nothing more is read."""
    for texts, _ in document_parts(text_column(ds, column)):
        yield from (t for t in texts if t)


def tokenize_documents(ds: datasets.Dataset, column: str, tokenizer: Tokenizer, last_ends: bool = True) -> np.ndarray:
    """The whole split's stream in memory, as minitx wrote it before shards: doc EOT doc EOT ... (no EOT after the
    last document unless `last_ends`: the held-out slice continues it). For bounded text (minitx-eval's split,
    streaming's validation documents) and as the reference the shards are tested against; a corpus goes to shards."""
    import pyarrow.compute as pc

    def encode(batch: dict) -> dict:
        texts = [t or "" for t in batch[column]]
        return {"ids": [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]}

    dtype = np.uint16 if id_limit(tokenizer) <= 2**16 else np.uint32  # the largest id, not the number of tokens
    if len(ds) == 0:  # map would not even add the column
        return np.empty(0, dtype=dtype)
    encoded = ds.map(encode, batched=True, batch_size=1000, remove_columns=ds.column_names,
                     keep_in_memory=True, new_fingerprint=f"{ds._fingerprint}-{tokenizer_hash(tokenizer)}")
    ids = encoded.data.column("ids")
    flat = pc.list_flatten(ids).to_numpy()
    lengths = pc.list_value_length(ids).to_numpy()
    out = np.empty(len(flat) + len(lengths) - (not last_ends), dtype=dtype)
    eot_at = np.cumsum(lengths + 1) - 1  # each document is followed by EOT
    is_eot = np.zeros(len(out), dtype=bool)
    is_eot[eot_at[eot_at < len(out)]] = True
    out[is_eot] = tokenizer.token_to_id(EOT)
    out[~is_eot] = flat
    return out


def batch_rng(seed: int, step: int, rank: int, world_size: int) -> np.random.Generator:
    """The generator of this process's `step`-th training batch: that of its global index step x world_size + rank,
    so the processes draw different batches, and N processes at accumulation A draw, per optimizer step, the batches
    one process draws at accumulation N x A. (One process: rng(seed, 0, step), as before ranks were interleaved.)"""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not one of {world_size} processes")
    return np.random.default_rng([seed, 0, step * world_size + rank])


class RandomWindows(IterableDataset):
    """Endless training batches: (x, y) of random windows, batch `step` drawn from batch_rng(seed, step, rank,
    world_size)."""

    def __init__(self, stream: TokenStream, block_size: int, batch_size: int, seed: int, rank: int = 0,
                 start_step: int = 0, pin_memory: bool = False, world_size: int = 1):
        self.stream, self.block_size, self.batch_size = stream, block_size, batch_size
        self.seed, self.rank, self.start_step, self.pin_memory = seed, rank, start_step, pin_memory
        self.world_size = world_size

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = batch_rng(self.seed, step, self.rank, self.world_size)
        starts = rng.integers(0, len(self.stream) - self.block_size, size=self.batch_size)
        w = self.stream.windows(starts, self.block_size + 1)
        x, y = w[:, :-1].contiguous(), w[:, 1:].contiguous()
        if self.pin_memory:  # page-locked: the copy to the GPU can overlap compute
            return x.pin_memory(), y.pin_memory()
        return x, y

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        step = self.start_step
        while True:
            yield self.batch(step)
            step += 1


class FixedWindows(Dataset):
    """Validation batches: windows evenly spaced over the whole stream, the same for every run and seed."""

    def __init__(self, stream: TokenStream, block_size: int, batch_size: int, n_batches: int):
        starts = np.linspace(0, len(stream) - block_size - 1, num=batch_size * n_batches).astype(np.int64)
        self.starts = starts.reshape(n_batches, batch_size)
        self.stream, self.block_size = stream, block_size

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.stream.windows(self.starts[i], self.block_size + 1)
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()


def val_share(n_batches: int, trainer: L.Trainer | None, setting: str, fix: str) -> list[int]:
    """This process's validation batches: every world_size-th one from its rank, so that the processes evaluate
    each batch once (a DistributedSampler pads by repeating some). Batch k of the share is global batch
    rank + k * world_size (global_batch_index). `setting` and `fix` name the key to change, for the error."""
    rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
    if n_batches < world:
        raise DataError(f"{setting}: {n_batches} validation batch(es) for {world} processes, each needs one; {fix}")
    if n_batches % world and trainer is not None and sharded(trainer):
        raise DataError(f"{setting}: {n_batches} validation batches do not split evenly over {world} processes, and "
                        "under trainer.strategy=fsdp every process must evaluate as many (each forward gathers the "
                        f"weights from all of them); change it so that the batches are a multiple of {world}")
    return list(range(rank, n_batches, world))


def sharded(trainer: L.Trainer) -> bool:
    from minitx.fsdp import is_sharded

    return is_sharded(trainer.strategy)


def global_batch_index(batch_idx: int, trainer: L.Trainer) -> int:
    """The index in the whole validation set of this process's `batch_idx`-th batch (see val_share)."""
    return trainer.global_rank + batch_idx * trainer.world_size


def world_size(trainer: L.Trainer | None) -> int:
    return trainer.world_size if trainer is not None else 1


def stream_position(trainer: L.Trainer | None) -> tuple[int, int]:
    """(rank, first batch to draw): train_dataloader runs after a checkpoint is restored, so a resumed run starts at
    the batch after its last one."""
    if trainer is None:
        return 0, 0
    return trainer.global_rank, getattr(trainer.lightning_module, "batches_seen", 0)


@dataclass
class LabelledData:
    """Tokenized, labelled rows for sequence classification: [CLS] + the text's tokens, cut at block_size."""

    train: list[np.ndarray]
    train_labels: np.ndarray
    val: list[np.ndarray]
    val_labels: np.ndarray
    labels: list[str]
    description: str
    tokenizer: Tokenizer


def load_labelled(cfg: DataConfig) -> tuple[datasets.Dataset, datasets.Dataset | None, str]:
    """The training split (and validation split, if any) of a labelled dataset, columns checked."""
    if cfg.label_column is None:
        raise DataError("data.label_column is not set: name the column that holds the labels")
    splits, description = load_splits(cfg, builtin=False)
    train = splits["train"] if "train" in splits else splits[next(iter(splits))]
    for key, column in (("text_column", cfg.text_column), ("label_column", cfg.label_column)):
        if column not in train.column_names:
            raise DataError(f"data.{key}={column!r} is not a column of {description}; "
                            f"its columns are {train.column_names}")
    return train, splits.get(cfg.val_split), description


def label_ids(values: list, key: str) -> tuple[np.ndarray, list[str]]:
    """Integer labels stay as they are (0..max); strings are numbered in sorted order."""
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        if min(values) < 0:
            raise DataError(f"{key}: integer labels must be >= 0, found {min(values)}")
        return np.asarray(values, dtype=np.int64), [str(i) for i in range(max(values) + 1)]
    if all(isinstance(v, str) for v in values):
        names = sorted(set(values))
        index = {name: i for i, name in enumerate(names)}
        return np.asarray([index[v] for v in values], dtype=np.int64), names
    bad = next(v for v in values if not isinstance(v, (str, int, np.integer)) or isinstance(v, bool))
    raise DataError(f"{key}: labels must be integers or strings, found {bad!r} ({type(bad).__name__})")


def prepare_labelled(cfg: DataConfig, tok_cfg: TokenizerConfig, block_size: int,
                     tokenizer: Tokenizer | None = None) -> LabelledData:
    """Load, split and tokenize labelled rows; without `tokenizer`, train one (with the encoder's special tokens)
    on the training rows."""
    from minitx.tokenizer import CLS

    train, val, description = load_labelled(cfg)
    texts, labels = list(train[cfg.text_column]), list(train[cfg.label_column])
    if val is not None:
        val_texts, val_labels = list(val[cfg.text_column]), list(val[cfg.label_column])
    else:  # a deterministic held-out share of the rows, shuffled with a fixed seed (files are often sorted)
        order = np.random.default_rng(0).permutation(len(texts))
        n_val = max(1, int(len(texts) * cfg.val_fraction))
        val_texts, val_labels = [texts[i] for i in order[:n_val]], [labels[i] for i in order[:n_val]]
        texts, labels = [texts[i] for i in order[n_val:]], [labels[i] for i in order[n_val:]]
    all_ids, names = label_ids(labels + val_labels, f"data.label_column={cfg.label_column!r}")
    if tokenizer is None:
        tokenizer = build_tokenizer(tok_cfg, (t for t in texts if t), encoder=True)
    cls = tokenizer.token_to_id(CLS)

    def encode(rows: list[str]) -> list[np.ndarray]:
        encoded = tokenizer.encode_batch([t or "" for t in rows], add_special_tokens=False)
        return [np.asarray([cls, *e.ids][:block_size], dtype=np.int64) for e in encoded]

    return LabelledData(encode(texts), all_ids[: len(labels)], encode(val_texts), all_ids[len(labels):], names,
                        description, tokenizer)


def pad_batch(rows: list[np.ndarray], labels: np.ndarray, pad_id: int) -> tuple[torch.Tensor, ...]:
    """(ids, key_padding, labels): rows padded with [PAD] to the longest in the batch; key_padding is True for
    real tokens."""
    length = max(len(r) for r in rows)
    ids = np.full((len(rows), length), pad_id, dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
    ids_t = torch.from_numpy(ids)
    return ids_t, ids_t != pad_id, torch.from_numpy(np.asarray(labels))


class RandomRows(IterableDataset):
    """Endless training batches of random rows, batch `step` drawn from batch_rng(seed, step, rank, world), as
    RandomWindows."""

    def __init__(self, data: LabelledData, batch_size: int, pad_id: int, seed: int, rank: int = 0,
                 start_step: int = 0, world_size: int = 1):
        self.data, self.batch_size, self.pad_id = data, batch_size, pad_id
        self.seed, self.rank, self.start_step, self.world_size = seed, rank, start_step, world_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        step = self.start_step
        while True:
            rng = batch_rng(self.seed, step, self.rank, self.world_size)
            rows = rng.integers(0, len(self.data.train), self.batch_size)
            yield pad_batch([self.data.train[i] for i in rows], self.data.train_labels[rows], self.pad_id)
            step += 1
