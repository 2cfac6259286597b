"""Attention kernels side by side: forward+backward time and peak extra memory per kernel and sequence length.

    python scripts/bench_attention.py --seq 256,512,1024,2048,4096 --kernels all

Time is the median of --repeats after a warm-up (which also compiles flex). Memory is the peak above what is
allocated after the warm-up: on CUDA max_memory_allocated; on CPU each case runs in a fresh subprocess, resets
the kernel's peak-RSS counter after its warm-up, and reports the peak resident size above the size before.
flex on CPU has no backward (torch 2.13), so its rows are forward only, marked "fwd".
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

VARIANTS = {  # name -> (kernel, sdpa backend)
    "naive": ("naive", ""),
    "sdpa": ("sdpa", "auto"),
    "sdpa-math": ("sdpa", "math"),
    "flex": ("flex", ""),
    "flex-eager": ("flex_eager", ""),
    "flash": ("flash", ""),
}


def rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**20


def reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets the peak resident size (VmHWM), so compilation and warm-up
    do not count."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mb() -> float:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def run_case(name: str, t: int, batch: int, heads: int, head_dim: int, dtype: str, repeats: int) -> dict:
    from minitx.attention import KERNELS, SDPA_BACKENDS, AttentionMask, kernel_unavailable, sdpa_kernel

    kernel, variant = VARIANTS[name]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backward = not (kernel.startswith("flex") and device == "cpu")
    if reason := kernel_unavailable(kernel, device, training=backward):
        return {"skip": reason}
    q, k, v = (torch.randn(batch, heads, t, head_dim, device=device, dtype=getattr(torch, dtype),
                           requires_grad=backward) for _ in range(3))
    mask = AttentionMask(causal=True)

    def step() -> None:
        if kernel == "sdpa" and variant != "auto":
            with sdpa_kernel(SDPA_BACKENDS[variant]):
                out = KERNELS[kernel](q, k, v, mask, 0.0)
        else:
            out = KERNELS[kernel](q, k, v, mask, 0.0)
        if backward:
            out.sum().backward()
        if device == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up (and compilation)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        reset_peak_rss()
        base = rss_mb()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else peak_rss_mb()) - base
    return {"ms": statistics.median(times) * 1e3, "mb": max(peak, 0.0), "backward": backward}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", default="256,512,1024,2048,4096")
    parser.add_argument("--kernels", default="all", help=f"all or a comma list of {sorted(VARIANTS)}")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: one measurement, printed as JSON
    args = parser.parse_args()
    shape = (args.batch, args.heads, args.head_dim, args.dtype, args.repeats)
    if args.case:
        name, t = args.case.split(":")
        print(json.dumps(run_case(name, int(t), *shape)))
        return

    names = list(VARIANTS) if args.kernels == "all" else args.kernels.split(",")
    on_gpu = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if on_gpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"causal attention, B={args.batch}, H={args.heads}, head dim {args.head_dim}, {args.dtype}, {device}; "
          f"fwd+bwd median of {args.repeats}")
    print(f"{'kernel':<11} {'T':>5} {'ms':>9} {'vs naive':>9} {'extra MB':>9} {'vs naive':>9}")
    for t in (int(x) for x in args.seq.split(",")):
        naive = None
        for name in names:
            if on_gpu:
                result = run_case(name, t, *shape)
            else:  # a fresh process per case: its peak RSS is this case's alone
                out = subprocess.run([sys.executable, __file__, "--case", f"{name}:{t}", "--batch", str(args.batch),
                                      "--heads", str(args.heads), "--head-dim", str(args.head_dim), "--dtype",
                                      args.dtype, "--repeats", str(args.repeats)],
                                     capture_output=True, text=True, check=True)
                result = json.loads(out.stdout.strip().splitlines()[-1])
            if "skip" in result:
                print(f"{name:<11} {t:>5}  skipped: {result['skip']}")
                continue
            if name == "naive":
                naive = result
            speed = f"{naive['ms'] / result['ms']:8.1f}x" if naive else f"{'':>9}"
            memory = f"{result['mb'] / naive['mb']:9.2f}" if naive and naive["mb"] > 0 else f"{'':>9}"
            mode = "" if result["backward"] else " fwd"
            print(f"{name:<11} {t:>5} {result['ms']:9.1f} {speed} {result['mb']:9.1f} {memory}{mode}")


if __name__ == "__main__":
    main()
