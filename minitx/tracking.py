"""Where a run's metrics go: Weights & Biases (offline unless it can reach its server now), a CSV file, or nowhere."""

from __future__ import annotations

import contextlib
import netrc
import os
from pathlib import Path
from typing import Any

from minitx.config import LoggerConfig


def make_logger(cfg: LoggerConfig, name: str, out_dir: Path, hparams: dict[str, Any], run_id: str | None,
                job_type: str = "") -> Any:
    """The configured Lightning logger; `run_id` continues a resumed run's wandb run. A wandb run is named and
    grouped by the run's name (a sweep's runs share a group), typed by its task (`job_type`), tagged with the
    command line's overrides, and its config is the resolved run config, nested as in conf/."""
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    if cfg.kind == "none":
        return False
    if cfg.kind == "csv":
        return CSVLogger(save_dir=out_dir, name="csv", version="")
    offline = cfg.offline if cfg.offline is not None else not wandb_online()
    logger = WandbLogger(project=cfg.project, name=name, save_dir=str(out_dir), offline=offline,
                         id=run_id, resume="allow" if run_id else None, group=name, job_type=job_type or None,
                         tags=command_line_tags())
    logger.log_hyperparams(hparams)
    return logger


def wandb_online() -> bool:
    """Online only with an API key and a server that answers now: wandb must never wait on a network."""
    from minitx.data import host_reachable

    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    has_key = bool(os.environ.get("WANDB_API_KEY"))
    if not has_key:
        with contextlib.suppress(FileNotFoundError, netrc.NetrcParseError):
            has_key = netrc.netrc().authenticators(host.split("//")[-1]) is not None
    return has_key and host_reachable(host)


def command_line_tags() -> list[str]:
    """The Hydra command line's overrides ("model.n_layer=2"), cut to wandb's 64 characters a tag; none without
    Hydra."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return [override[:64] for override in HydraConfig.get().overrides.task]


def offline_dir(logger: Any) -> Path | None:
    """The directory of an offline wandb run (what `wandb sync` uploads); None for any other logger."""
    from lightning.pytorch.loggers import WandbLogger

    if not isinstance(logger, WandbLogger) or not logger.experiment.offline:
        return None
    return Path(logger.experiment.settings.sync_dir)


def finish_wandb(logger: Any, summary: dict[str, Any], checkpoint: str, log_model: bool) -> None:
    """Put the run's summary numbers in the wandb run's summary (as run/<key>) and, with logger.log_model, best.ckpt as
    a model artifact whose metadata is the run config; then finish the run (the next run of a sweep in this process
    starts its own). Nothing for any other logger."""
    from lightning.pytorch.loggers import WandbLogger

    if not isinstance(logger, WandbLogger):
        return
    import wandb

    run = logger.experiment
    run.summary.update({f"run/{k}": v for k, v in summary.items() if k not in ("name", "task") and v is not None})
    if log_model and checkpoint:
        artifact = wandb.Artifact(f"model-{run.id}", type="model", metadata=dict(run.config))
        artifact.add_file(checkpoint, name="best.ckpt")
        run.log_artifact(artifact, aliases=["best", "latest"])
    run.finish()


def abort_wandb(logger: Any) -> None:
    """Finish the wandb run of a run that failed (exit code 1), so that the next job of a sweep in this process does
    not log into it. Nothing if no wandb run was started."""
    from lightning.pytorch.loggers import WandbLogger

    if isinstance(logger, WandbLogger) and getattr(logger, "_experiment", None) is not None:
        logger.experiment.finish(exit_code=1)
