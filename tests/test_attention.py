"""The attention kernels compute the same thing, and the KV cache changes nothing."""

from __future__ import annotations

import pytest
import torch

from minitx.attention import KERNELS, KVCache, MultiHeadSelfAttention, naive_attention


def qkv(B: int = 2, H: int = 4, T: int = 24, D: int = 16, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, T, D, generator=g, requires_grad=True) for _ in range(3))


@pytest.mark.parametrize("causal", [True, False])
def test_sdpa_matches_naive_outputs_and_gradients(causal: bool) -> None:
    q, k, v = qkv()
    out_ref = naive_attention(q, k, v, causal, 0.0)
    grads_ref = torch.autograd.grad(out_ref.pow(2).sum(), (q, k, v))
    out = KERNELS["sdpa"](q, k, v, causal, 0.0)
    grads = torch.autograd.grad(out.pow(2).sum(), (q, k, v))
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, atol=1e-4, rtol=1e-4)


def test_naive_is_the_formula() -> None:
    """softmax(QKᵀ/√d)V with -inf above the diagonal, computed here one query at a time."""
    q, k, v = (t.detach() for t in qkv(B=1, H=1, T=5, D=8))
    out = naive_attention(q, k, v, True, 0.0)
    for i in range(5):
        scores = q[0, 0, i] @ k[0, 0, : i + 1].T / 8**0.5
        expected = scores.softmax(-1) @ v[0, 0, : i + 1]
        torch.testing.assert_close(out[0, 0, i], expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_kernels_with_queries_after_a_cache(kernel: str) -> None:
    """Queries for the last positions against all keys (the bottom-right causal mask) equal the full result."""
    q, k, v = (t.detach() for t in qkv())
    full = naive_attention(q, k, v, True, 0.0)
    for t_q in (1, 5):
        part = KERNELS[kernel](q[:, :, -t_q:], k, v, True, 0.0)
        torch.testing.assert_close(part, full[:, :, -t_q:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_module_with_kv_cache_equals_full_forward(kernel: str) -> None:
    torch.manual_seed(0)
    attn = MultiHeadSelfAttention(32, 4, kernel).eval()
    x = torch.randn(2, 20, 32)
    full = attn(x)
    cache = KVCache(2, 4, 20, 8, x.device, x.dtype)
    chunks = [attn(x[:, :7], cache)] + [attn(x[:, t : t + 1], cache) for t in range(7, 20)]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=1e-5)


def test_naive_computes_in_float32_under_bfloat16() -> None:
    q, k, v = (t.detach() for t in qkv())
    out16 = naive_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), True, 0.0)
    assert out16.dtype == torch.bfloat16
    ref = naive_attention(q.bfloat16().float(), k.bfloat16().float(), v.bfloat16().float(), True, 0.0)
    torch.testing.assert_close(out16.float(), ref, atol=1e-2, rtol=1e-2)
