"""Time to quality: nanoGPT's CPU recipe (experiment=shakespeare_char) against minitx's fast recipe
(experiment=shakespeare_char_fast), run back to back through the real `minitx-train` command for each seed, each
timed from launch to the checkpoint line, with the val/loss-vs-wall-time curve read off its log as it happens.
With --ablation, the fast recipe is also run once per ingredient taken out (or added), for the first seed.

    python scripts/bench_time_to_quality.py --data ../shared/data/tinyshakespeare/input.txt
    python scripts/bench_time_to_quality.py --data ... --seeds 1337,1,2 --target 1.88 --ablation
"""

from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
import time

STEP_LINE = re.compile(r"step (\d+): val/loss ([0-9.]+)")
BASELINE, FAST = "experiment=shakespeare_char", "experiment=shakespeare_char_fast"

# (label, overrides of the fast recipe): one ingredient changed at a time
ABLATION = [
    ("fast recipe", []),
    ("- Muon (AdamW for every parameter)", ["optim.name=adamw"]),
    ("- QK-norm", ["model.qk_norm=false"]),
    ("- logit soft-cap", ["model.logit_softcap=0"]),
    ("- WSD (cosine decay)", ["optim.schedule=cosine"]),
    ("- Muon momentum 0.85 (torch's 0.95)", ["optim.muon_momentum=0.95"]),
    ("+ untied head", ["model.tie_embeddings=false"]),
    ("previous fast recipe (AdamW, 640 steps)",
     ["optim.name=adamw", "optim.lr=3e-3", "optim.warmup_steps=40", "optim.schedule=cosine", "model.qk_norm=false",
      "model.logit_softcap=0", "trainer.max_steps=640", "trainer.val_check_interval=160"]),
]


def run(overrides: list[str], data: str, seed: int) -> tuple[list[tuple[float, int, float]], float]:
    """[(seconds since launch, step, val/loss)], and the seconds until the checkpoint path was printed."""
    with tempfile.TemporaryDirectory() as out:
        command = ["minitx-train", *overrides, f"data.path={data}", f"seed={seed}", f"hydra.run.dir={out}",
                   "sample.max_new_tokens=0", "logger=csv"]
        t0 = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        curve, done = [], float("nan")
        assert process.stdout is not None
        for line in process.stdout:
            now = time.perf_counter() - t0
            if match := STEP_LINE.search(line):
                curve.append((now, int(match[1]), float(match[2])))
            elif line.startswith("checkpoint: "):
                done = now
        if process.wait() != 0:
            raise SystemExit(f"{' '.join(command)} failed with exit status {process.returncode}")
    return curve, done


def show(label: str, seed: int, curve: list[tuple[float, int, float]]) -> None:
    print(f"\n{label} (seed {seed}): val/loss vs wall time", flush=True)
    for seconds, step, loss in curve:
        print(f"  {seconds:6.1f} s  step {step:5d}  val/loss {loss:.4f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--seeds", default="1337,1,2")
    parser.add_argument("--target", type=float, default=1.88)
    parser.add_argument("--ablation", action="store_true", help="also run the ablation table (first seed)")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    for seed in seeds:
        base_curve, base_done = run([BASELINE], args.data, seed)
        show(BASELINE, seed, base_curve)
        fast_curve, fast_done = run([FAST], args.data, seed)
        show(FAST, seed, fast_curve)
        rows.append((seed, base_done, base_curve[-1][2], fast_done, fast_curve[-1][2]))
    print(f"\n{'seed':>5} {'nanoGPT recipe s':>17} {'val/loss':>9} {'fast recipe s':>14} {'val/loss':>9} "
          f"{'time ratio':>11}  reached {args.target}")
    for seed, base_done, base_loss, fast_done, fast_loss in rows:
        ok = "yes" if fast_loss <= args.target else "NO"
        print(f"{seed:>5} {base_done:17.1f} {base_loss:9.4f} {fast_done:14.1f} {fast_loss:9.4f} "
              f"{fast_done / base_done:10.2f}x  {ok}")
    if not args.ablation:
        return
    seed, base_done = rows[0][0], rows[0][1]
    table = []
    for label, overrides in ABLATION:
        curve, done = run([FAST, *overrides], args.data, seed)
        show(label, seed, curve)
        table.append((label, done, curve[-1][1], curve[-1][2]))
    print(f"\nablation, seed {seed} (nanoGPT recipe: {base_done:.1f} s in the same run)")
    print(f"| {'recipe':<40} | steps | wall s | x recipe | val/loss |")
    print(f"|{'-' * 42}|------:|-------:|---------:|---------:|")
    for label, done, steps, loss in table:
        print(f"| {label:<40} | {steps:5d} | {done:6.1f} | {done / base_done:7.2f}x | {loss:8.4f} |")


if __name__ == "__main__":
    main()
