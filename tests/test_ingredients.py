"""The time-to-quality ingredients, each a config key off by default: Muon, the warmup-stable-decay schedule, QK-norm,
an untied head and logit soft-capping."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from conftest import make_text
from test_train import compose_config

import minitx.muon
from minitx.checkpoint import state_without_tied_head
from minitx.config import ConfigError, ModelConfig, OptimConfig
from minitx.hf import gpt2_mismatch
from minitx.model import GPT
from minitx.tasks import lr_at
from minitx.tasks.base import hidden_matrices, lr_scales, optimizers
from minitx.train import parse_config


def test_qk_norm_cached_decoding_equals_full_forward(small_config: ModelConfig) -> None:
    """QK-norm sits before the kernel (naive and sdpa agree with it: test_model.py), and keys are cached normalised:
    one token at a time through the KV cache gives the full forward's logits."""
    model = GPT(dataclasses.replace(small_config, qk_norm=True, pos_emb="rope")).eval()
    attn = model.transformer.blocks[0].attn
    assert isinstance(attn.q_norm, torch.nn.RMSNorm) and attn.q_norm.weight.shape == (small_config.n_embd // 4,)
    idx = torch.randint(0, 50, (1, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full, _ = model(idx)
        caches = model.new_caches(1, idx.device, torch.float32)
        steps = [model.next_token_logits(idx[:, :5], caches)]
        steps += [model.next_token_logits(idx[:, t : t + 1], caches) for t in range(5, 32)]
    torch.testing.assert_close(torch.stack(steps, dim=1), full[:, 4:], atol=2e-5, rtol=0)


def test_qk_norm_bounds_attention_logits(small_config: ModelConfig) -> None:
    """Queries and keys come out of the norm with unit RMS per head whatever the projection's scale."""
    model = GPT(dataclasses.replace(small_config, qk_norm=True))
    attn = model.transformer.blocks[0].attn
    seen = {}
    attn.q_norm.register_forward_hook(lambda m, args, out: seen.setdefault("q", out))
    with torch.no_grad():
        attn.qkv.weight.mul_(1000.0)
        model(torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(0)))
    rms = seen["q"].pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.ones_like(rms), atol=1e-3, rtol=0)


def test_untied_head_is_its_own_matrix_and_is_saved(small_config: ModelConfig) -> None:
    tied, untied = GPT(small_config), GPT(dataclasses.replace(small_config, tie_embeddings=False))
    assert tied.lm_head.weight is tied.transformer.tok_emb.weight
    assert untied.lm_head.weight is not untied.transformer.tok_emb.weight
    assert untied.num_params() == tied.num_params() + small_config.vocab_size * small_config.n_embd
    assert "lm_head.weight" not in state_without_tied_head(tied)  # one copy of the shared matrix
    assert "lm_head.weight" in state_without_tied_head(untied)
    assert gpt2_mismatch(untied.config, "causal_lm") == "model.tie_embeddings=False"


def test_logit_softcap_bounds_the_logits(small_config: ModelConfig) -> None:
    capped = GPT(dataclasses.replace(small_config, logit_softcap=2.0))
    plain = GPT(small_config)
    plain.load_state_dict(capped.state_dict())
    idx = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(capped(idx)[0], 2.0 * torch.tanh(plain(idx)[0] / 2.0))
        capped.transformer.tok_emb.weight.mul_(100.0)  # the tied head's logits in the hundreds, squashed under 2
        assert capped(idx)[0].abs().max() <= 2.0
    assert gpt2_mismatch(capped.config, "causal_lm") == "model.logit_softcap=2.0"


def test_wsd_schedule_warms_up_holds_then_decays_linearly() -> None:
    cfg = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10, schedule="wsd", cooldown_frac=0.25).validate(100)
    lrs = [lr_at(step, cfg, 100) for step in range(110)]
    assert lrs[:10] == pytest.approx([(s + 1) / 11 for s in range(10)])  # the same warmup as cosine
    assert lrs[10:75] == [1.0] * 65  # stable until the last quarter
    assert lrs[75:100] == pytest.approx([1.0 - 0.9 * (s - 75) / 25 for s in range(75, 100)])
    assert lrs[100:] == [0.1] * 10
    cosine = dataclasses.replace(cfg, schedule="cosine")
    assert lr_at(50, cosine, 100) < 1.0  # cosine never holds


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest(small_config: ModelConfig) -> None:
    model = GPT(dataclasses.replace(small_config, qk_norm=True, tie_embeddings=False))
    adamw, muon = optimizers(model, OptimConfig(name="muon", lr=0.004, muon_lr=0.02))
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    in_muon = {id(p) for group in muon.param_groups for p in group["params"]}
    in_adamw = {id(p) for group in adamw.param_groups for p in group["params"]}
    assert in_muon == {id(p) for p in hidden_matrices(model)}
    assert len(in_muon) == 4 * small_config.n_layer  # qkv, attention out, MLP in, MLP out
    assert in_muon.isdisjoint(in_adamw) and in_muon | in_adamw == {id(p) for p in model.parameters()}
    assert id(model.lm_head.weight) in in_adamw and id(model.transformer.tok_emb.weight) in in_adamw
    assert lr_scales(OptimConfig(name="muon", lr=0.004, muon_lr=0.02)) == pytest.approx([1.0, 5.0])  # one schedule
    assert [type(o) for o in optimizers(model, OptimConfig())] == [torch.optim.AdamW]


