"""Validation numbers are the whole validation set's: sums and counts over every batch (and every rank), divided
once, checked against a per-row / per-batch reference computed here from the very weights that were evaluated."""

from __future__ import annotations

import copy
import csv
import json
import math
import re
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import make_text
from test_encoder import ENCODER, labelled_rows
from test_train import compose_config, run_cli

from minitx.data import FixedWindows
from minitx.tasks import MaskedLM, mask_tokens
from minitx.train import parse_config, train


class ValidationWeights(L.Callback):
    """A copy of the model as each evaluation sees it, with the step its numbers are logged at."""

    def __init__(self) -> None:
        self.models: list[tuple[int, torch.nn.Module]] = []
        self.module: L.LightningModule | None = None
        self.datamodule: L.LightningDataModule | None = None

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = 0 if trainer.sanity_checking else trainer.global_step
        self.models.append((step, copy.deepcopy(pl_module.model).eval()))
        self.module, self.datamodule = pl_module, trainer.datamodule


def logged(run_dir: Path) -> dict[int, dict[str, float]]:
    """The val/ metrics of the CSV log, by step."""
    with open(run_dir / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/loss")]
    return {int(r["step"]): {k: float(v) for k, v in r.items() if k.startswith("val/") and v} for r in rows}


def test_classification_validation_is_every_row_every_time(tmp_path: Path) -> None:
    """33 validation rows in batches of 32: the numbers are the 33 rows' mean, at step 0 too (data.val_batches,
    a token-task setting, must not cut the classifier's step-0 evaluation short)."""
    data = tmp_path / "reviews.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in labelled_rows(330)))  # val_fraction 0.1: 33 rows
    weights = ValidationWeights()
    train(parse_config(compose_config("experiment=classify", *ENCODER, f"data.path={data}", "data.batch_size=32",
                                      "data.val_batches=1", "trainer.max_steps=12", "trainer.val_check_interval=6",
                                      "optim.warmup_steps=2")), tmp_path / "run", callbacks=[weights])
    val = weights.datamodule.data
    assert len(val.val) == 33
    numbers = logged(tmp_path / "run")
    assert sorted(numbers) == [0, 6, 12]
    for step, model in weights.models:
        with torch.no_grad():
            logits = torch.cat([model.class_logits(model(torch.as_tensor(row)[None])) for row in val.val])
        labels = torch.as_tensor(val.val_labels)
        assert numbers[step]["val/loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), abs=1e-5), step
        assert numbers[step]["val/acc"] == pytest.approx((logits.argmax(-1) == labels).float().mean().item(),
                                                         abs=1e-6), step


def test_masked_lm_validation_averages_over_masked_positions(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(make_text(600))
    weights = ValidationWeights()
    train(parse_config(compose_config("experiment=mlm", *ENCODER, f"data.path={corpus}", "data.batch_size=4",
                                      "data.val_batches=5", "trainer.max_steps=6", "trainer.val_check_interval=6",
                                      "optim.warmup_steps=2")), tmp_path / "run", callbacks=[weights])
    module = weights.module
    assert isinstance(module, MaskedLM)
    windows = FixedWindows(weights.datamodule.data.val, module.model_cfg.block_size, 4, 5)
    numbers = logged(tmp_path / "run")
    assert sorted(numbers) == [0, 6]
    for step, model in weights.models:
        loss_sum, correct, majority, count = 0.0, 0, 0, 0
        for i in range(len(windows)):
            x = windows[i][0]
            inputs, labels = mask_tokens(x, torch.Generator().manual_seed(MaskedLM.VAL_SEED + i), module.mask_id,
                                         module.special_ids, module.model_cfg.vocab_size, module.mlm_probability)
            chosen = labels != -100
            with torch.no_grad():
                logits = model.mlm_logits(model(inputs))[chosen]
            loss_sum += F.cross_entropy(logits, labels[chosen], reduction="sum").item()
            correct += int((logits.argmax(-1) == labels[chosen]).sum())
            majority += int((labels[chosen] == module.majority_token).sum())
            count += int(chosen.sum())
        assert numbers[step]["val/loss"] == pytest.approx(loss_sum / count, abs=1e-5), step
        assert numbers[step]["val/mlm_acc"] == pytest.approx(correct / count, abs=1e-6), step
        assert numbers[step]["val/majority_acc"] == pytest.approx(majority / count, abs=1e-6), step


def test_a_batch_with_no_masked_position_still_has_one() -> None:
    """At a tiny mlm_probability most batches would choose nothing: one eligible position is chosen instead."""
    x = torch.randint(6, 40, (2, 16), generator=torch.Generator().manual_seed(0))
    x[0, :4] = 1  # special tokens are never chosen, not even then
    for seed in range(20):
        inputs, labels = mask_tokens(x, torch.Generator().manual_seed(seed), mask_id=3,
                                     special_ids=torch.arange(6), vocab_size=40, p=1e-6)
        chosen = labels != -100
        assert chosen.sum() == 1 and not chosen[0, :4].any()
        assert torch.equal(inputs[~chosen], x[~chosen])
    specials = torch.ones(2, 16, dtype=torch.long)  # nothing can be chosen: the loss is 0 with no gradient, not NaN
    assert (mask_tokens(specials, torch.Generator().manual_seed(0), 3, torch.arange(6), 40, p=0.5)[1] == -100).all()


def test_masked_lm_trains_with_a_small_mask_probability(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """The issue's command: data.mlm_probability=0.02 data.batch_size=2 model.block_size=16 stopped at a NaN loss.
    The run ends by showing the fills of sample.prompt's [MASK]; a prompt longer than a block is not shown and does
    not fail the finished run."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(make_text(600))
    overrides = ["experiment=mlm", *ENCODER, f"data.path={corpus}", "data.mlm_probability=0.02", "data.batch_size=2",
                 "model.block_size=16", "trainer.max_steps=30", "trainer.val_check_interval=15",
                 "optim.warmup_steps=2"]
    train(parse_config(compose_config(*overrides)), tmp_path / "run")
    numbers = logged(tmp_path / "run")
    assert sorted(numbers) == [0, 15, 30] and all(math.isfinite(n["val/loss"]) for n in numbers.values())
    assert re.search(r"fill-mask: import o\[MASK\]\n\[MASK\] 1: '.' 0\.\d+ ", capsys.readouterr().out)
    long = "sample.prompt='the big cat sat on the [MASK] under the log'"
    train(parse_config(compose_config(*overrides, "trainer.max_steps=2", long)), tmp_path / "long")
    assert "fill-mask" not in capsys.readouterr().out
    assert ("nothing shown at the end of training: sample.prompt='the big cat sat on the [MASK] under the log' is 38 "
            "tokens, more than model.block_size=16") in caplog.text


@pytest.mark.slow
@pytest.mark.parametrize("task", ["causal_lm", "masked_lm", "classify"])
def test_two_rank_validation_equals_one_rank(tmp_path: Path, task: str) -> None:
    """5 validation batches (classify: 33 rows, batches of 32 and 1) on 2 gloo processes: each rank evaluates its
    own batches (none repeated), masks come from the global batch index, and sums and counts are reduced before
    dividing."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(make_text(600))
    base = [*ENCODER, f"data.path={corpus}", "data.batch_size=4", "data.val_batches=5", "trainer.max_steps=2",
            "trainer.val_check_interval=1000", "trainer.accelerator=cpu", "sample.max_new_tokens=0",
            "optim.warmup_steps=1"]
    if task == "masked_lm":
        base.insert(0, "experiment=mlm")
    if task == "classify":
        rows = tmp_path / "reviews.jsonl"
        rows.write_text("\n".join(json.dumps(r) for r in labelled_rows(330)))
        base = ["experiment=classify", *base, f"data.path={rows}", "data.batch_size=32"]
    runs = {}
    for devices in (1, 2):
        run_dir = tmp_path / f"devices{devices}"
        strategy = ["trainer.strategy=ddp"] if devices > 1 else []
        result = run_cli("minitx-train", *base, f"trainer.devices={devices}", *strategy, f"hydra.run.dir={run_dir}",
                         cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[devices] = logged(run_dir)[0]  # step 0: the same initial weights on every rank
    assert runs[2].keys() == runs[1].keys()
    for key, value in runs[1].items():
        assert runs[2][key] == pytest.approx(value, abs=1e-6), key
    if task == "causal_lm":
        assert runs[2]["val/ppl"] == pytest.approx(math.exp(runs[2]["val/loss"]), rel=1e-6)
