"""`minitx-eval ckpt=<.ckpt | minitx-export directory | hf:dir> data.path=heldout.txt`: how well a causal language
model predicts a whole text, as loss (mean nats per token), perplexity and bits per byte.

    bpb = total nats / (ln 2 × total UTF-8 bytes of the text)

Bits per byte divide by the text, not by the tokens, so a char model and a BPE model compare on the same text. The
tokens are checked against it: byte-level BPE and char tokens count their own bytes
(minitx.tokenizer.token_bytes), and a tokenizer that loses text ([UNK]) is warned about; other tokenizers have no
such count, and the text's bytes are used as they are.

The documents are joined as training joins them, and one <|endoftext|> goes first so that the first token is scored
too: <|endoftext|> doc <|endoftext|> doc ... doc. The leading separator is context only; the separators between
documents are scored (where a document ends is part of the text's probability, and training scores them too) and
stand for 0 bytes. A plain file is one document.

Long text is scored by sliding windows of the model's block_size that move `stride` tokens at a time: every token is
scored exactly once, with at least block_size - stride tokens of context (fewer only at the start). Windows go through
the model `batch_size` at a time and only the sums are kept, so memory does not grow with the text.

Inference code: torch, tokenizers, datasets and minitx's model code; no Lightning, no Hydra.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from minitx.cli import resolve_device, run_command
from minitx.config import DataConfig, fail

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer

USAGE = """usage: minitx-eval ckpt=<.ckpt | minitx-export directory | hf:<dir>> data.path=<text> [key=value ...]
  minitx-eval ckpt=outputs/default/<run>/checkpoints/best.ckpt data.path=heldout.txt out=eval.json"""


@dataclass
class EvalData:
    """The text to score, named as minitx-train names its data (minitx.config.DataConfig)."""

    path: str | None = None  # a local .txt/.jsonl/.json/.csv/.parquet file or a directory of them; wins over hub_id
    hub_id: str | None = None  # a Hugging Face Hub dataset id, e.g. karpathy/tiny_shakespeare
    hub_config: str | None = None  # the Hub dataset's configuration name, if it has several
    text_column: str = DataConfig.text_column  # the column of text (jsonl, csv, parquet; a .txt file is "text")
    val_split: str = DataConfig.val_split  # the split scored when the data has it (split= chooses another)


@dataclass
class EvalConfig:
    ckpt: str | None = None  # a .ckpt, a minitx-export directory, or hf:<dir> (a transformers GPT-2) (required)
    data: EvalData = field(default_factory=EvalData)
    split: str | None = None  # unset: data.val_split if the data has it, else its only split (a plain file: "train")
    stride: int = 0  # tokens a window moves on; each keeps >= block_size - stride of context; 0: block_size
    batch_size: int = 8  # windows per forward pass: the logits held are at most batch_size × block_size × vocabulary
    device: str = "auto"  # auto | cpu | cuda
    backend: str = "minitx"  # hf:<dir> only: minitx (minitx.checkpoint.load's GPT) | transformers (its own model)
    out: str | None = None  # write the results here as JSON (e.g. eval.json); unset: print only

    def validate(self) -> EvalConfig:
        from minitx.checkpoint import HF_PREFIX

        if not self.ckpt:
            fail("ckpt", self.ckpt, "required: minitx-eval ckpt=<.ckpt | minitx-export directory | hf:<dir>>")
        if self.data.path is None and self.data.hub_id is None:
            fail("data.path", None, "required: the text to score (a file or directory), or data.hub_id=<dataset>")
        if self.stride < 0:
            fail("stride", self.stride, "must be >= 0 (0: the model's block_size)")
        if self.batch_size <= 0:
            fail("batch_size", self.batch_size, "must be > 0")
        if self.device not in ("auto", "cpu", "cuda"):
            fail("device", self.device, "choose auto, cpu or cuda")
        if self.backend not in ("minitx", "transformers"):
            fail("backend", self.backend, "choose minitx or transformers")
        if self.backend == "transformers" and not self.ckpt.startswith(HF_PREFIX):
            fail("backend", self.backend,
                 f"scores a transformers model: needs ckpt={HF_PREFIX}<dir>, not {self.ckpt!r}")
        return self


LogitsAt = Callable[["torch.Tensor", "torch.Tensor"], "torch.Tensor"]  # (x (B, T), keep (B, T) bool) -> (kept, V)


@dataclass
class Scorer:
    """A causal LM as evaluation needs it: logits at chosen positions, its tokenizer and its longest context."""

    logits_at: LogitsAt
    tokenizer: Tokenizer
    block_size: int


@dataclass
class Score:
    nats: float  # summed over the scored tokens
    tokens: int  # scored tokens (separators between documents included)
    bytes: int | None  # UTF-8 bytes the scored tokens stand for (minitx.tokenizer.token_bytes; None: no count)
    seconds: float


def windows(n: int, block_size: int, stride: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Sliding windows that score tokens 1..n-1 of an n-token stream exactly once: (starts, new, length).

    Window k reads tokens[starts[k] : starts[k] + length] and predicts the token after each position; its last
    new[k] predictions are scored. Window k ends at ends[k] = length + k·stride (the last at n - 1), so the first
    token it scores sees length - new[k] + 1 >= length - stride + 1 tokens."""
    length = min(block_size, n - 1)
    ends = np.append(np.arange(length, n - 1, stride), n - 1)
    new = np.diff(ends, prepend=0)
    return ends - length, new, length


