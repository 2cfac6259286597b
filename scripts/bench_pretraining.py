"""Does masked-LM pretraining help? One small labelled set, two classifiers trained the same way, side by side:
one from scratch, one from a masked-LM checkpoint (model.init_from).

The labelled set is built here from the built-in corpus: 96-character snippets labelled with the standard-library
module they come from (4 modules), `--per-class` snippets each for training, from the first 70% of each module,
and 100 each for validation from the last 30%.

    minitx-train experiment=mlm                                             # pretrain (about a minute)
    python scripts/bench_pretraining.py --mlm-ckpt outputs/mlm/<run>/checkpoints/best.ckpt
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
    parser.add_argument("--per-class", type=int, default=40)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for both runs, e.g. model.pooling=mean")
    args = parser.parse_args()

    pretrained = minitx.load(args.mlm_ckpt).config
    shape = [f"model.{k}={getattr(pretrained, k)}" for k in ("block_size", "n_layer", "n_head", "n_embd",
                                                              "pos_emb", "norm", "activation")]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "data"
        folder.mkdir()
        write_labelled(folder, args.modules.split(","), args.per_class, 96, args.seed)
        for name, extra in (("from scratch", []), ("from the masked LM", [f"model.init_from={args.mlm_ckpt}"])):
            overrides = ["experiment=classify", f"data.path={folder}", *shape, f"trainer.max_steps={args.steps}",
                         f"trainer.val_check_interval={args.steps // 3}", "logger=csv", f"seed={args.seed}",
                         "trainer.enable_progress_bar=false", "data.batch_size=32", *args.overrides, *extra]
            with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
                config = parse_config(compose("train", overrides=overrides))
            run = Path(tmp) / name.replace(" ", "_")
            train(config, run)
            results[name] = final_accuracy(run)
    n_classes = len(args.modules.split(","))
    print(f"\n{n_classes}-way module classification, {args.per_class} labelled snippets per class, "
          f"{args.steps} steps, seed {args.seed}")
    print(f"{'classifier':<20} {'final val/acc':>14} {'best val/acc':>13}")
    for name, (final, best) in results.items():
        print(f"{name:<20} {final:14.3f} {best:13.3f}")
    print(f"(chance: {1 / n_classes:.3f})")


if __name__ == "__main__":
    main()
