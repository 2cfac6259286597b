"""Encoder models: the decoder's blocks without the causal mask, masked-LM pretraining, fill-mask, and sequence
classification from scratch or from a pretrained checkpoint."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import make_text
from test_train import compose_config

from minitx.attention import MultiHeadSelfAttention
from minitx.config import ConfigError, MinitxError, ModelConfig, OptimConfig, TrainerConfig
from minitx.data import DataError
from minitx.model import GPT, Encoder
from minitx.sample import parse_args, sample
from minitx.tasks import mask_tokens
from minitx.train import parse_config, train

ENCODER = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32", "data.batch_size=16",
           "data.val_batches=4", "trainer.enable_progress_bar=false", "optim.warmup_steps=10", "logger=csv"]


@pytest.mark.parametrize("p", [0.15, 0.4])
def test_masking_ratios_follow_bert(p: float) -> None:
    x = torch.randint(0, 100, (400, 256), generator=torch.Generator().manual_seed(0))
    inputs, labels = mask_tokens(x, torch.Generator().manual_seed(1), mask_id=3, special_ids=torch.arange(6),
                                 vocab_size=100, p=p)
    chosen = labels != -100
    eligible = x >= 6
    assert not chosen[~eligible].any()  # special tokens are never masked
    assert chosen[eligible].float().mean() == pytest.approx(p, abs=0.005)
    assert torch.equal(labels[chosen], x[chosen])
    masked = (inputs == 3) & chosen
    unchanged = (inputs == x) & chosen
    randomised = chosen & ~masked & ~unchanged
    n = chosen.sum()
    assert masked.sum() / n == pytest.approx(0.8, abs=0.01)
    assert unchanged.sum() / n == pytest.approx(0.1 + 0.1 / 94, abs=0.01)  # a random token may equal the original
    assert randomised.sum() / n == pytest.approx(0.1 - 0.1 / 94, abs=0.01)
    assert torch.equal(inputs[~chosen], x[~chosen])


def test_masking_follows_the_tokenizers_special_ids(tmp_path: Path) -> None:
    """With tokenizer.path= the special tokens come after the file's own ids: real tokens 0..5 are masked like any
    other, special ones are never chosen and never drawn as the random replacement."""
    from minitx.config import TokenizerConfig
    from minitx.tokenizer import ENCODER_TOKENS, MASK, SPECIAL_TOKENS, build_tokenizer, train_bpe_tokenizer

    path = tmp_path / "tokenizer.json"
    train_bpe_tokenizer([make_text(200)], vocab_size=300, specials=[]).save(str(path))
    tok = build_tokenizer(TokenizerConfig(path=str(path)), texts=[], encoder=True)
    specials = torch.tensor([tok.token_to_id(t) for t in SPECIAL_TOKENS + ENCODER_TOKENS])
    vocab = tok.get_vocab_size()
    assert specials.min() > 6  # appended at the end
    x = torch.randint(0, vocab, (200, 256), generator=torch.Generator().manual_seed(0))
    mask_id = tok.token_to_id(MASK)
    inputs, labels = mask_tokens(x, torch.Generator().manual_seed(1), mask_id, specials, vocab, p=0.5)
    chosen = labels != -100
    assert not chosen[torch.isin(x, specials)].any()
    assert chosen[x < 6].float().mean() == pytest.approx(0.5, abs=0.05)
    randomised = chosen & (inputs != x) & (inputs != mask_id)
    assert randomised.sum() > 1000 and not torch.isin(inputs[randomised], specials).any()


def test_mlm_loss_counts_only_masked_positions() -> None:
    from minitx.tasks import MaskedLM

    cfg = ModelConfig(vocab_size=40, block_size=16, n_layer=1, n_head=2, n_embd=16).validate()
    task = MaskedLM(cfg, OptimConfig(), TrainerConfig(max_steps=10), "{}", mask_id=3, special_ids=list(range(6)),
                    seed=0, majority_token=6)
    x = torch.randint(6, 40, (4, 16), generator=torch.Generator().manual_seed(2))
    loss, _, _ = task.masked_loss(x, torch.Generator().manual_seed(5))
    inputs, labels = mask_tokens(x, torch.Generator().manual_seed(5), 3, torch.arange(6), 40)
    logits = task.model.mlm_logits(task.model(inputs))
    expected = F.cross_entropy(logits.view(-1, 40), labels.view(-1), ignore_index=-100)
    torch.testing.assert_close(loss, expected)
    assert 0 < (labels != -100).sum() < labels.numel()


@pytest.mark.parametrize("kernel", ["naive", "sdpa"])
def test_padding_changes_nothing_at_real_positions(kernel: str) -> None:
    cfg = ModelConfig(vocab_size=40, block_size=32, n_layer=2, n_head=2, n_embd=16, attention=kernel).validate()
    model = Encoder(cfg).eval()
    ids = torch.randint(6, 40, (1, 10), generator=torch.Generator().manual_seed(3))
    base = model(ids)
    for extra in (1, 7):
        padded = torch.cat([ids, torch.zeros(1, extra, dtype=torch.long)], dim=1)
        real = torch.arange(10 + extra)[None] < 10
        torch.testing.assert_close(model(padded, key_padding=real)[:, :10], base, atol=1e-5, rtol=0)


def test_encoder_and_decoder_share_their_modules() -> None:
    cfg = ModelConfig(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=16).validate()
    gpt, encoder = GPT(cfg), Encoder(cfg)
    assert type(gpt.transformer) is type(encoder.transformer)
    assert set(gpt.transformer.state_dict()) == set(encoder.transformer.state_dict())
    attention = {type(m) for model in (gpt, encoder) for m in model.modules() if "attn" in type(m).__name__.lower()
                 or isinstance(m, MultiHeadSelfAttention)}
    assert attention == {MultiHeadSelfAttention}
    assert gpt.transformer.causal and not encoder.transformer.causal


def labelled_rows(n: int, seed: int = 0) -> list[dict]:
    """Learnable sentiment: the label is whether 'great' or 'awful' appears among filler words."""
    rng = random.Random(seed)
    filler = ["the", "film", "was", "plot", "actors", "and", "music", "quite", "very", "ending"]
    rows = []
    for _ in range(n):
        label = rng.random() < 0.5
        words = [rng.choice(filler) for _ in range(6)]
        words.insert(rng.randrange(7), "great" if label else "awful")
        rows.append({"text": " ".join(words), "label": "pos" if label else "neg"})
    return rows


@pytest.fixture(scope="module")
def mlm_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mlm")
    corpus = root / "corpus.txt"
    rows = labelled_rows(600, seed=1)
    corpus.write_text(make_text(800) + "\n".join(r["text"] for r in rows))
    train(parse_config(compose_config("experiment=mlm", *ENCODER, f"data.path={corpus}", "trainer.max_steps=500",
                                      "trainer.val_check_interval=500", "optim.lr=3e-3")), root)
    return root


def test_mlm_beats_the_majority_baseline_and_fills_masks(mlm_run: Path) -> None:
    import csv

    with open(mlm_run / "csv" / "metrics.csv") as f:
        last = [r for r in csv.DictReader(f) if r["val/mlm_acc"]][-1]
    assert float(last["val/mlm_acc"]) > float(last["val/majority_acc"]) + 0.05
    out = io.StringIO()
    sample(parse_args([f"ckpt={mlm_run / 'checkpoints' / 'best.ckpt'}", "prompt=the big cat sat [MASK]n the mat.",
                       "candidates=3"]), out=out)
    line = out.getvalue().strip()
    assert line.startswith("[MASK] 1: ") and line.count(" 0.") == 3
    assert "'o'" in line  # 'on' is the only word that fits: the true token is among the top 3


def test_classifier_learns_a_small_labelled_set(tmp_path: Path, mlm_run: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "reviews.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in labelled_rows(500)))
    overrides = ["experiment=classify", *ENCODER, f"data.path={data}", "trainer.max_steps=400",
                 "trainer.val_check_interval=200", "optim.lr=3e-3", "model.dropout=0.0"]
    # block 64: every row fits whole (at 32 characters the label word of ~8% of rows is cut off, capping accuracy at
    # ~0.92-0.96 depending on the machine's rounding)
    best = train(parse_config(compose_config(*overrides, "model.block_size=64",
                                             "sample.prompt='the film was great and the music'")), tmp_path / "scratch")
    shown = capsys.readouterr().out.split("classify: the film was great and the music\n")[1].splitlines()
    assert shown[0].startswith("pos\t") and shown[1].startswith("neg\t")  # the end of training labels the prompt
    import csv

    with open(tmp_path / "scratch" / "csv" / "metrics.csv") as f:
        acc = [float(r["val/acc"]) for r in csv.DictReader(f) if r["val/acc"]][-1]
    assert acc >= 0.95, (acc, best)
    out = io.StringIO()
    sample(parse_args([f"ckpt={tmp_path / 'scratch' / 'checkpoints' / 'best.ckpt'}",
                       "prompt=the film was great and the music"]), out=out)
    assert out.getvalue().splitlines()[0].startswith("pos\t")

    # from the masked-LM checkpoint: same shape and tokenizer, the trunk's weights carried over
    train(parse_config(compose_config(*overrides, "trainer.max_steps=20",
                                      f"model.init_from={mlm_run / 'checkpoints' / 'best.ckpt'}")), tmp_path / "ft")


def test_classification_bad_inputs(tmp_path: Path, mlm_run: Path) -> None:
    data = tmp_path / "reviews.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in labelled_rows(50)))
    floats = tmp_path / "floats.jsonl"
    floats.write_text("\n".join(json.dumps({"text": "a b", "label": 0.5}) for _ in range(20)))
    base = ["experiment=classify", *ENCODER, "trainer.max_steps=5", "optim.warmup_steps=1"]
    cases = [
        ([f"data.path={data}", "data.label_column=stars"], DataError, "data.label_column='stars' is not a column"),
        ([f"data.path={floats}"], DataError, "labels must be integers or strings, found 0.5 (float)"),
        ([f"data.path={data}", "model.n_embd=64", f"model.init_from={mlm_run / 'checkpoints' / 'best.ckpt'}"],
         ConfigError, "model.n_embd=64 but model.init_from was trained with 32"),
        ([f"data.path={data}", f"model.init_from={tmp_path / 'none.ckpt'}"], MinitxError,
         "model.init_from="),
    ]
    for overrides, error, message in cases:
        with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
            train(parse_config(compose_config(*base, *overrides)), tmp_path / "out")
    with pytest.raises(ConfigError, match="a masked-LM checkpoint fills"):
        sample(parse_args([f"ckpt={mlm_run / 'checkpoints' / 'best.ckpt'}", "prompt=the cat sat"]),
               out=io.StringIO())
