"""`minitx-train`: compose the Hydra config in conf/, validate it, train, checkpoint, print a sample."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import netrc
import os
import sys
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

from minitx.config import ConfigError, LoggerConfig, MinitxError, ModelConfig, TrainConfig, from_mapping
from minitx.resources import config_dir

CONF_DIR = config_dir()
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


def resume_checkpoint(resume: str) -> Path:
    """`resume=` names a run directory (its checkpoints/last.ckpt) or a checkpoint file."""
    path = Path(resume)
    if path.is_dir():
        path = path / "checkpoints" / "last.ckpt"
        if not path.is_file():
            raise ConfigError(f"resume={resume!r}: no checkpoints/last.ckpt in that run directory")
    elif not path.is_file():
        raise ConfigError(f"resume={resume!r}: no such run directory or checkpoint")
    return path


# how the model runs, not what it is: a resumed run may choose these afresh (attention=auto may resolve differently)
RUNTIME_KEYS = ("attention", "sdpa_backend", "compile", "attention_check")


def check_same_run(meta: dict[str, Any], model_cfg: ModelConfig, tokenizer_json: str | None, resume: str) -> None:
    """A resumed run must rebuild the checkpoint's model and tokenizer exactly. Without the tokenizer (before the
    data is read) the vocabulary size is checked only if it is set explicitly."""
    keys = [k for k in meta["model"]
            if k not in RUNTIME_KEYS and not (k == "vocab_size" and model_cfg.vocab_size == 0)]
    require_same_model(meta["model"], model_cfg, keys, f"the checkpoint in resume={resume!r}",
                       "resume with the same settings")
    if tokenizer_json is not None and meta["tokenizer"] != tokenizer_json:
        raise ConfigError(f"resume={resume!r}: the tokenizer built from this data/tokenizer config differs from "
                          "the checkpoint's; resume with the same data and tokenizer settings")


def load_init_from(config: TrainConfig) -> Any:
    """The masked-LM checkpoint a classifier starts from (model.init_from)."""
    from minitx.checkpoint import load

    loaded = load(str(config.model.init_from), key="model.init_from")
    if loaded.task != "masked_lm":
        raise ConfigError(f"model.init_from={config.model.init_from!r}: a {loaded.task} checkpoint; "
                          "a classifier starts from a masked_lm checkpoint (experiment=mlm)")
    return loaded


def require_same_model(saved: dict[str, Any], model_cfg: ModelConfig, keys: Iterable[str], source: str,
                       fix: str) -> None:
    """The first of `keys` where model_cfg differs from a checkpoint's saved model settings fails as one line."""
    current = dataclasses.asdict(model_cfg)
    for key in keys:
        if current.get(key) != saved.get(key):
            raise ConfigError(f"model.{key}={current.get(key)!r} but {source} was trained with {saved.get(key)!r}; "
                              f"{fix}")


def check_same_architecture(pretrained: ModelConfig, model_cfg: ModelConfig) -> None:
    """The classifier must be the pretrained model's shape, vocabulary included."""
    keys = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "bias", "pos_emb", "norm", "activation")
    require_same_model(dataclasses.asdict(pretrained), model_cfg, keys, "model.init_from",
                       "use the same model settings (and its tokenizer)")


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def attention_masks(config: TrainConfig) -> set[str]:
    """The kinds of mask a run's batches carry, which its kernel must take: classification pads its rows."""
    return {name for name, on in (("document", config.data.document_mask), ("padding", config.task == "classify"),
                                  ("window", config.model.attention_window > 0)) if on}


