"""minitx: a small, fast, hackable framework for training transformers."""

__version__ = "0.1.0"


def load(path, device="cpu"):
    """Model and tokenizer from a minitx checkpoint (`m = minitx.load("best.ckpt"); m.model, m.tokenizer`), a directory
    minitx-export format=safetensors wrote, or "hf:<dir>", a transformers GPT-2 directory."""
    from minitx.checkpoint import load as _load

    return _load(path, device)
