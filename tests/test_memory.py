"""A model too big for the machine is refused before it is built, with the numbers; one that fits is not."""

from __future__ import annotations

import pytest

from minitx.config import ConfigError, ModelConfig
from minitx.memory import GB, check_fits, count_parameters, free_memory, training_memory
from minitx.model import GPT, Encoder


@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
def test_parameter_count_is_the_models_less_biases_and_norms(pos_emb: str) -> None:
    config = ModelConfig(vocab_size=300, block_size=64, n_layer=3, n_head=4, n_embd=64, pos_emb=pos_emb).validate()
    counted = count_parameters(config, 300)
    for model in (GPT(config), Encoder(config)):
        actual = sum(p.numel() for p in model.parameters())
        assert counted <= actual < counted * 1.01


def test_gpt2_small_needs_about_two_gigabytes_of_state() -> None:
    gpt2 = ModelConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768).validate()
    need = training_memory(gpt2, 50257, batch_size=1, precision="32-true", attention="sdpa")
    assert 123e6 < need.parameters < 125e6  # GPT-2 small's 124M
    assert need.states == 16 * need.parameters
    check_fits(gpt2, 50257, 1, "32-true", "cpu", free=need.total * 1.01)  # fits: not refused
    with pytest.raises(ConfigError) as e:
        check_fits(gpt2, 50257, 1, "32-true", "cpu", free=1 * GB)
    message = str(e.value)
    assert message.startswith("model.n_embd=768 with model.n_layer=12: ~124.3M parameters: it needs ~")
    assert "GB of weights, gradients and AdamW state" in message and "this cpu has 1.0 GB free" in message
    assert "\n" not in message


def test_a_batch_too_big_names_the_batch() -> None:
    small = ModelConfig(vocab_size=100, block_size=4096, n_layer=2, n_head=2, n_embd=64).validate()
    with pytest.raises(ConfigError, match=r"^data.batch_size=512 with model.block_size=4096: .* lower data.batch_size"):
        check_fits(small, 100, 512, "32-true", "cpu", free=1 * GB)


def test_processes_sharing_memory_are_counted() -> None:
    config = ModelConfig(vocab_size=100, block_size=64, n_layer=4, n_head=4, n_embd=512).validate()
    need = training_memory(config, 100, 16, "32-true", "sdpa").total
    check_fits(config, 100, 16, "32-true", "cpu", processes=1, free=need * 1.5)
    with pytest.raises(ConfigError, match="2 processes need"):
        check_fits(config, 100, 16, "32-true", "cpu", processes=2, free=need * 1.5)


def test_what_the_machine_trains_is_not_refused() -> None:
    """The default model and nanoGPT's 6 x 384 at block 256, batch 64 fit on any machine that runs these tests."""
    assert free_memory("cpu") > 1 * GB
    for config, batch in ((ModelConfig(vocab_size=100).validate(), 16),
                          (ModelConfig(vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384).validate(), 64)):
        check_fits(config, config.vocab_size, batch, "32-true", "cpu")


def test_heads_and_precision_change_the_estimate() -> None:
    """A classifier has no LM head over every position and a masked LM one over the masked share; bf16-true keeps
    half the bytes of state. A classifier that fits must not be refused for a GPT's logits."""
    encoder = ModelConfig(vocab_size=50257, block_size=512, n_layer=4, n_head=4, n_embd=128).validate()
    causal = training_memory(encoder, 50257, 128, "32-true", "sdpa")
    masked = training_memory(encoder, 50257, 128, "32-true", "sdpa", logit_share=0.15)
    classify = training_memory(encoder, 50257, 128, "32-true", "sdpa", logit_share=0.0)
    assert classify.activations < masked.activations < causal.activations
    assert causal.activations > 20 * GB > 4 * GB > classify.activations  # 128 x 512 rows of 50257 logits
    check_fits(encoder, 50257, 128, "32-true", "cpu", free=8 * GB, logit_share=0.0)
    assert training_memory(encoder, 50257, 1, "bf16-true", "sdpa").states == 8 * count_parameters(encoder, 50257)
    assert training_memory(encoder, 50257, 1, "bf16-mixed", "sdpa").states == 16 * count_parameters(encoder, 50257)
