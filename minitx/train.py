"""`minitx-train`: compose the Hydra config in conf/, validate it, train, checkpoint, print a sample."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import netrc
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from minitx.config import ConfigError, LoggerConfig, MinitxError, TrainConfig, from_mapping

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
log = logging.getLogger("minitx")


@contextlib.contextmanager
def exit_on_user_error() -> Iterator[None]:
    """A MinitxError becomes one line on stderr and exit status 2 (HYDRA_FULL_ERROR=1 shows the traceback)."""
    try:
        yield
    except MinitxError as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def parse_config(cfg: DictConfig) -> TrainConfig:
    values = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(values, dict)
    return from_mapping(TrainConfig, values).validate()


def make_logger(cfg: LoggerConfig, name: str, out_dir: Path, hparams: dict[str, Any]) -> Any:
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    if cfg.kind == "none":
        return False
    if cfg.kind == "csv":
        return CSVLogger(save_dir=out_dir, name="csv", version="")
    offline = cfg.offline if cfg.offline is not None else not wandb_online()
    logger = WandbLogger(project=cfg.project, name=name, save_dir=str(out_dir), offline=offline)
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


def train(config: TrainConfig, out_dir: Path) -> float:
    """Train per `config`, write checkpoints under out_dir/checkpoints; return the best val/loss."""
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint

    from minitx.callbacks import FinalValidation, Throughput
    from minitx.data import TokenDataModule, prepare_data
    from minitx.generation import generate
    from minitx.tasks import CausalLM
    from minitx.tokenizer import EOT, is_char_level, stream_decode

    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*isinstance.treespec, LeafSpec.*")  # Lightning 2.6 on torch 2.13
    L.seed_everything(config.seed, verbose=False)
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")

    data = prepare_data(config.data, config.tokenizer, config.model.block_size + 1)
    tokenizer = data.tokenizer
    vocab = tokenizer.get_vocab_size()
    if config.model.vocab_size and config.model.vocab_size < vocab:
        raise ConfigError(f"model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's {vocab}")
    model_cfg = dataclasses.replace(config.model, vocab_size=config.model.vocab_size or vocab)
    module = CausalLM(model_cfg, config.optim, config.trainer.max_steps, tokenizer.to_str(), is_char_level(tokenizer))
    datamodule = TokenDataModule(data, config.data, model_cfg.block_size, config.seed)

    checkpoints = ModelCheckpoint(
        dirpath=out_dir / "checkpoints", filename="best", monitor="val/loss", mode="min", save_top_k=1,
        save_last=True, auto_insert_metric_name=False, enable_version_counter=False,
    )
    hparams = dataclasses.asdict(config) | {"model": dataclasses.asdict(model_cfg)}
    trainer = L.Trainer(
        **dataclasses.asdict(config.trainer),
        logger=make_logger(config.logger, config.name, out_dir, hparams),
        callbacks=[checkpoints, Throughput(config.trainer.log_every_n_steps), FinalValidation()],
        default_root_dir=out_dir,
        check_val_every_n_epoch=None,  # validate every val_check_interval batches of the endless stream
        num_sanity_val_steps=config.data.val_batches,  # a full evaluation before step 1: the initial val/loss
        enable_model_summary=False,
    )
    if trainer.is_global_zero:
        log.info("data: %s, %s train / %s val tokens%s, vocabulary %d", data.description, f"{len(data.train):,}",
                 f"{len(data.val):,}", " (token cache)" if data.from_cache else "", vocab)
        log.info("model: %.2fM parameters, attention=%s; outputs in %s", module.model.num_params() / 1e6,
                 model_cfg.attention, out_dir)
    trainer.fit(module, datamodule=datamodule)

    final = float(trainer.callback_metrics["val/loss"])
    best = float(checkpoints.best_model_score) if checkpoints.best_model_score is not None else final
    if trainer.is_global_zero:
        log.info("val/loss %.4f at step 0 -> %.4f at step %d (best %.4f)", module.initial_val_loss or float("nan"),
                 final, trainer.global_step, best)
        print(f"checkpoint: {checkpoints.best_model_path}", flush=True)
        if config.sample.max_new_tokens > 0:
            model = module.model.eval()
            prompt = tokenizer.encode(config.sample.prompt).ids or [tokenizer.token_to_id(EOT)]
            generator = torch.Generator(device=next(model.parameters()).device).manual_seed(config.seed)
            print(f"sample:\n{config.sample.prompt}", end="", flush=True)
            for piece in stream_decode(tokenizer, generate(model, prompt, config.sample.max_new_tokens,
                                                           temperature=0.8, top_k=200, generator=generator)):
                print(piece, end="", flush=True)
            print(flush=True)
    return best


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig

    with exit_on_user_error():
        config = parse_config(cfg)
        return train(config, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
