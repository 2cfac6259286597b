"""Lightning modules: what a training step and an evaluation mean for each kind of model."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from minitx.callbacks import write
from minitx.config import GuardConfig, MinitxError, ModelConfig, OptimConfig, TrainerConfig
from minitx.data import global_batch_index
from minitx.model import GPT, Encoder

log = logging.getLogger("minitx")
CHECKPOINT_KEY = "minitx"  # the part of a .ckpt that rebuilds model and tokenizer without any config


class NonFiniteError(MinitxError):
    """The loss or the gradient norm stopped being a finite number."""


def lr_at(step: int, cfg: OptimConfig, decay_steps: int) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.min_lr at `decay_steps`, flat after."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    if step >= decay_steps:
        return cfg.min_lr
    progress = (step - cfg.warmup_steps) / max(1, decay_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def adamw(model: torch.nn.Module, cfg: OptimConfig, fused: bool = True) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (dim >= 2) only; the fused kernel where the device has one (not under
    float16 loss scaling: a fused AdamW unscales inside its step, after the gradients would have been clipped)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


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

    task = ""  # the name written into checkpoints

    def __init__(self, model_cfg: ModelConfig, optim_cfg: OptimConfig, trainer_cfg: TrainerConfig,
                 tokenizer_json: str, guard: GuardConfig | None = None, run_config: dict[str, Any] | None = None):
        super().__init__()
        self.automatic_optimization = False
        self.model_cfg, self.optim_cfg = model_cfg, optim_cfg
        self.decay_steps = optim_cfg.decay_steps or trainer_cfg.max_steps
        self.clip = trainer_cfg.gradient_clip_val or math.inf  # 0: no clipping (the norm is still checked)
        self.accumulate = trainer_cfg.accumulate_grad_batches
        self.tokenizer_json = tokenizer_json
        self.guard = guard or GuardConfig()
        self.run_config = run_config or {}
        self.batches_seen = 0  # training batches drawn so far: where the data stream resumes
        self.skipped_steps = 0
        self.initial_val_loss: float | None = None
        self._val_sums: list[dict[str, torch.Tensor]] = []  # per validation batch: name -> [sum, count]
        self._rng_to_restore: dict[str, Any] | None = None

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
        if self.model_cfg.compile:  # compile the inner model in place: the LightningModule's self.log does not compile
            self.model.compile()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """One batch: forward and backward; every `trainer.accumulate_grad_batches` batches, one optimizer step
        (clipping and the non-finite check run in on_before_optimizer_step, after any loss unscaling)."""
        self.batches_seen += 1
        optimizer = self.optimizers()
        loss = self.train_loss(batch)
        stepping = self.batches_seen % self.accumulate == 0
        if math.isfinite(loss.item()):  # (a 0-dim read: ~20x cheaper than torch.isfinite's new tensor)
            ddp = isinstance(self.trainer.model, torch.nn.parallel.DistributedDataParallel)
            with contextlib.nullcontext() if stepping or not ddp else self.trainer.model.no_sync():
                # DDP: gradients sync on a window's last batch only
                self.manual_backward(loss / self.accumulate if self.accumulate > 1 else loss)
        else:
            self._nonfinite("loss", loss)  # raises, or skips: this batch adds no gradient
        if stepping:
            lr = lr_at(self.trainer.global_step, self.optim_cfg, self.decay_steps)  # a function of the step alone
            for group in optimizer.param_groups:  # type: ignore[union-attr]
                group["lr"] = lr
            optimizer.step()  # type: ignore[union-attr]
            optimizer.zero_grad(set_to_none=True)  # type: ignore[union-attr]
        return loss  # the TrainingMetrics callback logs it (and lr) every trainer.log_every_n_steps steps

    def on_validation_model_zero_grad(self) -> None:
        """Lightning empties the gradients before an evaluation; inside an accumulation window they are still
        needed."""
        if self.batches_seen % self.accumulate == 0:
            super().on_validation_model_zero_grad()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Clip by global norm (trainer.gradient_clip_val; 0 = off), and check that norm is finite. Lightning calls
        this inside optimizer.step(), after float16's loss scale has been taken out of the gradients."""
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        if self.trainer.precision == "16-mixed":
            return  # float16's grad scaler expects overflows: it skips those steps and lowers its scale
        if not math.isfinite(norm.item()):
            self._nonfinite("gradient norm", norm)
            optimizer.zero_grad(set_to_none=True)  # skip: AdamW leaves parameters without gradients alone

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
        write(self.loggers, numbers, step)  # at the optimizer step, as TrainingMetrics does
        if self.trainer.is_global_zero:
            log.info("step %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in numbers.items() if k != "val/ppl"))
        if self.trainer.sanity_checking:
            self.initial_val_loss = numbers["val/loss"]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW; training_step sets its learning rate from the step number before each step (lr_at), so the
        schedule needs no state of its own and resumes exactly."""
        return adamw(self.model, self.optim_cfg, fused=self.trainer.precision != "16-mixed")

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
        self.batches_seen = meta["batches_seen"]
        self.skipped_steps = meta.get("skipped_steps", 0)
        self._rng_to_restore = meta["rng"]

    def on_train_start(self) -> None:
        if self._rng_to_restore is not None:  # restored here, so nothing between loading and step 1 draws from it
            torch.set_rng_state(self._rng_to_restore["torch"])
            if "cuda" in self._rng_to_restore and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(self._rng_to_restore["cuda"])
            self._rng_to_restore = None


class CausalLM(Task):
    """Next-token prediction with a GPT. Logs train/loss, val/loss, val/ppl, val/bpc (char tokenizers), lr."""

    task = "causal_lm"

    def __init__(self, model_cfg: ModelConfig, optim_cfg: OptimConfig, trainer_cfg: TrainerConfig, tokenizer_json: str,
                 char_level: bool, guard: GuardConfig | None = None, run_config: dict[str, Any] | None = None,
                 document_eot: int | None = None):
        super().__init__(model_cfg, optim_cfg, trainer_cfg, tokenizer_json, guard, run_config)
        self.char_level = char_level
        self.document_eot = document_eot  # set: windows are split into documents at this token
        self.model = GPT(model_cfg)

    def doc_ids(self, x: torch.Tensor) -> torch.Tensor | None:
        """Document index of every position: <|endoftext|> opens the next document (it predicts its first token)."""
        return None if self.document_eot is None else (x == self.document_eot).cumsum(dim=1)

    def train_loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return self.model(x, y, self.doc_ids(x))[1]

    def val_metrics(self, batch: tuple[torch.Tensor, torch.Tensor],
                    batch_idx: int) -> dict[str, tuple[torch.Tensor, int]]:
        n = batch[1].numel()
        return {"loss": (self.train_loss(batch) * n, n)}

    def derived_metrics(self, means: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        derived = {"ppl": means["loss"].exp()}
        if self.char_level:
            derived["bpc"] = means["loss"] / math.log(2)
        return derived


def mask_tokens(x: torch.Tensor, generator: torch.Generator, mask_id: int, special_ids: torch.Tensor, vocab_size: int,
                p: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking: choose a fraction p of the non-special positions; 80% of them become [MASK], 10% a random
    non-special token, 10% stay as they are. Labels are the original tokens there and -100 (ignored) everywhere else.
    `special_ids` (distinct) are the special tokens' ids: a loaded tokenizer.json has them at its end, not at 0..5."""
    shape, device = x.shape, x.device
    ordinary = torch.ones(vocab_size, dtype=torch.bool, device=device)
    ordinary[special_ids] = False
    eligible = ordinary[x]
    chosen = (torch.rand(shape, generator=generator, device=device) < p) & eligible
    action = torch.rand(shape, generator=generator, device=device)
    nth = torch.randint(vocab_size - len(special_ids), shape, generator=generator, device=device)
    random_tokens = torch.searchsorted(ordinary.cumsum(0), nth + 1)  # the nth non-special id (no host sync)
    # a batch with no chosen position has no loss (0/0): choose one eligible position then (drawn last, so the
    # masks of every other batch stay as they were; no host sync)
    pick = (torch.rand(shape, generator=generator, device=device) * eligible).flatten().argmax()
    fallback = torch.zeros(shape.numel(), dtype=torch.bool, device=device)
    fallback[pick] = eligible.flatten()[pick] & ~chosen.any()
    chosen = chosen | fallback.view(shape)
    inputs = torch.where(chosen & (action < 0.8), mask_id, x)
    inputs = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_tokens, inputs)
    return inputs, torch.where(chosen, x, -100)


