"""Reading models: a minitx `.ckpt` (model config, tokenizer and weights in one file), a directory in minitx's own safe
format (model.safetensors + minitx_config.json + tokenizer.json: no pickle), or `hf:<dir>`, a transformers GPT-2.

Inference starts here, so this needs torch, tokenizers, safetensors and minitx's model code only (no Lightning, no
Hydra, no transformers)."""

from __future__ import annotations

import dataclasses
import json
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
OWN_CONFIG = "minitx_config.json"  # in an own-format directory: the model config, task, labels, pooling, step
HF_PREFIX = "hf:"  # a source naming a transformers GPT-2 directory


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
    document_mask: bool = False  # trained with data.document_mask: attention stopped at <|endoftext|>


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
    """Model (in eval mode) and tokenizer from a .ckpt, an own-format directory or `hf:<dir>`; nothing else needed.
    `key` is the setting that named the source, for the error messages."""
    source = str(path)
    if source.startswith(HF_PREFIX):
        loaded = load_gpt2(source[len(HF_PREFIX):], key)
    elif Path(source).is_dir():
        loaded = load_own_format(source, key)
    else:
        loaded = load_ckpt(source, key)
    config = loaded.config
    if kernel_unavailable(config.attention, torch.device(device).type, training=False) is not None:
        config = dataclasses.replace(config, attention="sdpa")  # e.g. trained with flash-attn on a GPU: same math
        loaded.model.transformer.set_attention("sdpa", config.sdpa_backend)
        loaded.config = config
    loaded.model.to(device).eval()
    return loaded


def read_model_config(path: str | Path, key: str) -> tuple[ModelConfig, str]:
    """The model settings and task of a source `load` reads, without building the model."""
    source = str(path)
    if source.startswith(HF_PREFIX):
        from minitx.hf import read_gpt2_dir

        return read_gpt2_dir(source[len(HF_PREFIX):], f"{key}={source!r}")[0], "causal_lm"
    where = f"{key}={source!r}"
    meta = read_own_format(source, key) if Path(source).is_dir() else read_checkpoint(source, key)[CHECKPOINT_KEY]
    config, task, _, _ = settings_from_meta(meta, where)
    return config, task


def settings_from_meta(meta: Any, where: str) -> tuple[ModelConfig, str, list[str] | None, str]:
    """A checkpoint's (or minitx_config.json's) model settings, task, labels and pooling."""
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
        raise CheckpointError(f"{where}: no model settings (a 'model' entry) in its minitx metadata")
    config = from_mapping(ModelConfig, meta["model"], "model.").validate()
    return config, meta.get("task", "causal_lm"), meta.get("labels"), meta.get("pooling", "cls")


def build_model(config: ModelConfig, task: str, labels: list[str] | None, pooling: str) -> GPT | Encoder:
    return GPT(config) if task == "causal_lm" else Encoder(config, len(labels or []), pooling)


def load_weights(model: GPT | Encoder, state: dict[str, torch.Tensor], where: str) -> None:
    """model.load_state_dict, a missing, unexpected or misshapen tensor failing as one line."""
    try:
        model.load_state_dict(state)
    except RuntimeError as e:  # torch lists every mismatch over many lines: the first one names the problem
        detail = " ".join(str(e).split())[:300]
        raise CheckpointError(f"{where}: its weights do not fit its model settings ({detail})") from None


def load_ckpt(path: str, key: str) -> Loaded:
    checkpoint = read_checkpoint(path, key)
    meta, where = checkpoint[CHECKPOINT_KEY], f"{key}={path!r}"
    config, task, labels, pooling = settings_from_meta(meta, where)
    model = build_model(config, task, labels, pooling)
    prefix = "model."
    load_weights(model, {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)},
                 where)
    tokenizer = Tokenizer.from_str(meta["tokenizer"])
    run_config = meta.get("config") or {}
    document_mask = bool(run_config.get("data", {}).get("document_mask", False))
    return Loaded(model, tokenizer, config, int(checkpoint.get("global_step", 0)), task, labels, document_mask)


