"""Fill-mask on held-out text: mask one character (token) at random positions of text the model did not train
on, and count how often the true token is the model's first choice and among its top 5.

    python scripts/eval_fill_mask.py --ckpt outputs/mlm/<run>/checkpoints/best.ckpt            # built-in corpus
    python scripts/eval_fill_mask.py --ckpt ... --data held_out.txt --n 1000

Without --data it uses the last 10% of the built-in corpus: the held-out slice `experiment=mlm` validates on.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

import minitx
from minitx.data import builtin_corpus_files
from minitx.tokenizer import MASK, special_ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--data", help="a text file; default: the held-out end of the built-in corpus")
    parser.add_argument("--n", type=int, default=1000, help="masked positions to evaluate")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    loaded = minitx.load(args.ckpt)
    if loaded.task != "masked_lm":
        raise SystemExit(f"{args.ckpt} is a {loaded.task} checkpoint, not a masked_lm one")
    tokenizer, model, block = loaded.tokenizer, loaded.model, loaded.config.block_size
    if args.data:
        text = Path(args.data).read_text(encoding="utf-8")
    else:
        text = "".join(f.read_text(encoding="utf-8") + "\n" for f in builtin_corpus_files())
        text = text[int(len(text) * 0.9):]
    ids = np.asarray(tokenizer.encode(text, add_special_tokens=False).ids)
    rng = np.random.default_rng(args.seed)
    ordinary = ~np.isin(ids, special_ids(tokenizer))  # special ids sit wherever the tokenizer put them
    starts = rng.integers(0, len(ids) - block, size=args.n)
    offsets = rng.integers(0, block, size=args.n)  # where in its window each masked token sits
    windows = ids[starts[:, None] + np.arange(block)]
    truth = windows[np.arange(args.n), offsets]
    keep = ~np.isin(truth, special_ids(tokenizer))
    windows, offsets, truth = windows[keep], offsets[keep], truth[keep]
    inputs = torch.from_numpy(windows.copy())
    inputs[torch.arange(len(inputs)), torch.from_numpy(offsets)] = tokenizer.token_to_id(MASK)
    top1 = top5 = 0
    with torch.inference_mode():
        for i in range(0, len(inputs), 64):
            hidden = model(inputs[i : i + 64])
            rows = torch.arange(len(hidden))
            logits = model.mlm_logits(hidden[rows, torch.from_numpy(offsets[i : i + 64])])
            best = logits.topk(5, dim=-1).indices
            true = torch.from_numpy(truth[i : i + 64])[:, None]
            top1 += int((best[:, :1] == true).sum())
            top5 += int((best == true).any(dim=1).sum())
    counts = np.bincount(ids[ordinary])
    majority = counts.max() / counts.sum()
    n = len(inputs)
    print(f"{n} masked tokens of held-out text, one per {block}-token window")
    print(f"true token first: {top1 / n:.1%}   in the top 5: {top5 / n:.1%}   "
          f"(always guessing the most common token: {majority:.1%})")


if __name__ == "__main__":
    main()
