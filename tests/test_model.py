"""The GPT: causal, tied, initialised as GPT-2, validated at construction."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from minitx.config import ConfigError, ModelConfig
from minitx.model import GPT


@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
@pytest.mark.parametrize("kernel", ["naive", "sdpa"])
def test_causal_mask_hides_the_future(small_config: ModelConfig, kernel: str, pos_emb: str) -> None:
    """Changing token t changes no logit at positions before t, and does change t's own."""
    model = GPT(dataclasses.replace(small_config, pos_emb=pos_emb)).eval()
    model.transformer.set_attention(kernel)
    idx = torch.randint(0, 50, (1, 32), generator=torch.Generator().manual_seed(1))
    changed = idx.clone()
    t = 17
    changed[0, t] = (idx[0, t] + 1) % 50
    a, _ = model(idx)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :t], b[:, :t], atol=0, rtol=0)
    assert not torch.allclose(a[:, t], b[:, t])


@pytest.mark.parametrize("qk_norm", [False, True])
def test_naive_and_sdpa_models_agree(small_config: ModelConfig, qk_norm: bool) -> None:
    model = GPT(dataclasses.replace(small_config, qk_norm=qk_norm))
    idx = torch.randint(0, 50, (3, 32), generator=torch.Generator().manual_seed(2))
    results = {}
    for kernel in ("naive", "sdpa"):
        model.transformer.set_attention(kernel)
        model.zero_grad()
        logits, loss = model(idx, idx)
        loss.backward()
        results[kernel] = (logits.detach(), [p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(results["sdpa"][0], results["naive"][0], atol=1e-5, rtol=1e-5)
    for g, g_ref in zip(results["sdpa"][1], results["naive"][1], strict=True):
        torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-4)


def test_initial_loss_is_uniform_and_head_is_tied(small_config: ModelConfig) -> None:
    model = GPT(small_config)
    g = torch.Generator().manual_seed(3)
    idx, targets = torch.randint(0, 50, (2, 8, 32), generator=g)
    _, loss = model(idx, targets)
    assert abs(loss.item() - math.log(50)) < 0.1  # N(0, 0.02) init predicts nearly uniformly
    assert model.lm_head.weight is model.transformer.tok_emb.weight
    std = model.transformer.blocks[0].attn.proj.weight.std().item()
    assert abs(std - 0.02 / math.sqrt(2 * small_config.n_layer)) < 0.003


def test_rotary_attention_depends_only_on_relative_position() -> None:
    """With rope, q·k between positions i and j depends on i - j: shifting both leaves the score unchanged."""
    from minitx.attention import apply_rotary, rotary_tables

    rotations = rotary_tables(8, 64)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 1, 1, 1, 8, generator=g)

    def score(i: int, j: int) -> float:
        q_i = apply_rotary(q, rotations[i : i + 1])
        k_j = apply_rotary(k, rotations[j : j + 1])
        return float((q_i * k_j).sum())

    assert score(5, 2) == pytest.approx(score(40, 37), abs=1e-5)
    assert score(5, 2) != pytest.approx(score(5, 3), abs=1e-3)


def test_rmsnorm_and_rope_options_build_and_train(small_config: ModelConfig) -> None:
    model = GPT(dataclasses.replace(small_config, pos_emb="rope", norm="rmsnorm"))
    assert model.transformer.pos_emb is None
    assert isinstance(model.transformer.ln_f, torch.nn.RMSNorm)
    assert "transformer.rope" not in model.state_dict()  # derived tables are not saved
    idx = torch.randint(0, 50, (4, 32), generator=torch.Generator().manual_seed(4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        _, loss = model(idx, idx.roll(-1, dims=1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_longer_than_block_size_is_refused(small_config: ModelConfig) -> None:
    with pytest.raises(ValueError, match="block_size=32"):
        GPT(small_config)(torch.zeros(1, 33, dtype=torch.long))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"n_embd": 130, "n_head": 4}, "model.n_embd=130 is not divisible by model.n_head=4"),
        ({"attention": "nope"}, "model.attention='nope': unknown kernel"),
        ({"n_layer": 0}, "model.n_layer=0: must be > 0"),
        ({"block_size": -1}, "model.block_size=-1: must be > 0"),
        ({"dropout": 1.5}, "model.dropout=1.5"),
        ({"pos_emb": "alibi"}, "model.pos_emb='alibi': choose learned or rope"),
        ({"norm": "batchnorm"}, "model.norm='batchnorm': choose layernorm or rmsnorm"),
        ({"pos_emb": "rope", "n_embd": 12, "n_head": 4}, "model.n_embd=12: rope needs an even head size"),
    ],
)
def test_bad_model_config_names_the_key(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        ModelConfig(**changes).validate()
    assert message in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kernel", ["naive", "sdpa"])
def test_document_mask_isolates_packed_documents(small_config: ModelConfig, kernel: str) -> None:
    """With doc_ids, changing a token of the first document changes no logit of the second."""
    model = GPT(small_config).eval()
    model.transformer.set_attention(kernel)
    g = torch.Generator().manual_seed(5)
    idx = torch.randint(2, 50, (1, 32), generator=g)
    idx[0, 12] = 0  # <|endoftext|> opens document 1 at position 12
    doc_ids = (idx == 0).cumsum(dim=1)
    changed = idx.clone()
    changed[0, 3] = (idx[0, 3] + 1) % 50
    a, _ = model(idx, doc_ids=doc_ids)
    b, _ = model(changed, doc_ids=doc_ids)
    torch.testing.assert_close(a[:, 12:], b[:, 12:], atol=1e-6, rtol=0)
    c, _ = model(changed)  # without the mask, the change leaks forward
    assert not torch.allclose(a[:, 12:], c[:, 12:])
