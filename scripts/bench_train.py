"""What minitx costs over a plain PyTorch loop, measured side by side in one process.

(a) minitx's real path: the composed Hydra config, `minitx.train.train` (Lightning, the token-stream data
    module, logging, throughput callback, progress bar), and (b) a minimal loop written here: the same GPT,
    the same AdamW + schedule + clipping, the same batches, no Lightning.

The two are interleaved inside one minitx run: after every `--chunk` minitx steps, a callback runs `--chunk` steps
of the plain loop. This machine's speed drifts by several percent over seconds, which swamps a 2% difference
between two runs made one after the other; chunks a fraction of a second apart see the same machine. The first
step after a switch (cold caches) and the minitx step that contains a plain chunk are left out of the timings. The
ratio is taken per chunk pair; the table gives its median.

    python scripts/bench_train.py --data ../shared/data/tinyshakespeare/input.txt            # nanoGPT CPU recipe
    python scripts/bench_train.py --data ... model.n_layer=6 model.n_head=6 model.n_embd=384 model.block_size=256 \\
        data.batch_size=8 --steps 240 --warmup-chunks 2
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra import compose, initialize_config_dir

from minitx.data import RandomWindows, prepare_data
from minitx.model import GPT
from minitx.perf import flops_per_token, measure_matmul_flops
from minitx.tasks import adamw, lr_at
from minitx.train import CONF_DIR, parse_config, train


def plain_steps(config: Any, data: Any) -> Iterator[float]:
    """The loop nanoGPT's train.py runs, minus its evaluation: forward, backward, clip, step, schedule. Yields the
    wall time of each step."""
    torch.manual_seed(config.seed)
    model_cfg = dataclasses.replace(config.model, vocab_size=data.tokenizer.get_vocab_size())
    model = GPT(model_cfg)
    optimizer = adamw(model.parameters(), config.optim)
    decay = config.optim.decay_steps or config.trainer.max_steps
    batches = iter(RandomWindows(data.train, model_cfg.block_size, config.data.batch_size, config.seed))
    step = 0
    while True:
        start = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config.optim, decay)
        x, y = next(batches)
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.trainer.gradient_clip_val)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % config.trainer.log_every_n_steps == 0:
            loss.item()  # what a loop that prints its loss every log interval pays (nanoGPT's does)
        step += 1
        yield time.perf_counter() - start


class Interleave(L.Callback):
    """Times minitx's steps (batch start to next batch start: data, hooks and logging included) and, after every
    `chunk` of them, runs `chunk` plain-loop steps."""

    def __init__(self, plain: Iterator[float], chunk: int):
        self.plain, self.chunk = plain, chunk
        self.starts: list[float] = []
        self.plain_chunks: list[list[float]] = []

    def on_train_batch_start(self, *args: object) -> None:
        self.starts.append(time.perf_counter())

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if len(self.starts) % self.chunk == 0:
            self.plain_chunks.append([next(self.plain) for _ in range(self.chunk)][1:])

    def minitx_chunks(self) -> list[list[float]]:
        steps = [b - a for a, b in zip(self.starts, self.starts[1:], strict=False)]
        return [steps[i + 1 : i + self.chunk - 1] for i in range(0, len(steps) - self.chunk + 2, self.chunk)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a text file (tiny Shakespeare for the nanoGPT recipe)")
    parser.add_argument("--experiment", default="shakespeare_char")
    parser.add_argument("--steps", type=int, default=2000, help="minitx steps (as many plain ones run)")
    parser.add_argument("--chunk", type=int, default=20, help="steps of one path before switching to the other")
    parser.add_argument("--warmup-chunks", type=int, default=3, help="chunk pairs left out at the start")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model.n_layer=6")
    args = parser.parse_args()

    overrides = [
        f"experiment={args.experiment}", f"data.path={args.data}", "logger=none", f"trainer.max_steps={args.steps}",
        f"trainer.val_check_interval={args.steps * 10}", f"checkpoint.every_n_steps={args.steps * 10}",
        "data.val_batches=1", "sample.max_new_tokens=0", "optim.warmup_steps=0", *args.overrides,
    ]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        config = parse_config(compose("train", overrides=overrides))
    data = prepare_data(config.data, config.tokenizer, config.model.block_size + 1)
    peak = measure_matmul_flops(1024, seconds=1.0)

    interleave = Interleave(plain_steps(config, data), args.chunk)
    with tempfile.TemporaryDirectory() as out:
        train(config, Path(out), callbacks=[interleave])
    pairs = list(zip(interleave.minitx_chunks(), interleave.plain_chunks, strict=False))[args.warmup_chunks :]
    results = {"minitx": [statistics.median(m) for m, _ in pairs], "plain": [statistics.median(p) for _, p in pairs]}

    model = GPT(dataclasses.replace(config.model, vocab_size=data.tokenizer.get_vocab_size()))
    tokens = config.data.batch_size * config.model.block_size
    fpt = flops_per_token(model.config, model.num_params())
    print(f"\nmodel: {model.num_params() / 1e6:.2f}M params, {config.model.n_layer} layers, "
          f"{config.model.n_embd} embd, "
          f"block {config.model.block_size}, batch {config.data.batch_size}; torch threads {torch.get_num_threads()}; "
          f"fp32 matmul peak measured now: {peak / 1e9:.0f} GFLOP/s")
    print(f"{len(pairs)} chunk pairs of {args.chunk} steps each (first {args.warmup_chunks} left out)")
    print(f"{'path':<8} {'ms/step (median of chunks)':>27} {'quartiles':>14} {'tokens/s':>10} {'GFLOP/s':>8} "
          f"{'MFU':>6}")
    for name, medians in results.items():
        ms = statistics.median(medians)
        q1, _, q3 = statistics.quantiles(medians, n=4)
        per_sec = tokens / ms
        print(f"{name:<8} {ms * 1e3:27.2f} {q1 * 1e3:6.2f}-{q3 * 1e3:6.2f} {per_sec:10.0f} "
              f"{per_sec * fpt / 1e9:8.1f} {per_sec * fpt / peak:6.1%}")
    ratios = [p / m for p, m in zip(results["plain"], results["minitx"], strict=True)]
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    print(f"\nthroughput minitx / plain loop: {statistics.median(ratios):.3f} "
          f"(median of the {len(ratios)} chunk pairs' "
          f"ratios; quartiles {q1:.3f}-{q3:.3f}; 1.0 = the framework costs nothing)")


if __name__ == "__main__":
    main()
