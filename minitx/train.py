"""`minitx-train`: compose the Hydra config in conf/, validate it, and train: config -> resume / device / kernel ->
the task (minitx.tasks.task_class(config.task)) -> its data -> its module -> Trainer -> fit -> what the task shows.

Nothing here knows what a task is; each task class wires its own data, model and data module."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from omegaconf import DictConfig, OmegaConf

from minitx.checkpoint import CHECKPOINT_KEY, require_same_model
from minitx.cli import exit_on_user_error
from minitx.config import RUNTIME_KEYS, ConfigError, MinitxError, ModelConfig, TrainConfig, from_mapping
from minitx.resources import config_dir

if TYPE_CHECKING:
    from minitx.summary import RunSummary
    from minitx.tasks import Prepared, Task

CONF_DIR = config_dir()
log = logging.getLogger("minitx")


def parse_config(cfg: DictConfig) -> TrainConfig:
    values = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(values, dict)
    return from_mapping(TrainConfig, values).validate()


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


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def attention_masks(config: TrainConfig) -> set[str]:
    """The kinds of mask a run's batches carry, which its kernel must take (a task that pads its rows: padding)."""
    from minitx.tasks import task_class

    return {name for name, on in (("document", config.data.document_mask), ("padding", task_class(config.task).padded),
                                  ("window", config.model.attention_window > 0)) if on}


def training_cases(config: TrainConfig, kernel: str, device: str) -> list[Any]:
    """The shape a training run attends at with `kernel`, with gradients (training) and without (evaluation), for
    the kernel self-check (minitx.kernel_check)."""
    from minitx.config import compute_dtype
    from minitx.kernel_check import COMPILED_PER_SHAPE, AttentionCase
    from minitx.tasks import task_class

    task, m = task_class(config.task), config.model
    # a kernel compiled per shape is checked at the run's own batch size (its graph); others at 2 rows, to be quick
    batch = config.data.batch_size if kernel in COMPILED_PER_SHAPE else 2
    case = AttentionCase(m.n_head, m.n_embd // m.n_head, m.block_size, m.block_size,
                         compute_dtype(config.trainer.precision), device, causal=task.causal, padding=task.padded,
                         document=config.data.document_mask,
                         window=m.attention_window, backward=True, batch=batch, sdpa_backend=m.sdpa_backend)
    return [case, dataclasses.replace(case, backward=False)]


@dataclass
class Resume:
    """The checkpoint a resumed run continues from (resume=...)."""

    path: Path
    state: dict[str, Any]

    @property
    def meta(self) -> dict[str, Any]:
        return self.state[CHECKPOINT_KEY]

    @property
    def step(self) -> int:
        return int(self.state.get("global_step", 0))

    @classmethod
    def of(cls, config: TrainConfig) -> Resume | None:
        """None for a fresh run; refuses a checkpoint of another model, or of a run already finished."""
        from minitx.checkpoint import read_checkpoint

        if not config.resume:
            return None
        path = resume_checkpoint(config.resume)
        resume = cls(path, read_checkpoint(path, "resume"))
        check_same_run(resume.meta, config.model, None, config.resume)
        if resume.step >= config.trainer.max_steps:  # Lightning would return at once, with no evaluation to report
            raise ConfigError(f"resume={config.resume!r}: the run is finished at step {resume.step} (trainer.max_steps="
                              f"{config.trainer.max_steps}); to train further, resume with trainer.max_steps above "
                              f"{resume.step}")
        return resume


