"""Multi-head self-attention, written out, with a switchable attention kernel.

The module does the projections and the head bookkeeping; a kernel computes softmax(QKᵀ/√d_k)V.
Kernels live in one registry, `KERNELS`, and all take the same arguments, so `model.attention=<name>`
swaps them without touching the model.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# kernel(q, k, v, causal, dropout_p) -> (B, H, T_q, D); q is (B, H, T_q, D), k and v are (B, H, T_k, D), T_k >= T_q.
# With T_k > T_q (decoding with a KV cache) the queries are the last T_q positions of the sequence.
AttentionKernel = Callable[[Tensor, Tensor, Tensor, bool, float], Tensor]
KERNELS: dict[str, AttentionKernel] = {}


def register_kernel(name: str) -> Callable[[AttentionKernel], AttentionKernel]:
    def add(kernel: AttentionKernel) -> AttentionKernel:
        KERNELS[name] = kernel
        return kernel

    return add


def causal_mask(t_q: int, t_k: int, device: torch.device) -> Tensor:
    """(T_q, T_k) booleans, True where query i (at position T_k - T_q + i) may attend to key j."""
    return torch.ones(t_q, t_k, dtype=torch.bool, device=device).tril(diagonal=t_k - t_q)


@register_kernel("naive")
def naive_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool, dropout_p: float) -> Tensor:
    """The explicit math, in float32 whatever the input dtype: the reference other kernels are checked against."""
    scale = 1.0 / math.sqrt(q.size(-1))
    att = (q.float() @ k.float().transpose(-2, -1)) * scale  # (B, H, T_q, T_k)
    if causal:
        att = att.masked_fill(~causal_mask(q.size(-2), k.size(-2), q.device), float("-inf"))
    att = att.softmax(dim=-1)
    if dropout_p > 0.0:
        att = F.dropout(att, p=dropout_p)
    return (att @ v.float()).to(q.dtype)  # (B, H, T_q, D)


@register_kernel("sdpa")
def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool, dropout_p: float) -> Tensor:
    """PyTorch's fused kernels (flash / memory-efficient / math, chosen by PyTorch)."""
    t_q, t_k = q.size(-2), k.size(-2)
    if not causal or t_q == 1:  # one new query may see every cached key
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    if t_q == t_k:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    # is_causal aligns the mask top-left; a chunk of queries after a cache needs it bottom-right
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(t_q, t_k, q.device), dropout_p=dropout_p)


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
        self.k = torch.zeros(batch, n_head, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.length = 0

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store the new positions' keys and values; return all of them so far."""
        end = self.length + k.size(2)
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class MultiHeadSelfAttention(nn.Module):
    """Q, K, V from one fused projection, split into heads, attend, merge heads, project out."""

    def __init__(self, n_embd: int, n_head: int, attention: str = "sdpa", causal: bool = True,
                 dropout: float = 0.0, bias: bool = False):
        super().__init__()
        assert n_embd % n_head == 0, "validated in ModelConfig"
        self.n_head = n_head
        self.head_dim = n_embd // n_head
        self.attention = attention  # a key of KERNELS; may be switched on a built model
        self.causal = causal
        self.dropout = dropout
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, cache: KVCache | None = None, rope: Tensor | None = None) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        if rope is not None:  # rotary positions: keys are cached already rotated
            q, k = apply_rotary(q, rope), apply_rotary(k, rope)
        if cache is not None:
            k, v = cache.append(k, v)  # (B, H, T_cached + T, D)
        kernel = KERNELS[self.attention]
        y = kernel(q, k, v, self.causal, self.dropout if self.training else 0.0)  # (B, H, T, D)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # merge heads
        return self.resid_dropout(self.proj(y))