def score(scorer: Scorer, tokens: np.ndarray, stride: int, batch_size: int, device: str) -> Score:
    """Sum of -log p(token | the tokens before it in its window) over every token but the first, `batch_size`
    windows at a time."""
    import torch
    import torch.nn.functional as F

    from minitx.tokenizer import token_bytes

    table = token_bytes(scorer.tokenizer)
    table_t = None if table is None else torch.from_numpy(table).to(device)
    starts, new, length = windows(len(tokens), scorer.block_size, stride)
    position = torch.arange(length, device=device)
    nats, count, n_bytes = 0.0, 0, 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(starts), batch_size):
            rows = tokens[starts[i : i + batch_size, None] + np.arange(length + 1)]
            w = torch.from_numpy(rows.astype(np.int64)).to(device)
            x, y = w[:, :-1], w[:, 1:]  # (B, length)
            keep = position >= length - torch.from_numpy(new[i : i + batch_size]).to(device)[:, None]
            targets = y[keep]
            nats += F.cross_entropy(scorer.logits_at(x, keep).float(), targets, reduction="sum").item()
            count += len(targets)
            if table_t is not None:
                n_bytes += int(table_t[targets].sum())
    return Score(nats, count, None if table_t is None else n_bytes, time.perf_counter() - t0)


