"""Multi-head self-attention, written out, with a switchable attention kernel.

The module does the projections and the head bookkeeping; a kernel computes softmax(QKᵀ/√d_k)V.
Kernels live in one registry, `KERNELS`, and all take the same arguments, so `model.attention=<name>`
swaps them without touching the model.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel


@dataclass(frozen=True)
class AttentionMask:
    """Which keys each query may see, in a form every kernel understands.

    Positions are those of the keys; the T_q queries are the last T_q of them (decoding with a KV cache), or
    at `query_positions` (a static cache: the keys are the whole buffer, written up to those positions).
    A query always sees itself, so no row is empty (a padded query's output is meaningless but finite).
    """

    causal: bool = True
    key_padding: Tensor | None = None  # (B, T_k) bool, True for real tokens
    doc_ids: Tensor | None = None  # (B, T_k) int: attend only within the same document (packed sequences)
    window: int = 0  # sliding window: a query sees the `window` most recent positions, itself included (0 = all)
    query_positions: Tensor | None = None  # (T_q,) long; None: the last T_q key positions

    @property
    def is_plain(self) -> bool:
        """Only causal or nothing: the case fused kernels take without an explicit mask."""
        return (self.key_padding is None and self.doc_ids is None and self.window == 0
                and self.query_positions is None)

    def allows(self, q_pos: Tensor, k_pos: Tensor, b: Tensor | int = 0) -> Tensor:
        """Whether query position q_pos may see key position k_pos (broadcasting; b indexes the batch)."""
        ok = q_pos == k_pos  # itself, always
        seen = torch.ones_like(ok)
        if self.causal:
            seen = seen & (k_pos <= q_pos)
        if self.window:
            seen = seen & (q_pos - k_pos < self.window) & (k_pos - q_pos < self.window)
        if self.doc_ids is not None:
            seen = seen & (self.doc_ids[b, q_pos] == self.doc_ids[b, k_pos])
        if self.key_padding is not None:
            seen = seen & self.key_padding[b, k_pos]
        return ok | seen

    def dense(self, t_q: int, t_k: int, device: torch.device) -> Tensor:
        """(B or 1, 1, T_q, T_k) booleans, True where attention is allowed."""
        q_pos = (torch.arange(t_k - t_q, t_k, device=device) if self.query_positions is None
                 else self.query_positions)[:, None]
        k_pos = torch.arange(t_k, device=device)[None, :]
        if self.doc_ids is None and self.key_padding is None:
            return self.allows(q_pos, k_pos)[None, None]
        batch = (self.doc_ids if self.doc_ids is not None else self.key_padding).size(0)  # type: ignore[union-attr]
        b = torch.arange(batch, device=device)[:, None, None]
        return self.allows(q_pos[None], k_pos[None], b)[:, None]


CAUSAL = AttentionMask(causal=True)

# kernel(q, k, v, mask, dropout_p) -> (B, H, T_q, D); q is (B, H, T_q, D), k and v are (B, H, T_k, D), T_k >= T_q.
AttentionKernel = Callable[[Tensor, Tensor, Tensor, AttentionMask, float], Tensor]
KERNELS: dict[str, AttentionKernel] = {}


def register_kernel(name: str) -> Callable[[AttentionKernel], AttentionKernel]:
    def add(kernel: AttentionKernel) -> AttentionKernel:
        KERNELS[name] = kernel
        return kernel

    return add


@register_kernel("naive")
def naive_attention(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, dropout_p: float) -> Tensor:
    """The explicit math, in float32 whatever the input dtype: the reference other kernels are checked against."""
    scale = 1.0 / math.sqrt(q.size(-1))
    att = (q.float() @ k.float().transpose(-2, -1)) * scale  # (B, H, T_q, T_k)
    if mask.causal or not mask.is_plain:
        att = att.masked_fill(~mask.dense(q.size(-2), k.size(-2), q.device), float("-inf"))
    att = att.softmax(dim=-1)
    if dropout_p > 0.0:
        att = F.dropout(att, p=dropout_p)
    return (att @ v.float()).to(q.dtype)  # (B, H, T_q, D)


SDPA_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
}


@register_kernel("sdpa")
def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, dropout_p: float) -> Tensor:
    """PyTorch's fused kernels; which one is PyTorch's choice, or model.sdpa_backend's (see MultiHeadSelfAttention)."""
    t_q, t_k = q.size(-2), k.size(-2)
    if mask.is_plain and (not mask.causal or t_q == 1):  # one new query may see every cached key
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    if mask.is_plain and t_q == t_k:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    # is_causal aligns the mask top-left; queries after a cache, padding, documents and windows need it explicit
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense(t_q, t_k, q.device), dropout_p=dropout_p)


