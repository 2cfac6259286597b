"""Sampling speed: tokens/s with and without the KV cache, with the compiled decoding step (torch.compile) and the
packaged one (AOTInductor, minitx.packaged_decoding), of `--batch` samples decoded together (generate_batch) against
one, and Hugging Face transformers' `generate()` with its own cache on a GPT-2 of the same shape when `transformers`
is installed (at the length GPT-2's position table allows, minitx's runs repeated at that length), measured side by
side in one run, in rounds (every path once a round). The weight-streaming ceiling is timed in the same rounds: the
bare matrix-vector products of the blocks' weight matrices (F.linear, one token), and a plain read of the same bytes.

    python scripts/bench_sample.py                                   # nanoGPT's default shape: 6 x 384, block 256
    python scripts/bench_sample.py --layers 4 --embd 128 --heads 4 --block 64 --new 500
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from minitx.config import ModelConfig
from minitx.generation import CompiledDecoding, DecodingStep, generate, generate_batch
from minitx.model import GPT
from minitx.packaged_decoding import PackagedDecoding


def interleaved_rates(jobs: list[tuple[str, int, Callable[[], None]]], repeats: int) -> list[tuple[str, int, float]]:
    """tokens/s of each (name, tokens, run) job: a warm-up of each (compiles and builds happen there), then `repeats`
    rounds that time every job once, the median kept: a machine that gets busier or quieter during the run moves
    every path alike, so the ratios between them stay fair."""
    for _, _, run in jobs:
        run()
    times: list[list[float]] = [[] for _ in jobs]
    for _ in range(repeats):
        for i, (_, _, run) in enumerate(jobs):
            t0 = time.perf_counter()
            run()
            times[i].append(time.perf_counter() - t0)
    return [(name, tokens, tokens / statistics.median(t)) for (name, tokens, _), t in zip(jobs, times, strict=True)]


def weight_jobs(model: GPT, passes: int = 20) -> list[tuple[str, int, Callable[[], None]]]:
    """The weight-streaming ceiling as two jobs of `passes` 'tokens': the bare GEMVs of the blocks' weight matrices
    (F.linear, one row), and just reading their bytes once (a sum over each)."""
    weights = [p for name, p in model.named_parameters() if p.dim() == 2 and ".blocks." in name]
    inputs = {w.size(1): torch.randn(1, w.size(1), device=w.device) for w in weights}

    @torch.no_grad()
    def gemvs() -> None:
        for _ in range(passes):
            for w in weights:
                F.linear(inputs[w.size(1)], w)

    @torch.no_grad()
    def reads() -> None:
        for _ in range(passes):
            for w in weights:
                w.sum()

    return [("bare GEMVs of the block weights", passes, gemvs), ("reading the block weights once", passes, reads)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--embd", type=int, default=384)
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=65)
    parser.add_argument("--new", type=int, default=500, help="new tokens per sample")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8, help="samples decoded together in the batched rows")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-autotune", action="store_true", help="build the packaged step without GEMM autotuning")
    args = parser.parse_args()

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=args.vocab, block_size=args.block, n_layer=args.layers, n_head=args.heads,
                         n_embd=args.embd).validate()
    model = GPT(config).to(args.device).eval()
    prompt = [1]
    jobs: list[tuple[str, int, Callable[[], None]]] = []
    hf_new = min(args.new, args.block - 1)  # GPT-2 cannot go past its position table
    t0 = time.perf_counter()
    compiled = CompiledDecoding(model)
    for _ in generate(model, prompt, 2, compiled=compiled):  # compiles it
        pass
    compile_s = time.perf_counter() - t0
    package_dir = tempfile.mkdtemp(prefix="bench-sample-")
    packaged = PackagedDecoding(model, package_dir, autotune=not args.no_autotune)
    for _ in generate(model, prompt, 2, compiled=packaged):  # builds its batch-1 package
        pass
    # what the next run does: load what this one built
    reloaded = PackagedDecoding(model, package_dir, autotune=not args.no_autotune)
    for _ in generate(model, prompt, 2, compiled=reloaded):
        pass
    costs = {"compiled step": f"{compile_s:.1f} s compile", "packaged step": f"{packaged.build_s:.1f} s build once, "
             f"then {reloaded.load_s:.2f} s load"}
    built_before_batch = packaged.build_s
    runs = [("KV cache on", True, None), ("KV cache off", False, None), ("KV cache on, compiled step", True, compiled),
            ("KV cache on, packaged step", True, reloaded)]
    for (label, use_cache, step), new in [(r, args.new) for r in runs] + [(r, hf_new) for r in runs[::2] + runs[3:]]:
        def run(use_cache: bool = use_cache, new: int = new, step: DecodingStep | None = step) -> None:
            g = torch.Generator(args.device).manual_seed(0)
            for _ in generate(model, prompt, new, temperature=1.0, top_k=200, generator=g, use_cache=use_cache,
                              compiled=step):
                pass

        jobs.append((f"minitx, {label}", new, run))
    n_rows = len(jobs)
    for label, step in [("", None), (", compiled step", compiled), (", packaged step", packaged)]:
        def run_batch(step: DecodingStep | None = step) -> None:
            g = torch.Generator(args.device).manual_seed(0)
            generate_batch(model, [prompt] * args.batch, args.new, temperature=1.0, top_k=200, generator=g,
                           compiled=step)

        jobs.append((f"minitx, batch {args.batch}{label}", args.batch * args.new, run_batch))
    try:
        from transformers import GPT2Config, GPT2LMHeadModel

        hf = GPT2LMHeadModel(GPT2Config(vocab_size=args.vocab, n_positions=args.block, n_embd=args.embd,
                                        n_layer=args.layers, n_head=args.heads)).eval()
        ids = torch.tensor([prompt], device=args.device)

        def run_hf() -> None:
            with torch.inference_mode():
                hf.generate(ids, max_new_tokens=hf_new, min_new_tokens=hf_new, do_sample=True, top_k=200,
                            pad_token_id=0)

        jobs.insert(n_rows, ("transformers generate(), its KV cache", hf_new, run_hf))
        n_rows += 1
    except ImportError:
        print("(transformers is not installed: pip install transformers to compare with its generate())")

    jobs += weight_jobs(model)
    rates = interleaved_rates(jobs, args.repeats)
    shutil.rmtree(package_dir, ignore_errors=True)  # the packages are ~2x the weights each: not left in /tmp
    rows, batched, (gemv, read) = rates[:n_rows], rates[n_rows:-2], rates[-2:]
    gemv_s, read_s = 1 / gemv[2], 1 / read[2]
    costs[f"batch {args.batch}, compiled"] = "recompiled for the batch in its warm-up (not timed)"
    costs[f"batch {args.batch}, packaged"] = (f"{packaged.build_s - built_before_batch:.1f} s build once "
                                              f"(one package per batch size)")
    n_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if p.dim() == 2 and ".blocks." in n)
    print(f"\nmodel: {args.layers} layers, {args.heads} heads, {args.embd} embd, block {args.block}, "
          f"{model.num_params() / 1e6:.1f}M params; torch threads {torch.get_num_threads()}")
    print(f"{'path':<44} {'new tokens':>10} {'tokens/s':>10}  cost before the first token")
    for name, new, rate in rows + batched + [gemv, read]:
        cost = next((c for k, c in reversed(costs.items()) if k in name), "")
        print(f"{name:<44} {new:>10} {rate:10.1f}  {cost}")
    print(f"\nweights of the blocks: {n_bytes / 1e6:.1f} MB; bare GEMVs {gemv_s * 1e3:.2f} ms per token "
          f"(ceiling {1 / gemv_s:.0f} tokens/s), reading their bytes once {read_s * 1e3:.2f} ms ({1 / read_s:.0f}/s)")
    print(f"KV cache speed-up: {rows[0][2] / rows[1][2]:.1f}x; over the eager cached step: compiled "
          f"{rows[2][2] / rows[0][2]:.2f}x, packaged {rows[3][2] / rows[0][2]:.2f}x")
    print(f"batch {args.batch} vs batch 1, tokens/s: {batched[0][2] / rows[0][2]:.1f}x eager, "
          f"{batched[1][2] / rows[2][2]:.1f}x compiled, {batched[2][2] / rows[3][2]:.1f}x packaged")
    for name, _, rate in rows[:4:2] + rows[3:4]:
        print(f"{name}: {rate * gemv_s:.0%} of the GEMV ceiling, {rate * read_s:.0%} of the weight-read one")
    if rows[-1][0].startswith("transformers"):  # against minitx's cached runs of the same length
        for name, _, rate in rows[4:7]:
            print(f"{name} vs transformers generate(), {hf_new} new tokens each: {rate / rows[-1][2]:.1f}x")
        checks = [("batch 1, packaged step vs transformers generate() >= 3x", rows[6][2] / rows[-1][2], 3.0)]
    else:
        checks = []
    checks += [("batch 1, packaged step >= 50% of the GEMV ceiling", rows[3][2] * gemv_s, 0.5),
               (f"batch {args.batch} >= 5x batch 1, packaged step", batched[2][2] / rows[3][2], 5.0)]
    print("\nissue 16's targets:")
    for what, value, target in checks:
        print(f"  {what}: {value:.2f} -> {'met' if value >= target else 'NOT met'}")


if __name__ == "__main__":
    main()