@dataclass
class Placement:
    """Where this process trains: its device, and how many training processes share this machine's memory."""

    on_gpu: bool
    device: str  # this rank's device: cuda:<LOCAL_RANK> under DDP
    processes: int
    shards: int = 1  # trainer.strategy=fsdp: the processes the training state is sharded over

    @classmethod
    def of(cls, config: TrainConfig) -> Placement:
        import torch

        on_gpu = torch.cuda.is_available() and config.trainer.accelerator in ("auto", "gpu", "cuda")
        if str(config.trainer.precision).startswith("bf16") and not on_gpu and not cpu_has_bf16():
            log.warning("trainer.precision=%s on a CPU without bfloat16 hardware runs about 16x slower than 32-true",
                        config.trainer.precision)
        if on_gpu:  # before the kernel self-check, so that it checks the TF32 matmuls the run will use
            torch.set_float32_matmul_precision("high")
        devices = config.trainer.devices
        processes = 1 if on_gpu else devices if isinstance(devices, int) and devices > 1 else 1  # CPU DDP shares RAM
        return cls(on_gpu, f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if on_gpu else "cpu", processes,
                   config.trainer.world_size() if config.trainer.strategy == "fsdp" else 1)

    def check_fits(self, config: TrainConfig, task: type[Task], model_cfg: ModelConfig) -> None:
        """Refuse a model whose training state cannot fit (minitx.memory), before anything is allocated."""
        from minitx.memory import check_fits

        check_fits(model_cfg, model_cfg.vocab_size, config.data.batch_size, config.trainer.precision, self.device,
                   self.processes, logit_share=task.logit_share(config), shards=self.shards)


def choose_kernel(config: TrainConfig, task: type[Task], place: Placement) -> tuple[str, str]:
    """The attention kernel the run trains with, and why: model.attention if it can run these masks here and passes
    its self-check at the run's shapes, else the first fallback that does (minitx.kernel_check)."""
    import torch

    from minitx.attention import resolve_kernel
    from minitx.kernel_check import checked_kernel

    try:
        kernel, why = resolve_kernel(config.model.attention, "cuda" if place.on_gpu else "cpu", True,
                                     attention_masks(config))
    except ValueError as e:
        raise ConfigError(f"model.attention={config.model.attention!r}: {e}") from None
    place.check_fits(config, task, dataclasses.replace(config.model, attention=kernel))  # before the data
    if config.model.attention_check and kernel != "naive":
        checked = checked_kernel(kernel, training_cases(config, kernel, place.device))
        if checked != kernel:
            kernel, why = checked, f"{kernel} failed its self-check"
        if place.on_gpu:
            torch.cuda.empty_cache()  # what the check allocated is not held from the memory estimate
    return kernel, why


def tokens_per_step(config: TrainConfig) -> int:
    """The effective global batch in tokens: batch_size x block_size x accumulate_grad_batches x processes."""
    t = config.trainer
    return config.data.batch_size * config.model.block_size * t.accumulate_grad_batches * t.world_size()


def sized_model(config: TrainConfig, prepared: Prepared, kernel: str) -> ModelConfig:
    """The model's settings as trained: the vocabulary from the tokenizer (unless set), the chosen kernel."""
    from minitx.tokenizer import id_limit

    vocab = id_limit(prepared.tokenizer)  # the largest id + 1: a tokenizer.json may skip ids
    if config.model.vocab_size and config.model.vocab_size < vocab:
        raise ConfigError(f"model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's largest id + 1 "
                          f"({vocab}); set model.vocab_size=0 to take it from the tokenizer")
    return dataclasses.replace(config.model, vocab_size=config.model.vocab_size or vocab, attention=kernel)


def make_strategy(config: TrainConfig) -> Any:
    """trainer.strategy as Lightning takes it, except `fsdp`: FSDP2 through Lightning's ModelParallelStrategy
    (minitx.fsdp), which runs on CPU processes too, where Lightning's own `fsdp` refuses a CPU."""
    from minitx.fsdp import STRATEGY, FullyShardedStrategy

    return FullyShardedStrategy() if config.trainer.strategy == STRATEGY else config.trainer.strategy


