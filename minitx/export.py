"""`minitx-export ckpt=<path> out=<dir> [format=transformers|safetensors]`: write a trained model for others to load.

format=transformers writes a GPT2LMHeadModel directory (config.json, model.safetensors, tokenizer files) that
transformers' Auto classes and pipeline("text-generation") load with no extra code; only a model that computes
exactly what GPT-2 computes is written, anything else is refused naming the setting. format=safetensors writes
minitx's own safe format (model.safetensors, minitx_config.json, tokenizer.json): every model, no pickle; minitx.load,
minitx-sample ckpt=<dir> and model.init_from=<dir> read it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from minitx.checkpoint import OWN_CONFIG, Loaded, load, own_format_meta, state_without_tied_head
from minitx.cli import run_command
from minitx.config import ConfigError, fail

USAGE = """usage: minitx-export ckpt=<.ckpt or export dir> out=<new dir> [format=transformers|safetensors]
  minitx-export ckpt=outputs/default/<run>/checkpoints/best.ckpt out=my-model
  minitx-export ckpt=outputs/default/<run>/checkpoints/best.ckpt out=my-model format=safetensors"""

FORMATS = ("transformers", "safetensors")
# what one format writes and the other does not (both write model.safetensors and tokenizer.json): overwrite=true
# removes the other format's, so that the directory reads as the format just written
ONLY_IN = {"transformers": ("config.json", "generation_config.json", "tokenizer_config.json",
                            "special_tokens_map.json"),
           "safetensors": (OWN_CONFIG,)}


@dataclass
class ExportConfig:
    ckpt: str | None = None  # a .ckpt written by minitx-train, or a directory minitx-export format=safetensors wrote
    out: str | None = None  # the directory to write (new, or empty unless overwrite=true)
    format: str = "transformers"  # transformers (GPT2LMHeadModel; GPT-2's layout only) | safetensors (minitx's own)
    overwrite: bool = False  # write into an existing non-empty directory

    def validate(self) -> ExportConfig:
        if not self.ckpt:
            fail("ckpt", self.ckpt, "required: minitx-export ckpt=<.ckpt> out=<dir>")
        if not self.out:
            fail("out", self.out, "required: the directory to write")
        if self.format not in FORMATS:
            fail("format", self.format, f"choose one of {list(FORMATS)}")
        out = Path(self.out)
        if out.exists() and not out.is_dir():
            fail("out", self.out, "exists and is not a directory")
        if out.is_dir() and any(out.iterdir()) and not self.overwrite:
            fail("out", self.out, "exists and is not empty; add overwrite=true to write into it")
        return self


def save_safetensors(loaded: Loaded, out: Path) -> None:
    """minitx's own format: weights (one copy of the tied embedding), the model config as checkpoints save it, the
    tokenizer."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file(state_without_tied_head(loaded.model), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / OWN_CONFIG).write_text(json.dumps(own_format_meta(loaded), indent=2) + "\n")
    loaded.tokenizer.save(str(out / "tokenizer.json"))


def save_transformers(loaded: Loaded, out: Path) -> None:
    """A GPT2LMHeadModel directory with a tokenizer.json-backed fast tokenizer; refuses a model GPT-2 cannot
    compute exactly."""
    from safetensors.torch import save_file

    from minitx.hf import gpt2_config_dict, gpt2_mismatch, to_gpt2_state
    from minitx.tokenizer import ENCODER_TOKENS, EOT, UNK

    if setting := gpt2_mismatch(loaded.config, loaded.task):
        raise ConfigError(f"{setting}: no transformers architecture matches it exactly; export with format=safetensors")
    try:
        from transformers import GPT2Config, PreTrainedTokenizerFast
    except ImportError:
        raise ConfigError("format=transformers needs transformers: pip install 'minitx[hf]'") from None
    tokenizer = loaded.tokenizer
    eos = tokenizer.token_to_id(EOT)
    out.mkdir(parents=True, exist_ok=True)
    GPT2Config(**gpt2_config_dict(loaded.config, eos, eos)).save_pretrained(out)
    state = to_gpt2_state(loaded.model.state_dict(), loaded.config)  # lm_head is tied to wte: not saved
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    specials = {name: token for name, token in
                [("eos_token", EOT), ("bos_token", EOT), ("unk_token", UNK),
                 *zip(("pad_token", "mask_token", "cls_token", "sep_token"), ENCODER_TOKENS, strict=True)]
                if tokenizer.token_to_id(token) is not None}
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=loaded.config.block_size, **specials)
    fast.save_pretrained(out)


def export(cfg: ExportConfig) -> None:
    loaded = load(str(cfg.ckpt), key="ckpt")
    out = Path(str(cfg.out))
    (save_transformers if cfg.format == "transformers" else save_safetensors)(loaded, out)
    for name in ONLY_IN[next(f for f in FORMATS if f != cfg.format)]:  # after writing: a refusal leaves out as it was
        (out / name).unlink(missing_ok=True)
    print(f"wrote {out} ({cfg.format}: {loaded.task}, {loaded.model.num_params() / 1e6:.2f}M parameters)")


def main(argv: list[str] | None = None) -> None:
    """The minitx-export console script."""
    run_command(ExportConfig, USAGE, export, argv)


if __name__ == "__main__":
    main()
