"""The one-token decoding step built ahead of time by AOTInductor and kept on disk, so that decoding runs no Python
between kernels and a later run loads the step in well under a second instead of compiling it.

What makes it fast on a CPU, measured in docs/decoding.md: the weights are frozen into the package (Inductor lays
them out for its GEMMs, and with autotuning times its own C++ GEMM kernels against oneDNN's for these very weights),
the step is one C++ call with no guards to check, and its attention reads only the positions written so far (the
span is one dynamic size of the package, not one compiled graph per length).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from minitx.attention import KVCache
from minitx.generation import eager_prefill
from minitx.model import GPT


class _Step(nn.Module):
    """The step as torch.export sees it: the caches as flat inputs written in place, and `slots`, whose length is
    the number of cache slots attended (its values are unused: a size export can keep dynamic)."""

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def forward(self, feed: Tensor, positions: Tensor, slots: Tensor, kv: list[Tensor],
                pad: Tensor | None = None) -> Tensor:
        caches = [KVCache.over(kv[i], kv[i + 1], slots.size(0)) for i in range(0, len(kv), 2)]
        return self.model.next_token_logits(feed, caches, positions, pad)


def package_key(model: GPT, batch: int, padded: bool, autotune: bool) -> str:
    """What a built step depends on: the weights, the shape and kernels, the batch, torch's version, the ISA and the
    thread count (Inductor's C++ kernels fix theirs when they are generated)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    kernels = [block.attn.attention for block in model.transformer.blocks]
    param = next(model.parameters())
    machine = (torch.backends.cpu.get_cpu_capability(), torch.cpu._is_avx512_bf16_supported(),
               torch.cpu._is_amx_tile_supported())  # a folder beside a checkpoint may be shared by other machines
    if param.device.type == "cuda":
        machine += (torch.cuda.get_device_capability(param.device),)
    context = (model.config, kernels, batch, padded, autotune, torch.__version__, param.dtype, param.device.type,
               machine, torch.get_num_threads())
    digest.update(repr(context).encode())
    return digest.hexdigest()[:24]


class PackagedDecoding:
    """Drop-in for CompiledDecoding (same call): the one-token step as an AOTInductor package per batch size (and
    with or without left padding), built on first use, or loaded from `cache_dir` when a run with the same weights
    built it before. Prefills (the prompt, a cache refill) run eagerly into the same caches.

    The weights are copied into the package: a model changed afterwards needs a new PackagedDecoding."""

    def __init__(self, model: GPT, cache_dir: str | Path | None = None, autotune: bool = True):
        self.model = model
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.autotune = autotune  # time GEMM kernels for these weights while building: slower once, faster after
        device = next(model.parameters()).device
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.slots = torch.arange(model.config.block_size, device=device)
        self.steps: dict[tuple[int, bool], Callable[[list[Tensor]], Tensor]] = {}
        self.build_s = 0.0  # seconds spent building packages (export + AOTInductor), and loading them from disk
        self.load_s = 0.0

    def __call__(self, feed: Tensor, caches: list[KVCache], start: int, pad: Tensor | None = None) -> Tensor:
        if feed.size(1) > 1:
            return eager_prefill(self.model, feed, caches, start, pad)
        kv = [t for cache in caches for t in (cache.k, cache.v)]
        step = self.steps.get((feed.size(0), pad is not None)) or self._step(feed, kv, pad)
        self.position.fill_(start)
        slots = self.slots[: max(start + 1, 2)]  # a span of 1 would be a size export specialises; slot 1 is unseen
        return step([feed, self.position, slots, *kv] + ([] if pad is None else [pad]))

    def _step(self, feed: Tensor, kv: list[Tensor], pad: Tensor | None) -> Callable[[list[Tensor]], Tensor]:
        t0 = time.perf_counter()
        key = package_key(self.model, feed.size(0), pad is not None, self.autotune)
        path = self.cache_dir / f"decode-{key}.pt2" if self.cache_dir is not None else None
        if path is None or not path.exists():
            t1 = time.perf_counter()
            path = self._build(feed, kv, pad, path)
            self.build_s += time.perf_counter() - t1
            t0 += time.perf_counter() - t1
        # the loaded model's own call parses its input and output tree specs each time (0.1-0.25 ms a token, 6 x 384):
        # run the flat inputs, in the order export flattened them, directly
        run = torch._inductor.aoti_load_package(str(path)).loader.boxed_run

        def step(inputs: list[Tensor]) -> Tensor:
            return run(inputs)[0]

        self.load_s += time.perf_counter() - t0  # the weights' hash included: it is paid on every load
        self.steps[(feed.size(0), pad is not None)] = step
        return step

    def _build(self, feed: Tensor, kv: list[Tensor], pad: Tensor | None, path: Path | None) -> Path:
        block = self.model.config.block_size
        span = torch.export.Dim("span", min=2, max=max(block, 3))
        args = (feed, self.position, self.slots[: min(8, block)], kv) + (() if pad is None else (pad,))
        dynamic = (None, None, {0: span}, [None] * len(kv)) + (() if pad is None else (None,))
        with torch.no_grad():
            program = torch.export.export(_Step(self.model), args, dynamic_shapes=dynamic)
        configs = {"freezing": True}
        if self.autotune:  # on a CPU, Inductor's own C++ GEMMs against oneDNN's (ATen); elsewhere its defaults
            configs |= {"max_autotune": True} | ({"max_autotune_gemm_backends": "CPP,ATEN"}
                                                 if feed.device.type == "cpu" else {})
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                if not os.access(path.parent, os.W_OK):
                    raise PermissionError(13, "not writable")
            except OSError as e:  # a read-only place: build for this run only
                warnings.warn(f"cannot keep the decoding step in {path.parent} ({e.strerror}): built for this run only",
                              stacklevel=2)
                path = None
        if path is None:  # no cache: a private temporary file
            path = Path(tempfile.mkdtemp(prefix="minitx-decode-")) / "decode.pt2"
        partial = path.with_suffix(f".{os.getpid()}.partial.pt2")  # renamed when whole: readers never see half
        torch._inductor.aoti_compile_and_package(program, package_path=str(partial), inductor_configs=configs)
        partial.replace(path)
        return path