def make_trainer(config: TrainConfig, task: type[Task], out_dir: Path, ckpt_dir: Path, resume: Resume | None,
                 run_config: dict[str, Any], callbacks: list[Any], tokenizer: Any) -> tuple[Any, Any, RunSummary]:
    """The Lightning Trainer with minitx's callbacks (checkpoints, metrics, progress, the run summary; with wandb,
    the samples table), the best-checkpoint callback and the run-summary one."""
    import lightning as L

    from minitx.callbacks import (
        AtomicCheckpointIO,
        Checkpoint,
        FinalValidation,
        NoProfiler,
        ProgressBar,
        TrainingMetrics,
    )
    from minitx.samples import SampleTable
    from minitx.summary import RunSummary
    from minitx.tracking import make_logger

    metric, mode = task.monitor
    best = Checkpoint(
        dirpath=ckpt_dir, filename="best", monitor=metric, mode=mode, save_top_k=1, save_last=True,
        auto_insert_metric_name=False, enable_version_counter=False,
    )
    periodic = Checkpoint(
        dirpath=ckpt_dir, filename="step-{step:06d}", monitor="step", mode="max",
        save_top_k=config.checkpoint.keep_last, every_n_train_steps=config.checkpoint.every_n_steps,
        save_last=True, auto_insert_metric_name=False,
    )
    metrics = TrainingMetrics(config.trainer.log_every_n_steps, config.perf.peak_flops)
    progress_bar = [ProgressBar(config.trainer.log_every_n_steps, metrics)] * config.trainer.enable_progress_bar
    summary = RunSummary(metrics)
    run_id = resume.meta.get("logger_run_id") if resume else None
    logger = make_logger(config.logger, config.name, out_dir, run_config, run_id, task.task or config.task)
    sharded = config.trainer.strategy == "fsdp"  # rank 0 alone cannot run a sharded model: no samples table
    if sharded and config.logger.kind == "wandb" and config.sample.table_tokens > 0:
        log.info("no wandb samples table under trainer.strategy=fsdp (the end-of-training sample is still shown)")
    samples = [SampleTable(config, tokenizer)] if config.logger.kind == "wandb" and not sharded else []
    trainer = L.Trainer(
        **{k: v for k, v in dataclasses.asdict(config.trainer).items()
           if k not in ("gradient_clip_val", "accumulate_grad_batches", "tokens_per_step", "val_check_interval",
                        "strategy")},
        # Lightning counts batches between evaluations; minitx's key counts optimizer steps, so that an evaluation
        # falls at the same step on 1 process or N (tokens_per_step derives the accumulation from the world size)
        val_check_interval=config.trainer.val_check_interval * config.trainer.accumulate_grad_batches,
        strategy=make_strategy(config),
        logger=logger,
        callbacks=[best, periodic, metrics, summary, FinalValidation(), *progress_bar, *samples, *callbacks],
        plugins=[AtomicCheckpointIO()],
        default_root_dir=out_dir,
        check_val_every_n_epoch=None,  # validate every val_check_interval steps of the endless stream
        # a full evaluation (every batch) before step 1 gives the initial val/loss; a resumed run has had it
        num_sanity_val_steps=0 if resume else -1,
        use_distributed_sampler=False,  # the data modules shard validation themselves (no repeated batches)
        enable_model_summary=False,
        profiler=NoProfiler(),
    )
    return trainer, best, summary