def state_without_tied_head(model: GPT | Encoder) -> dict[str, torch.Tensor]:
    """The state dict with one copy of each tensor: a tied lm_head shares the embedding, and safetensors refuses
    shared tensors, so its weight is left out and re-tied on load."""
    tied = model.config.tie_embeddings
    return {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}


def own_format_meta(loaded: Loaded) -> dict[str, Any]:
    """What minitx_config.json holds: the ModelConfig as a checkpoint saves it, the task, labels, pooling, step and
    whether training masked attention across documents."""
    return {"model": dataclasses.asdict(loaded.config), "task": loaded.task, "labels": loaded.labels,
            "pooling": getattr(loaded.model, "pooling", "cls"), "step": loaded.step,
            "document_mask": loaded.document_mask}


def read_own_format(path: str, key: str) -> dict[str, Any]:
    """An own-format directory's minitx_config.json, once the directory is seen to hold all three files."""
    folder, where = Path(path), f"{key}={path!r}"
    if not (folder / OWN_CONFIG).is_file():
        if (folder / "checkpoints").is_dir():
            raise CheckpointError(f"{where}: a training run directory; use {folder / 'checkpoints' / 'best.ckpt'}")
        raise CheckpointError(f"{where}: a directory without {OWN_CONFIG} (minitx-export format=safetensors writes "
                              f"one); a transformers directory loads as {key}={HF_PREFIX}{path}")
    for name in ("model.safetensors", "tokenizer.json"):
        if not (folder / name).is_file():
            raise CheckpointError(f"{where}: no {name} in this directory")
    try:
        return json.loads((folder / OWN_CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{where}: {OWN_CONFIG} is not JSON ({e})") from None


def load_own_format(path: str, key: str) -> Loaded:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder, where = Path(path), f"{key}={path!r}"
    meta = read_own_format(path, key)
    config, task, labels, pooling = settings_from_meta(meta, where)
    model = build_model(config, task, labels, pooling)
    try:
        state = load_file(str(folder / "model.safetensors"))
    except SafetensorError as e:
        raise CheckpointError(f"{where}: model.safetensors is truncated or corrupt ({e})") from None
    if "transformer.tok_emb.weight" not in state:
        raise CheckpointError(f"{where}: model.safetensors has no 'transformer.tok_emb.weight'; not a minitx model")
    if config.tie_embeddings:
        state["lm_head.weight"] = state["transformer.tok_emb.weight"]  # tied: one copy saved
    load_weights(model, state, where)
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    return Loaded(model, tokenizer, config, int(meta.get("step", 0)), task, labels,
                  bool(meta.get("document_mask", False)))


def load_gpt2(path: str, key: str) -> Loaded:
    """A transformers GPT-2 directory (config.json, model.safetensors or pytorch_model.bin, tokenizer.json) as the
    minitx GPT that computes the same logits."""
    from minitx.hf import from_gpt2_state, read_gpt2_dir, read_gpt2_weights
    from minitx.tokenizer import id_limit

    source = f"{key}={HF_PREFIX + path!r}"
    config, _ = read_gpt2_dir(path, source)
    if not (Path(path) / "tokenizer.json").is_file():
        raise CheckpointError(f"{source}: no tokenizer.json there (minitx reads the fast tokenizer's file only)")
    tokenizer = Tokenizer.from_file(str(Path(path) / "tokenizer.json"))
    if id_limit(tokenizer) > config.vocab_size:
        raise CheckpointError(f"{source}: the tokenizer's largest id + 1 ({id_limit(tokenizer)}) exceeds the "
                              f"model's vocab_size={config.vocab_size}")
    model = GPT(config)
    load_weights(model, from_gpt2_state(read_gpt2_weights(Path(path), source), config, source), source)
    return Loaded(model, tokenizer, config, 0, "causal_lm", None)


def require_same_model(saved: dict[str, Any], model_cfg: ModelConfig, keys: Iterable[str], source: str,
                       fix: str) -> None:
    """The first of `keys` where model_cfg differs from a checkpoint's saved model settings fails as one line."""
    current = dataclasses.asdict(model_cfg)
    for key in keys:
        if current.get(key) != saved.get(key):
            raise ConfigError(f"model.{key}={current.get(key)!r} but {source} was trained with {saved.get(key)!r}; "
                              f"{fix}")
