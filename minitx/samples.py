"""A wandb table of what the model makes of sample.table_prompts at every evaluation (continuations for a causal
LM, [MASK] fills for a masked LM), one row per prompt and evaluation, so the run's page shows the learning."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import lightning as L
import torch

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from minitx.config import TrainConfig


log = logging.getLogger("minitx")


class SampleTable(L.Callback):
    """After each evaluation, on rank 0: the task's rows (Task.samples) for this step, added to every earlier
    evaluation's, logged as the wandb table `samples` (columns step, prompt, then the task's). Sampled in eval mode
    without gradients, under the run's precision (autocast for *-mixed), with the kernel the run trains with;
    training mode is restored after."""

    def __init__(self, config: TrainConfig, tokenizer: Tokenizer, key: str = "samples"):
        self.config, self.tokenizer, self.key = config, tokenizer, key
        self.rows: list[dict[str, Any]] = []

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or self.config.sample.table_tokens <= 0:
            return
        step = 0 if trainer.sanity_checking else trainer.global_step
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad(), trainer.precision_plugin.forward_context():  # as validation computes
                rows = pl_module.samples(self.config, self.tokenizer)
        except Exception as e:  # the table is a view of training, never a reason to stop it
            log.warning("samples table skipped at step %d: %s", step, e)
            return
        finally:
            pl_module.train(was_training)
        if not rows:
            return
        self.rows += [{"step": step, **row} for row in rows]
        columns = list(self.rows[-1])
        trainer.logger.log_table(self.key, columns=columns, data=[[row[c] for c in columns] for row in self.rows],
                                 step=step)
