"""How fast a run goes: model FLOPs per token, and the peak FLOP/s of the device to measure them against."""

from __future__ import annotations

import time

import torch

from minitx.config import ModelConfig

# dense peak FLOP/s (no sparsity) of common GPUs: (bf16/fp16 tensor cores, tf32 tensor cores)
GPU_PEAKS = {
    "H200": (989e12, 494e12),
    "H100": (989e12, 494e12),
    "A100": (312e12, 156e12),
    "L40S": (362e12, 183e12),
    "L4": (121e12, 60e12),
    "A10": (125e12, 62e12),
    "RTX 4090": (165e12, 83e12),
    "RTX 3090": (71e12, 36e12),
    "V100": (125e12, 15.7e12),
    "T4": (65e12, 8.1e12),
}


def flops_per_token(config: ModelConfig, n_params: int) -> int:
    """Training FLOPs per token: 6N for the weights (forward 2N, backward 4N) plus 12·L·H·Q·T for attention
    (PaLM appendix B). N leaves out the position table, which costs a lookup, not a matmul."""
    head_dim = config.n_embd // config.n_head
    return 6 * n_params + 12 * config.n_layer * config.n_head * head_dim * config.block_size


def measure_matmul_flops(n: int = 1024, seconds: float = 0.3) -> float:
    """The CPU's fp32 matmul FLOP/s right now (best of a few n³ products): the ceiling a model can reach here."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def peak_flops(device: torch.device, precision: str) -> float | None:
    """The device's peak for this precision: a table for known GPUs, a measurement on CPU, None if unknown."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (half, tf32) in GPU_PEAKS.items():
            if key in name:
                return half if precision.startswith(("bf16", "16")) else tf32
        return None
    if device.type == "cpu":
        return measure_matmul_flops()
    return None
