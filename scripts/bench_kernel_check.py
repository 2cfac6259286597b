"""What the attention self-check costs at start-up: each run's checks timed in a fresh process, cold.

    python scripts/bench_kernel_check.py                 # CPU rows (and GPU rows when CUDA is there)
    ATEN_CPU_CAPABILITY=avx2 python scripts/bench_kernel_check.py   # AVX2 code, where compiled flex goes wrong

Each row is the list of shapes a run checks (minitx.train.training_cases / minitx.kernel_check.sampling_cases) for its
configured kernel; the time includes compiling a compiled kernel (each process starts with an empty inductor
cache), since a run pays that too, although the run itself would then reuse the compiled code.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

# name -> (kernel, heads, head dim, positions, kinds of case, dtype, device)
ROWS = {
    "minitx-train (default: 4 x 128, block 64)": ("sdpa", 4, 32, 64, "train", "float32", "cpu"),
    "nanoGPT default shape (6 x 384, block 256)": ("sdpa", 6, 64, 256, "train", "float32", "cpu"),
    "experiment=classify (padding masks)": ("sdpa", 4, 32, 64, "classify", "float32", "cpu"),
    "minitx-sample attention=sdpa (prompt 4, 300 tokens)": ("sdpa", 4, 32, 64, "sample", "float32", "cpu"),
    "minitx-sample attention=flex (prompt 4, 300 tokens)": ("flex", 4, 32, 64, "sample", "float32", "cpu"),
    "minitx-sample attention=flex, head size 16, prompt 24": ("flex", 2, 16, 32, "sample24", "float32", "cpu"),
    "GPU: GPT-2 small shape, sdpa, bf16 (12 x 64, block 1024)": ("sdpa", 12, 64, 1024, "train", "bfloat16", "cuda"),
    "GPU: GPT-2 small shape, flex, bf16": ("flex", 12, 64, 1024, "train", "bfloat16", "cuda"),
    "GPU: GPT-2 small shape, flash-attn, bf16": ("flash", 12, 64, 1024, "train", "bfloat16", "cuda"),
}


def cases(kernel: str, heads: int, head_dim: int, t: int, kind: str, dtype: str, device: str) -> list:
    from minitx.kernel_check import AttentionCase

    common = dict(n_head=heads, head_dim=head_dim, dtype=getattr(torch, dtype), device=device)
    if kind in ("train", "classify"):
        causal, padding = kind == "train", kind == "classify"
        return [AttentionCase(t_q=t, t_k=t, causal=causal, padding=padding, backward=b, **common)
                for b in (True, False)]
    prompt = 24 if kind == "sample24" else 4
    keep = t * 3 // 4
    shapes = [(prompt, prompt), (1, prompt + 1)] + ([(keep, keep)] if kind == "sample" else [])
    return [AttentionCase(t_q=q, t_k=k, batch=1, **common) for q, k in shapes]


def one(name: str) -> dict:
    from minitx.attention import kernel_unavailable
    from minitx.kernel_check import checked_kernel

    kernel, *shape = ROWS[name]
    todo = cases(kernel, *shape)
    if reason := kernel_unavailable(kernel, shape[-1], todo[0].backward, todo[0].masks):
        return {"skip": reason}
    t0 = time.perf_counter()
    chosen = checked_kernel(kernel, todo)
    return {"seconds": time.perf_counter() - t0, "chosen": chosen, "cases": len(todo)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one)))
        return
    print(f"torch {torch.__version__}, ATEN_CPU_CAPABILITY={os.environ.get('ATEN_CPU_CAPABILITY', '(default)')}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'run':58} {'kernel':7} {'cases':>5} {'check':>9}  kernel used")
    for name, (kernel, *_, device) in ROWS.items():
        if device == "cuda" and not torch.cuda.is_available():
            continue
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(prefix="inductor-")}
        out = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True, text=True, env=env)
        try:
            result = json.loads(out.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            print(f"{name:58} {kernel:7} failed: {out.stderr.strip().splitlines()[-1:]}")
            continue
        if "skip" in result:
            print(f"{name:58} {kernel:7} skipped: {result['skip']}")
            continue
        print(f"{name:58} {kernel:7} {result['cases']:5d} {result['seconds'] * 1000:7.0f} ms  {result['chosen']}")


if __name__ == "__main__":
    main()
