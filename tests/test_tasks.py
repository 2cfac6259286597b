"""Tasks are found through a registry: a task brings its own data, model, data module and end-of-training display, and
minitx-train runs it without a line of train.py knowing it exists."""

from __future__ import annotations

import inspect
import logging
import re
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from torch.utils.data import DataLoader, TensorDataset

import minitx.train
from minitx.checkpoint import CHECKPOINT_KEY, read_checkpoint
from minitx.config import ConfigError, GuardConfig, ModelConfig, OptimConfig, TrainConfig, TrainerConfig
from minitx.model import Encoder
from minitx.tasks import TASKS, Prepared, Task, register_task, task_class
from minitx.tokenizer import train_char_tokenizer
from minitx.train import CONF_DIR, parse_config, train


class RowData(L.LightningDataModule):
    def __init__(self, rows: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int):
        super().__init__()
        self.rows, self.labels, self.batch_size, self.seed = rows, labels, batch_size, seed

    def train_dataloader(self) -> DataLoader:
        data = TensorDataset(self.rows[64:], self.labels[64:])
        return DataLoader(data, self.batch_size, shuffle=True, generator=torch.Generator().manual_seed(self.seed))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.rows[:64], self.labels[:64]), self.batch_size)


class FirstDigit(Task):
    """A toy task defined outside minitx: read a row of digits, predict its first digit (10 classes)."""

    task = "first_digit"
    monitor = ("val/acc", "max")  # best.ckpt keeps the most accurate weights

    @classmethod
    def check_config(cls, config: TrainConfig) -> None:
        if config.model.pooling != "cls":
            raise ConfigError("model.pooling: first_digit reads the [CLS]-free first position; use model.pooling=cls")

    @classmethod
    def prepare(cls, config: TrainConfig) -> Prepared:
        tokenizer = train_char_tokenizer(["0123456789"])
        digits = torch.randint(0, 10, (576, 12), generator=torch.Generator().manual_seed(config.seed))
        ids = torch.tensor([[tokenizer.token_to_id(str(int(d))) for d in row] for row in digits])
        return Prepared((ids, digits[:, 0]), tokenizer, "576 rows of 12 random digits")

    @classmethod
    def build(cls, config: TrainConfig, model_cfg: ModelConfig, prepared: Prepared,
              run_config: dict[str, Any]) -> tuple[Task, L.LightningDataModule]:
        module = cls(model_cfg, config.optim, config.trainer, prepared.tokenizer.to_str(), config.guard, run_config)
        return module, RowData(*prepared.data, config.data.batch_size, config.seed)

    def __init__(self, model_cfg: ModelConfig, optim_cfg: OptimConfig, trainer_cfg: TrainerConfig, tokenizer_json: str,
                 guard: GuardConfig, run_config: dict[str, Any]):
        super().__init__(model_cfg, optim_cfg, trainer_cfg, tokenizer_json, guard, run_config)
        self.model = Encoder(model_cfg, n_classes=10)

    def logits(self, rows: torch.Tensor) -> torch.Tensor:
        return self.model.class_logits(self.model(rows))

    def train_loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(self.logits(batch[0]), batch[1])

    def val_metrics(self, batch: tuple[torch.Tensor, torch.Tensor],
                    batch_idx: int) -> dict[str, tuple[torch.Tensor, int]]:
        logits, n = self.logits(batch[0]), len(batch[1])
        return {"loss": (F.cross_entropy(logits, batch[1]) * n, n), "acc": ((logits.argmax(-1) == batch[1]).sum(), n)}

    def show(self, config: TrainConfig, tokenizer: Any) -> None:
        row = torch.tensor([tokenizer.encode("7301").ids])
        print(f"first digit of 7301: {int(self.logits(row.to(self.device)).argmax())}")


TOY = ["task=first_digit", "model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=12",
       "data.batch_size=32", "trainer.max_steps=120", "trainer.val_check_interval=60", "optim.lr=3e-3",
       "optim.warmup_steps=10", "trainer.enable_progress_bar=false", "logger=none"]


def config_of(*overrides: str) -> TrainConfig:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return parse_config(compose("train", overrides=list(overrides)))


def test_a_task_added_through_the_registry_trains_without_touching_train_py(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ConfigError, match=r"^task='first_digit': choose one of \['causal_lm', 'classify'"):
        config_of(*TOY)
    monkeypatch.setitem(TASKS, "first_digit", FirstDigit)
    with pytest.raises(ConfigError, match=r"use model\.pooling=cls"):  # the task's own start-up check
        config_of(*TOY, "model.pooling=mean")
    caplog.set_level(logging.INFO, logger="minitx")
    best = train(config_of(*TOY), tmp_path)
    assert best > 0.9  # val/acc, the metric the task monitors: from chance (0.1) to almost every row
    assert re.search(r"val/acc 0\.\d+ at step 0 -> (0\.9|1\.0)\d* at step 120 \(best ", caplog.text)
    assert "first digit of 7301: 7" in capsys.readouterr().out
    saved = read_checkpoint(tmp_path / "checkpoints" / "best.ckpt")
    assert saved[CHECKPOINT_KEY]["task"] == "first_digit"
    best_callback = next(v for k, v in saved["callbacks"].items() if "val/acc" in k)
    assert float(best_callback["best_model_score"]) == pytest.approx(best)


def test_a_task_of_ones_own_is_named_by_its_import_path() -> None:
    config = config_of(*TOY, "task=test_tasks:FirstDigit")  # tests/ is on sys.path, as a user's package would be
    assert task_class(config.task) is FirstDigit
    for name, message in [("test_tasks:Nope", "cannot import it"), ("no_such_module:Task", "cannot import it"),
                          ("test_tasks:RowData", "not a subclass of minitx.tasks.Task")]:
        with pytest.raises(ConfigError, match=f"^task='{name}': {message}"):
            config_of(*TOY, f"task={name}")
    with pytest.raises(ValueError, match="a task needs a name of its own"):
        register_task(type("Again", (FirstDigit,), {"task": "causal_lm"}))


def test_train_does_not_branch_on_the_task() -> None:
    source = inspect.getsource(minitx.train)
    assert "config.task ==" not in source and "config.task !=" not in source
    assert set(TASKS) == {"causal_lm", "masked_lm", "classify"}
    for name, task in TASKS.items():  # every built-in task says how minitx-train wires it; train.py names none
        assert name not in source and task.__name__ not in source, name
        assert task.task == name
        for hook in ("prepare", "build"):
            assert getattr(task, hook).__func__ is not getattr(Task, hook).__func__, (name, hook)
        assert task.show is not Task.show, name
