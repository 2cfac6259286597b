"""Lightning callbacks minitx adds to every run."""

from __future__ import annotations

import contextlib
import os
import time
from functools import cached_property
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.profilers import PassThroughProfiler


class TrainingMetrics(L.Callback):
    """Every `every` optimizer steps: `train/loss` (the last optimizer step's: the mean over its accumulated
    batches and over the processes, so N processes log what one process accumulating N batches logs), `lr`,
    `grad_norm` (the last step's global gradient norm before clipping), `tokens_per_sec` (every batch of every
    rank: the effective batch, batch_size x block_size x accumulation x processes, per step), `mfu` (model FLOP/s
    over the devices' peak; `peak` None measures or looks it up at the start, 0 turns it off) and `time` (wall
    seconds of training, so curves can be drawn against it), written to the loggers at that step and shown by
    ProgressBar.

    Not through `self.log`: once a value has been logged in training, Lightning re-reads it after every later
    batch and calls .item() on the progress-bar ones, a host sync on every step of a GPU run (and ~50 us a step
    on a CPU). Here the only syncs are one float() per interval for the loss (under DDP after one all-reduce) and
    one for the gradient norm.

    `time` counts from on_train_start (after the initial evaluation, which is at time 0). It is saved in
    checkpoints, so a resumed run continues from the time it was saved at: the pause between is not counted."""

    def __init__(self, every: int, peak: float | None = None):
        self.every = every
        self.peak = peak
        self.flops_per_token = 0
        self.latest: dict[str, float] = {}
        self.history: list[dict[str, float]] = []  # every row logged by this process (for the run summary's means)
        self.tokens_seen = 0  # on this rank, by this process (not carried across a resume)
        self._t0: float | None = None
        self._tokens = 0
        self._logged_step = -1
        self._time_before = 0.0  # training seconds of the run this one resumes
        self._started: float | None = None  # perf_counter() at on_train_start

    def elapsed(self) -> float:
        """Wall seconds of training so far, a resumed run's earlier time included."""
        return self._time_before + (time.perf_counter() - self._started if self._started is not None else 0.0)

    def state_dict(self) -> dict[str, Any]:
        return {"time": self.elapsed()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._time_before = state_dict.get("time", 0.0)  # (checkpoints from before `time` was logged: 0)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from minitx.perf import flops_per_token, peak_flops

        self._started = time.perf_counter()

        model = pl_module.model
        self.flops_per_token = flops_per_token(model.config, model.num_params())
        if self.peak is None:
            self.peak = peak_flops(pl_module.device, str(trainer.precision)) or 0.0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._tokens += batch[0].numel()
        self.tokens_seen += batch[0].numel()
        if self._t0 is None:  # the first batch pays for warm-up; start the clock after it
            self._t0, self._tokens = time.perf_counter(), 0
            return
        step = trainer.global_step  # with gradient accumulation, it moves on a window's last batch only
        if step % self.every or step == self._logged_step:
            return
        self._logged_step = step
        now = time.perf_counter()
        per_sec = self._tokens * trainer.world_size / (now - self._t0)
        loss = getattr(pl_module, "step_loss", None)
        loss = (outputs["loss"] if loss is None else loss).detach().clone()
        if trainer.world_size > 1:  # one collective per interval, on every rank (all reach this step together)
            loss = trainer.strategy.reduce(loss, reduce_op="mean")
        metrics = {"train/loss": float(loss), "lr": trainer.optimizers[0].param_groups[0]["lr"],
                   "tokens_per_sec": per_sec}
        if getattr(pl_module, "grad_norm", None) is not None:
            metrics["grad_norm"] = float(pl_module.grad_norm)
        if self.peak:
            metrics["mfu"] = per_sec * self.flops_per_token / (self.peak * trainer.world_size)
        metrics["time"] = self.elapsed()
        self.latest = metrics
        self.history.append(metrics)
        write(trainer.loggers, metrics, step)
        self._t0, self._tokens = now, 0


def write(loggers: list[Any], metrics: dict[str, float], step: int) -> None:
    """Metrics to every logger, flushed (a CSV logger otherwise writes every 100 steps: a killed run would lose
    them). Lightning's loggers write from rank 0 only."""
    for logger in loggers:
        logger.log_metrics(metrics, step=step)
        logger.save()


class ProgressBar(TQDMProgressBar):
    """Lightning's bar, redrawn every `refresh_rate` batches (every batch costs ~0.5 ms), with the training
    numbers of a TrainingMetrics callback."""

    def __init__(self, refresh_rate: int, metrics: TrainingMetrics):
        super().__init__(refresh_rate=refresh_rate)
        self.metrics = metrics

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        shown = {k: v for k, v in self.metrics.latest.items() if k not in ("lr", "time")}  # (the bar shows time)
        return super().get_metrics(trainer, pl_module) | shown


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


class NoProfiler(PassThroughProfiler):
    """Lightning's default profiler, minus its cost: Lightning wraps each of the ~80 hook calls of a step in
    `profiler.profile(...)`, a generator-based context manager; this one hands back one reusable no-op context."""

    _nothing = contextlib.nullcontext()

    def profile(self, action_name: str) -> contextlib.nullcontext:  # type: ignore[override]
        return self._nothing
