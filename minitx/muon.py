"""torch.optim.Muon, with its Newton-Schulz iterations batched over matrices of one shape, and in float32 where
bfloat16 matrix products are slow.

torch's Muon orthogonalises every update on its own, in bfloat16. On a small model the iterations' many small products
are a fifth of a CPU training step; batched by shape they cost ~60% of that. On GPUs and on CPUs with AVX512-BF16 or
AMX bfloat16 is the fast choice; on other CPUs (AVX2: the AMD EPYC machines minitx is tested on) bfloat16 products are
emulated, 10-100x slower than float32 (../shared/FACTS.md): there the same iteration runs in float32. State and param
groups are torch's, so checkpoints move between machines and to torch.optim.Muon.
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


def orthogonalise(updates: Tensor, coefficients: tuple[float, float, float], steps: int, eps: float,
                  dtype: torch.dtype) -> Tensor:
    """The nearest semi-orthogonal matrix to each of `updates` (S, m, n), roughly (U S' Vᵀ with S' near 1), by
    torch.optim.Muon's quintic Newton-Schulz iteration X <- aX + (bA + cA²)X, A = XXᵀ, computed in `dtype`."""
    a, b, c = coefficients
    x = updates.to(dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the wide side: XXᵀ is the smaller square
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


class Muon(torch.optim.Muon):
    """torch.optim.Muon's update, state and settings, with the Newton-Schulz iterations of all matrices of one shape
    run as one batched product (a 3-layer model's 12 matrices have 4 shapes: 60 products a step instead of 180; 14.6
    ms instead of 19-20 ms for the whole step at 3 x 144 on 2 Zen 4 cores), in bfloat16 as torch does where that is
    fast, else float32."""

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            with torch.autocast(group["params"][0].device.type, enabled=False):  # (stepped inside training_step)
                self._step_group(group)
        return loss

    def _step_group(self, group: dict) -> None:
        """One param group's update: momentum, orthogonalised (by shape), weight decay, the step."""
        params: list[Tensor] = []
        grads: list[Tensor] = []
        buffers: list[Tensor] = []
        self._init_group(group, params, grads, buffers)
        if not params:
            return
        momentum = group["momentum"]
        torch._foreach_lerp_(buffers, grads, 1 - momentum)  # (one kernel launch for all, not one each)
        updates = torch._foreach_lerp(grads, buffers, momentum) if group["nesterov"] else buffers
        torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
        dtype = torch.bfloat16 if fast_bfloat16(params[0].device) else torch.float32
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, update in enumerate(updates):
            by_shape.setdefault(tuple(update.shape), []).append(i)
        for shape, members in by_shape.items():
            stacked = torch.stack([updates[i] for i in members])
            orthogonal = orthogonalise(stacked, group["ns_coefficients"], group["ns_steps"], group["eps"], dtype)
            lr = torch.optim._muon._adjust_lr(group["lr"], group["adjust_lr_fn"], torch.Size(shape))
            torch._foreach_add_([params[i] for i in members], list(orthogonal.to(params[0].dtype).unbind()),
                                alpha=-lr)
