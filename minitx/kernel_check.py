"""The attention self-check: a fused kernel is trusted at a shape only after it has agreed with the naive math there.

Fused kernels are other people's code, compiled for this machine, and can be wrong for some shapes on some CPUs
(torch 2.13's compiled flex_attention is, at head size 16 and 24 positions on AVX2 code). Before a run attends with a
kernel other than `naive`, it runs that kernel once on random inputs at each shape the run will use and compares the
output (and, for training, the gradients) with `naive`. A kernel that disagrees is replaced by the next one in its
fallback chain that agrees, with one warning naming the kernel, the shape and the error. Verdicts are remembered for
the process. `model.attention_check=false` (minitx-sample: `attention_check=false`) skips all of this.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from minitx.attention import AttentionMask, attend, kernel_unavailable, naive_attention
from minitx.config import ModelConfig

log = logging.getLogger("minitx")

# where a kernel that fails its check falls back to, in order; naive is the reference, so it always agrees
FALLBACKS = {"flex": ("flex_eager", "sdpa"), "flex_eager": ("sdpa",), "flash": ("sdpa",), "sdpa": ()}
# random inputs a kernel is run on per case: compiled flex's errors depend on the values (about half of all random
# inputs at a bad shape), so one draw can miss them; eight all miss about once in a thousand
TRIALS = 8
# largest |kernel - naive| accepted, relative to max(1, |naive|): rounding, not a wrong result
TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6, torch.bfloat16: 6e-2, torch.float16: 1e-2}


@dataclass(frozen=True)
class AttentionCase:
    """One shape a run attends at: T_q queries (the last of T_k positions) against T_k keys."""

    n_head: int
    head_dim: int
    t_q: int
    t_k: int
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    causal: bool = True
    padding: bool = False  # key padding masks (classification batches)
    document: bool = False  # document masks (packed sequences with data.document_mask)
    window: int = 0
    backward: bool = False  # training: gradients are compared too
    batch: int = 2
    sdpa_backend: str = "auto"

    def __str__(self) -> str:
        kinds = ["causal" if self.causal else "bidirectional"] + ["padding"] * self.padding
        kinds += ["document"] * self.document + [f"window {self.window}"] * bool(self.window)
        queries = f"{self.t_q} positions" if self.t_q == self.t_k else f"{self.t_q} queries x {self.t_k} keys"
        return (f"batch {self.batch}, {self.n_head} heads of {self.head_dim}, {queries}, {'+'.join(kinds)}, "
                f"{str(self.dtype).removeprefix('torch.')}, {self.device}" + ", with gradients" * self.backward)

    @property
    def masks(self) -> set[str]:
        return {name for name, on in (("padding", self.padding), ("document", self.document)) if on}

    def inputs(self, trial: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMask]:
        """Random q, k, v and a mask of this case's kinds, the same for every process (seeded by `trial`)."""
        g = torch.Generator().manual_seed(trial)
        q = torch.randn(self.batch, self.n_head, self.t_q, self.head_dim, generator=g)
        k, v = (torch.randn(self.batch, self.n_head, self.t_k, self.head_dim, generator=g) for _ in range(2))
        key_padding = doc_ids = None
        if self.padding:  # every row keeps at least its first position
            lengths = torch.randint(1, self.t_k + 1, (self.batch,), generator=g)
            lengths[-1] = self.t_k  # and one row is full
            key_padding = (torch.arange(self.t_k)[None] < lengths[:, None]).to(self.device)
        if self.document:
            starts = torch.rand(self.batch, self.t_k, generator=g) < 4 / max(self.t_k, 4)
            doc_ids = starts.long().cumsum(dim=1).to(self.device)
        mask = AttentionMask(self.causal, key_padding, doc_ids, self.window)
        q, k, v = (t.to(self.device, self.dtype) for t in (q, k, v))
        return q, k, v, mask


def mismatch(kernel: str, case: AttentionCase, trials: int = TRIALS) -> str | None:
    """How `kernel` disagrees with the naive math at `case` on any of `trials` random inputs, or None if it agrees."""
    for trial in range(trials):
        if (why := _mismatch_once(kernel, case, trial)) is not None:
            return why
    return None


class NaiveReferenceFailed(Exception):
    """The naive reference itself could not run (its T x T scores did not fit): the kernel is not to blame."""


