"""The AOTInductor-built decoding step: eager decoding's tokens, and a package built once is loaded, not rebuilt."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import pytest
import torch
from conftest import make_text
from test_generation import trained_ish

from minitx.checkpoint import Loaded
from minitx.config import ModelConfig
from minitx.export import save_safetensors
from minitx.generation import generate_batch
from minitx.model import GPT
from minitx.packaged_decoding import PackagedDecoding, package_key
from minitx.sample import parse_args, sample
from minitx.tokenizer import train_char_tokenizer


@pytest.mark.slow
def test_packaged_step_equals_eager_and_is_loaded_not_rebuilt(small_config: ModelConfig, tmp_path: Path) -> None:
    """A batch of prompts of different lengths, through two cache refills: the greedy tokens of eager batched
    decoding, from two packages (left-padded rows before the first refill, unpadded after), each for every span
    attended; a second PackagedDecoding over the same directory loads them without building; other weights make
    another key. (Batch 1: the CLI test below.)"""
    model = trained_ish(dataclasses.replace(small_config, pos_emb="rope", norm="rmsnorm"))
    prompts = [[1, 2, 3], [4], [5, 6, 7, 8, 9]]
    n = 2 * small_config.block_size + 5
    eager = generate_batch(model, prompts, n, temperature=0)
    packaged = PackagedDecoding(model, tmp_path, autotune=False)
    assert generate_batch(model, prompts, n, temperature=0, compiled=packaged) == eager
    assert packaged.build_s > 0 and len(list(tmp_path.glob("decode-*.pt2"))) == 2

    again = PackagedDecoding(model, tmp_path, autotune=False)
    assert generate_batch(model, prompts, n, temperature=0, compiled=again) == eager
    assert again.build_s == 0 and again.load_s < 5

    key = package_key(model, 3, True, False)
    with torch.no_grad():
        model.transformer.blocks[0].mlp.fc.weight[0, 0] += 1
    assert package_key(model, 3, True, False) != key


@pytest.mark.slow
def test_sample_compile_builds_beside_the_checkpoint_once(tmp_path: Path) -> None:
    """minitx-sample compile=true (compile_aot on by default) writes the same greedy text as eager decoding, past
    two cache refills (34 tokens, block 16), and keeps its package in <ckpt>.decode/, which the next run reuses."""
    text = make_text(200)
    tokenizer = train_char_tokenizer([text])
    config = ModelConfig(vocab_size=tokenizer.get_vocab_size(), block_size=16, n_layer=1, n_head=2,
                         n_embd=16).validate()
    torch.manual_seed(0)
    ckpt = tmp_path / "model"
    save_safetensors(Loaded(trained_ish(config), tokenizer, config, step=0), ckpt)

    def sample_text(*args: str) -> str:
        out = io.StringIO()
        sample(parse_args([f"ckpt={ckpt}", "prompt=the ", "temperature=0", "max_new_tokens=30", *args]), out=out)
        return out.getvalue()

    assert parse_args(["ckpt=x"]).compile_aot  # the default: compile=true means the packaged step
    eager = sample_text()
    assert sample_text("compile=true", "compile_autotune=false") == eager
    built = list((tmp_path / "model.decode").glob("decode-*.pt2"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    assert sample_text("compile=true", "compile_autotune=false") == eager
    assert list((tmp_path / "model.decode").glob("decode-*.pt2")) == built and built[0].stat().st_mtime_ns == stamp


def test_package_key_depends_on_batch_padding_and_autotuning(small_config: ModelConfig) -> None:
    model = GPT(small_config).eval()
    keys = {package_key(model, b, p, a) for b in (1, 8) for p in (False, True) for a in (False, True)}
    assert len(keys) == 8
