"""Sequence classification: a label head on the encoder, from scratch or from a masked-LM checkpoint."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from minitx.checkpoint import Loaded, require_same_model
from minitx.config import (
    ARCHITECTURE_KEYS,
    ConfigError,
    GuardConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    TrainerConfig,
    fail,
)
from minitx.data import prepare_labelled
from minitx.datamodules import LabelledDataModule
from minitx.model import Encoder
from minitx.tasks.base import Prepared, Task, register_task

if TYPE_CHECKING:
    from tokenizers import Tokenizer


def load_init_from(config: TrainConfig) -> Loaded:
    """The masked-LM checkpoint a classifier starts from (model.init_from)."""
    from minitx.checkpoint import load

    loaded = load(str(config.model.init_from), key="model.init_from")
    if loaded.task != "masked_lm":
        raise ConfigError(f"model.init_from={config.model.init_from!r}: a {loaded.task} checkpoint; "
                          "a classifier starts from a masked_lm checkpoint (experiment=mlm)")
    return loaded


@register_task
class SequenceClassifier(Task):
    """A linear head over the Encoder's pooled states ([CLS] or mean); from scratch or from a masked-LM checkpoint.
    Logs val/loss and val/acc; ends with the label probabilities of sample.prompt (nothing when it is empty)."""

    task = "classify"
    padded = True

    @classmethod
    def check_config(cls, config: TrainConfig) -> None:
        if config.data.label_column is None:
            fail("data.label_column", None, "task=classify needs the column that holds the labels")
        if config.data.streaming:
            fail("data.streaming", True, "task=classify reads its labelled rows into memory; set data.streaming=false")
        if not config.model.tie_embeddings:
            fail("model.tie_embeddings", False, "task=classify trains no LM head: an untied one would be dead weight; "
                 "keep it tied")

    @classmethod
    def prepare(cls, config: TrainConfig) -> Prepared:
        init = load_init_from(config) if config.model.init_from else None
        data = prepare_labelled(config.data, config.tokenizer, config.model.block_size,
                                init.tokenizer if init else None)
        description = f"{data.description}, {len(data.train):,} train / {len(data.val):,} val rows"
        return Prepared(data, data.tokenizer, description, pretrained=init)

    @classmethod
    def build(cls, config: TrainConfig, model_cfg: ModelConfig, prepared: Prepared,
              run_config: dict[str, Any]) -> tuple[Task, LabelledDataModule]:
        from minitx.tokenizer import PAD

        init: Loaded | None = prepared.pretrained
        if init is not None:  # the classifier must be the pretrained model's shape, vocabulary included
            require_same_model(dataclasses.asdict(init.config), model_cfg, ARCHITECTURE_KEYS, "model.init_from",
                               "use the same model settings (and its tokenizer)")
        tokenizer, data = prepared.tokenizer, prepared.data
        module = cls(model_cfg, config.optim, config.trainer, tokenizer.to_str(), data.labels, model_cfg.pooling,
                     config.guard, run_config)
        if init is not None:  # the pretrained trunk; the label head starts fresh
            module.model.transformer.load_state_dict(init.model.transformer.state_dict())
            prepared.pretrained = None  # copied: let the source model's memory go for the rest of the run
        return module, LabelledDataModule(data, config.data, tokenizer.token_to_id(PAD), config.seed)

    def __init__(self, model_cfg: ModelConfig, optim_cfg: OptimConfig, trainer_cfg: TrainerConfig, tokenizer_json: str,
                 labels: list[str], pooling: str = "cls", guard: GuardConfig | None = None,
                 run_config: dict[str, Any] | None = None):
        super().__init__(model_cfg, optim_cfg, trainer_cfg, tokenizer_json, guard, run_config)
        self.labels, self.pooling = labels, pooling
        self.model = Encoder(model_cfg, n_classes=len(labels), pooling=pooling)

    def logits_and_loss(self, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        ids, key_padding, labels = batch
        logits = self.model.class_logits(self.model(ids, key_padding), key_padding)
        return logits, F.cross_entropy(logits, labels)

    def train_loss(self, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return self.logits_and_loss(batch)[1]

    def val_metrics(self, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                    batch_idx: int) -> dict[str, tuple[torch.Tensor, int]]:
        logits, loss = self.logits_and_loss(batch)
        n = len(batch[2])  # rows
        return {"loss": (loss * n, n), "acc": ((logits.argmax(-1) == batch[2]).sum(), n)}

    def checkpoint_extras(self) -> dict[str, Any]:
        return {"labels": self.labels, "pooling": self.pooling}

    def show(self, config: TrainConfig, tokenizer: Tokenizer) -> None:
        """The label probabilities of sample.prompt, most likely first."""
        from minitx.generation import show_labels

        if not config.sample.prompt:
            return
        self.model.eval()
        length = 1 + len(tokenizer.encode(config.sample.prompt, add_special_tokens=False).ids)  # [CLS] first
        self.check_kernel_for(min(length, self.model_cfg.block_size), 0)
        print(f"classify: {config.sample.prompt}", flush=True)
        show_labels(self.model, tokenizer, config.sample.prompt, self.labels)