def quiet_lightning() -> None:
    """Lightning's notices that say nothing to a minitx user."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*isinstance.treespec, LeafSpec.*")  # Lightning 2.6 on torch 2.13
    # the state after the step is the one to save (as in automatic optimization); resume tests check it
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")


def writable(*folders: Path) -> None:
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK):
            raise ConfigError(f"{folder}: output directory is not writable; set hydra.run.dir=<a writable path>")


def train(config: TrainConfig, out_dir: Path, callbacks: list[Any] | None = None) -> float:
    """Train per `config`, write checkpoints, show what the task shows at the end (a sample); return the best value
    of the task's monitored metric (Task.monitor: val/loss for minitx's tasks). `callbacks` are added to minitx's own
    (tests use it to inject faults)."""
    with released_launcher():
        return _train(config, out_dir, callbacks)


def _train(config: TrainConfig, out_dir: Path, callbacks: list[Any] | None) -> float:
    import lightning as L

    from minitx.fsdp import is_sharded, unshard_for_rank_zero
    from minitx.summary import print_summary, write_summary
    from minitx.tasks import task_class
    from minitx.tokenizer import id_limit
    from minitx.tracking import abort_wandb, finish_wandb, offline_dir

    quiet_lightning()
    task = task_class(config.task)
    resume = Resume.of(config)
    ckpt_dir = resume.path.parent if resume else out_dir / "checkpoints"  # a resumed run keeps writing where it was
    writable(out_dir, ckpt_dir)
    place = Placement.of(config)
    kernel, why = choose_kernel(config, task, place)
    L.seed_everything(config.seed, verbose=False)

    prepared = task.prepare(config)
    model_cfg = sized_model(config, prepared, kernel)
    place.check_fits(config, task, model_cfg)  # with the vocabulary
    if resume:
        check_same_run(resume.meta, model_cfg, prepared.tokenizer.to_str(), str(config.resume))
    run_config = dataclasses.asdict(config) | {"model": dataclasses.asdict(model_cfg)}
    run_config["trainer"]["tokens_per_step"] = tokens_per_step(config)  # the global batch as run, also when derived
    module, datamodule = task.build(config, model_cfg, prepared, run_config)
    trainer, best, summary = make_trainer(config, task, out_dir, ckpt_dir, resume, run_config, callbacks or [],
                                          prepared.tokenizer)
    if trainer.world_size != config.trainer.world_size():  # the global batch was worked out for the latter
        raise ConfigError(f"trainer.devices={config.trainer.devices}: Lightning starts {trainer.world_size} processes "
                          f"where minitx counted {config.trainer.world_size()}; give trainer.devices as a number")
    if trainer.is_global_zero:
        log.info("data: %s, vocabulary %d", prepared.description, id_limit(prepared.tokenizer))
        t = config.trainer
        log.info("global batch: %d x %d tokens x %d accumulated x %d processes = %s tokens per optimizer step",
                 config.data.batch_size, config.model.block_size, t.accumulate_grad_batches, trainer.world_size,
                 f"{tokens_per_step(config):,}")
        log.info("model: %.2fM parameters, attention=%s (%s); outputs in %s", module.model.num_params() / 1e6,
                 kernel, why, out_dir)
        if resume:
            log.info("resuming %s at step %d", resume.path, resume.step)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume.path) if resume else None)
    except BaseException:
        abort_wandb(trainer.logger)
        raise

    if is_sharded(trainer.strategy):
        unshard_for_rank_zero(module, trainer.is_global_zero)
    metric = task.monitor[0]
    final = float(trainer.callback_metrics[metric])
    best_value = float(best.best_model_score) if best.best_model_score is not None else final
    if trainer.is_global_zero:
        start = f"{module.initial_metrics[metric]:.4f} at step 0 -> " if metric in module.initial_metrics else ""
        log.info("%s %s%.4f at step %d (best %.4f)", metric, start, final, trainer.global_step, best_value)
        numbers = summary.numbers(config.name, task.task or config.task, trainer.global_step, best.best_model_path)
        numbers["tokens_per_step"] = tokens_per_step(config)
        if metric == "val/loss":  # best.ckpt's score: after a resume, the evaluations before it count too
            numbers["best_val_loss"] = best_value
        write_summary(numbers, out_dir)
        sync_dir = offline_dir(trainer.logger)
        finish_wandb(trainer.logger, numbers, best.best_model_path, config.logger.log_model)
        print_summary(numbers, sync_dir)
        try:
            module.show(config, prepared.tokenizer)
        except MinitxError as e:  # the run and its checkpoints are done: a display that cannot be made is a warning
            log.warning("nothing shown at the end of training: %s", e)
    return best_value


def check_output_dir(argv: list[str]) -> None:
    """Create an explicitly given hydra.run.dir / hydra.sweep.dir now, so that one we cannot create fails as one
    line (Hydra would fail later, with a traceback)."""
    for arg in argv:
        key, _, value = arg.partition("=")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":  # Hydra's quoting (Lightning's DDP
            value = value[1:-1]  # children get hydra.run.dir="<dir>")
        if key in ("hydra.run.dir", "hydra.sweep.dir") and value and "${" not in value:
            try:
                Path(value).mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ConfigError(f"{key}={value}: cannot create the output directory ({e.strerror})") from None
            if not os.access(value, os.W_OK):
                raise ConfigError(f"{key}={value}: the output directory is not writable")


# A sweep's job, for the DDP processes Lightning starts for it: its overrides and its directory (JSON)
SWEEP_JOB = "MINITX_SWEEP_JOB"
LAUNCHER_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "OMP_NUM_THREADS", SWEEP_JOB)


@contextlib.contextmanager
def released_launcher() -> Iterator[None]:
    """Around one training run in this process: afterwards the process group it started, the variables Lightning's
    launcher set here and the thread count it chose are dropped, so that the next run in the same process (a sweep's
    next job, a Python caller's second train()) starts its own processes on a fresh port, on every core."""
    import torch
    import torch.distributed as dist

    before = {k: os.environ.get(k) for k in LAUNCHER_ENV}
    had_group = dist.is_available() and dist.is_initialized()
    threads = torch.get_num_threads()  # Lightning's CPU DDP divides the cores between its processes
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if not had_group and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def sweep_job(hydra_config: Any) -> Iterator[None]:
    """In a sweep (-m), one job: its DDP processes are told which job they are (see job_argv); train() releases the
    job's process group and launcher variables when it ends (released_launcher)."""
    from hydra.types import RunMode

    if hydra_config.mode != RunMode.MULTIRUN:
        yield
        return
    before = os.environ.get(SWEEP_JOB)
    os.environ[SWEEP_JOB] = json.dumps([*hydra_config.overrides.task,
                                        f'hydra.run.dir="{hydra_config.runtime.output_dir}"'])
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(SWEEP_JOB, None)
        else:
            os.environ[SWEEP_JOB] = before


def job_argv(argv: list[str]) -> list[str]:
    """The command line of this process. Lightning starts a DDP run's other processes with the first process's
    command line (hydra.run.dir, hydra.job.name and hydra.output_subdir appended: lightning.fabric.strategies.
    launchers.subprocess_script); in a sweep that would run the whole sweep again, into a new sweep directory. Such
    a process runs its own job instead: the job's overrides, in the job's directory."""
    job = os.environ.get(SWEEP_JOB)
    if job is None or "LOCAL_RANK" not in os.environ or not {"-m", "--multirun"} & set(argv):
        return argv
    lightning_args = [a for a in argv if a.startswith(("hydra.job.name=", "hydra.output_subdir="))]
    return [*json.loads(job), *lightning_args]


def launched_rank() -> int | None:
    """This process's global rank when a launcher outside Lightning (torchrun, srun) started all the processes, as
    Lightning's TorchElasticEnvironment and SLURMEnvironment read it; None for a single or Lightning-started run."""
    if not {"TORCHELASTIC_RUN_ID", "SLURM_NTASKS"} & set(os.environ):  # (spare --help the import of Lightning)
        return None
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    for environment in (TorchElasticEnvironment, SLURMEnvironment):
        if environment.detect() and environment().world_size() > 1:
            return environment().global_rank()
    return None


def launched_argv(argv: list[str]) -> list[str]:
    """Under torchrun or srun every process composes the config itself: they must share one run directory (a
    timestamped default could differ between nodes), and, as in Lightning's own launcher, only rank 0 writes .hydra/
    while each other rank logs to <run dir>/train_rank_<rank>.log."""
    rank = launched_rank()
    if rank is None:
        return argv
    if {"-m", "--multirun"} & set(argv):
        raise ConfigError("-m: a sweep cannot run under torchrun or srun; launch one job per run")
    if not any(arg.startswith("hydra.run.dir=") for arg in argv):
        raise ConfigError("hydra.run.dir: under torchrun or srun every process needs the same run directory; set "
                          "hydra.run.dir=<a path all nodes share>")
    return argv if rank == 0 else [*argv, "hydra.output_subdir=null", f"hydra.job.name=train_rank_{rank}"]


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def hydra_main(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig

    with exit_on_user_error(), sweep_job(HydraConfig.get()):
        config = parse_config(cfg)
        return train(config, Path(HydraConfig.get().runtime.output_dir))


def main() -> None:
    """The minitx-train console script."""
    sys.argv[1:] = job_argv(sys.argv[1:])
    with exit_on_user_error():
        sys.argv[1:] = launched_argv(sys.argv[1:])
        check_output_dir(sys.argv[1:])
    hydra_main()


if __name__ == "__main__":
    main()