def load_scorer(cfg: EvalConfig, device: str) -> Scorer:
    """The model behind ckpt=: minitx.checkpoint.load's, or for backend=transformers, transformers' own."""
    from minitx.checkpoint import HF_PREFIX, load
    from minitx.tokenizer import EOT

    if cfg.backend == "transformers":
        return transformers_scorer(cfg.ckpt.removeprefix(HF_PREFIX), device)  # type: ignore[union-attr]

    loaded = load(cfg.ckpt, device)  # type: ignore[arg-type]
    if loaded.task != "causal_lm":
        fail("ckpt", cfg.ckpt, f"a {loaded.task} checkpoint; minitx-eval scores causal language models only")
    model = loaded.model
    # a model trained with data.document_mask=true never attended across <|endoftext|>: score it the same way
    eot = loaded.tokenizer.token_to_id(EOT) if loaded.document_mask else None

    def logits_at(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        doc_ids = None if eot is None else (x == eot).cumsum(dim=1)
        return model.lm_head(model.transformer(x, doc_ids=doc_ids)[keep])  # the head only where a token is scored

    return Scorer(logits_at, loaded.tokenizer, loaded.config.block_size)


def transformers_scorer(directory: str, device: str) -> Scorer:
    """A transformers causal LM and its tokenizer.json, scored with transformers' own forward pass."""
    from tokenizers import Tokenizer

    from minitx.checkpoint import HF_PREFIX

    where = Path(directory)
    for name in ("config.json", "tokenizer.json"):
        if not (where / name).is_file():
            fail("ckpt", f"{HF_PREFIX}{directory}", f"no {name} in it: not a transformers model directory")
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        fail("backend", "transformers", "needs the transformers package: pip install 'minitx[hf]'")

    model = AutoModelForCausalLM.from_pretrained(where, local_files_only=True).to(device).eval()

    def logits_at(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return model(input_ids=x).logits[keep]

    return Scorer(logits_at, Tokenizer.from_file(str(where / "tokenizer.json")),
                  int(model.config.max_position_embeddings))


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Score the text, print a table (and write cfg.out); the numbers as a dict."""
    import pyarrow.compute as pc

    from minitx.data import load_split, tokenize_documents
    from minitx.tokenizer import EOT

    device = resolve_device(cfg.device)
    scorer = load_scorer(cfg, device)
    if cfg.stride > scorer.block_size:  # windows that far apart would leave tokens between them unscored
        fail("stride", cfg.stride, f"must be <= the model's block_size={scorer.block_size}")
    eot = scorer.tokenizer.token_to_id(EOT)
    if eot is None:
        fail("ckpt", cfg.ckpt, f"its tokenizer has no {EOT} token to join documents with")
    data = DataConfig(path=cfg.data.path, hub_id=cfg.data.hub_id, hub_config=cfg.data.hub_config,
                      text_column=cfg.data.text_column, val_split=cfg.data.val_split)
    texts, description = load_split(data, cfg.split)
    column = cfg.data.text_column
    stream = tokenize_documents(texts, column, scorer.tokenizer, last_ends=False)  # doc EOT doc ... doc
    tokens = np.concatenate([np.asarray([eot], dtype=stream.dtype), stream])
    if len(tokens) < 2:
        fail("data.path" if cfg.data.path is not None else "data.hub_id", cfg.data.path or cfg.data.hub_id,
             "no tokens to score")
    n_bytes = int(pc.sum(pc.binary_length(pc.fill_null(texts.data.column(column), ""))).as_py() or 0)
    result = score(scorer, tokens, cfg.stride or scorer.block_size, cfg.batch_size, device)
    if result.bytes is not None and result.bytes != n_bytes:
        print(f"warning: the tokens stand for {result.bytes} bytes but the text has {n_bytes} (the tokenizer "
              "does not reproduce it: e.g. [UNK] for characters it has never seen); bpb divides by the text's bytes",
              file=sys.stderr)
    loss = result.nats / result.tokens
    numbers = {
        "source": cfg.ckpt, "data": description, "tokens": result.tokens, "bytes": n_bytes, "loss": loss,
        "ppl": math.exp(loss), "bpb": result.nats / (math.log(2) * n_bytes) if n_bytes else math.nan,
        "tokens_per_sec": result.tokens / result.seconds, "block_size": scorer.block_size,
        "stride": cfg.stride or scorer.block_size, "backend": cfg.backend,
    }
    print_table(numbers)
    if cfg.out is not None:
        Path(cfg.out).write_text(json.dumps(numbers, indent=2) + "\n")
        print(f"wrote {cfg.out}")
    return numbers


def print_table(n: dict[str, Any]) -> None:
    print(f"data: {n['data']}  (block_size {n['block_size']}, stride {n['stride']})")
    width = max(len("source"), len(str(n["source"])))
    print(f"{'source':<{width}}  {'tokens':>10}  {'bytes':>10}  {'loss':>7}  {'ppl':>9}  {'bpb':>6}  {'tokens/s':>9}")
    print(f"{n['source']:<{width}}  {n['tokens']:>10,}  {n['bytes']:>10,}  {n['loss']:>7.4f}  {n['ppl']:>9.3f}  "
          f"{n['bpb']:>6.4f}  {n['tokens_per_sec']:>9,.0f}")


def main(argv: list[str] | None = None) -> None:
    """The minitx-eval console script."""
    run_command(EvalConfig, USAGE, evaluate, argv)


if __name__ == "__main__":
    main()
