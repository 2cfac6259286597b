"""Typed, validated configuration: every setting's one home.

Each default lives here, with a trailing comment saying what the key means; conf/*.yaml is written from these
dataclasses (minitx.config_files). Hydra composes the YAML, then every section is read into one of these dataclasses,
and each bad value fails here, at start-up, with one line that names the key, the value and the fix.
"""

from __future__ import annotations

import dataclasses
import logging
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import torch

log = logging.getLogger("minitx")


class MinitxError(Exception):
    """An error the user can fix. Entry points print it as one line and exit with status 2."""


class ConfigError(MinitxError):
    """A configuration value that cannot work."""


def fail(key: str, value: Any, problem: str) -> typing.NoReturn:
    raise ConfigError(f"{key}={value!r}: {problem}")


def check_positive(section: str, obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value <= 0:
            fail(f"{section}.{name}", value, "must be > 0")


# a checkpoint's model settings that a resumed run (RUNTIME_KEYS may change) or a fine-tuned classifier
# (ARCHITECTURE_KEYS must match) rebuilds
RUNTIME_KEYS = ("attention", "sdpa_backend", "compile", "attention_check")  # how the model runs, not what it is
ARCHITECTURE_KEYS = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "bias", "pos_emb", "rope_base", "norm",
                     "activation", "attention_window", "qk_norm", "tie_embeddings", "logit_softcap")


