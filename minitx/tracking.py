"""Where a run's metrics go: Weights & Biases (offline unless it can reach its server now), a CSV file, or nowhere."""

from __future__ import annotations

import contextlib
import netrc
import os
from pathlib import Path
from typing import Any

from minitx.config import LoggerConfig


def make_logger(cfg: LoggerConfig, name: str, out_dir: Path, hparams: dict[str, Any], run_id: str | None) -> Any:
    """The configured Lightning logger; `run_id` continues a resumed run's wandb run."""
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    if cfg.kind == "none":
        return False
    if cfg.kind == "csv":
        return CSVLogger(save_dir=out_dir, name="csv", version="")
    offline = cfg.offline if cfg.offline is not None else not wandb_online()
    logger = WandbLogger(project=cfg.project, name=name, save_dir=str(out_dir), offline=offline,
                         id=run_id, resume="allow" if run_id else None)
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
