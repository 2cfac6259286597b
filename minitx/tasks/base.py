"""What every training task shares: the Lightning module's optimization step and evaluation, and the wiring a task
supplies to `minitx-train` (its data, model, data module, monitored metric, and what it shows at the end)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import lightning as L
import torch

from minitx.callbacks import TrainingMetrics, write
from minitx.checkpoint import CHECKPOINT_KEY
from minitx.config import ConfigError, GuardConfig, MinitxError, ModelConfig, OptimConfig, TrainConfig, TrainerConfig
from minitx.data import global_batch_index, prepare_data

if TYPE_CHECKING:
    from tokenizers import Tokenizer

log = logging.getLogger("minitx")


@dataclass
class Prepared:
    """A task's data, ready for its data module, and the tokenizer the model's vocabulary comes from."""

    data: Any  # what the task's data module reads (minitx.data.PreparedData, LabelledData, ...)
    tokenizer: Tokenizer
    description: str  # for the log: the source and its size
    pretrained: Any = None  # a checkpoint (minitx.checkpoint.Loaded) the model starts from, if any


class NonFiniteError(MinitxError):
    """The loss or the gradient norm stopped being a finite number."""


def lr_at(step: int, cfg: OptimConfig, decay_steps: int) -> float:
    """Linear warmup to cfg.lr; then cosine decay to cfg.min_lr at `decay_steps` (schedule=cosine), or cfg.lr held
    until the last cooldown_frac of the steps and a linear decay to cfg.min_lr there (schedule=wsd: warmup-stable-
    decay, as modded-nanogpt and nanochat train); flat after `decay_steps`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    if step >= decay_steps:
        return cfg.min_lr
    if cfg.schedule == "wsd":
        stable_until = max(cfg.warmup_steps, decay_steps - round(cfg.cooldown_frac * decay_steps))
        if step < stable_until:
            return cfg.lr
        return cfg.lr + (step - stable_until) / (decay_steps - stable_until) * (cfg.min_lr - cfg.lr)
    progress = (step - cfg.warmup_steps) / max(1, decay_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def hidden_matrices(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The transformer blocks' 2-D weights (attention and MLP projections): what Muon orthogonalises. Embeddings, the
    heads, norms and biases are not hidden matrices (Muon's authors keep them on AdamW)."""
    return [p for p in model.transformer.blocks.parameters() if p.requires_grad and p.dim() == 2]


def adamw(params: Iterable[torch.nn.Parameter], cfg: OptimConfig, fused: bool = True) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (dim >= 2) only; the fused kernel where the device has one (not under
    float16 loss scaling: a fused AdamW unscales inside its step, after the gradients would have been clipped)."""
    params = [p for p in params if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


def lr_scales(cfg: OptimConfig) -> list[float]:
    """Each optimizer's learning rate over optim.lr (AdamW's is optim.lr; Muon's optim.muon_lr), from the config: a
    resumed run takes the rates it is given, not the checkpoint's."""
    return [1.0] if cfg.name == "adamw" else [1.0, cfg.muon_lr / cfg.lr]


def optimizers(model: torch.nn.Module, cfg: OptimConfig, fused: bool = True) -> list[torch.optim.Optimizer]:
    """optim.name=adamw: AdamW for every parameter. optim.name=muon: torch.optim.Muon (minitx.muon: momentum, then
    the update orthogonalised by Newton-Schulz iterations, so every direction of a matrix moves at the same rate) for
    the hidden matrices at optim.muon_lr, and AdamW at optim.lr for the rest; one schedule (lr_at) sets both, scaled
    by lr_scales."""
    params = list(model.parameters())
    if cfg.name == "adamw":
        return [adamw(params, cfg, fused)]
    from minitx.muon import Muon

    matrices = {id(p) for p in hidden_matrices(model)}
    muon = Muon([p for p in params if id(p) in matrices], lr=cfg.muon_lr, weight_decay=cfg.weight_decay,
                momentum=cfg.muon_momentum, nesterov=True, ns_steps=cfg.muon_ns_steps)
    return [adamw([p for p in params if id(p) not in matrices], cfg, fused), muon]


class Task(L.LightningModule):
    """What every minitx training task shares: the optimization step (AdamW with warmup + cosine, gradient
    accumulation, clipping with a non-finite guard), fixed-window evaluation, and checkpoints that carry everything a
    resumed run or a sampler needs: the model config, the tokenizer, the run config, the number of training batches
    drawn (the data position) and the RNG states. A task says what its model is, what its loss is, and what it
    measures.

    The step is written out here (Lightning's manual optimization) rather than left to Lightning's automatic loop,
    which costs about 0.8 ms a step on a CPU: 3% of the nanoGPT CPU recipe. Lightning still does the rest:
    precision (loss scaling), gradient sync across processes, step counting, checkpoints. Lightning does not know
    about the accumulation, so its own batch-based counters (the logger's step axis) count batches."""

    task: ClassVar[str] = ""  # its name in TASKS (task=...), written into checkpoints
    causal: ClassVar[bool] = False  # attention is causal (for the kernel self-check)
    padded: ClassVar[bool] = False  # batches carry padding masks (for kernel choice and the self-check)
    monitor: ClassVar[tuple[str, str]] = ("val/loss", "min")  # what best.ckpt keeps the best of

    # -- the wiring minitx-train calls, in this order --------------------------------------------------------------

    @classmethod
    def check_config(cls, config: TrainConfig) -> None:
        """Fail at start-up, as one line, on settings this task cannot run with."""

    @classmethod
    def logit_share(cls, config: TrainConfig) -> float:
        """The share of positions whose logits over the vocabulary are computed (the memory estimate)."""
        return 0.0

    @classmethod
    def prepare(cls, config: TrainConfig) -> Prepared:
        """Load and tokenize the data (training the tokenizer if the config says so)."""
        raise NotImplementedError

    @classmethod
    def build(cls, config: TrainConfig, model_cfg: ModelConfig, prepared: Prepared,
              run_config: dict[str, Any]) -> tuple[Task, L.LightningDataModule]:
        """The module (with its model, sized by `model_cfg`) and the data module that feeds it."""
        raise NotImplementedError

    def show(self, config: TrainConfig, tokenizer: Tokenizer) -> None:
        """What the end of training prints from the final weights (config.sample), on rank 0."""

    def samples(self, config: TrainConfig, tokenizer: Tokenizer) -> list[dict[str, str]]:
        """Rows of the wandb samples table logged at every evaluation (minitx.samples): what the model makes of each
        of sample.table_prompts now; a task with nothing to show returns none. Called in eval mode, without
        gradients."""
        return []

    # -- training ----------------------------------------------------------------------------------------------------

    def __init__(self, model_cfg: ModelConfig, optim_cfg: OptimConfig, trainer_cfg: TrainerConfig,
                 tokenizer_json: str, guard: GuardConfig | None = None, run_config: dict[str, Any] | None = None):
        super().__init__()
        self.automatic_optimization = False
        self.model_cfg, self.optim_cfg = model_cfg, optim_cfg
        self.decay_steps = optim_cfg.decay_steps or trainer_cfg.max_steps
        self.lr_scales = lr_scales(optim_cfg)
        self.clip = trainer_cfg.gradient_clip_val or math.inf  # 0: no clipping (the norm is still checked)
        self.accumulate = trainer_cfg.accumulate_grad_batches
        self.tokenizer_json = tokenizer_json
        self.guard = guard or GuardConfig()
        self.run_config = run_config or {}
        self.batches_seen = 0  # training batches drawn so far: where the data stream resumes
        self.skipped_steps = 0
        self.step_loss: torch.Tensor | None = None  # the last optimizer step's mean loss on this process
        self._window_loss = torch.zeros(())
        self.grad_norm: torch.Tensor | None = None  # the last step's, before clipping (0-dim; TrainingMetrics reads it)
        self.initial_metrics: dict[str, float] = {}  # the evaluation before step 1
        self._val_sums: list[dict[str, torch.Tensor]] = []  # per validation batch: name -> [sum, count]
        self._rng_to_restore: dict[str, Any] | None = None
        self.document_eot: int | None = None  # set: packed windows are split into documents at this token

    model: torch.nn.Module

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "_current_fx_name":  # set and reset around each of ~30 hook calls a step: skip nn.Module's checks
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def train_loss(self, batch: Any) -> torch.Tensor:
        raise NotImplementedError

    def val_metrics(self, batch: Any, batch_idx: int) -> dict[str, tuple[torch.Tensor, int]]:
        """Per-batch validation (sum, count) pairs, e.g. the loss summed over the batch's targets and their number;
        must include "loss". `batch_idx` is the batch's index in the whole validation set. The logged number is
        the sum over every batch of every process divided by the count: batches of unequal size weigh what they
        hold."""
        raise NotImplementedError

    def derived_metrics(self, means: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Numbers computed from the reduced means (val/ppl from val/loss)."""
        return {}

    def checkpoint_extras(self) -> dict[str, Any]:
        return {}

    def configure_model(self) -> None:
        """Lightning calls this once the processes exist: under trainer.strategy=fsdp the model is sharded across
        them (minitx.fsdp), and compiled block by block; otherwise compiled whole, in place (the LightningModule's
        self.log does not compile)."""
        from minitx.fsdp import is_sharded, shard

        if is_sharded(self.trainer.strategy):
            done = shard(self.model, self.device_mesh["data_parallel"], str(self.trainer.precision),
                         self.model_cfg.compile)
            if self.trainer.is_global_zero:
                log.info(done)
        elif self.model_cfg.compile:
            self.model.compile()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """One batch: forward and backward; every `trainer.accumulate_grad_batches` batches, one optimizer step
        (clipping and the non-finite check run in on_before_optimizer_step, after any loss unscaling)."""
        self.batches_seen += 1
        loss = self.train_loss(batch)
        stepping = self.batches_seen % self.accumulate == 0
        if math.isfinite(loss.item()):  # (a 0-dim read: ~20x cheaper than torch.isfinite's new tensor)
            with self._gradient_sync(stepping):  # across processes, on a window's last batch only
                self.manual_backward(loss / self.accumulate if self.accumulate > 1 else loss)
        else:
            self._nonfinite("loss", loss)  # raises, or skips: this batch adds no gradient
        if self.accumulate > 1:  # the step's loss is its window's mean (one process at accumulation A x N = N of them)
            first = self.batches_seen % self.accumulate == 1
            self._window_loss = loss.detach() if first else self._window_loss + loss.detach()
        if stepping:
            self.step_loss = loss.detach() if self.accumulate == 1 else self._window_loss / self.accumulate
            lr = lr_at(self.trainer.global_step, self.optim_cfg, self.decay_steps)  # a function of the step alone
            optimizers = self.trainer.optimizers  # AdamW, then Muon with optim=muon
            for optimizer, scale in zip(optimizers, self.lr_scales, strict=True):
                for group in optimizer.param_groups:
                    group["lr"] = lr * scale
            wrapped = self.optimizers()  # Lightning's wrapper: precision, the on_before_optimizer_step hook, the count
            (wrapped[0] if isinstance(wrapped, list) else wrapped).step()  # type: ignore[union-attr]
            for optimizer in optimizers[1:]:  # unwrapped: Lightning counts every wrapped step as an optimizer step
                optimizer.step()
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
        return loss  # the TrainingMetrics callback logs it (and lr) every trainer.log_every_n_steps steps

    def _gradient_sync(self, stepping: bool) -> contextlib.AbstractContextManager:
        """DDP: its no_sync() inside an accumulation window; FSDP2: its reduce-scatter switched off there."""
        if self.accumulate == 1:
            return contextlib.nullcontext()
        if isinstance(self.trainer.model, torch.nn.parallel.DistributedDataParallel) and not stepping:
            return self.trainer.model.no_sync()
        if hasattr(self.model, "set_requires_gradient_sync"):  # (a model fully_shard-ed: minitx.fsdp)
            self.model.set_requires_gradient_sync(stepping)
        return contextlib.nullcontext()

    def on_validation_model_zero_grad(self) -> None:
        """Lightning empties the gradients before an evaluation; inside an accumulation window they are still
        needed."""
        if self.batches_seen % self.accumulate == 0:
            super().on_validation_model_zero_grad()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Clip by global norm (trainer.gradient_clip_val; 0 = off), and check that norm is finite. Lightning calls
        this inside optimizer.step(), after float16's loss scale has been taken out of the gradients; with two
        optimizers (optim=muon), only the first is stepped through Lightning: once, before either moves a weight."""
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.grad_norm = norm.detach()  # kept on the device: read once per log interval, not once a step
        if self.trainer.precision == "16-mixed":
            return  # float16's grad scaler expects overflows: it skips those steps and lowers its scale
        if not math.isfinite(norm.item()):
            self._nonfinite("gradient norm", norm)
            self.model.zero_grad(set_to_none=True)  # skip: AdamW and Muon leave parameters without gradients alone

    def _nonfinite(self, what: str, value: torch.Tensor) -> None:
        step = self.trainer.global_step + 1
        if self.guard.on_nonfinite == "skip" and self.skipped_steps < self.guard.max_skips:
            self.skipped_steps += 1
            self.print(f"warning: non-finite {what} ({float(value)}) at step {step}: step skipped "
                       f"({self.skipped_steps}/{self.guard.max_skips})")
            return None
        written = [Path(p) for cb in self.trainer.checkpoint_callbacks for p in (cb.last_model_path, cb.best_model_path)
                   if p and Path(p).exists()]
        last_good = max(written, key=lambda p: p.stat().st_mtime) if written else "none yet"
        raise NonFiniteError(
            f"non-finite {what} ({float(value.detach())}) at step {step}; stopped. Last good checkpoint: {last_good} "
            "(guard.on_nonfinite=skip skips such steps)"
        )

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        pairs = self.val_metrics(batch, global_batch_index(batch_idx, self.trainer))
        self._val_sums.append({k: torch.stack([total.detach().float(), torch.as_tensor(count, dtype=torch.float32,
                                                                                       device=total.device)])
                               for k, (total, count) in pairs.items()})

    def on_validation_epoch_end(self) -> None:
        """Sums and counts over every batch and every process, divided once; derived numbers after that."""
        names = list(self._val_sums[0])
        wide = torch.float32 if self.device.type == "mps" else torch.float64  # (MPS has no float64)
        totals = torch.stack([torch.stack([batch[k] for k in names]) for batch in self._val_sums]).to(wide).sum(0)
        self._val_sums.clear()
        totals = self.trainer.strategy.reduce(totals, reduce_op="sum")  # (names, [sum, count])
        means = {k: (totals[i, 0] / totals[i, 1]).float() for i, k in enumerate(names)}
        metrics = {f"val/{k}": v for k, v in (means | self.derived_metrics(means)).items()}
        self.log_dict(metrics, logger=False, sync_dist=True)  # for the checkpoint callbacks (the same on every rank)
        step = 0 if self.trainer.sanity_checking else self.trainer.global_step  # the sanity pass: the step-0 eval
        numbers = {k: float(v) for k, v in metrics.items()}
        clock = next((cb for cb in self.trainer.callbacks if isinstance(cb, TrainingMetrics)), None)
        when = {"time": clock.elapsed()} if clock else {}  # so val/loss can be drawn against wall time too
        write(self.loggers, numbers | when, step)  # at the optimizer step, as TrainingMetrics does
        if self.trainer.is_global_zero:
            log.info("step %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in numbers.items() if k != "val/ppl"))
        if self.trainer.sanity_checking:
            self.initial_metrics = numbers

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        """AdamW, or Muon + AdamW (optimizers); training_step sets their learning rates from the step number before
        each step (lr_at), so the schedule needs no state of its own and resumes exactly."""
        return optimizers(self.model, self.optim_cfg, fused=self.trainer.precision != "16-mixed")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        checkpoint[CHECKPOINT_KEY] = self.checkpoint_extras() | {
            "task": self.task,
            "model": dataclasses.asdict(self.model_cfg),
            "tokenizer": self.tokenizer_json,
            "config": self.run_config,
            "batches_seen": self.batches_seen,
            "world_size": self.trainer.world_size,
            "skipped_steps": self.skipped_steps,
            "rng": rng,
            "logger_run_id": getattr(self.logger, "version", None) if self.logger else None,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Runs before Lightning restores its loops from the same dict."""
        loops = checkpoint.get("loops", {}).get("fit_loop", {})
        automatic = loops.get("epoch_loop.automatic_optimization.optim_progress", {}).get("optimizer", {}).get("step")
        manual = "epoch_loop.manual_optimization.optim_step_progress"
        steps_done = loops.get(manual, {}).get("total", {}).get("completed")
        if automatic and automatic["total"]["completed"] and not steps_done:
            loops[manual] = copy.deepcopy(automatic)  # written before minitx took the step over: keep its step count
        meta = checkpoint[CHECKPOINT_KEY]
        world = meta.get("world_size", self.trainer.world_size)  # (older checkpoints do not record it)
        if world != self.trainer.world_size:  # each rank's batch count and the evaluation steps are laid out for it
            raise ConfigError(f"resume: the checkpoint's run trained on {world} process(es), this one has "
                              f"{self.trainer.world_size}; resume with trainer.devices x trainer.num_nodes = {world}")
        saved = (meta.get("config") or {}).get("optim", {}).get("name", "adamw")
        if saved != self.optim_cfg.name:  # the optimizers' states would not fit: refuse before Lightning tries
            raise ConfigError(f"resume: the checkpoint's run trained with optim.name={saved}, this one has "
                              f"optim.name={self.optim_cfg.name}; resume with optim={saved}")
        self.batches_seen = meta["batches_seen"]
        self.skipped_steps = meta.get("skipped_steps", 0)
        self._rng_to_restore = meta["rng"]

    def on_train_start(self) -> None:
        if self._rng_to_restore is not None:  # restored here, so nothing between loading and step 1 draws from it
            torch.set_rng_state(self._rng_to_restore["torch"])
            if "cuda" in self._rng_to_restore and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(self._rng_to_restore["cuda"])
            self._rng_to_restore = None

    # -- helpers for the tasks ---------------------------------------------------------------------------------------

    def doc_ids(self, x: torch.Tensor) -> torch.Tensor | None:
        """Document index of every position: <|endoftext|> opens the next document (it predicts its first token)."""
        return None if self.document_eot is None else (x == self.document_eot).cumsum(dim=1)

    def check_kernel_for(self, prompt_len: int, max_new_tokens: int) -> None:
        """Self-check the model's kernel at the end-of-training display's shapes (batch 1); fall back if wrong."""
        from minitx.kernel_check import checked_kernel, sampling_cases

        kernel = self.model_cfg.attention
        if self.model_cfg.attention_check and kernel != "naive":
            parameter = next(self.model.parameters())
            cases = sampling_cases(self.model_cfg, kernel, self.causal, prompt_len, max_new_tokens, True,
                                   parameter.dtype, str(parameter.device))
            self.model.transformer.set_attention(checked_kernel(kernel, cases), self.model_cfg.sdpa_backend)


# -- what the token-stream tasks (causal_lm, masked_lm) share ------------------------------------------------------


def token_stream(config: TrainConfig, encoder: bool, tokenizer: Tokenizer | None = None) -> Prepared:
    """The corpus as cached token streams (train, val) of at least one window each; `encoder`: the tokenizer gets
    the encoder's special tokens; `tokenizer`: use this one (a pretrained model's) instead of tokenizer.*. With
    data.streaming, the training stream is read as it trains (minitx.streaming); only validation is tokenized here."""
    if config.data.streaming:
        from minitx.streaming import prepare_stream

        stream = prepare_stream(config.data, config.tokenizer, config.model.block_size + 1, encoder=encoder,
                                tokenizer=tokenizer)
        return Prepared(stream, stream.tokenizer, f"{stream.description}, {len(stream.val):,} val tokens")
    data = prepare_data(config.data, config.tokenizer, config.model.block_size + 1, encoder=encoder,
                        tokenizer=tokenizer, prepare_cfg=config.prepare)
    description = (data.description + " (token cache)" * data.from_cache +
                   f", {len(data.train):,} train / {len(data.val):,} val tokens")
    return Prepared(data, data.tokenizer, description)


def document_eot(config: TrainConfig, tokenizer: Tokenizer) -> int | None:
    """The <|endoftext|> id that splits packed windows into documents (data.document_mask), else None."""
    from minitx.tokenizer import EOT

    return tokenizer.token_to_id(EOT) if config.data.document_mask else None


# -- the registry ---------------------------------------------------------------------------------------------------

TASKS: dict[str, type[Task]] = {}  # task=<name> -> its class; the config key indexes it, nothing branches on it


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: make `cls` available as task=<cls.task>."""
    if not cls.task or TASKS.get(cls.task, cls) is not cls:
        raise ValueError(f"{cls.__name__}.task={cls.task!r}: a task needs a name of its own (taken: {sorted(TASKS)})")
    TASKS[cls.task] = cls
    return cls


def task_class(name: str) -> type[Task]:
    """The class of task=<name>: a registered name, or `package.module:Class` for a task defined outside minitx (the
    module must be importable: installed, or on PYTHONPATH)."""
    if name in TASKS:
        return TASKS[name]
    module, colon, attribute = name.partition(":")
    if not colon:
        raise ConfigError(f"task={name!r}: choose one of {sorted(TASKS)}, or name a class of your own as "
                          "task=package.module:Class")
    try:
        cls = getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"task={name!r}: cannot import it ({e})") from None
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise ConfigError(f"task={name!r}: not a subclass of minitx.tasks.Task")
    return cls
