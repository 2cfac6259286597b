"""Max |logit difference| between minitx and transformers for every model variant, both directions.

For each variant a random tiny model (norm weights and biases perturbed, so every tensor's mapping matters) is written
by minitx-export's two writers and read back: by transformers' GPT2LMHeadModel (format=transformers, where the variant
is GPT-2's layout) and by minitx.load (format=safetensors, every variant). Then a random GPT2LMHeadModel (gelu_new)
is imported through minitx.load("hf:<dir>"). Prints one row per case.

    python scripts/hf_parity.py
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

import minitx
from minitx.checkpoint import Loaded
from minitx.config import MinitxError, ModelConfig
from minitx.export import save_safetensors, save_transformers
from minitx.model import GPT, Encoder
from minitx.tokenizer import ENCODER_TOKENS, SPECIAL_TOKENS, train_bpe_tokenizer

TINY = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32)
VARIANTS = {
    "learned, layernorm, gelu, bias=false": ("causal_lm", {}),
    "bias=true": ("causal_lm", {"bias": True}),
    "activation=gelu_tanh": ("causal_lm", {"activation": "gelu_tanh"}),
    "pos_emb=rope": ("causal_lm", {"pos_emb": "rope"}),
    "norm=rmsnorm": ("causal_lm", {"norm": "rmsnorm"}),
    "activation=relu2": ("causal_lm", {"activation": "relu2"}),
    "attention_window=8": ("causal_lm", {"attention_window": 8}),
    "masked_lm encoder": ("masked_lm", {}),
    "classify (rope, rmsnorm)": ("classify", {"pos_emb": "rope", "norm": "rmsnorm"}),
}


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln" in name or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def outputs(loaded: Loaded, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        if loaded.task == "causal_lm":
            return loaded.model(ids)[0]
        hidden = loaded.model(ids)
        return loaded.model.class_logits(hidden) if loaded.task == "classify" else loaded.model.mlm_logits(hidden)


def main() -> None:
    torch.manual_seed(0)
    text = [f"line {i}: the quick brown fox jumps over the lazy dog {i * 7 % 13}" for i in range(300)]
    tokenizers = {"causal": train_bpe_tokenizer(text, 300),
                  "encoder": train_bpe_tokenizer(text, 300, SPECIAL_TOKENS + ENCODER_TOKENS)}
    root = Path(tempfile.mkdtemp())
    print(f"{'variant':<44} {'format=transformers':<42} format=safetensors")
    for i, (name, (task, settings)) in enumerate(VARIANTS.items()):
        tokenizer = tokenizers["causal" if task == "causal_lm" else "encoder"]
        config = dataclasses.replace(TINY, vocab_size=tokenizer.get_vocab_size(), **settings).validate()
        labels = ["neg", "pos"] if task == "classify" else None
        model = perturbed(GPT(config) if task == "causal_lm" else Encoder(config, 2 if labels else 0))
        loaded = Loaded(model, tokenizer, config, 0, task, labels)
        ids = torch.randint(0, config.vocab_size, (2, config.block_size))
        try:
            save_transformers(loaded, root / f"hf{i}")
            theirs = GPT2LMHeadModel.from_pretrained(root / f"hf{i}").eval()
            with torch.no_grad():
                hf = f"GPT2LMHeadModel, max |diff| {(theirs(ids).logits - outputs(loaded, ids)).abs().max():.1e}"
        except MinitxError as e:
            hf = "refused: " + str(e).split(":")[0]
        save_safetensors(loaded, root / f"own{i}")
        own = (outputs(minitx.load(root / f"own{i}"), ids) - outputs(loaded, ids)).abs().max()
        print(f"{name:<44} {hf:<42} max |diff| {own:.1e}")
    for weights in ("model.safetensors", "pytorch_model.bin"):
        folder = root / weights
        hf_config = GPT2Config(vocab_size=tokenizers["causal"].get_vocab_size(), n_positions=48, n_embd=32, n_layer=2,
                               n_head=2, activation_function="gelu_new")
        theirs = perturbed(GPT2LMHeadModel(hf_config))
        theirs.save_pretrained(folder, safe_serialization=weights.endswith("safetensors"))
        fast = PreTrainedTokenizerFast(tokenizer_object=tokenizers["causal"], eos_token="<|endoftext|>")
        fast.save_pretrained(folder)
        ours = minitx.load(f"hf:{folder}")
        ids = torch.randint(0, hf_config.vocab_size, (2, 48))
        with torch.no_grad():
            diff = (theirs(ids).logits - ours.model(ids)[0]).abs().max()
        print(f"{'import GPT2LMHeadModel (' + weights + ')':<44} {'minitx GPT, max |diff| ' + f'{diff:.1e}':<42}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
