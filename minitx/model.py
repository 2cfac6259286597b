"""The transformer: a pre-LayerNorm block stacked into a trunk, and the decoder-only GPT on top of it.

The trunk is shared by every model head; a GPT is the trunk with a causal mask and an LM head (tied to the token
embedding unless model.tie_embeddings=false).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minitx.attention import AttentionMask, KVCache, MultiHeadSelfAttention, rotary_tables
from minitx.config import ModelConfig


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd)
    return nn.LayerNorm(config.n_embd, bias=config.bias)


def relu2(x: Tensor) -> Tensor:
    """ReLU squared (So et al., Primer, 2021): as good as GELU for LMs and far cheaper on a CPU."""
    return F.relu(x).square()


def gelu_tanh(x: Tensor) -> Tensor:
    """GELU's tanh approximation, as GPT-2 was trained with (transformers' gelu_new)."""
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {"gelu": F.gelu, "gelu_tanh": gelu_tanh, "relu2": relu2}


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.act = ACTIVATIONS[config.activation]
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.proj(self.act(self.fc(x))))


class Block(nn.Module):
    """x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = MultiHeadSelfAttention(
            config.n_embd, config.n_head, config.attention, config.dropout, config.bias, config.sdpa_backend,
            config.qk_norm,
        )
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, mask: AttentionMask, cache: KVCache | None = None,
                rope: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.ln_1(x), mask, cache, rope)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """Token embeddings + positions (a learned table, or rotary in every attention), N blocks, final norm:
    tokens (B, T) -> hidden states (B, T, C)."""

    def __init__(self, config: ModelConfig, causal: bool):
        super().__init__()
        self.config = config
        self.causal = causal  # the one thing that makes a decoder's trunk differ from an encoder's
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_emb = nn.Embedding(config.block_size, config.n_embd) if config.pos_emb == "learned" else None
        if config.pos_emb == "rope":
            rotations = rotary_tables(config.n_embd // config.n_head, config.block_size, config.rope_base)
            self.register_buffer("rope", rotations, persistent=False)  # derived: not saved in checkpoints
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = make_norm(config)

    def forward(self, idx: Tensor, caches: list[KVCache] | None = None, key_padding: Tensor | None = None,
                doc_ids: Tensor | None = None, positions: Tensor | None = None, pad: Tensor | None = None) -> Tensor:
        """key_padding (B, T): True for real tokens; doc_ids (B, T): attend within documents only; positions (T,):
        where idx goes in the caches, kept by the caller (a compiled decoding step); default: after what they hold.
        pad (B,): left padding of each row (batched decoding): row b's slot t holds position t - pad[b], and its
        first pad[b] slots are hidden from every query, so a row sees what it would see decoded alone."""
        T = idx.size(1)
        if positions is None:
            start = caches[0].length if caches else 0
            if start + T > self.config.block_size:
                raise ValueError(f"sequence of {start + T} tokens exceeds model.block_size={self.config.block_size}")
            at = torch.arange(start, start + T, device=idx.device)
        else:
            at = positions
        if pad is not None:
            key_padding = torch.arange(self.config.block_size, device=idx.device) >= pad[:, None]  # (B, block)
            at = (at - pad[:, None]).clamp(min=0)  # (B, T); padding sits at 0, seen by no real token
        x = self.tok_emb(idx)  # (B, T, C)
        rope = None
        if self.pos_emb is not None:
            x = x + self.pos_emb(at)
        else:
            rope = self.rope[at] if pad is None else self.rope[at][:, None]  # per row: (B, 1, T, D/2) over heads
        x = self.drop(x)
        mask = AttentionMask(self.causal, key_padding, doc_ids, self.config.attention_window, positions)
        for i, block in enumerate(self.blocks):
            x = block(x, mask, caches[i] if caches else None, rope)
        return self.ln_f(x)

    def set_attention(self, kernel: str, sdpa_backend: str = "auto") -> None:
        """Switch every layer to another kernel of minitx.attention.KERNELS."""
        for block in self.blocks:
            block.attn.attention = kernel
            block.attn.sdpa_backend = sdpa_backend


def count_params(model: nn.Module, non_embedding: bool = True) -> int:
    """Parameter count; the position table is left out by default, as in the GPT papers."""
    n = sum(p.numel() for p in model.parameters())
    pos_emb = model.transformer.pos_emb
    return n - pos_emb.weight.numel() if non_embedding and pos_emb is not None else n


def init_weights(model: nn.Module, n_layer: int) -> None:
    """GPT-2 init: N(0, 0.02) weights, zero biases, residual projections scaled by 1/√(2·n_layer)."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
    for name, p in model.named_parameters():
        if name.endswith(("attn.proj.weight", "mlp.proj.weight")):  # the two writes into the residual stream
            nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))


class LMHead(nn.Linear):
    """Hidden states (..., C) -> logits over the vocabulary (..., V); with model.logit_softcap = c, squashed to
    c·tanh(logits/c) (Gemma 2, modded-nanogpt): no logit runs away, which lets a fast optimizer push harder."""

    def __init__(self, config: ModelConfig, embedding: nn.Embedding):
        super().__init__(config.n_embd, config.vocab_size, bias=False)
        self.softcap = config.logit_softcap
        if config.tie_embeddings:
            self.weight = embedding.weight  # weight tying: one matrix reads tokens in and writes them out

    def forward(self, x: Tensor) -> Tensor:
        logits = super().forward(x)
        return self.softcap * torch.tanh(logits / self.softcap) if self.softcap else logits


class GPT(nn.Module):
    """Decoder-only language model: causal trunk + LM head."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.transformer = Transformer(config, causal=True)
        self.lm_head = LMHead(config, self.transformer.tok_emb)
        init_weights(self, config.n_layer)

    def forward(self, idx: Tensor, targets: Tensor | None = None,
                doc_ids: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Logits (B, T, V) for every position; with targets (B, T), also the mean cross-entropy."""
        logits = self.lm_head(self.transformer(idx, doc_ids=doc_ids))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def next_token_logits(self, idx: Tensor, caches: list[KVCache] | None = None,
                          positions: Tensor | None = None, pad: Tensor | None = None) -> Tensor:
        """Logits (B, V) for the position after `idx`; only the last position goes through the LM head.
        pad (B,): left padding per row (see Transformer.forward)."""
        return self.lm_head(self.transformer(idx, caches, positions=positions, pad=pad)[:, -1])

    def new_caches(self, batch: int, device: torch.device, dtype: torch.dtype) -> list[KVCache]:
        c = self.config
        return [KVCache(batch, c.n_head, c.block_size, c.n_embd // c.n_head, device, dtype) for _ in range(c.n_layer)]

    def num_params(self, non_embedding: bool = True) -> int:
        return count_params(self, non_embedding)


class Encoder(nn.Module):
    """Bidirectional model (BERT-style): the same trunk without the causal mask, a masked-LM head, and, for sequence
    classification, a linear head over the pooled hidden states."""

    def __init__(self, config: ModelConfig, n_classes: int = 0, pooling: str = "cls"):
        super().__init__()
        self.config = config
        self.transformer = Transformer(config, causal=False)
        self.lm_head = LMHead(config, self.transformer.tok_emb)
        self.pooling = pooling  # cls: the first position's state; mean: the mean over real tokens
        self.cls_head = nn.Linear(config.n_embd, n_classes) if n_classes else None
        init_weights(self, config.n_layer)

    def forward(self, idx: Tensor, key_padding: Tensor | None = None, doc_ids: Tensor | None = None) -> Tensor:
        """Hidden states (B, T, C); key_padding (B, T) is True for real tokens; doc_ids (B, T): attend within
        documents only."""
        return self.transformer(idx, key_padding=key_padding, doc_ids=doc_ids)

    def num_params(self, non_embedding: bool = True) -> int:
        return count_params(self, non_embedding)

    def mlm_logits(self, hidden: Tensor) -> Tensor:
        return self.lm_head(hidden)

    def class_logits(self, hidden: Tensor, key_padding: Tensor | None = None) -> Tensor:
        assert self.cls_head is not None, "built without classes"
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            weights = (key_padding if key_padding is not None else torch.ones(hidden.shape[:2], dtype=torch.bool,
                                                                                  device=hidden.device)).float()
            pooled = (hidden * weights[..., None]).sum(1) / weights.sum(1, keepdim=True)
        return self.cls_head(pooled)