class MaskedLM(Task):
    """BERT-style masked-LM pretraining of an Encoder on packed windows of the token stream. Masks are drawn on
    the fly from (seed, batch number), and for validation from the batch index alone, so every run and every
    resume sees the same masks. Logs val/loss, val/mlm_acc and val/majority_acc (always guessing the most common
    token: the baseline mlm_acc has to beat)."""

    task = "masked_lm"
    VAL_SEED = 20260101

    def __init__(self, model_cfg: ModelConfig, optim_cfg: OptimConfig, trainer_cfg: TrainerConfig, tokenizer_json: str,
                 mask_id: int, special_ids: list[int], seed: int, majority_token: int, guard: GuardConfig | None = None,
                 run_config: dict[str, Any] | None = None, document_eot: int | None = None,
                 mlm_probability: float = 0.15):
        super().__init__(model_cfg, optim_cfg, trainer_cfg, tokenizer_json, guard, run_config)
        self.mask_id, self.seed, self.majority_token = mask_id, seed, majority_token
        # never masked, never drawn as replacements; a buffer to follow the model's device, not saved in checkpoints
        self.register_buffer("special_ids", torch.tensor(sorted(set(special_ids)), dtype=torch.long), persistent=False)
        self.document_eot = document_eot
        self.mlm_probability = mlm_probability
        self.model = Encoder(model_cfg)

    def masked_loss(self, x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        inputs, labels = mask_tokens(x, generator, self.mask_id, self.special_ids, self.model_cfg.vocab_size,
                                     self.mlm_probability)
        doc_ids = None if self.document_eot is None else (x == self.document_eot).cumsum(dim=1)
        hidden = self.model.transformer(inputs, doc_ids=doc_ids)
        chosen = labels != -100
        logits = self.model.mlm_logits(hidden[chosen])  # only masked positions go through the head and the loss
        targets = labels[chosen]  # (no position chosen only when none can be: then 0, not NaN)
        return F.cross_entropy(logits, targets, reduction="sum") / max(targets.numel(), 1), logits, targets

    def train_loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        generator = torch.Generator(device=batch[0].device).manual_seed(self.seed * 1_000_003 + self.batches_seen)
        return self.masked_loss(batch[0], generator)[0]

    def val_metrics(self, batch: tuple[torch.Tensor, torch.Tensor],
                    batch_idx: int) -> dict[str, tuple[torch.Tensor, int]]:
        generator = torch.Generator(device=batch[0].device).manual_seed(self.VAL_SEED + batch_idx)
        loss, logits, labels = self.masked_loss(batch[0], generator)
        n = labels.numel()  # masked positions
        return {"loss": (loss * n, n), "mlm_acc": ((logits.argmax(-1) == labels).sum(), n),
                "majority_acc": ((labels == self.majority_token).sum(), n)}


class SequenceClassifier(Task):
    """A linear head over the Encoder's pooled states ([CLS] or mean); from scratch or from a masked-LM checkpoint.
    Logs val/loss and val/acc."""

    task = "classify"

    def __init__(self, model_cfg: ModelConfig, optim_cfg: OptimConfig, trainer_cfg: TrainerConfig, tokenizer_json: str,
                 labels: list[str], pooling: str = "cls", guard: GuardConfig | None = None,
                 run_config: dict[str, Any] | None = None):
        super().__init__(model_cfg, optim_cfg, trainer_cfg, tokenizer_json, guard, run_config)
        self.labels, self.pooling = labels, pooling
        self.model = Encoder(model_cfg, n_classes=len(labels), pooling=pooling)

    def logits_and_loss(self, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        ids, key_padding, labels = batch
        logits = self.model.class_logits(self.model(ids, key_padding), key_padding)
        return logits, F.cross_entropy(logits, labels)

    def train_loss(self, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return self.logits_and_loss(batch)[1]

    def val_metrics(self, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                    batch_idx: int) -> dict[str, tuple[torch.Tensor, int]]:
        logits, loss = self.logits_and_loss(batch)
        n = len(batch[2])  # rows
        return {"loss": (loss * n, n), "acc": ((logits.argmax(-1) == batch[2]).sum(), n)}

    def checkpoint_extras(self) -> dict[str, Any]:
        return {"labels": self.labels, "pooling": self.pooling}
