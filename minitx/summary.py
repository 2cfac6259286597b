"""The end of a run in one place: what it reached (best and final val/loss), what it cost (steps, tokens, time,
throughput), where its checkpoint is; printed on rank 0 and written as <out_dir>/summary.json for tables over runs."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import lightning as L

log = logging.getLogger("minitx")
METRIC = "val/loss"


class RunSummary(L.Callback):
    """Collects what the summary reports while the run trains: each evaluation's val/loss and its step and the wall
    time of fit; the tokens trained on (all ranks) and the means of tokens_per_sec and mfu come from `metrics` (the
    run's TrainingMetrics callback), which counts and logs them already."""

    def __init__(self, metrics: Any):
        self.metrics = metrics
        self.evaluations: list[tuple[int, float]] = []  # (step, val/loss); step 0: the evaluation before training
        self.world_size = 1
        self._t0 = time.perf_counter()
        self.wall_time = 0.0

    @property
    def tokens(self) -> int:
        return self.metrics.tokens_seen * self.world_size

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0 = time.perf_counter()
        self.world_size = trainer.world_size

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.wall_time = time.perf_counter() - self._t0

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if METRIC in trainer.callback_metrics:
            step = 0 if trainer.sanity_checking else trainer.global_step
            self.evaluations.append((step, float(trainer.callback_metrics[METRIC])))

    def mean(self, key: str) -> float | None:
        values = [m[key] for m in self.metrics.history if key in m]
        return sum(values) / len(values) if values else None

    def numbers(self, name: str, task: str, steps: int, checkpoint: str) -> dict[str, Any]:
        """The keys of summary.json: best and final val/loss (None without an evaluation), the best one's step,
        steps, tokens, wall time, mean throughput and mfu as logged (None if never logged)."""
        trained = [e for e in self.evaluations if e[0] > 0] or self.evaluations  # best.ckpt is never from step 0
        best_step, best = min(trained, key=lambda e: e[1]) if trained else (None, None)
        return {"name": name, "task": task, "best_val_loss": best, "best_step": best_step,
                "final_val_loss": self.evaluations[-1][1] if self.evaluations else None, "steps": steps,
                "tokens_seen": self.tokens, "wall_time_s": round(self.wall_time, 3),
                "tokens_per_sec": self.mean("tokens_per_sec"), "mfu": self.mean("mfu"), "checkpoint": checkpoint}


def write_summary(summary: dict[str, Any], out_dir: Path) -> Path:
    path = out_dir / "summary.json"
    path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return path


def print_summary(summary: dict[str, Any], sync_dir: Path | None) -> None:
    """The block a person reads at the end of a run (the task's display follows it)."""
    def number(value: float | None, form: str) -> str:
        return "n/a" if value is None else format(value, form)

    lines = [f"run {summary['name']} ({summary['task']}): {summary['steps']} steps, {summary['tokens_seen']:,} "
             f"tokens in {summary['wall_time_s']:.1f} s ({number(summary['tokens_per_sec'], ',.0f')} tokens/s, "
             f"mfu {number(summary['mfu'], '.2%')})"]
    if summary["best_val_loss"] is not None:
        lines.append(f"{METRIC}: best {summary['best_val_loss']:.4f} at step {summary['best_step']}, final "
                     f"{summary['final_val_loss']:.4f}")
    lines.append(f"checkpoint: {summary['checkpoint']}")
    if sync_dir is not None:
        lines.append(f"wandb (offline): wandb sync {sync_dir}")
    print("\n".join(lines), flush=True)