_block_masks: dict[tuple, object] = {}


def flex_block_mask(mask: AttentionMask, batch: int, t_q: int, t_k: int, device: torch.device) -> object:
    """flex_attention's block mask for `mask`; masks that depend only on the shape are built once and cached."""
    from torch.nn.attention.flex_attention import create_block_mask

    offset = t_k - t_q

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return mask.allows(q_idx + offset, kv_idx, b)

    data_dependent = mask.doc_ids is not None or mask.key_padding is not None
    key = (mask.causal, mask.window, t_q, t_k, str(device))
    if data_dependent:
        return create_block_mask(mask_mod, batch, None, t_q, t_k, device=str(device))
    if key not in _block_masks:
        _block_masks[key] = create_block_mask(mask_mod, None, None, t_q, t_k, device=str(device))
    return _block_masks[key]


@lru_cache(maxsize=1)
def _compiled_flex() -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, compiled: bool) -> Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    if mask.query_positions is not None:
        raise ValueError("the flex kernel takes queries at the end of the keys only (no static-cache decoding)")
    block_mask = flex_block_mask(mask, q.size(0), q.size(-2), k.size(-2), q.device)
    if compiled:  # one memory layout per shape: the graph the self-check ran is the one every call runs
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    fn = _compiled_flex() if compiled else flex_attention
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        return fn(q, k, v, block_mask=block_mask)


@register_kernel("flex")
def flex_attention_kernel(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, dropout_p: float) -> Tensor:
    """torch's flex_attention with a block mask, compiled: fused and sparse over masked blocks.
    No dropout on attention weights; on CPU (torch 2.13) forward only."""
    # a decoding step (one query) is cheap unfused, and its growing key length would recompile at every token
    return _flex(q, k, v, mask, compiled=q.size(-2) > 1)


@register_kernel("flex_eager")
def flex_eager_kernel(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, dropout_p: float) -> Tensor:
    """flex_attention without torch.compile: slow, unfused, and what `flex` falls back to where its compiled code
    fails the self-check (minitx.kernel_check)."""
    return _flex(q, k, v, mask, compiled=False)


@register_kernel("flash")
def flash_attention_kernel(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, dropout_p: float) -> Tensor:
    """The flash-attn package (CUDA, fp16/bf16). Causal and sliding windows; no padding or document masks here."""
    from flash_attn import flash_attn_func

    if not (mask.key_padding is None and mask.doc_ids is None and mask.query_positions is None):
        raise ValueError("the flash kernel takes causal and window masks only")
    window = (mask.window - 1, 0 if mask.causal else mask.window - 1) if mask.window else (-1, -1)
    # flash-attn wants (B, T, H, D); with T_q < T_k its causal mask is aligned bottom-right, as a KV cache needs
    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p,
                          causal=mask.causal, window_size=window)
    return out.transpose(1, 2)


def kernel_unavailable(name: str, device: str, training: bool, masks: set[str] | None = None) -> str | None:
    """Why kernel `name` cannot run here (None if it can). masks: the mask kinds the run needs
    (padding, document, window)."""
    masks = masks or set()
    if name == "flash":
        if importlib.util.find_spec("flash_attn") is None:
            return "the flash-attn package is not installed (pip install flash-attn; CUDA GPUs only)"
        if device != "cuda":
            return "flash-attn runs on CUDA GPUs only"
        if masks & {"padding", "document"}:
            return "flash-attn's dense kernel takes no padding or document masks"
    if name in ("flex", "flex_eager"):
        if not hasattr(torch.nn.attention, "flex_attention") and importlib.util.find_spec(
                "torch.nn.attention.flex_attention") is None:
            return "this torch has no flex_attention"
        if training and device == "cpu":
            return "flex_attention has no backward on CPU (torch 2.13): use it for evaluation and sampling"
    return None


def resolve_kernel(name: str, device: str, training: bool, masks: set[str] | None = None) -> tuple[str, str]:
    """The kernel to run and why: `auto` picks flash, then sdpa; others are checked and kept, or refused."""
    if name == "auto":
        reason = kernel_unavailable("flash", device, training, masks)
        if reason is None:
            return "flash", "flash-attn is available"
        return "sdpa", f"not flash: {reason}"
    reason = kernel_unavailable(name, device, training, masks)
    if reason is not None:
        working = [k for k in sorted(KERNELS) if kernel_unavailable(k, device, training, masks) is None]
        raise ValueError(f"{reason}; kernels that work here: {working}")
    return name, "as configured"


