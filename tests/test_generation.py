"""Sampling: the KV cache gives what recomputation gives; the knobs do what they say."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from minitx.config import ModelConfig
from minitx.generation import CompiledDecoding, generate, generate_batch, sample_next
from minitx.model import GPT


def trained_ish(config: ModelConfig) -> GPT:
    """Random weights scaled up so greedy decoding is not flat (a fresh init predicts near-uniformly)."""
    model = GPT(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(8)
    return model


@pytest.mark.parametrize("variant", [{}, {"pos_emb": "rope", "norm": "rmsnorm"}], ids=["gpt2", "rope-rmsnorm"])
def test_kv_cache_greedy_equals_full_recomputation(small_config: ModelConfig, variant: dict) -> None:
    model = trained_ish(dataclasses.replace(small_config, **variant))
    prompt = [1, 2, 3, 4, 5]
    n = small_config.block_size - len(prompt)  # everything fits in one block: the two paths must agree exactly
    cached = list(generate(model, prompt, n, temperature=0, use_cache=True))
    full = list(generate(model, prompt, n, temperature=0, use_cache=False))
    assert cached == full
    assert len(set(cached)) >= 3  # not a degenerate constant sequence


@pytest.mark.parametrize("variant", [{}, {"pos_emb": "rope", "norm": "rmsnorm"}], ids=["gpt2", "rope-rmsnorm"])
def test_compiled_decoding_equals_eager_and_compiles_once(small_config: ModelConfig, variant: dict) -> None:
    """The compiled step attends over the whole static cache, masked past its position: the same tokens as the
    eager cached path, through two cache refills, from one compiled graph."""
    from torch._dynamo.utils import counters

    model = trained_ish(dataclasses.replace(small_config, **variant))
    n = 2 * small_config.block_size + 5
    eager = list(generate(model, [1, 2, 3], n, temperature=0))
    torch._dynamo.reset()
    counters.clear()
    compiled = list(generate(model, [1, 2, 3], n, temperature=0, compiled=CompiledDecoding(model)))
    assert compiled == eager
    assert counters["stats"]["unique_graphs"] == 1


def test_generate_leaves_the_callers_grad_mode_alone(small_config: ModelConfig) -> None:
    """Between tokens the caller's own code runs: no inference or no-grad mode may leak into it."""
    model = trained_ish(small_config)
    for compiled in (None, CompiledDecoding(model)):
        tokens = generate(model, [1, 2], 4, temperature=0, compiled=compiled)
        next(tokens)
        assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
        tokens.close()
        assert torch.is_grad_enabled()


def test_generation_continues_past_block_size(small_config: ModelConfig) -> None:
    model = trained_ish(small_config)
    g = torch.Generator().manual_seed(0)
    tokens = list(generate(model, [1], 3 * small_config.block_size + 7, temperature=1.0, generator=g))
    assert len(tokens) == 3 * small_config.block_size + 7
    assert all(0 <= t < small_config.vocab_size for t in tokens)


def test_sampling_is_seeded(small_config: ModelConfig) -> None:
    model = trained_ish(small_config)
    runs = [list(generate(model, [1], 40, generator=torch.Generator().manual_seed(7))) for _ in range(2)]
    assert runs[0] == runs[1]


def test_top_k_and_top_p_restrict_the_choice() -> None:
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0, 1.0]])
    g = torch.Generator().manual_seed(0)
    assert sample_next(logits, temperature=0).item() == 1
    assert {sample_next(logits, top_k=1, generator=g).item() for _ in range(50)} == {1}
    assert {sample_next(logits, top_k=2, generator=g).item() for _ in range(200)} == {1, 2}
    # p(1) ≈ 0.45, p(2) ≈ 0.41: top_p=0.5 keeps exactly those two
    assert {sample_next(logits, top_p=0.5, generator=g).item() for _ in range(200)} == {1, 2}
    assert {sample_next(logits, top_p=0.1, generator=g).item() for _ in range(50)} == {1}


@pytest.mark.parametrize("variant", [{}, {"pos_emb": "rope", "norm": "rmsnorm"}], ids=["learned", "rope"])
def test_batched_greedy_equals_one_by_one(small_config: ModelConfig, variant: dict) -> None:
    """Prompts of different lengths, left-padded into one batch: each row's positions and mask make it decode
    the tokens it decodes alone."""
    model = trained_ish(dataclasses.replace(small_config, **variant))
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11], [12, 13, 14, 15, 16]]
    n = small_config.block_size - 7  # the longest prompt and its tokens fill one block
    alone = [list(generate(model, prompt, n, temperature=0)) for prompt in prompts]
    assert generate_batch(model, prompts, n, temperature=0) == alone
    if variant:  # and with the compiled step (a second graph, for padded batches): rope, the harder case
        assert generate_batch(model, prompts, n, temperature=0, compiled=CompiledDecoding(model)) == alone
    assert len({tuple(row) for row in alone}) == len(prompts)  # the rows really differ


def test_batched_rows_stop_on_their_own(small_config: ModelConfig) -> None:
    """A row ends at a stop token (left out) or when should_stop says so; the other rows go on unchanged."""
    model = trained_ish(small_config)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11]]
    n = 20
    alone = [list(generate(model, prompt, n, temperature=0)) for prompt in prompts]
    stop = alone[0][4]
    expected = [row[: row.index(stop)] if stop in row else row for row in alone]
    assert generate_batch(model, prompts, n, temperature=0, stop_ids={stop}) == expected
    # the compiled step keeps ended rows in the batch, riding along
    step = CompiledDecoding(model)
    assert generate_batch(model, prompts, n, temperature=0, stop_ids={stop}, compiled=step) == expected
    assert len(expected[0]) == 4 and any(len(row) > 4 for row in expected)
    calls = []
    ended = generate_batch(model, prompts, n, temperature=0,
                           should_stop=lambda row, token: calls.append(row) or (row == 1 and len(calls) > 6))
    assert ended[1] == alone[1][:3] and ended[0] == alone[0] and ended[2] == alone[2]


def test_batched_sampling_past_block_size(small_config: ModelConfig) -> None:
    """Rows refilled together past block_size, one of them leaving the batch on the way."""
    model = trained_ish(dataclasses.replace(small_config, pos_emb="rope"))
    n = 2 * small_config.block_size + 3
    rows = generate_batch(model, [[1], [2, 3, 4, 5], [6, 7]], n, generator=torch.Generator().manual_seed(0),
                          should_stop=lambda row, token: row == 2 and token % 2 == 0)
    assert [len(row) for row in rows[:2]] == [n, n] and rows[2][-1] % 2 == 0
    assert all(0 <= t < small_config.vocab_size for row in rows for t in row)
