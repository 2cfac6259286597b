"""experiment=gpt2_124m: the GPU recipe composes as published, and a scaled-down copy of it trains on a CPU."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from conftest import make_text
from test_train import compose_config

from minitx.train import parse_config, train


def test_gpt2_124m_composes_to_gpt2_small_at_half_a_million_tokens_a_step() -> None:
    config = parse_config(compose_config("experiment=gpt2_124m", "trainer.accelerator=cpu"))
    m, t = config.model, config.trainer
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size, m.vocab_size) == (12, 12, 768, 1024, 50304)
    assert (m.bias, m.activation, m.pos_emb, m.compile, m.attention) == (True, "gelu_tanh", "learned", True, "auto")
    assert (t.strategy, t.precision, t.tokens_per_step, t.max_steps) == ("ddp", "bf16-mixed", 524288, 19073)
    # one CPU process: 16 windows of 1024 tokens a batch, 32 of them accumulated = 524,288 tokens a step
    assert t.accumulate_grad_batches == 32
    assert (config.data.hub_id, config.data.hub_config) == ("HuggingFaceFW/fineweb-edu", "sample-10BT")
    assert (config.tokenizer.kind, config.tokenizer.vocab_size) == ("bpe", 50257)
    assert (config.optim.lr, config.optim.min_lr, config.optim.beta2) == (6e-4, 6e-5, 0.95)


@pytest.mark.slow
def test_gpt2_124m_scaled_down_trains_two_steps_on_a_cpu(tmp_path: Path) -> None:
    """The recipe as it is (DDP preset, BPE, GPT-2 layout, derived accumulation, 50,304-row embedding), only smaller:
    local data instead of the Hub, 2 layers of 32, block 64, fp32, no compile."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(make_text(1500))
    config = parse_config(compose_config(
        "experiment=gpt2_124m", f"data.path={corpus}", "data.val_fraction=0.1", "data.batch_size=2",
        "data.val_batches=2", "tokenizer.vocab_size=300", "model.n_layer=2", "model.n_head=2", "model.n_embd=32",
        "model.block_size=64", "model.compile=false", "trainer.accelerator=cpu", "trainer.precision=32-true",
        "trainer.tokens_per_step=256", "trainer.max_steps=2", "optim.warmup_steps=1", "logger=csv",
        "sample.max_new_tokens=0", "trainer.enable_progress_bar=false"))
    assert config.trainer.accumulate_grad_batches == 2
    best = train(config, tmp_path / "run")
    rows = list(csv.DictReader((tmp_path / "run" / "csv" / "metrics.csv").open()))
    val = [(int(r["step"]), float(r["val/loss"])) for r in rows if r.get("val/loss")]
    assert val[0][0] == 0 and val[-1][0] == 2 and best == val[-1][1] < val[0][1]  # 2 steps already lower it
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
