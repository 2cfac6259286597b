"""Whether a model fits before it is built: training memory estimated from the config, against what is free.

A model too big for the machine otherwise fails deep inside an allocation (`DefaultCPUAllocator: can't allocate
memory`), or gets the process killed. The estimate counts what cannot be avoided: weights, their gradients and
AdamW's two moments (16 bytes a parameter in fp32 or mixed precision, 8 in bf16-true), plus a rough lower bound on
the activations a step keeps for backward. It errs low, so a model that fits is never refused.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from minitx.config import ConfigError, ModelConfig, compute_dtype

GB = 1e9


def count_parameters(config: ModelConfig, vocab_size: int) -> int:
    """Parameters of the GPT or encoder `config` describes (tied head; biases and norms left out: a lower bound)."""
    c, layers = config.n_embd, config.n_layer
    positions = config.block_size * c if config.pos_emb == "learned" else 0
    return vocab_size * c + positions + layers * 12 * c * c  # per block: qkv 3c², proj c², MLP 8c²


@dataclass
class TrainingMemory:
    parameters: int
    states: float  # bytes: weights, gradients, AdamW moments
    activations: float  # bytes kept for backward in one step (a rough lower bound)

    @property
    def total(self) -> float:
        return self.states + self.activations


def training_memory(config: ModelConfig, vocab_size: int, batch_size: int, precision: str, attention: str,
                    logit_share: float = 1.0) -> TrainingMemory:
    """`logit_share`: the share of positions that go through the LM head (1 for a GPT, the masking probability
    for a masked LM, 0 for a classifier)."""
    n = count_parameters(config, vocab_size)
    width = compute_dtype(precision).itemsize
    weight_bytes = width if str(precision).endswith("-true") else 4  # mixed precision keeps fp32 weights
    tokens = batch_size * config.block_size
    per_token = config.n_layer * 16 * config.n_embd + 2 * vocab_size * logit_share  # blocks; logits and gradient
    activations = tokens * per_token * width
    if attention == "naive":  # the (T x T) scores and their softmax, per head and layer
        activations += 2 * batch_size * config.n_layer * config.n_head * config.block_size**2 * 4
    return TrainingMemory(n, 4.0 * weight_bytes * n, float(activations))  # weights, gradients, two AdamW moments


def free_memory(device: str) -> float:
    """Bytes free now: on a GPU what CUDA reports, on a CPU MemAvailable (capped by a cgroup's limit, if any)."""
    if device == "cuda":
        return float(torch.cuda.mem_get_info()[0])
    free = float("inf")
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024.0
    except OSError:
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        stat = dict(line.split() for line in Path("/sys/fs/cgroup/memory.stat").read_text().splitlines())
        used -= int(stat.get("inactive_file", 0))  # page cache the kernel gives back under pressure
        if limit != "max":
            free = min(free, float(int(limit) - used))
    except (OSError, ValueError):
        pass
    return free


def _count(n: int) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def check_fits(config: ModelConfig, vocab_size: int, batch_size: int, precision: str, device: str,
               processes: int = 1, free: float | None = None, logit_share: float = 1.0, shards: int = 1) -> None:
    """Refuse, in one line with the numbers, a model whose training state alone cannot fit in free memory.
    `processes`: training processes sharing this memory (CPU DDP); `shards`: the processes that share out the
    weights, gradients and AdamW state (FSDP), each holding 1/shards of them."""
    need = training_memory(config, vocab_size, batch_size, precision, config.attention, logit_share)
    need = dataclasses.replace(need, states=need.states / shards)
    free = free_memory(device) if free is None else free
    if need.total * processes <= free:
        return
    where = f"{processes} processes need" if processes > 1 else "it needs"
    numbers = (f"~{_count(need.parameters)} parameters: {where} ~{need.total * processes / GB:,.1f} GB "
               f"({need.states * processes / GB:,.1f} GB of weights, gradients and AdamW state, "
               f"~{need.activations * processes / GB:,.1f} GB of activations), and this {device} has "
               f"{free / GB:,.1f} GB free")
    if need.states >= need.activations:
        raise ConfigError(f"model.n_embd={config.n_embd} with model.n_layer={config.n_layer}: {numbers}; "
                          "make the model smaller")
    raise ConfigError(f"data.batch_size={batch_size} with model.block_size={config.block_size}: {numbers}; "
                      "lower data.batch_size (trainer.accumulate_grad_batches keeps the batch) or model.block_size")
