"""torch.optim.Muon, with its Newton-Schulz iterations in float32 where bfloat16 matrix products are slow.

torch's Muon orthogonalises every update in bfloat16. On GPUs and on CPUs with AVX512-BF16 or AMX that is the fast
choice; on other CPUs (AVX2: the AMD EPYC machines minitx is tested on) bfloat16 products are emulated, 10-100x slower
than float32 (../shared/FACTS.md), and a small model's optimizer step would cost more than its forward and backward.
There this class runs the same iteration, with the same coefficients, in float32. Its state and param groups are
torch's, so checkpoints move between the two paths.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def fast_bfloat16(device: torch.device) -> bool:
    """Whether bfloat16 matrix products run natively on `device` (not emulated)."""
    if device.type != "cpu":
        return True
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def orthogonalise(update: Tensor, coefficients: tuple[float, float, float], steps: int, eps: float) -> Tensor:
    """The nearest semi-orthogonal matrix to `update`, roughly (U S' Vᵀ with S' near 1), by a quintic Newton-Schulz
    iteration X <- aX + (bA + cA²)X, A = XXᵀ, in float32; as torch.optim.Muon computes it in bfloat16."""
    a, b, c = coefficients
    x = update.float()
    tall = x.size(0) > x.size(1)
    if tall:  # iterate on the wide side: XXᵀ is the smaller square
        x = x.T
    x = x / x.norm().clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


class Muon(torch.optim.Muon):
    """torch.optim.Muon; its own step where bfloat16 is fast, the same update in float32 elsewhere."""

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        params = [p for group in self.param_groups for p in group["params"]]
        if not params or fast_bfloat16(params[0].device):
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            with_grad: list[Tensor] = []
            grads: list[Tensor] = []
            buffers: list[Tensor] = []
            self._init_group(group, with_grad, grads, buffers)
            for param, grad, buffer in zip(with_grad, grads, buffers, strict=True):
                buffer.lerp_(grad, 1 - group["momentum"])
                update = grad.lerp(buffer, group["momentum"]) if group["nesterov"] else buffer
                update = orthogonalise(update, group["ns_coefficients"], group["ns_steps"], group["eps"])
                lr = torch.optim._muon._adjust_lr(group["lr"], group["adjust_lr_fn"], param.shape)
                param.mul_(1 - group["lr"] * group["weight_decay"])
                param.add_(update.to(param.dtype), alpha=-lr)
        return loss