def _mismatch_once(kernel: str, case: AttentionCase, trial: int) -> str | None:
    # Evaluation and sampling run under inference_mode, on tensors made there; training on tensors that need
    # gradients. A compiled kernel is compiled anew for each such state (and layout), and each compilation can be
    # right or wrong on its own: the check must run the one the run will.
    mode = contextlib.nullcontext() if case.backward else torch.inference_mode()
    with mode:
        q, k, v, mask = case.inputs(trial)
    if case.backward:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    try:
        with mode:
            out = attend(kernel, q, k, v, mask, 0.0, case.sdpa_backend)
        grads = None
        if case.backward:
            g = torch.randn(out.shape, generator=torch.Generator().manual_seed(trial)).to(out.device, out.dtype)
            grads = torch.autograd.grad(out, (q, k, v), g)
    except Exception as e:  # a kernel that cannot run this case is as unusable as a wrong one
        first_line = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
        return f"raised {type(e).__name__}: {first_line}"
    try:
        with mode:
            reference = naive_attention(q, k, v, mask, 0.0)
        results = [("output", out.float(), reference.float())]
        if grads is not None:
            ref_grads = torch.autograd.grad(reference, (q, k, v), g)
            results += [(f"d{n}", a.float(), b.float()) for n, a, b in zip("qkv", grads, ref_grads, strict=True)]
    except Exception as e:
        raise NaiveReferenceFailed(f"{type(e).__name__}: {str(e).strip()[:120]}") from e
    for name, got, want in results:
        if not torch.isfinite(got).all():
            return f"non-finite values in its {name}"
        error = (got - want).abs().max().item()
        if error > TOLERANCE.get(case.dtype, 1e-3) * max(1.0, want.abs().max().item()):
            return f"{name} differs from naive by up to {error:.3g}"
    return None


_verdicts: dict[tuple[str, AttentionCase], str | None] = {}


def verdict(kernel: str, case: AttentionCase) -> str | None:
    """mismatch(), computed once per kernel and case in this process. Where naive itself cannot run the case (its
    T x T scores do not fit), the kernel is kept unchecked, with a warning: it is not the kernel's fault."""
    key = (kernel, case)
    if key not in _verdicts:
        try:
            _verdicts[key] = mismatch(kernel, case)
        except NaiveReferenceFailed as e:
            log.warning("attention kernel %r not checked at %s: the naive reference could not run (%s)",
                        kernel, case, e)
            _verdicts[key] = None
    return _verdicts[key]


def fallback_chain(kernel: str) -> list[str]:
    """`kernel`, then the kernels to try if it fails, ending with naive."""
    chain = [kernel, *FALLBACKS.get(kernel, ("sdpa",)), "naive"]
    return list(dict.fromkeys(chain))  # once each, in order


def checked_kernel(kernel: str, cases: Iterable[AttentionCase]) -> str:
    """The first kernel of `kernel`'s fallback chain that agrees with naive at every case (naive needs no check).
    Each rejected kernel is reported in one warning: the kernel, the shape, the error, and what is used instead."""
    cases = list(cases)
    failures = []
    for candidate in fallback_chain(kernel):
        if candidate != "naive":
            if any(kernel_unavailable(candidate, torch.device(c.device).type, c.backward, c.masks) for c in cases):
                continue
            failed = next(((c, why) for c in cases if (why := verdict(candidate, c)) is not None), None)
            if failed is not None:
                failures.append((candidate, *failed))
                continue
        for name, case, why in failures:
            log.warning("attention kernel %r failed its self-check at %s: %s; using %r instead "
                        "(model.attention_check=false skips the check)", name, case, why, candidate)
        return candidate
    raise AssertionError("unreachable: naive ends every chain")


COMPILED_PER_SHAPE = ("flex",)  # kernels compiled for each shape: every shape a run uses is checked


def sampling_cases(model: ModelConfig, kernel: str, causal: bool, prompt_len: int, max_new_tokens: int,
                   use_cache: bool, dtype: torch.dtype, device: str) -> list[AttentionCase]:
    """The shapes sampling one sequence attends at: the prompt; then, with the KV cache, one query after it and the
    refill of a full cache; without the cache, every context length up to block_size (a few of them for a kernel
    that is not compiled per shape). An encoder's prompt is one bidirectional pass."""
    block_size = model.block_size

    def case(t_q: int, t_k: int) -> AttentionCase:
        return AttentionCase(model.n_head, model.n_embd // model.n_head, t_q, t_k, dtype, device, causal,
                             window=model.attention_window, batch=1, sdpa_backend=model.sdpa_backend)

    start = min(prompt_len, block_size)
    if not causal:
        return [case(start, start)]
    if not use_cache:  # each token recomputes the whole context, cropped to block_size
        lengths = list(range(start, max(start, min(prompt_len + max_new_tokens - 1, block_size)) + 1))
        if kernel not in COMPILED_PER_SHAPE and len(lengths) > 3:
            lengths = [lengths[0], lengths[len(lengths) // 2], lengths[-1]]
        return [case(t, t) for t in lengths]
    cases = [case(start, start)]
    if max_new_tokens > 1:
        cases.append(case(1, min(start + 1, block_size)))
    if prompt_len + max_new_tokens > block_size:
        keep = max(1, block_size * 3 // 4)
        cases.append(case(keep, keep))
    return cases
