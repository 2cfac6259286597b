"""GPT-2's layout in transformers and minitx's GPT: one weight-name mapping, used by export and import alike.

The two models compute the same function when minitx's settings are GPT-2's (learned positions, LayerNorm, GELU);
only the names and one layout differ: GPT-2's Conv1D stores a weight as (in, out), the transpose of nn.Linear's,
and its c_attn packs q, k, v in the order minitx's fused qkv projection does.

Import reads config.json and the weights with safetensors / torch.load(weights_only=True): no transformers needed.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from minitx.checkpoint import CheckpointError
from minitx.config import ConfigError, ModelConfig

# minitx activation -> GPT-2 activation_function written on export; import maps these (and the aliases) back
ACTIVATION_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_new"}
ACTIVATION_FROM_HF = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}

# per block: minitx name -> (GPT-2 name, stored transposed by Conv1D)
BLOCK_NAMES = {
    "ln_1.weight": ("ln_1.weight", False), "ln_1.bias": ("ln_1.bias", False),
    "attn.qkv.weight": ("attn.c_attn.weight", True), "attn.qkv.bias": ("attn.c_attn.bias", False),
    "attn.proj.weight": ("attn.c_proj.weight", True), "attn.proj.bias": ("attn.c_proj.bias", False),
    "ln_2.weight": ("ln_2.weight", False), "ln_2.bias": ("ln_2.bias", False),
    "mlp.fc.weight": ("mlp.c_fc.weight", True), "mlp.fc.bias": ("mlp.c_fc.bias", False),
    "mlp.proj.weight": ("mlp.c_proj.weight", True), "mlp.proj.bias": ("mlp.c_proj.bias", False),
}
TOP_NAMES = {
    "transformer.tok_emb.weight": "transformer.wte.weight", "transformer.pos_emb.weight": "transformer.wpe.weight",
    "transformer.ln_f.weight": "transformer.ln_f.weight", "transformer.ln_f.bias": "transformer.ln_f.bias",
}


def name_map(n_layer: int) -> dict[str, tuple[str, bool]]:
    """Every minitx GPT parameter name -> (its GPT-2 name, transposed); lm_head is tied to the embedding in both."""
    names = {ours: (theirs, False) for ours, theirs in TOP_NAMES.items()}
    for i in range(n_layer):
        names |= {f"transformer.blocks.{i}.{ours}": (f"transformer.h.{i}.{theirs}", t)
                  for ours, (theirs, t) in BLOCK_NAMES.items()}
    return names


def gpt2_mismatch(config: ModelConfig, task: str) -> str | None:
    """The first setting with no exact GPT-2 equivalent, as `key=value`; None when the model is GPT-2's layout."""
    checks = [("task", task, task != "causal_lm"), ("model.pos_emb", config.pos_emb, config.pos_emb != "learned"),
              ("model.norm", config.norm, config.norm != "layernorm"),
              ("model.activation", config.activation, config.activation not in ACTIVATION_TO_HF),
              ("model.attention_window", config.attention_window, config.attention_window != 0),
              ("model.qk_norm", config.qk_norm, config.qk_norm),
              ("model.tie_embeddings", config.tie_embeddings, not config.tie_embeddings),
              ("model.logit_softcap", config.logit_softcap, config.logit_softcap != 0)]
    return next((f"{key}={value!r}" for key, value, bad in checks if bad), None)


