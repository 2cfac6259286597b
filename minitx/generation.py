"""Autoregressive sampling with a preallocated KV cache: one token through the model per step."""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Callable, Collection, Iterator
from typing import TYPE_CHECKING, Protocol, TextIO

import torch
from torch import Tensor

from minitx.attention import KVCache
from minitx.config import ConfigError
from minitx.model import GPT, Encoder
from minitx.tokenizer import CLS, MASK

if TYPE_CHECKING:
    from tokenizers import Tokenizer


def sample_next(logits: Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> Tensor:
    """Pick the next token (B, 1) from logits (B, V): greedy when temperature <= 0, else top-k / top-p sampling."""
    if temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:  # nucleus: the smallest set of tokens whose probability reaches top_p
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative - sorted_logits.softmax(dim=-1) >= top_p  # keep the token that crosses top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(dim=-1), num_samples=1, generator=generator)


STATIC_KERNELS = ("sdpa", "naive")  # the kernels that take a mask at explicit query positions


class DecodingStep(Protocol):
    """A fast path for cached decoding: logits (B, V) after `feed`, written into `caches` from position `start`
    (CompiledDecoding here; PackagedDecoding in minitx.packaged_decoding)."""

    def __call__(self, feed: Tensor, caches: list[KVCache], start: int, pad: Tensor | None = None) -> Tensor: ...


def eager_prefill(model: GPT, feed: Tensor, caches: list[KVCache], start: int, pad: Tensor | None) -> Tensor:
    """A fast step's prefill (the prompt, a cache refill): run eagerly into its static caches, at explicit positions
    from `start`."""
    return model.next_token_logits(feed, caches, torch.arange(start, start + feed.size(1), device=feed.device), pad)


class CompiledDecoding:
    """The one-token step of cached decoding, compiled once (torch.compile): its position is a tensor on the device
    and the caches are written in place and attended whole, masked past that position, so every step has the same
    shapes and nothing recompiles. Prefills (the prompt, a cache refill) run eagerly into the same caches."""

    def __init__(self, model: GPT):
        self.model = model
        self.position = torch.zeros(1, dtype=torch.long, device=next(model.parameters()).device)
        self.step = torch.compile(model.next_token_logits, dynamic=False)

    def __call__(self, feed: Tensor, caches: list[KVCache], start: int, pad: Tensor | None = None) -> Tensor:
        if feed.size(1) > 1:
            return eager_prefill(self.model, feed, caches, start, pad)
        self.position.fill_(start)
        return self.step(feed, caches, self.position, pad)


def generate(model: GPT, prompt: list[int], max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float = 1.0, generator: torch.Generator | None = None,
             use_cache: bool = True, compiled: DecodingStep | None = None) -> Iterator[int]:
    """Yield new token ids one at a time; `compiled` decodes each token with that compiled step.

    Past `block_size` the context is cropped: without a cache to the last `block_size` tokens each step
    (as nanoGPT does); with the cache, once it is full it is refilled from the last 3/4 of a block, so the
    per-token cost stays one position except for one prefill every block_size/4 tokens.
    """
    # a compiled step cannot take tensors made under inference_mode (the caches): no_grad there. As a decorator, the
    # mode is on only while the generator runs, not in the caller's code between tokens.
    mode = torch.inference_mode() if compiled is None else torch.no_grad()
    return mode(_generate)(model, prompt, max_new_tokens, temperature, top_k, top_p, generator, use_cache, compiled)


def _generate(model: GPT, prompt: list[int], max_new_tokens: int, temperature: float, top_k: int | None,
              top_p: float, generator: torch.Generator | None, use_cache: bool,
              compiled: DecodingStep | None) -> Iterator[int]:
    block = model.config.block_size
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    tokens = torch.tensor([prompt], dtype=torch.long, device=device)  # (1, T)
    if not use_cache:
        for _ in range(max_new_tokens):
            logits = model.next_token_logits(tokens[:, -block:])
            nxt = sample_next(logits, temperature, top_k, top_p, generator)
            tokens = torch.cat([tokens, nxt], dim=1)
            yield int(nxt)
        return
    keep = max(1, block * 3 // 4)
    caches = model.new_caches(1, device, dtype)
    feed = tokens[:, -block:]  # what goes through the model this step; the cache holds the rest
    context = tokens[:, -block:]  # everything the cache will hold, kept to refill it
    held = 0  # positions the caches hold
    for _ in range(max_new_tokens):
        logits = model.next_token_logits(feed, caches) if compiled is None else compiled(feed, caches, held)
        held += feed.size(1)
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        yield int(nxt)
        context = torch.cat([context[:, -(block - 1):], nxt], dim=1)
        if held < block:
            feed = nxt
        else:  # full: start over from the most recent tokens
            for cache in caches:
                cache.length = 0
            held = 0
            feed = context[:, -keep:]


def generate_batch(model: GPT, prompts: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
                   top_k: int | None = None, top_p: float = 1.0, generator: torch.Generator | None = None,
                   stop_ids: Collection[int] = (), should_stop: Callable[[int, int], bool] | None = None,
                   compiled: DecodingStep | None = None) -> list[list[int]]:
    """The new tokens of every prompt, decoded together: one batch through the model per step.

    Prompts of different lengths are padded on the left; each row's positions count from its first real token
    and its padding is hidden from attention, so a greedy row gets the tokens it gets decoded alone by
    `generate` (within block_size: past it the rows' caches are refilled together, at the longest row's pace).
    A row ends at a token in `stop_ids` (left out) or once should_stop(row, token) is true (that token kept), and
    leaves the batch (a compiled step keeps one batch size: there it rides along); decoding ends when all have.
    """
    if not prompts or not all(prompts):
        raise ValueError("generate_batch takes one or more prompts of one or more tokens each")
    mode = torch.inference_mode() if compiled is None else torch.no_grad()
    with mode:
        return _generate_batch(model, prompts, max_new_tokens, temperature, top_k, top_p, generator, stop_ids,
                               should_stop, compiled)


def left_padded(rows: list[list[int]], device: torch.device) -> tuple[Tensor, Tensor | None]:
    """Token rows as one (B, T) batch padded on the left, and each row's padding (None when there is none)."""
    width = max(len(row) for row in rows)
    pad = [width - len(row) for row in rows]
    tokens = torch.tensor([[0] * p + row for p, row in zip(pad, rows, strict=True)], device=device)
    return tokens, torch.tensor(pad, device=device) if any(pad) else None


def _generate_batch(model: GPT, prompts: list[list[int]], max_new_tokens: int, temperature: float,
                    top_k: int | None, top_p: float, generator: torch.Generator | None, stop_ids: Collection[int],
                    should_stop: Callable[[int, int], bool] | None,
                    compiled: DecodingStep | None) -> list[list[int]]:
    block = model.config.block_size
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    keep = max(1, block * 3 // 4)
    contexts = [deque(prompt[-block:], maxlen=block) for prompt in prompts]  # what each row's cache holds, to refill
    new: list[list[int]] = [[] for _ in prompts]
    ended = [False] * len(prompts)
    caches = model.new_caches(len(prompts), device, dtype)
    feed, pad = left_padded([list(c) for c in contexts], device)
    held = 0  # cache slots in use, the same for every row
    rows = list(range(len(prompts)))  # the prompt each row of the batch decodes
    for _ in range(max_new_tokens):
        logits = (model.next_token_logits(feed, caches, pad=pad) if compiled is None
                  else compiled(feed, caches, held, pad))
        held += feed.size(1)
        nxt = sample_next(logits, temperature, top_k, top_p, generator)  # (B, 1)
        for row, token in zip(rows, nxt[:, 0].tolist(), strict=True):
            contexts[row].append(token)
            if ended[row]:  # an ended row rides along in a compiled step (one batch size): its tokens are dropped
                continue
            if token in stop_ids:
                ended[row] = True
                continue
            new[row].append(token)
            ended[row] = should_stop is not None and should_stop(row, token)
        if all(ended):
            break
        live = [i for i, row in enumerate(rows) if not ended[row]]
        if compiled is None and len(live) < len(rows):  # eager: ended rows leave the batch and its caches
            index = torch.tensor(live, device=device)
            for cache in caches:
                cache.k, cache.v = cache.k[index], cache.v[index]
            nxt, pad = nxt[index], None if pad is None else pad[index]
            rows = [rows[i] for i in live]
        if held < block:
            feed = nxt
        else:  # full: start every row over from its most recent tokens
            for cache in caches:
                cache.length = 0
            held = 0
            feed, pad = left_padded([list(contexts[row])[-keep:] for row in rows], device)
    return new


@torch.inference_mode()
def fill_mask(model: Encoder, tokenizer: Tokenizer, text: str, top: int = 5) -> list[list[tuple[str, float]]]:
    """For each [MASK] in `text`, the `top` most likely tokens with their probabilities."""
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    positions = [i for i, t in enumerate(ids) if t == tokenizer.token_to_id(MASK)]
    if not positions:
        raise ConfigError(f"prompt={text!r}: a masked-LM checkpoint fills [MASK] tokens; put at least one in it")
    if len(ids) > model.config.block_size:
        raise ConfigError(f"prompt={text[:40]!r}...: {len(ids)} tokens, more than model.block_size="
                          f"{model.config.block_size}")
    device = next(model.parameters()).device
    hidden = model(torch.tensor([ids], device=device))
    best = model.mlm_logits(hidden[0, positions]).softmax(dim=-1).topk(top, dim=-1)
    return [[(tokenizer.decode([int(i)]), float(p)) for p, i in zip(ps, ix, strict=True)]
            for ps, ix in zip(best.values, best.indices, strict=True)]


@torch.inference_mode()
def classify(model: Encoder, tokenizer: Tokenizer, text: str, labels: list[str]) -> list[tuple[str, float]]:
    """Label probabilities for `text`, most likely first."""
    ids = [tokenizer.token_to_id(CLS), *tokenizer.encode(text, add_special_tokens=False).ids][: model.config.block_size]
    device = next(model.parameters()).device
    hidden = model(torch.tensor([ids], device=device))
    probs = model.class_logits(hidden)[0].softmax(dim=-1)
    return sorted(zip(labels, probs.tolist(), strict=True), key=lambda pair: -pair[1])


def show_fills(model: Encoder, tokenizer: Tokenizer, text: str, top: int = 5, out: TextIO | None = None) -> None:
    """One line per [MASK] in `text`: its `top` most likely fills with their probabilities."""
    for n, candidates in enumerate(fill_mask(model, tokenizer, text, top), start=1):
        shown = "  ".join(f"{token!r} {p:.3f}" for token, p in candidates)
        print(f"[MASK] {n}: {shown}", file=out or sys.stdout, flush=True)


def show_labels(model: Encoder, tokenizer: Tokenizer, text: str, labels: list[str], out: TextIO | None = None) -> None:
    """One line per label, most likely first: `label<TAB>probability`."""
    for label, p in classify(model, tokenizer, text, labels):
        print(f"{label}\t{p:.4f}", file=out or sys.stdout, flush=True)
