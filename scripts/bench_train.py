"""What minitx costs over a plain PyTorch loop, measured side by side in one process.

(a) minitx's real path: the composed Hydra config, `minitx.train.train` (Lightning, the token-stream data
    module, logging, throughput callback, progress bar), and (b) a minimal loop written here: the same GPT,
    the same AdamW + schedule + clipping, the same batches, no Lightning. The two alternate `--rounds` times
    (ABBA); each reports the median ms/step after `--warmup` steps, and the ratio is taken within each round.

    python scripts/bench_train.py --data ../shared/data/tinyshakespeare/input.txt            # nanoGPT CPU recipe
    python scripts/bench_train.py --data ... model.n_layer=6 model.n_head=6 model.n_embd=384 model.block_size=256 \\
        data.batch_size=8 --steps 30 --warmup 5
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir

from minitx.data import RandomWindows, prepare_data
from minitx.model import GPT
from minitx.perf import flops_per_token, measure_matmul_flops
from minitx.tasks import adamw, lr_at
from minitx.train import CONF_DIR, parse_config, train


class StepTimer(L.Callback):
    """Wall time between consecutive training-batch starts: everything a step costs, data and logging included."""

    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(self, *args: object) -> None:
        self.starts.append(time.perf_counter())

    def step_times(self) -> list[float]:
        return [b - a for a, b in zip(self.starts, self.starts[1:], strict=False)]


def run_minitx(config, steps: int) -> list[float]:
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        train(config, Path(out), callbacks=[timer])
    return timer.step_times()[: steps - 1]


def run_plain(config, data, steps: int) -> list[float]:
    """The loop nanoGPT's train.py runs, minus its evaluation: forward, backward, clip, step, schedule."""
    torch.manual_seed(config.seed)
    model_cfg = dataclasses.replace(config.model, vocab_size=data.tokenizer.get_vocab_size())
    model = GPT(model_cfg)
    optimizer = adamw(model, config.optim)
    decay = config.optim.decay_steps or config.trainer.max_steps
    batches = iter(RandomWindows(data.train, model_cfg.block_size, config.data.batch_size, config.seed))
    times, last = [], time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config.optim, decay)
        x, y = next(batches)
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.trainer.gradient_clip_val)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # what a loop that prints its loss pays; Lightning's progress bar does the same
        now = time.perf_counter()
        times.append(now - last)
        last = now
    return times[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a text file (tiny Shakespeare for the nanoGPT recipe)")
    parser.add_argument("--experiment", default="shakespeare_char")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=10)
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

    results: dict[str, list[float]] = {"minitx": [], "plain": []}
    for r in range(args.rounds):
        for name in ("minitx", "plain") if r % 2 == 0 else ("plain", "minitx"):  # ABBA: no order bias
            times = run_minitx(config, args.steps) if name == "minitx" else run_plain(config, data, args.steps)
            median = statistics.median(times[args.warmup :])
            results[name].append(median)
            print(f"round {r + 1} {name:>6}: {median * 1e3:7.2f} ms/step", flush=True)

    model = GPT(dataclasses.replace(config.model, vocab_size=data.tokenizer.get_vocab_size()))
    tokens = config.data.batch_size * config.model.block_size
    fpt = flops_per_token(model.config, model.num_params())
    print(f"\nmodel: {model.num_params() / 1e6:.2f}M params, {config.model.n_layer} layers, "
          f"{config.model.n_embd} embd, "
          f"block {config.model.block_size}, batch {config.data.batch_size}; torch threads {torch.get_num_threads()}; "
          f"fp32 matmul peak measured now: {peak / 1e9:.0f} GFLOP/s")
    print(f"{'path':<8} {'ms/step (median of rounds)':>27} {'spread':>14} {'tokens/s':>10} {'GFLOP/s':>8} {'MFU':>6}")
    for name, medians in results.items():
        ms = statistics.median(medians)
        per_sec = tokens / ms
        print(f"{name:<8} {ms * 1e3:27.2f} {min(medians) * 1e3:6.2f}-{max(medians) * 1e3:6.2f} {per_sec:10.0f} "
              f"{per_sec * fpt / 1e9:8.1f} {per_sec * fpt / peak:6.1%}")
    # each round runs both paths back to back: their ratio cancels the machine's drift between rounds
    ratios = [p / m for p, m in zip(results["plain"], results["minitx"], strict=True)]
    print(f"\nthroughput minitx / plain loop: {statistics.median(ratios):.3f} (median of the {len(ratios)} "
          f"rounds' ratios; range {min(ratios):.3f}-{max(ratios):.3f}; 1.0 = the framework costs nothing)")


if __name__ == "__main__":
    main()
