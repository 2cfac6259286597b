"""Speed features that must not change results: the FLOP count behind MFU, and torch.compile."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from minitx.config import ModelConfig, OptimConfig
from minitx.model import GPT
from minitx.perf import flops_per_token, measure_matmul_flops
from minitx.tasks import adamw


def test_flops_per_token_by_hand(small_config: ModelConfig) -> None:
    # vocab 50, block 32, 2 layers, 4 heads, 32 embd, no biases
    per_layer = 32 + 32 * 96 + 32 * 32 + 32 + 32 * 128 + 128 * 32  # ln_1, qkv, proj, ln_2, fc, mlp proj
    n = 50 * 32 + 2 * per_layer + 32  # tied embedding/head, layers, ln_f; the position table is left out
    model = GPT(small_config)
    assert model.num_params() == n == 26336
    assert flops_per_token(small_config, model.num_params()) == 6 * 26336 + 12 * 2 * 4 * 8 * 32 == 182592


def test_cpu_matmul_measurement_is_plausible() -> None:
    flops = measure_matmul_flops(256, seconds=0.05)
    assert 1e8 < flops < 1e14


@pytest.mark.slow
def test_compiled_model_trains_like_eager(small_config: ModelConfig) -> None:
    config = dataclasses.replace(small_config, dropout=0.0)
    torch.manual_seed(0)
    eager = GPT(config)
    compiled = GPT(config)
    compiled.load_state_dict(eager.state_dict())
    compiled.compile()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 50, (2, 4, 32), generator=g) for _ in range(3)]
    losses = {}
    for name, model in (("eager", eager), ("compiled", compiled)):
        optimizer = adamw(model.parameters(), OptimConfig(lr=1e-2))
        losses[name] = []
        for x, y in batches:
            _, loss = model(x, y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses[name].append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses["compiled"])))
    assert losses["compiled"] == pytest.approx(losses["eager"], abs=1e-4)
    assert set(compiled.state_dict()) == set(eager.state_dict())  # checkpoints keep their keys
