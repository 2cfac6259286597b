"""Does masked-LM pretraining help? One small labelled set, two classifiers trained the same way, side by side:
one from scratch, one from a masked-LM checkpoint (model.init_from).

The labelled set is built here from the built-in corpus: 96-character snippets labelled with the standard-library
module they come from (4 modules), `--per-class` snippets each for training, from the first 70% of each module,
and 100 each for validation from the last 30%. Each labelled-set size is drawn and trained with every seed of
`--seeds` (a new draw of the snippets and a new initialisation of the head per seed): differences of a few points
between two single runs are noise at this size.

    minitx-train experiment=mlm                                             # pretrain (about a minute)
    python scripts/bench_pretraining.py --mlm-ckpt outputs/mlm/<run>/checkpoints/best.ckpt --per-class 40,200
"""

from __future__ import annotations

import argparse
import csv
import json
import sysconfig
import tempfile
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir

import minitx
from minitx.train import CONF_DIR, parse_config, train


def write_labelled(folder: Path, modules: list[str], per_class: int, length: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    splits: dict[str, list[dict]] = {"train": [], "validation": []}
    for module in modules:
        text = (stdlib / f"{module}.py").read_text(encoding="utf-8")
        cut = int(len(text) * 0.7)
        for split, (lo, hi), n in (("train", (0, cut), per_class), ("validation", (cut, len(text)), 100)):
            for start in rng.integers(lo, hi - length, size=n):
                splits[split].append({"text": text[start : start + length], "label": module})
    for split, rows in splits.items():
        (folder / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))


def final_accuracy(run_dir: Path) -> tuple[float, float]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        accs = [float(r["val/acc"]) for r in csv.DictReader(f) if r.get("val/acc")]
    return accs[-1], max(accs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mlm-ckpt", required=True)
    parser.add_argument("--modules", default="argparse,datetime,threading,tarfile")
    parser.add_argument("--per-class", default="40,200", help="labelled-set sizes (snippets per class) to compare")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for both runs, e.g. model.pooling=mean")
    args = parser.parse_args()

    pretrained = minitx.load(args.mlm_ckpt).config
    shape = [f"model.{k}={getattr(pretrained, k)}" for k in ("block_size", "n_layer", "n_head", "n_embd",
                                                              "pos_emb", "norm", "activation")]
    arms = {"from scratch": [], "from the masked LM": [f"model.init_from={args.mlm_ckpt}"]}
    sizes, seeds = [int(n) for n in args.per_class.split(",")], [int(n) for n in args.seeds.split(",")]
    results: dict[tuple[int, str], list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for per_class in sizes:
            for seed in seeds:
                folder = Path(tmp) / f"data-{per_class}-{seed}"
                folder.mkdir()
                write_labelled(folder, args.modules.split(","), per_class, 96, seed)
                for name, extra in arms.items():
                    overrides = ["experiment=classify", f"data.path={folder}", *shape,
                                 f"trainer.max_steps={args.steps}", f"trainer.val_check_interval={args.steps // 3}",
                                 "logger=csv", f"seed={seed}", "trainer.enable_progress_bar=false",
                                 "data.batch_size=32", *args.overrides, *extra]
                    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
                        config = parse_config(compose("train", overrides=overrides))
                    run = Path(tmp) / f"{name.replace(' ', '_')}-{per_class}-{seed}"
                    train(config, run)
                    results.setdefault((per_class, name), []).append(final_accuracy(run))
    n_classes = len(args.modules.split(","))
    print(f"\n{n_classes}-way module classification, {args.steps} steps, seeds {args.seeds}; "
          f"final val/acc per seed, mean, and mean of the best evaluation (chance {1 / n_classes:.3f})")
    print(f"{'per class':>9}  {'classifier':<20} {'per seed':>24} {'mean':>6} {'best':>6}")
    for (per_class, name), accs in results.items():
        finals = " ".join(f"{final:.3f}" for final, _ in accs)
        print(f"{per_class:>9}  {name:<20} {finals:>24} {np.mean([a[0] for a in accs]):6.3f} "
              f"{np.mean([a[1] for a in accs]):6.3f}")


if __name__ == "__main__":
    main()