def training_cases(config: TrainConfig, kernel: str, device: str) -> list[Any]:
    """The shape a training run attends at with `kernel`, with gradients (training) and without (evaluation), for
    the kernel self-check (minitx.kernel_check)."""
    from minitx.config import compute_dtype
    from minitx.kernel_check import COMPILED_PER_SHAPE, AttentionCase

    m = config.model
    # a kernel compiled per shape is checked at the run's own batch size (its graph); others at 2 rows, to be quick
    batch = config.data.batch_size if kernel in COMPILED_PER_SHAPE else 2
    case = AttentionCase(m.n_head, m.n_embd // m.n_head, m.block_size, m.block_size,
                         compute_dtype(config.trainer.precision), device, causal=config.task == "causal_lm",
                         padding=config.task == "classify", document=config.data.document_mask,
                         window=m.attention_window, backward=True, batch=batch, sdpa_backend=m.sdpa_backend)
    return [case, dataclasses.replace(case, backward=False)]


def train(config: TrainConfig, out_dir: Path, callbacks: list[Any] | None = None) -> float:
    """Train per `config`, write checkpoints, print a sample; return the best val/loss.

    `callbacks` are added to minitx's own (tests use it to inject faults).
    """
    import lightning as L
    import torch

    from minitx.attention import resolve_kernel
    from minitx.callbacks import (
        AtomicCheckpointIO,
        Checkpoint,
        FinalValidation,
        NoProfiler,
        ProgressBar,
        TrainingMetrics,
    )
    from minitx.checkpoint import read_checkpoint
    from minitx.data import LabelledDataModule, TokenDataModule, prepare_data, prepare_labelled
    from minitx.generation import generate
    from minitx.kernel_check import checked_kernel, sampling_cases
    from minitx.memory import check_fits
    from minitx.tasks import CHECKPOINT_KEY, CausalLM, MaskedLM, SequenceClassifier
    from minitx.tokenizer import (
        EOT,
        MASK,
        PAD,
        id_limit,
        is_char_level,
        special_ids,
        stream_decode,
    )

    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*isinstance.treespec, LeafSpec.*")  # Lightning 2.6 on torch 2.13
    # the state after the step is the one to save (as in automatic optimization); resume tests check it
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
    resume = resume_checkpoint(config.resume) if config.resume else None
    resume_state = read_checkpoint(resume, "resume") if resume else None
    resume_meta = resume_state[CHECKPOINT_KEY] if resume_state else None
    if resume_meta is not None:
        check_same_run(resume_meta, config.model, None, str(config.resume))
        done = int(resume_state.get("global_step", 0))
        if done >= config.trainer.max_steps:  # Lightning would return at once, with no evaluation to report
            raise ConfigError(f"resume={config.resume!r}: the run is finished at step {done} (trainer.max_steps="
                              f"{config.trainer.max_steps}); to train further, resume with trainer.max_steps above "
                              f"{done}")
    ckpt_dir = resume.parent if resume else out_dir / "checkpoints"  # a resumed run keeps writing where it was
    for folder in (out_dir, ckpt_dir):
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK):
            raise ConfigError(f"{folder}: output directory is not writable; set hydra.run.dir=<a writable path>")
    on_gpu = torch.cuda.is_available() and config.trainer.accelerator in ("auto", "gpu", "cuda")
    if str(config.trainer.precision).startswith("bf16") and not on_gpu and not cpu_has_bf16():
        log.warning("trainer.precision=%s on a CPU without bfloat16 hardware runs about 16x slower than 32-true",
                    config.trainer.precision)
    try:
        kernel, why = resolve_kernel(config.model.attention, "cuda" if on_gpu else "cpu", True, attention_masks(config))
    except ValueError as e:
        raise ConfigError(f"model.attention={config.model.attention!r}: {e}") from None
    if on_gpu:  # before the self-check, so that it checks the TF32 matmuls the run will use
        torch.set_float32_matmul_precision("high")
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if on_gpu else "cpu"  # this rank's GPU under DDP
    devices = config.trainer.devices
    processes = 1 if on_gpu else devices if isinstance(devices, int) and devices > 1 else 1  # CPU DDP shares RAM
    logit_share = {"causal_lm": 1.0, "masked_lm": config.data.mlm_probability}.get(config.task, 0.0)  # LM head rows
    fits = dict(batch_size=config.data.batch_size, precision=config.trainer.precision, device=device,
                processes=processes, logit_share=logit_share)
    check_fits(dataclasses.replace(config.model, attention=kernel), config.model.vocab_size, **fits)  # before the data
    if config.model.attention_check and kernel != "naive":
        checked = checked_kernel(kernel, training_cases(config, kernel, device))
        if checked != kernel:
            kernel, why = checked, f"{kernel} failed its self-check"
        if on_gpu:
            torch.cuda.empty_cache()  # what the check allocated is not held from the memory estimate below
    L.seed_everything(config.seed, verbose=False)

    init = load_init_from(config) if config.task == "classify" and config.model.init_from else None
    if config.task == "classify":
        data = prepare_labelled(config.data, config.tokenizer, config.model.block_size,
                                init.tokenizer if init else None)
        tokenizer = data.tokenizer
        description, sizes = data.description, f"{len(data.train):,} train / {len(data.val):,} val rows"
    else:
        data = prepare_data(config.data, config.tokenizer, config.model.block_size + 1,
                            encoder=config.task == "masked_lm")
        tokenizer = data.tokenizer
        description = data.description + " (token cache)" * data.from_cache
        sizes = f"{len(data.train):,} train / {len(data.val):,} val tokens"
    vocab = id_limit(tokenizer)  # the largest id + 1: a tokenizer.json may skip ids
    if config.model.vocab_size and config.model.vocab_size < vocab:
        raise ConfigError(f"model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's largest id + 1 "
                          f"({vocab}); set model.vocab_size=0 to take it from the tokenizer")
    model_cfg = dataclasses.replace(config.model, vocab_size=config.model.vocab_size or vocab, attention=kernel)
    check_fits(model_cfg, model_cfg.vocab_size, **fits)  # with the vocabulary
    if init is not None:
        check_same_architecture(init.config, model_cfg)
    if resume_meta is not None:
        check_same_run(resume_meta, model_cfg, tokenizer.to_str(), str(config.resume))
    run_config = dataclasses.asdict(config) | {"model": dataclasses.asdict(model_cfg)}
    eot = tokenizer.token_to_id(EOT) if config.data.document_mask else None
    common = (model_cfg, config.optim, config.trainer, tokenizer.to_str())
    if config.task == "classify":
        module = SequenceClassifier(*common, data.labels, model_cfg.pooling, config.guard, run_config)
        if init is not None:  # the pretrained trunk; the label head starts fresh
            module.model.transformer.load_state_dict(init.model.transformer.state_dict())
        datamodule = LabelledDataModule(data, config.data, tokenizer.token_to_id(PAD), config.seed)
    elif config.task == "masked_lm":
        majority = int(np.bincount(np.asarray(data.val.tokens)).argmax())
        module = MaskedLM(*common, tokenizer.token_to_id(MASK), special_ids(tokenizer), config.seed,
                          majority, config.guard, run_config, document_eot=eot,
                          mlm_probability=config.data.mlm_probability)
        datamodule = TokenDataModule(data, config.data, model_cfg.block_size, config.seed)
    else:
        module = CausalLM(*common, is_char_level(tokenizer), config.guard, run_config, document_eot=eot)
        datamodule = TokenDataModule(data, config.data, model_cfg.block_size, config.seed)

    best = Checkpoint(
        dirpath=ckpt_dir, filename="best", monitor="val/loss", mode="min", save_top_k=1, save_last=True,
        auto_insert_metric_name=False, enable_version_counter=False,
    )
    periodic = Checkpoint(
        dirpath=ckpt_dir, filename="step-{step:06d}", monitor="step", mode="max",
        save_top_k=config.checkpoint.keep_last, every_n_train_steps=config.checkpoint.every_n_steps,
        save_last=True, auto_insert_metric_name=False,
    )
    run_id = resume_meta.get("logger_run_id") if resume_meta else None
    metrics = TrainingMetrics(config.trainer.log_every_n_steps, config.perf.peak_flops)
    progress_bar = [ProgressBar(config.trainer.log_every_n_steps, metrics)] * config.trainer.enable_progress_bar
    trainer = L.Trainer(
        **{k: v for k, v in dataclasses.asdict(config.trainer).items()
           if k not in ("gradient_clip_val", "accumulate_grad_batches")},  # the Task's own step applies these
        logger=make_logger(config.logger, config.name, out_dir, run_config, run_id),
        callbacks=[best, periodic, metrics, FinalValidation(), *progress_bar, *(callbacks or [])],
        plugins=[AtomicCheckpointIO()],
        default_root_dir=out_dir,
        check_val_every_n_epoch=None,  # validate every val_check_interval batches of the endless stream
        # a full evaluation (every batch) before step 1 gives the initial val/loss; a resumed run has had it
        num_sanity_val_steps=0 if resume else -1,
        use_distributed_sampler=False,  # the data modules shard validation themselves (no repeated batches)
        enable_model_summary=False,
        profiler=NoProfiler(),
    )
    if trainer.is_global_zero:
        log.info("data: %s, %s, vocabulary %d", description, sizes, vocab)
        log.info("model: %.2fM parameters, attention=%s (%s); outputs in %s", module.model.num_params() / 1e6,
                 model_cfg.attention, why, out_dir)
        if resume:
            log.info("resuming %s at step %d", resume, int(resume_state.get("global_step", 0)))
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume) if resume else None)

    final = float(trainer.callback_metrics["val/loss"])
    best_loss = float(best.best_model_score) if best.best_model_score is not None else final
    if trainer.is_global_zero:
        start = f"{module.initial_val_loss:.4f} at step 0 -> " if module.initial_val_loss is not None else ""
        log.info("val/loss %s%.4f at step %d (best %.4f)", start, final, trainer.global_step, best_loss)
        print(f"checkpoint: {best.best_model_path}", flush=True)
        if config.sample.max_new_tokens > 0 and config.task == "causal_lm":
            model = module.model.eval()
            prompt = tokenizer.encode(config.sample.prompt).ids or [tokenizer.token_to_id(EOT)]
            if config.model.attention_check and kernel != "naive":  # the sample's own shapes, batch 1
                parameter = next(model.parameters())
                cases = sampling_cases(model_cfg, kernel, True, len(prompt), config.sample.max_new_tokens, True,
                                       parameter.dtype, str(parameter.device))
                model.transformer.set_attention(checked_kernel(kernel, cases), model_cfg.sdpa_backend)
            generator = torch.Generator(device=next(model.parameters()).device).manual_seed(config.seed)
            print(f"sample:\n{config.sample.prompt}", end="", flush=True)
            for piece in stream_decode(tokenizer, generate(model, prompt, config.sample.max_new_tokens,
                                                           temperature=0.8, top_k=200, generator=generator)):
                print(piece, end="", flush=True)
            print(flush=True)
    return best_loss


def check_output_dir(argv: list[str]) -> None:
    """Create an explicitly given hydra.run.dir / hydra.sweep.dir now, so that one we cannot create fails as one
    line (Hydra would fail later, with a traceback)."""
    for arg in argv:
        key, _, value = arg.partition("=")
        if key in ("hydra.run.dir", "hydra.sweep.dir") and value and "${" not in value:
            try:
                Path(value).mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ConfigError(f"{key}={value}: cannot create the output directory ({e.strerror})") from None
            if not os.access(value, os.W_OK):
                raise ConfigError(f"{key}={value}: the output directory is not writable")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def hydra_main(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig

    with exit_on_user_error():
        config = parse_config(cfg)
        return train(config, Path(HydraConfig.get().runtime.output_dir))


def main() -> None:
    """The minitx-train console script."""
    with exit_on_user_error():
        check_output_dir(sys.argv[1:])
    hydra_main()


if __name__ == "__main__":
    main()