@pytest.mark.parametrize("fast_bf16", [True, False], ids=["bf16", "fp32"])
def test_muon_batched_by_shape_steps_as_torchs_muon(monkeypatch: pytest.MonkeyPatch, fast_bf16: bool) -> None:
    """minitx's Muon (Newton-Schulz batched over same-shape matrices; float32 where bfloat16 is emulated) makes
    torch.optim.Muon's steps to bfloat16's precision, from the same state (so checkpoints cross over)."""
    monkeypatch.setattr(minitx.muon, "fast_bfloat16", lambda device: fast_bf16)
    g = torch.Generator().manual_seed(0)
    shapes = [(24, 40), (24, 40), (40, 24), (24, 40), (16, 16), (40, 24)]
    start = [torch.randn(shape, generator=g) for shape in shapes]
    grads = [[torch.randn(shape, generator=g) for shape in shapes] for _ in range(3)]
    weights = {}
    for kind in (torch.optim.Muon, minitx.muon.Muon):
        params = [torch.nn.Parameter(w.clone()) for w in start]
        optimizer = kind(params, lr=0.05, momentum=0.9, weight_decay=0.1)
        for step_grads in grads:
            for param, grad in zip(params, step_grads, strict=True):
                param.grad = grad.clone()
            optimizer.step()
        weights[kind] = [p.detach().clone() for p in params]
        state = optimizer.state_dict()
    for ours, theirs, first in zip(weights[minitx.muon.Muon], weights[torch.optim.Muon], start, strict=True):
        moved = (theirs - first).abs().max()
        assert moved > 0.05
        torch.testing.assert_close(ours, theirs, atol=0.05 * float(moved), rtol=0)  # bfloat16: ~1% an op
    torch.optim.Muon([torch.nn.Parameter(w.clone()) for w in start]).load_state_dict(state)


def test_a_muon_run_counts_one_step_per_step_and_learns(tmp_path) -> None:
    """Two optimizers, one optimizer step: trainer.max_steps and the evaluations fall where they would with AdamW."""
    from minitx.checkpoint import CHECKPOINT_KEY, read_checkpoint
    from minitx.train import train

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(make_text(800))
    config = parse_config(compose_config(
        "optim=muon", "model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32",
        "model.qk_norm=true", "model.logit_softcap=15", "optim.schedule=wsd", "data.batch_size=8",
        "data.val_batches=4", "trainer.max_steps=30", "trainer.val_check_interval=15", "optim.warmup_steps=3",
        "trainer.enable_progress_bar=false", "sample.max_new_tokens=0", "logger=none", f"data.path={corpus}"))
    train(config, tmp_path / "run")
    checkpoint = read_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == 30
    assert len(checkpoint["optimizer_states"]) == 2
    muon_state = checkpoint["optimizer_states"][1]
    assert len(muon_state["state"]) == 4 * 2  # Muon stepped every block matrix (its momentum buffers)
    assert muon_state["param_groups"][0]["lr"] == pytest.approx(lr_at(29, config.optim, 30) * 10.0)  # 0.02 / 0.002
    score = next(v for k, v in checkpoint["callbacks"].items() if "val/loss" in k)["current_score"]
    vocab = checkpoint[CHECKPOINT_KEY]["model"]["vocab_size"]
    assert float(score) < math.log(vocab) - 0.5  # learned well below the uniform guess


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optim.name=sgd"], "optim.name='sgd': choose adamw or muon"),
        (["optim.schedule=linear"], "optim.schedule='linear': choose cosine or wsd"),
        (["optim.cooldown_frac=0"], "optim.cooldown_frac=0.0: must be in (0, 1]"),
        (["optim=muon", "trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2"],
         "optim.name='muon': Muon orthogonalises whole matrices"),
        (["model.logit_softcap=-1"], "model.logit_softcap=-1.0: must be >= 0"),
        (["optim.muon_ns_steps=0"], "optim.muon_ns_steps=0: must be in [1, 100)"),
        (["optim.muon_momentum=1"], "optim.muon_momentum=1.0: must be in [0, 1)"),
    ],
)
def test_bad_ingredient_settings_name_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(compose_config(*overrides))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_resuming_with_another_optimizer_is_one_line(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Muon's and AdamW's states do not fit each other: a resume that switches is refused, naming the fix."""
    from minitx.train import train

    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus.txt").write_text(make_text(400))
    run = ["model.n_layer=1", "model.n_head=2", "model.n_embd=16", "model.block_size=16", "data.batch_size=4",
           "data.val_batches=2", "data.path=corpus.txt", "trainer.enable_progress_bar=false", "sample.max_new_tokens=0",
           "logger=none", "trainer.max_steps=2", "trainer.val_check_interval=2"]
    train(parse_config(compose_config(*run, "optim=muon")), tmp_path / "run")
    config = parse_config(compose_config(*run, "trainer.max_steps=4", f"resume={tmp_path / 'run'}"))
    with pytest.raises(ConfigError, match=r"^resume: the checkpoint's run trained with optim.name=muon, this one has "
                                          r"optim.name=adamw; resume with optim=muon$"):
        train(config, tmp_path / "resumed")


def test_classify_refuses_an_untied_head() -> None:
    with pytest.raises(ConfigError, match=r"^model.tie_embeddings=False: task=classify trains no LM head"):
        parse_config(compose_config("experiment=classify", "data.label_column=label", "model.tie_embeddings=false"))
