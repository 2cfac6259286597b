"""Lightning modules: what a training step and an evaluation mean for each kind of model."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import lightning as L
import torch

from minitx.config import ModelConfig, OptimConfig
from minitx.model import GPT

CHECKPOINT_KEY = "minitx"  # the part of a .ckpt that rebuilds model and tokenizer without any config


def lr_at(step: int, cfg: OptimConfig, decay_steps: int) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.min_lr at `decay_steps`, flat after."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    if step >= decay_steps:
        return cfg.min_lr
    progress = (step - cfg.warmup_steps) / max(1, decay_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def adamw(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (dim >= 2) only; the fused kernel where the device has one."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)


class CausalLM(L.LightningModule):
    """Next-token prediction with a GPT. Logs train/loss, val/loss, val/ppl, val/bpc (char tokenizers), lr."""

    def __init__(self, model_cfg: ModelConfig, optim_cfg: OptimConfig, max_steps: int, tokenizer_json: str,
                 char_level: bool):
        super().__init__()
        self.model_cfg, self.optim_cfg = model_cfg, optim_cfg
        self.decay_steps = optim_cfg.decay_steps or max_steps
        self.tokenizer_json, self.char_level = tokenizer_json, char_level
        self.model = GPT(model_cfg)
        self.initial_val_loss: float | None = None
        self._val_losses: list[torch.Tensor] = []

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        _, loss = self.model(x, y)
        self.log("train/loss", loss, prog_bar=True)
        self.log("lr", self.lr_schedulers().get_last_lr()[0])  # type: ignore[union-attr]
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        _, loss = self.model(x, y)
        self._val_losses.append(loss.detach())

    def on_validation_epoch_end(self) -> None:
        loss = torch.stack(self._val_losses).mean()
        self._val_losses.clear()
        metrics = {"val/loss": loss, "val/ppl": loss.exp()}
        if self.char_level:
            metrics["val/bpc"] = loss / math.log(2)
        self.log_dict(metrics, prog_bar=False, sync_dist=True)
        if self.trainer.sanity_checking:  # the sanity pass runs every val batch: it is the step-0 evaluation
            self.initial_val_loss = float(loss)
            if self.logger is not None:
                self.logger.log_metrics({k: float(v) for k, v in metrics.items()}, step=0)

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = adamw(self.model, self.optim_cfg)
        base = self.optim_cfg.lr
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_at(step, self.optim_cfg, self.decay_steps) / base
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = {
            "task": "causal_lm",
            "model": dataclasses.asdict(self.model_cfg),
            "tokenizer": self.tokenizer_json,
        }
