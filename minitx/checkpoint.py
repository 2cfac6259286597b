"""Reading minitx checkpoints: a `.ckpt` carries the model config, the tokenizer and the weights.

Inference starts here, so this needs torch, tokenizers and minitx's model code only (no Lightning, no Hydra)."""

from __future__ import annotations

import dataclasses
import pickle
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from minitx.attention import kernel_unavailable
from minitx.config import ConfigError, MinitxError, ModelConfig, from_mapping
from minitx.model import GPT, Encoder

CHECKPOINT_KEY = "minitx"  # the part of a .ckpt that rebuilds model and tokenizer without any config


class CheckpointError(MinitxError):
    """A file that is missing, unreadable, or not a minitx checkpoint."""


@dataclass
class Loaded:
    model: GPT | Encoder
    tokenizer: Tokenizer
    config: ModelConfig
    step: int
    task: str = "causal_lm"  # causal_lm | masked_lm | classify
    labels: list[str] | None = None  # classify: the label names, in the head's order


def read_checkpoint(path: str | Path, key: str = "ckpt") -> dict[str, Any]:
    """The checkpoint dict, loaded with weights_only=True: a pickle that would run code is refused.

    `key` is the setting that named the file, for the error messages.
    """
    path = Path(path)
    where = f"{key}={str(path)!r}"
    if not path.is_file():
        raise CheckpointError(f"{where}: no such file")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            if f.read(4) == b"PK\x03\x04":
                raise CheckpointError(f"{where}: truncated or corrupt checkpoint (its zip archive is incomplete)")
        raise CheckpointError(f"{where}: not a checkpoint (torch.save writes a zip archive, this is not)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{where}: refused: its pickle holds objects other than tensors and plain data, "
            "and loading it could run code"
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile) as e:
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{where}: truncated or corrupt checkpoint ({reason})") from None
    if not isinstance(checkpoint, dict) or CHECKPOINT_KEY not in checkpoint:
        raise CheckpointError(f"{where}: not a minitx checkpoint (no {CHECKPOINT_KEY!r} entry)")
    return checkpoint


def load(path: str | Path, device: str | torch.device = "cpu", key: str = "ckpt") -> Loaded:
    """Model (in eval mode) and tokenizer from a minitx checkpoint; nothing else is needed."""
    checkpoint = read_checkpoint(path, key)
    meta = checkpoint[CHECKPOINT_KEY]
    task = meta.get("task", "causal_lm")
    config = from_mapping(ModelConfig, meta["model"], "model.").validate()
    if kernel_unavailable(config.attention, torch.device(device).type, training=False) is not None:
        config = dataclasses.replace(config, attention="sdpa")  # e.g. trained with flash-attn on a GPU: same math
    labels = meta.get("labels")
    model = GPT(config) if task == "causal_lm" else Encoder(config, len(labels or []), meta.get("pooling", "cls"))
    prefix = "model."
    state = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    model.load_state_dict(state)
    tokenizer = Tokenizer.from_str(meta["tokenizer"])
    return Loaded(model.to(device).eval(), tokenizer, config, int(checkpoint.get("global_step", 0)), task, labels)


def require_same_model(saved: dict[str, Any], model_cfg: ModelConfig, keys: Iterable[str], source: str,
                       fix: str) -> None:
    """The first of `keys` where model_cfg differs from a checkpoint's saved model settings fails as one line."""
    current = dataclasses.asdict(model_cfg)
    for key in keys:
        if current.get(key) != saved.get(key):
            raise ConfigError(f"model.{key}={current.get(key)!r} but {source} was trained with {saved.get(key)!r}; "
                              f"{fix}")
