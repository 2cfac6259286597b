"""Shared fixtures. Caches and wandb are pointed at temporary places before anything imports them."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

_session_tmp = Path(tempfile.mkdtemp(prefix="minitx-tests-"))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ["MINITX_CACHE"] = str(_session_tmp / "minitx-cache")
os.environ["HF_HOME"] = str(_session_tmp / "hf")
os.environ["HF_DATASETS_CACHE"] = str(_session_tmp / "hf" / "datasets")
os.environ["WANDB_DIR"] = str(_session_tmp / "wandb")

import pytest  # noqa: E402
import torch  # noqa: E402

from minitx.config import ModelConfig  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def make_text(n_lines: int, seed: int = 0) -> str:
    """A small learnable language: sentences from a tiny grammar, one per line."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        lines.append(f"the {rng.choice(['big', 'small', 'red'])} {rng.choice(['cat', 'dog'])} "
                     f"{rng.choice(['sat', 'ran'])} {rng.choice(['on', 'under'])} the {rng.choice(['mat', 'log'])}.")
    return "\n".join(lines) + "\n"


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(make_text(2000))
    return path


@pytest.fixture
def small_config() -> ModelConfig:
    torch.manual_seed(0)
    return ModelConfig(vocab_size=50, block_size=32, n_layer=2, n_head=4, n_embd=32).validate()
