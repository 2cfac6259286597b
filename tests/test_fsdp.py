"""trainer.strategy=fsdp (FSDP2 through Lightning's ModelParallelStrategy) on 2 CPU processes (gloo): the same
optimisation as DDP, and checkpoints that minitx-sample and resume= read."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest
import torch
from conftest import make_text
from test_train import run_cli

from minitx.config import ConfigError, ModelConfig
from minitx.memory import GB, check_fits
from minitx.sample import parse_args, sample

RUN = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32", "data.batch_size=8",
       "data.val_batches=2", "trainer.val_check_interval=4", "trainer.accumulate_grad_batches=2",
       "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", "optim.lr=1e-2", "optim.warmup_steps=2",
       "optim.decay_steps=12", "sample.max_new_tokens=8", "logger=csv", "trainer.devices=2",
       "trainer.accelerator=cpu", "data.path=corpus.txt", "model.attention_check=false"]
TOLERANCE = 1e-5  # absolute, on every logged loss and gradient norm (measured: equal to float32 rounding)


def logged(run_dir: Path) -> dict[tuple[int, str], float]:
    """Every number of the CSV log, by (step, name)."""
    with open(run_dir / "csv" / "metrics.csv") as f:
        return {(int(row["step"]), key): float(value) for row in csv.DictReader(f)
                for key, value in row.items() if value and key in ("train/loss", "val/loss", "grad_norm")}


def greedy(ckpt: Path) -> str:
    """What `minitx-sample ckpt=... temperature=0` prints (greedy decoding)."""
    out = io.StringIO()
    sample(parse_args([f"ckpt={ckpt}", "prompt=the ", "temperature=0", "max_new_tokens=40", "device=cpu"]), out)
    return out.getvalue()


@pytest.mark.slow
def test_fsdp_matches_ddp_and_its_checkpoint_samples_and_resumes(tmp_path: Path) -> None:
    """10 optimizer steps of 2 accumulated batches on 2 processes: FSDP logs DDP's losses and gradient norms at
    every step and evaluation; its best.ckpt (one consolidated file) samples DDP's greedy text; resume= from its
    last.ckpt trains 2 steps more under FSDP."""
    (tmp_path / "corpus.txt").write_text(make_text(600))
    runs = {}
    for strategy in ("ddp", "fsdp"):
        runs[strategy] = tmp_path / strategy
        result = run_cli("minitx-train", *RUN, "trainer.max_steps=10", f"trainer.strategy={strategy}",
                         f"hydra.run.dir={runs[strategy]}", cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
    assert "sharded over 2 processes" in result.stdout + result.stderr  # (the FSDP run)
    ddp, fsdp = logged(runs["ddp"]), logged(runs["fsdp"])
    assert fsdp.keys() == ddp.keys() and (10, "val/loss") in fsdp and (10, "train/loss") in fsdp
    for key, value in ddp.items():
        assert fsdp[key] == pytest.approx(value, abs=TOLERANCE), key
    assert fsdp[10, "val/loss"] < fsdp[0, "val/loss"] - 0.3  # it learned something: the text below means something

    best = runs["fsdp"] / "checkpoints" / "best.ckpt"
    assert best.is_file()  # one file, not a folder of shards
    text = greedy(best)
    assert text == greedy(runs["ddp"] / "checkpoints" / "best.ckpt")
    assert len(text) > len("the ") + 20 and text.strip() != "the"

    resumed = tmp_path / "resumed"
    result = run_cli("minitx-train", *RUN, "trainer.max_steps=12", "trainer.strategy=fsdp",
                     f"resume={runs['fsdp']}", f"hydra.run.dir={resumed}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    after = logged(resumed)
    assert (12, "train/loss") in after and (12, "val/loss") in after and min(step for step, _ in after) > 10
    assert torch.load(runs["fsdp"] / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 12


def test_sharded_training_state_is_counted_once() -> None:
    """GPT-2 small's 2 GB of weights, gradients and AdamW state and 1 GB of activations (batch 1) do not fit in
    2 GB on one GPU; sharded over 4 processes (FSDP), each holds a quarter of the state and fits."""
    gpt2 = ModelConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768).validate()
    with pytest.raises(ConfigError, match="make the model smaller"):
        check_fits(gpt2, 50257, 1, "32-true", "cuda", free=2 * GB)
    check_fits(gpt2, 50257, 1, "32-true", "cuda", free=2 * GB, shards=4)


@pytest.mark.slow
def test_validation_batches_that_do_not_split_evenly_are_refused(tmp_path: Path) -> None:
    """3 validation batches over 2 FSDP processes would leave one process gathering weights alone (a hang): refused
    in one line naming the key, on both ranks, before any step."""
    (tmp_path / "corpus.txt").write_text(make_text(300))
    result = run_cli("minitx-train", *RUN, "trainer.max_steps=2", "trainer.strategy=fsdp", "data.val_batches=3",
                     f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, timeout=120)
    assert result.returncode != 0
    assert ("error: data.val_batches=3: 3 validation batches do not split evenly over 2 processes, and under "
            "trainer.strategy=fsdp every process must evaluate as many") in result.stderr
    assert "Traceback" not in result.stderr