def attend(kernel: str, q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, dropout_p: float = 0.0,
           sdpa_backend: str = "auto") -> Tensor:
    """softmax(QKᵀ/√d_k)V by kernel `kernel`: (B, H, T_q, D). With sdpa, `sdpa_backend` forces PyTorch's choice."""
    backend = (sdpa_kernel(SDPA_BACKENDS[sdpa_backend])
               if kernel == "sdpa" and sdpa_backend != "auto" else contextlib.nullcontext())
    with backend:
        return KERNELS[kernel](q, k, v, mask, dropout_p)


def rotary_tables(head_dim: int, max_len: int, base: float = 10000.0) -> Tensor:
    """e^(i·p·θ_j) as complex numbers (max_len, head_dim/2): pair j of position p turns by angle p·base^(-2j/d)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rotary(x: Tensor, rotations: Tensor) -> Tensor:
    """Rotate (B, H, T, D) queries or keys by their positions' angles: consecutive pairs of the head dimension
    taken as complex numbers, one complex multiply (rotations: (T, D/2))."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (B, H, T, D/2)
    return torch.view_as_real(pairs * rotations).flatten(-2).type_as(x)


class KVCache:
    """Keys and values of one layer, preallocated to `max_len` so decoding never reallocates."""

    def __init__(self, batch: int, n_head: int, max_len: int, head_dim: int, device: torch.device, dtype: torch.dtype):
        # one slot more than is ever used: a step's first `span` slots are then never the whole buffer, so a compiled
        # step has one memory layout for every span (a whole-buffer slice would be contiguous, a case of its own)
        self.k = torch.zeros(batch, n_head, max_len + 1, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.length = 0
        self.span = max_len  # the slots a static-cache step attends (see write); <= max_len

    @classmethod
    def over(cls, k: Tensor, v: Tensor, span: int) -> KVCache:
        """A cache over existing buffers (a compiled step's inputs), attending their first `span` slots."""
        cache = cls.__new__(cls)
        cache.k, cache.v, cache.length, cache.span = k, v, 0, span
        return cache

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store the new positions' keys and values; return all of them so far."""
        end = self.length + k.size(2)
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def write(self, positions: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store keys and values at `positions` (the caller keeps count, on the device) and return the first `span`
        slots: shapes a compiled step can fix (span = max_len) or take as one dynamic size (the positions so far,
        no more keys read than are written)."""
        self.k.index_copy_(2, positions, k)
        self.v.index_copy_(2, positions, v)
        return self.k[:, :, : self.span], self.v[:, :, : self.span]


class MultiHeadSelfAttention(nn.Module):
    """Q, K, V from one fused projection, split into heads, attend, merge heads, project out. With qk_norm, each
    head's queries and keys are RMS-normalised first (Dehghani et al. 2023; modded-nanogpt): attention logits stay
    bounded whatever the projections' scale, so higher learning rates stay stable."""

    def __init__(self, n_embd: int, n_head: int, attention: str = "sdpa", dropout: float = 0.0, bias: bool = False,
                 sdpa_backend: str = "auto", qk_norm: bool = False):
        super().__init__()
        assert n_embd % n_head == 0, "validated in ModelConfig"
        self.n_head = n_head
        self.head_dim = n_embd // n_head
        self.attention = attention  # a key of KERNELS; may be switched on a built model
        self.sdpa_backend = sdpa_backend  # auto, or a key of SDPA_BACKENDS
        self.dropout = dropout
        self.q_norm = nn.RMSNorm(self.head_dim) if qk_norm else None
        self.k_norm = nn.RMSNorm(self.head_dim) if qk_norm else None
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: AttentionMask = CAUSAL, cache: KVCache | None = None,
                rope: Tensor | None = None) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:  # rotary positions: keys are cached already rotated
            q, k = apply_rotary(q, rope), apply_rotary(k, rope)
        if cache is not None:  # (B, H, T_cached + T, D), or the whole buffer
            k, v = cache.append(k, v) if mask.query_positions is None else cache.write(mask.query_positions, k, v)
        y = attend(self.attention, q, k, v, mask, self.dropout if self.training else 0.0, self.sdpa_backend)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # merge heads
        return self.resid_dropout(self.proj(y))
