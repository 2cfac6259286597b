"""Lightning callbacks minitx adds to every run."""

from __future__ import annotations

import os
import time
from functools import cached_property
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO


class Throughput(L.Callback):
    """Logs `tokens_per_sec` (all ranks together) and `mfu` (model FLOP/s over the device's peak), averaged over
    every `every` training batches. `peak` None measures or looks it up at the start; 0 turns mfu off."""

    def __init__(self, every: int, peak: float | None = None):
        self.every = every
        self.peak = peak
        self.flops_per_token = 0
        self._t0: float | None = None
        self._tokens = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from minitx.perf import flops_per_token, peak_flops

        model = pl_module.model
        self.flops_per_token = flops_per_token(model.config, model.num_params())
        if self.peak is None:
            self.peak = peak_flops(pl_module.device, str(trainer.precision)) or 0.0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._tokens += batch[0].numel()
        if self._t0 is None:  # the first batch pays for warm-up; start the clock after it
            self._t0, self._tokens = time.perf_counter(), 0
        elif self._tokens and (batch_idx + 1) % self.every == 0:
            per_sec = self._tokens * trainer.world_size / (time.perf_counter() - self._t0)
            pl_module.log("tokens_per_sec", per_sec, prog_bar=True)
            if self.peak:
                pl_module.log("mfu", per_sec * self.flops_per_token / (self.peak * trainer.world_size), prog_bar=True)
            self._t0, self._tokens = time.perf_counter(), 0


class FinalValidation(L.Callback):
    """Evaluate (and so checkpoint) after the last step even when max_steps is not a multiple of
    val_check_interval: Lightning validates when a run is asked to stop, so ask on the last batch."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
            trainer.should_stop = True


class Checkpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint with its state key computed once: Lightning formats it into a profiler label
    on every hook call, six times a step, and building it is most of the callback's per-step cost."""

    @cached_property
    def state_key(self) -> str:
        return super().state_key


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each checkpoint to a temporary file, fsync it, then rename it into place: a kill during a save
    leaves the previous file whole, never a truncated one."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

