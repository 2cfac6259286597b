"""Time to quality: recipes run back to back through the real `minitx-train` command, each timed from launch
to the checkpoint line, with the val/loss-vs-wall-time curve read off its log as it happens.

    python scripts/bench_time_to_quality.py --data ../shared/data/tinyshakespeare/input.txt
    python scripts/bench_time_to_quality.py --data ... --seeds 1337,1,2 --target 1.88
"""

from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
import time

STEP_LINE = re.compile(r"step (\d+): val/loss ([0-9.]+)")


def run(experiment: str, data: str, seed: int) -> tuple[list[tuple[float, int, float]], float]:
    """[(seconds since launch, step, val/loss)], and the seconds until the checkpoint path was printed."""
    with tempfile.TemporaryDirectory() as out:
        command = ["minitx-train", f"experiment={experiment}", f"data.path={data}", f"seed={seed}",
                   f"hydra.run.dir={out}", "sample.max_new_tokens=0"]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--recipes", default="shakespeare_char,shakespeare_char_fast")
    parser.add_argument("--seeds", default="1337")
    parser.add_argument("--target", type=float, default=1.88)
    args = parser.parse_args()
    recipes = args.recipes.split(",")
    summary = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for recipe in recipes:
            curve, done = run(recipe, args.data, seed)
            print(f"\n{recipe} (seed {seed}): val/loss vs wall time")
            for seconds, step, loss in curve:
                print(f"  {seconds:6.1f} s  step {step:5d}  val/loss {loss:.4f}")
            reached = next((s for s, _, loss in curve if loss <= args.target), None)
            summary.append((recipe, seed, done, curve[-1][2], reached))
    reached_header = f"reached {args.target}"
    print(f"\n{'recipe':<24} {'seed':>5} {'wall to checkpoint':>19} {'final val/loss':>15} {reached_header:>13}")
    for recipe, seed, done, final, reached in summary:
        reached_s = f"{reached:.1f} s" if reached is not None else "no"
        print(f"{recipe:<24} {seed:>5} {done:17.1f} s {final:15.4f} {reached_s:>13}")
    if len(recipes) == 2:
        for seed in sorted({s for _, s, *_ in summary}):
            walls = [d for r, s, d, *_ in summary if s == seed]
            print(f"seed {seed}: {recipes[1]} takes {walls[1] / walls[0]:.2f} of {recipes[0]}'s wall time")


if __name__ == "__main__":
    main()