def to_gpt2_state(state: dict[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """A minitx GPT's state dict under GPT-2's names and layout; biases minitx lacks (bias=false) are zeros."""
    out = {}
    for ours, (theirs, transposed) in name_map(config.n_layer).items():
        if ours in state:
            out[theirs] = (state[ours].t() if transposed else state[ours]).contiguous()
        else:  # a bias of a model built with bias=false: GPT-2 always has one; zero computes the same
            weight = state[ours.removesuffix(".bias") + ".weight"]  # (out, in) as nn.Linear stores it
            out[theirs] = torch.zeros(weight.shape[0], dtype=weight.dtype)
    return out


def from_gpt2_state(state: dict[str, Tensor], config: ModelConfig, source: str) -> dict[str, Tensor]:
    """GPT-2's weights under minitx's names (lm_head tied to the embedding)."""
    out = {}
    for ours, (theirs, transposed) in name_map(config.n_layer).items():
        if theirs not in state:
            raise CheckpointError(f"{source}: no weight {theirs!r}; not a GPT-2 model of this config.json")
        out[ours] = state[theirs].t() if transposed else state[theirs]
    out["lm_head.weight"] = out["transformer.tok_emb.weight"]
    return out


def crop_positions(state: dict[str, Tensor], block_size: int) -> dict[str, Tensor]:
    """The state of a model with a learned position table, for one with block_size positions: its first rows."""
    if "transformer.pos_emb.weight" in state:
        state = state | {"transformer.pos_emb.weight": state["transformer.pos_emb.weight"][:block_size]}
    return state


def gpt2_config_dict(config: ModelConfig, eos_id: int, bos_id: int) -> dict[str, Any]:
    """The GPT2Config settings of a minitx GPT in GPT-2's layout."""
    return {"vocab_size": config.vocab_size, "n_positions": config.block_size, "n_embd": config.n_embd,
            "n_layer": config.n_layer, "n_head": config.n_head, "n_inner": 4 * config.n_embd,
            "activation_function": ACTIVATION_TO_HF[config.activation], "layer_norm_epsilon": 1e-5,
            "resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attn_pdrop": config.dropout,
            "bos_token_id": bos_id, "eos_token_id": eos_id, "tie_word_embeddings": True,
            "architectures": ["GPT2LMHeadModel"]}


def model_config_from_gpt2(hf: dict[str, Any], source: str) -> ModelConfig:
    """minitx's ModelConfig for a transformers GPT-2 config.json; anything GPT-2 allows that minitx does not compute
    the same way is refused, naming the setting."""
    if hf.get("model_type") != "gpt2":
        raise CheckpointError(f"{source}: model_type={hf.get('model_type')!r}: only GPT-2's layout (model_type='gpt2') "
                          "imports into minitx")
    activation = hf.get("activation_function", "gelu_new")
    if activation not in ACTIVATION_FROM_HF:
        raise CheckpointError(f"{source}: activation_function={activation!r}: minitx has no such activation; "
                          f"importable: {sorted(ACTIVATION_FROM_HF)}")
    n_embd = hf.get("n_embd", 768)
    unsupported = [("n_inner", hf.get("n_inner"), (None, 4 * n_embd)),
                   ("layer_norm_epsilon", hf.get("layer_norm_epsilon", 1e-5), (1e-5,)),
                   ("scale_attn_weights", hf.get("scale_attn_weights", True), (True,)),
                   ("scale_attn_by_inverse_layer_idx", hf.get("scale_attn_by_inverse_layer_idx", False), (False,)),
                   ("tie_word_embeddings", hf.get("tie_word_embeddings", True), (True,))]
    for key, value, allowed in unsupported:
        if value not in allowed:
            raise CheckpointError(f"{source}: {key}={value!r}: minitx's GPT computes {allowed[-1]!r} only")
    config = ModelConfig(vocab_size=hf.get("vocab_size", 50257), block_size=hf.get("n_positions", 1024),
                         n_layer=hf.get("n_layer", 12), n_head=hf.get("n_head", 12), n_embd=n_embd,
                         dropout=0.0, bias=True, pos_emb="learned", norm="layernorm",
                         activation=ACTIVATION_FROM_HF[activation])
    try:
        return config.validate()
    except ConfigError as e:  # name config.json's keys (n_positions, n_embd, ...), not minitx's model.* settings
        message = re.sub(r"model\.(\w+)", lambda m: {"block_size": "n_positions"}.get(m[1], m[1]), str(e))
        raise CheckpointError(f"{source}: config.json {message}") from None


def read_gpt2_dir(path: str | Path, source: str) -> tuple[ModelConfig, dict[str, Any]]:
    """A transformers directory's config.json, as minitx's ModelConfig and as written."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{source}: no config.json there; expected a transformers model directory")
    try:
        hf = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{source}: config.json is not JSON ({e})") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{source}: config.json is not a JSON object of settings")
    return model_config_from_gpt2(hf, source), hf


def read_gpt2_weights(path: Path, source: str) -> dict[str, Tensor]:
    """model.safetensors, or pytorch_model.bin read with weights_only=True; names with or without 'transformer.'."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if (path / "model.safetensors").is_file():
        try:
            state = load_file(str(path / "model.safetensors"))
        except SafetensorError as e:
            raise CheckpointError(f"{source}: model.safetensors is truncated or corrupt ({e})") from None
    elif (path / "pytorch_model.bin").is_file():
        try:
            state = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise CheckpointError(f"{source}: pytorch_model.bin refused: its pickle holds objects other than tensors "
                                  "and plain data, and loading it could run code") from None
        except (RuntimeError, EOFError, ValueError, OSError) as e:
            reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{source}: pytorch_model.bin is truncated or corrupt ({reason})") from None
    else:
        raise CheckpointError(f"{source}: no model.safetensors or pytorch_model.bin there")
    return {k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k: v for k, v in state.items()}