@dataclass
class ModelConfig:
    """Architecture of the transformer; saved in every checkpoint so the model can be rebuilt."""

    vocab_size: int = 0  # 0: taken from the tokenizer
    block_size: int = 64  # longest context the model sees (size of the position table)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = False  # biases in Linear and LayerNorm; GPT-2 had them, small models train as well without
    attention: str = "sdpa"  # naive | sdpa | flex | flex_eager | flash (flash-attn, CUDA) | auto
    sdpa_backend: str = "auto"  # with sdpa: auto (PyTorch chooses) | flash | efficient | math | cudnn
    attention_check: bool = True  # check a fused kernel against naive at the run's shapes first; fall back if wrong
    attention_window: int = 0  # sliding-window attention over this many most recent positions (0 = off)
    pos_emb: str = "learned"  # learned (GPT-2's table) | rope (rotary, applied to q and k in every layer)
    rope_base: float = 10000.0
    norm: str = "layernorm"  # layernorm | rmsnorm
    activation: str = "gelu"  # gelu (exact) | gelu_tanh (GPT-2's tanh approximation) | relu2 (ReLU squared)
    compile: bool = False  # torch.compile the model (cold compile ~35 s on 2 CPU cores; pays on long runs, GPUs)
    init_from: str | None = None  # start from its weights+tokenizer: classify: masked-LM; causal_lm: .ckpt, dir, hf:dir
    pooling: str = "cls"  # task=classify: cls (the [CLS] position) | mean (over real tokens)
    qk_norm: bool = False  # RMS-normalise each head's queries and keys before attending (bounded attention logits)
    tie_embeddings: bool = True  # the LM/MLM head shares the token embedding's matrix (false: a head of its own)
    logit_softcap: float = 0.0  # > 0: logits = c * tanh(logits / c), no logit beyond +-c (0 = off)

    def validate(self) -> ModelConfig:
        from minitx.attention import KERNELS

        check_positive("model", self, "block_size", "n_layer", "n_head", "n_embd")
        if self.vocab_size < 0:
            fail("model.vocab_size", self.vocab_size, "must be >= 0 (0 takes it from the tokenizer)")
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}"
            )
        if not 0.0 <= self.dropout < 1.0:
            fail("model.dropout", self.dropout, "must be in [0, 1)")
        from minitx.attention import SDPA_BACKENDS

        if self.attention not in KERNELS and self.attention != "auto":
            fail("model.attention", self.attention, f"unknown kernel; choose one of {[*sorted(KERNELS), 'auto']}")
        if self.sdpa_backend not in SDPA_BACKENDS and self.sdpa_backend != "auto":
            fail("model.sdpa_backend", self.sdpa_backend, f"choose auto or one of {sorted(SDPA_BACKENDS)}")
        if self.attention_window < 0:
            fail("model.attention_window", self.attention_window, "must be >= 0 (0 = no window)")
        if self.pos_emb not in ("learned", "rope"):
            fail("model.pos_emb", self.pos_emb, "choose learned or rope")
        if self.pos_emb == "rope" and (self.n_embd // self.n_head) % 2:
            head = self.n_embd // self.n_head
            fail("model.n_embd", self.n_embd, f"rope needs an even head size; n_embd/n_head={head}")
        if self.activation not in ("gelu", "gelu_tanh", "relu2"):
            fail("model.activation", self.activation, "choose gelu, gelu_tanh or relu2")
        if self.pooling not in ("cls", "mean"):
            fail("model.pooling", self.pooling, "choose cls or mean")
        if self.norm not in ("layernorm", "rmsnorm"):
            fail("model.norm", self.norm, "choose layernorm or rmsnorm")
        if self.logit_softcap < 0:
            fail("model.logit_softcap", self.logit_softcap, "must be >= 0 (0 = off; 15-30 is usual)")
        return self


@dataclass
class TokenizerConfig:
    kind: str = "char"  # char (one token per character) | bpe (byte-level BPE); ignored when path is set
    vocab_size: int = 1024  # bpe: the vocabulary's target size (char takes every character it sees)
    path: str | None = None  # a tokenizer.json to load instead of training one
    sample_chars: int = 50_000_000  # train on at most the first this-many characters of the training text

    def validate(self) -> TokenizerConfig:
        if self.path is not None:
            from pathlib import Path

            if not Path(self.path).is_file():
                fail("tokenizer.path", self.path, "no such file")
            return self
        if self.kind not in ("char", "bpe"):
            fail("tokenizer.kind", self.kind, "choose char or bpe, or set tokenizer.path=<tokenizer.json>")
        if self.sample_chars <= 0:
            fail("tokenizer.sample_chars", self.sample_chars, "must be > 0 (e.g. 50000000)")
        if self.kind == "bpe" and self.vocab_size < 260:
            fail("tokenizer.vocab_size", self.vocab_size, "byte-level BPE needs at least 260 (256 bytes + specials)")
        return self


@dataclass
class DataConfig:
    hub_id: str | None = None  # a Hugging Face Hub dataset id, e.g. karpathy/tiny_shakespeare
    hub_config: str | None = None  # the Hub dataset's configuration name, if it has several
    path: str | None = None  # a local .txt/.jsonl/.json/.csv/.parquet file or a directory of them; wins over hub_id
    text_column: str = "text"
    label_column: str | None = None  # task=classify: the column of labels (integers or strings)
    val_split: str = "validation"  # the dataset's own split if present, else the last val_fraction of the stream
    val_fraction: float = 0.1
    batch_size: int = 16
    val_batches: int = 40  # fixed, evenly spaced windows evaluated each time: val numbers compare across runs
    document_mask: bool = False  # no attention across <|endoftext|> inside a window (packed documents)
    mlm_probability: float = 0.15  # task=masked_lm: share of tokens chosen (80% [MASK], 10% random, 10% kept)
    streaming: bool = False  # train from a stream of data.path / data.hub_id, tokenized as read (docs/streaming.md)
    max_documents: int = 0  # with streaming: read at most this many training documents (0: the whole stream)
    val_documents: int = 1000  # with streaming: validation documents: data.val_split's first, else the stream's first
    num_workers: int = 0  # with streaming: DataLoader worker processes tokenizing the stream (at most one per file)
    cache_dir: str | None = None  # token-stream cache; default $MINITX_CACHE or ~/.cache/minitx

    def validate(self) -> DataConfig:
        check_positive("data", self, "batch_size", "val_batches")
        if not 0.0 < self.mlm_probability < 1.0:
            fail("data.mlm_probability", self.mlm_probability, "must be in (0, 1); BERT uses 0.15")
        check_positive("data", self, "val_documents")
        for key in ("max_documents", "num_workers"):
            if getattr(self, key) < 0:
                fail(f"data.{key}", getattr(self, key), "must be >= 0")
            if getattr(self, key) > 0 and not self.streaming:  # a corpus read whole into shards has neither
                fail(f"data.{key}", getattr(self, key), "is for data.streaming=true; set that too, or leave it at 0")
        if not 0.0 < self.val_fraction < 1.0:
            fail("data.val_fraction", self.val_fraction, "must be in (0, 1)")
        return self


@dataclass
class PrepareConfig:
    num_proc: int = 1  # processes tokenizing shards at once (1: one process, the tokenizer's own threads)
    shard_bytes: int = 100_000_000  # text per token shard, in UTF-8 bytes (whole documents; ~25M BPE tokens)

    def validate(self) -> PrepareConfig:
        check_positive("prepare", self, "num_proc", "shard_bytes")
        return self


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | muon (Muon for the blocks' matrices, AdamW for embeddings, head, norms, biases)
    lr: float = 2e-3
    min_lr: float = 2e-4  # the schedule's decay ends here
    weight_decay: float = 0.1  # matrices only; biases, norms and embeddings' 1-d params are not decayed
    beta1: float = 0.9
    beta2: float = 0.99  # 0.99 rather than 0.999: small batches, short runs
    warmup_steps: int = 100  # linear warmup; a run shorter than this warms up over all of it
    decay_steps: int = 0  # 0: decay over trainer.max_steps
    schedule: str = "cosine"  # after warmup: cosine (decay all the way) | wsd (warmup, stable, then linear decay)
    cooldown_frac: float = 0.2  # schedule=wsd: the last fraction of the decay steps, decaying linearly to min_lr
    muon_lr: float = 0.02  # name=muon: the matrices' learning rate (scaled by the schedule like lr)
    muon_momentum: float = 0.95  # name=muon: Nesterov momentum of the matrices' updates
    muon_ns_steps: int = 5  # name=muon: Newton-Schulz iterations per update (fewer: cheaper, less orthogonal)

    def validate(self, max_steps: int) -> OptimConfig:
        check_positive("optim", self, "lr", "muon_lr")
        if self.name not in ("adamw", "muon"):
            fail("optim.name", self.name, "choose adamw or muon (optim=muon)")
        if self.schedule not in ("cosine", "wsd"):
            fail("optim.schedule", self.schedule, "choose cosine or wsd")
        if not 0.0 < self.cooldown_frac <= 1.0:
            fail("optim.cooldown_frac", self.cooldown_frac, "must be in (0, 1]")
        if not 1 <= self.muon_ns_steps < 100:
            fail("optim.muon_ns_steps", self.muon_ns_steps, "must be in [1, 100)")
        if not 0.0 <= self.muon_momentum < 1.0:
            fail("optim.muon_momentum", self.muon_momentum, "must be in [0, 1)")
        if self.min_lr < 0 or self.min_lr > self.lr:
            fail("optim.min_lr", self.min_lr, f"must be in [0, optim.lr={self.lr}]")
        if self.weight_decay < 0:
            fail("optim.weight_decay", self.weight_decay, "must be >= 0")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                fail(f"optim.{name}", getattr(self, name), "must be in [0, 1)")
        if self.warmup_steps < 0:
            fail("optim.warmup_steps", self.warmup_steps, "must be >= 0")
        if self.decay_steps < 0:
            fail("optim.decay_steps", self.decay_steps, "must be >= 0 (0 decays over trainer.max_steps)")
        if self.warmup_steps > max_steps:  # a shortened run (trainer.max_steps=N alone) warms up over all of it
            log.info("optim.warmup_steps=%d is longer than trainer.max_steps=%d: warming up over all %d steps",
                     self.warmup_steps, max_steps, max_steps)
            return dataclasses.replace(self, warmup_steps=max_steps)
        return self


PRECISIONS = ("32-true", "32", "bf16-mixed", "bf16-true", "16-mixed", "16-true", "64-true")
FSDP_PRECISIONS = ("32-true", "32", "bf16-mixed", "bf16-true", "16-true")  # Lightning's ModelParallelStrategy's


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype activations (attention included) are computed in under a Lightning precision setting."""
    import torch

    precision = str(precision)
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return torch.float64 if precision.startswith("64") else torch.float32


@dataclass
class TrainerConfig:
    """Passed to `lightning.Trainer` under the same names, except the two its optimizer step uses, which minitx's
    Task applies itself (see minitx.tasks.Task): gradient_clip_val and accumulate_grad_batches."""

    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"  # bf16-mixed on GPUs with bf16; slower on CPUs without it
    max_steps: int = 1500
    val_check_interval: int = 250  # optimizer steps between evaluations (whatever the accumulation)
    log_every_n_steps: int = 25
    gradient_clip_val: float = 1.0
    accumulate_grad_batches: int = 1  # batches per optimizer step on each process (derived when tokens_per_step>0)
    tokens_per_step: int = 0  # global batch: tokens per optimizer step, all processes (0: from accumulate_grad_batches)
    enable_progress_bar: bool = True

    def validate(self) -> TrainerConfig:
        check_positive(
            "trainer", self, "max_steps", "val_check_interval", "log_every_n_steps",
            "accumulate_grad_batches", "num_nodes",
        )
        if str(self.precision) not in PRECISIONS:
            fail("trainer.precision", self.precision, f"choose one of {list(PRECISIONS)}")
        self._check_device()
        if self.strategy == "fsdp" and str(self.precision) not in FSDP_PRECISIONS:
            fail("trainer.precision", self.precision, f"trainer.strategy=fsdp (FSDP2) takes {list(FSDP_PRECISIONS)}; "
                 "use bf16-mixed (32-true on a GPU without bfloat16)")
        if self.gradient_clip_val < 0:
            fail("trainer.gradient_clip_val", self.gradient_clip_val, "must be >= 0 (0 disables clipping)")
        return self

    @property
    def on_gpu(self) -> bool:
        import torch

        return self.accelerator in ("gpu", "cuda") or (self.accelerator == "auto" and torch.cuda.device_count() > 0)

    def world_size(self) -> int:
        """The number of training processes: devices per node (parsed by Lightning's own accelerator classes, as the
        Trainer parses them) times num_nodes."""
        from lightning.fabric.accelerators import CPUAccelerator, CUDAAccelerator

        accelerator = CUDAAccelerator if self.on_gpu else CPUAccelerator
        try:
            devices = accelerator.auto_device_count() if self.devices == "auto" else self.devices
            parsed = accelerator.parse_devices(devices)
        except Exception as e:  # Lightning's own message says what it accepts
            fail("trainer.devices", self.devices, str(e))
        if parsed is None:  # no device of this kind here (auto on a machine without one)
            fail("trainer.devices", self.devices, f"no {'GPU' if self.on_gpu else 'device'} here to count")
        return (len(parsed) if isinstance(parsed, list) else int(parsed)) * self.num_nodes

    def _check_device(self) -> None:
        """Refuse what the machine cannot run, before Lightning fails (or silently does something else)."""
        import torch

        gpus = torch.cuda.device_count()
        on_gpu = self.on_gpu
        if self.accelerator in ("gpu", "cuda") and gpus == 0:
            fail("trainer.accelerator", self.accelerator, "no CUDA GPU here; use trainer.accelerator=cpu (or auto)")
        if on_gpu and isinstance(self.devices, int) and self.devices > gpus:
            fail("trainer.devices", self.devices, f"only {gpus} GPU(s) here")
        if isinstance(self.devices, int) and self.devices <= 0 and self.devices != -1:
            fail("trainer.devices", self.devices, "must be > 0, -1 (all) or auto")
        precision = str(self.precision)
        if not on_gpu and precision.startswith("16"):
            fail("trainer.precision", precision, "float16 needs a GPU (on CPU Lightning would silently run "
                 "bf16-mixed); use 32-true, or bf16-mixed on a CPU with bf16 hardware")
        if on_gpu and precision.startswith("bf16") and not torch.cuda.is_bf16_supported():
            fail("trainer.precision", precision, "this GPU has no bfloat16; use 16-mixed or 32-true")


@dataclass
class LoggerConfig:
    kind: str = "wandb"  # wandb | csv | none
    project: str = "minitx"
    offline: bool | None = None  # wandb: null = offline unless an API key is set and the server answers
    log_model: bool = False  # wandb: best.ckpt as a model artifact at the end (offline: uploaded by wandb sync)

    def validate(self) -> LoggerConfig:
        if self.kind not in ("wandb", "csv", "none"):
            fail("logger.kind", self.kind, "choose wandb, csv or none")
        return self


@dataclass
class CheckpointConfig:
    """Periodic checkpoints besides best.ckpt (by val/loss)."""

    every_n_steps: int = 250  # step-NNNNNN.ckpt and last.ckpt, written atomically
    keep_last: int = 2  # periodic checkpoints kept; older ones are deleted

    def validate(self) -> CheckpointConfig:
        check_positive("checkpoint", self, "every_n_steps", "keep_last")
        return self


@dataclass
class GuardConfig:
    """What a non-finite loss or gradient norm does: stop the run (default) or skip the step, up to max_skips."""

    on_nonfinite: str = "stop"  # stop (keeping the last good checkpoint) | skip (the step)
    max_skips: int = 10

    def validate(self) -> GuardConfig:
        if self.on_nonfinite not in ("stop", "skip"):
            fail("guard.on_nonfinite", self.on_nonfinite, "choose stop or skip")
        if self.max_skips < 0:
            fail("guard.max_skips", self.max_skips, "must be >= 0")
        return self


@dataclass
class PerfConfig:
    peak_flops: float | None = None  # FLOP/s for mfu: null = known GPU table or a CPU matmul measurement; 0: off

    def validate(self) -> PerfConfig:
        if self.peak_flops is not None and self.peak_flops < 0:
            fail("perf.peak_flops", self.peak_flops, "must be >= 0 (0 turns mfu off, null finds it)")
        return self


@dataclass
class SampleAfterConfig:
    """What the end of training shows from the final weights; each task decides what (minitx.tasks: Task.show)."""

    prompt: str = "def "  # causal_lm continues it; masked_lm fills its [MASK]s; classify labels it (if not empty)
    max_new_tokens: int = 200  # causal_lm: tokens to sample (0: no sample)
    prompts: list[str] = field(default_factory=list)  # wandb: a table of these at every validation ([]: [prompt])
    table_tokens: int = 64  # wandb: tokens sampled per prompt for the table (0: no table)

    def validate(self) -> SampleAfterConfig:
        if self.table_tokens < 0:
            fail("sample.table_tokens", self.table_tokens, "must be >= 0 (0: no samples table)")
        return self

    @property
    def table_prompts(self) -> list[str]:
        return self.prompts or [self.prompt]


@dataclass
class TrainConfig:
    """A whole training run. The groups (model ... logger) come from conf/<group>/*.yaml; the rest from train.yaml."""

    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)  # how minitx-prepare (or a first run) tokenizes
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    name: str = "default"  # outputs/<name>/<timestamp>/, and the wandb run name
    task: str = "causal_lm"  # causal_lm (GPT) | masked_lm (encoder) | classify | package.module:Class (your own)
    seed: int = 1337
    resume: str | None = None  # a run directory or .ckpt: continue that run exactly (same command + resume=...)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)  # besides best.ckpt (lowest val/loss)
    guard: GuardConfig = field(default_factory=GuardConfig)  # a non-finite loss or gradient norm: stop or skip
    perf: PerfConfig = field(default_factory=PerfConfig)
    sample: SampleAfterConfig = field(default_factory=SampleAfterConfig)  # shown from the final weights

    def validate(self) -> TrainConfig:
        from minitx.tasks import task_class  # (imports Lightning: validation is for training runs)

        self.model.validate()
        self.tokenizer.validate()
        self.data.validate()
        self.prepare.validate()
        self.trainer.validate()  # (the devices first: the world size below counts them)
        self.trainer = global_batch(self.trainer, self.data.batch_size * self.model.block_size)
        self.optim = self.optim.validate(self.trainer.max_steps)
        self.logger.validate()
        self.checkpoint.validate()
        self.guard.validate()
        self.perf.validate()
        self.sample.validate()
        if not 0 <= self.seed < 2**32:  # numpy's and Lightning's seeding refuse anything else, with a traceback
            fail("seed", self.seed, "must be in [0, 2**32)")
        task_class(self.task).check_config(self)
        if self.optim.name == "muon" and self.trainer.strategy == "fsdp":
            fail("optim.name", "muon", "Muon orthogonalises whole matrices; trainer.strategy=fsdp shards them: use "
                 "trainer=ddp or optim=adamw")
        if self.optim.name == "muon" and str(self.trainer.precision) == "16-mixed":
            fail("optim.name", "muon", "not with float16's grad scaler (trainer.precision=16-mixed); use bf16-mixed")
        devices = self.trainer.devices
        several = (isinstance(devices, int) and devices != 1) or (isinstance(devices, list) and len(devices) > 1)
        if self.guard.on_nonfinite == "skip" and (several or self.trainer.num_nodes > 1):
            fail("guard.on_nonfinite", "skip", "skipping a step is for single-process runs (ranks would disagree)")
        if self.guard.on_nonfinite == "skip" and str(self.trainer.precision) == "16-mixed":
            fail("guard.on_nonfinite", "skip", "not with trainer.precision=16-mixed, whose grad scaler already skips "
                 "steps that overflow; use guard.on_nonfinite=stop")
        return self


def global_batch(trainer: TrainerConfig, tokens_per_batch: int) -> TrainerConfig:
    """`trainer` with accumulate_grad_batches derived from tokens_per_step (as nanochat does): a run states its global
    batch in tokens per optimizer step, and the same experiment then takes the same optimizer steps on 1 process or
    N (batch_size x block_size tokens per batch on each process). tokens_per_step=0: the accumulation as set."""
    if trainer.tokens_per_step < 0:
        fail("trainer.tokens_per_step", trainer.tokens_per_step, "must be >= 0 (0: from accumulate_grad_batches)")
    if trainer.tokens_per_step == 0:
        return trainer
    per_round = tokens_per_batch * trainer.world_size()  # one batch on every process
    accumulate, rest = divmod(trainer.tokens_per_step, per_round)
    if rest or not accumulate:
        near = sorted({max(1, accumulate) * per_round, (accumulate + 1) * per_round})
        fail("trainer.tokens_per_step", trainer.tokens_per_step,
             f"must be a multiple of data.batch_size x model.block_size x processes = {per_round:,}; nearest: "
             + " or ".join(str(n) for n in near))
    if trainer.accumulate_grad_batches not in (1, accumulate):
        fail("trainer.accumulate_grad_batches", trainer.accumulate_grad_batches,
             f"trainer.tokens_per_step={trainer.tokens_per_step} sets it ({accumulate} here); leave it at 1")
    return dataclasses.replace(trainer, accumulate_grad_batches=accumulate)


T = TypeVar("T")


def from_mapping(cls: type[T], values: Mapping[str, Any], prefix: str = "") -> T:
    """Dataclass `cls` from a plain mapping (a resolved Hydra config, a checkpoint's settings): every value checked
    against its field's type, then merged onto the dataclass's defaults by OmegaConf (which refuses unknown keys), each
    error one line that names the key. Strings are set aside and put back as they are: the mapping is already resolved,
    so "${...}" in a prompt or a path is text, not an interpolation."""
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError

    typed, strings = _checked(cls, values, prefix)
    try:
        merged = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), typed))
    except ConfigKeyError as e:
        section = _field_type(cls, e.full_key.rpartition(".")[0])
        known = sorted(f.name for f in dataclasses.fields(section)) if dataclasses.is_dataclass(section) else []
        raise ConfigError(f"{prefix}{e.full_key}: unknown key; known keys are {known}") from None
    return _with_strings(merged, strings)  # type: ignore[return-value]


def _options(hint: Any) -> tuple[Any, ...]:
    """The types a field accepts: (int,) for int, (str, NoneType) for str | None."""
    return typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)


def _accepts(option: Any, value: Any) -> bool:
    """Whether a field of type `option` takes `value` as it is (an int for a float, a number for a str; a bool only
    for a bool)."""
    if option is Any:
        return True
    if isinstance(value, bool) or option is bool:
        return option is bool and isinstance(value, bool)
    numbers = {int: (int,), float: (int, float), str: (str, int, float)}
    return isinstance(value, numbers.get(option, ()))


def _checked(cls: Any, values: Mapping[str, Any], prefix: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """`values` split into what OmegaConf merges and the strings of str fields (nested as the sections are); a value
    of the wrong type fails, naming its key. Keys `cls` lacks are left for OmegaConf to refuse."""
    hints = typing.get_type_hints(cls)
    typed: dict[str, Any] = {}
    strings: dict[str, Any] = {}
    for key, value in values.items():
        hint, where = hints.get(key), f"{prefix}{key}"
        if key not in hints:
            typed[key] = value
        elif dataclasses.is_dataclass(hint):
            if not isinstance(value, Mapping):
                fail(where, value, "expected a section of keys")
            typed[key], strings[key] = _checked(hint, value, where + ".")
        elif isinstance(value, str) and str in _options(hint):
            strings[key] = value
        elif typing.get_origin(hint) is list:  # a list of strings (the only kind of list a setting is): kept as text
            if not (isinstance(value, list) and all(_accepts(str, item) for item in value)):
                fail(where, value, "expected list of str")
            strings[key] = [str(item) for item in value]  # (Hydra reads [def, 1] as ["def", 1])
        elif value is None:
            if type(None) not in _options(hint):
                fail(where, value, "must be set")
            typed[key] = value
        elif not any(_accepts(option, value) for option in _options(hint)):
            wanted = " or ".join(o.__name__ for o in _options(hint) if o is not type(None))
            fail(where, value, f"expected {wanted}")
        else:
            typed[key] = value
    return typed, strings


def _with_strings(obj: Any, strings: dict[str, Any]) -> Any:
    changes = {k: _with_strings(getattr(obj, k), v) if isinstance(v, dict) else v for k, v in strings.items()}
    return dataclasses.replace(obj, **changes) if changes else obj


def _field_type(cls: Any, key: str) -> Any:
    """The annotated type at dotted `key` below dataclass `cls` (`cls` itself for "")."""
    for name in filter(None, key.split(".")):
        cls = typing.get_type_hints(cls).get(name, Any) if dataclasses.is_dataclass(cls) else Any
    return cls


def field_notes(cls: type) -> dict[str, str]:
    """Each field's trailing comment in the class's source: what conf/*.yaml and `--help` say about the key."""
    import inspect
    import io
    import tokenize

    notes: dict[str, str] = {}
    tokens = list(tokenize.generate_tokens(io.StringIO(inspect.getsource(cls)).readline))
    for i, tok in enumerate(tokens[:-1]):
        if tok.type == tokenize.NAME and tok.start[1] == 4 and tokens[i + 1].string == ":":
            line = tok.start[0]
            comment = next((t.string for t in tokens[i:] if t.start[0] == line and t.type == tokenize.COMMENT), None)
            if comment is not None:
                notes[tok.string] = comment.lstrip("#").strip()
    return notes
