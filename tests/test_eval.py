"""minitx-eval: loss, perplexity and bits per byte of a whole text, checked against the model run window by window;
and val/bpb in training logs."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_text
from test_train import TINY, compose_config

import minitx
from minitx.evaluate import main, windows
from minitx.tokenizer import EOT, token_bytes, train_bpe_tokenizer, train_char_tokenizer
from minitx.train import parse_config, train

if TYPE_CHECKING:
    from tokenizers import Tokenizer


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny char-level GPT trained for 20 steps (evaluated at 0, 10, 20) and a held-out text; its run directory."""
    root = tmp_path_factory.mktemp("run")
    (root / "corpus.txt").write_text(make_text(2000))
    (root / "heldout.txt").write_text(make_text(60, seed=1))
    overrides = [*TINY, f"data.path={root / 'corpus.txt'}", "logger=csv", "trainer.max_steps=20",
                 "trainer.val_check_interval=10", "sample.max_new_tokens=0"]
    train(parse_config(compose_config(*overrides)), root)
    return root


def evaluate(*args: str) -> dict:
    from minitx.cli import parse_key_values
    from minitx.evaluate import EvalConfig
    from minitx.evaluate import evaluate as run_eval

    return run_eval(parse_key_values(EvalConfig, list(args)).validate())


def reference_nats(model: torch.nn.Module, tokens: list[int], block_size: int, stride: int,
                   eot: int | None = None) -> tuple[float, int]:
    """Summed nats over tokens[1:], one window at a time through the model's own forward: each window ends `stride`
    tokens after the last (the first after block_size tokens) and scores the targets it adds. With `eot`, attention
    stays within the documents it separates."""
    nats, scored_to = 0.0, 0  # tokens[1 .. scored_to] are scored
    while scored_to < len(tokens) - 1:
        end = min(scored_to + stride if scored_to else block_size, len(tokens) - 1)
        begin = max(0, end - block_size)
        x, y = torch.tensor([tokens[begin:end]]), torch.tensor(tokens[begin + 1 : end + 1])
        with torch.no_grad():
            logits = model(x, None, None if eot is None else (x == eot).cumsum(dim=1))[0][0]
        new = end - scored_to
        nats += F.cross_entropy(logits[-new:], y[-new:], reduction="sum").item()
        scored_to = end
    return nats, len(tokens) - 1


def test_windows_score_every_token_once_with_enough_context() -> None:
    """Token t (1..n-1) is scored once, predicted from the `context` tokens of its window up to it: all t tokens
    before it in the first window, and at least length - stride + 1 in any later one."""
    for n, block_size, stride in [(2, 8, 8), (9, 8, 8), (10, 8, 8), (100, 8, 3), (100, 8, 1), (101, 16, 5)]:
        starts, new, length = windows(n, block_size, stride)
        assert (starts >= 0).all() and length == min(block_size, n - 1)
        position = np.concatenate([np.arange(length - k, length) for k in new])  # of each scored target's input
        target = np.repeat(starts, new) + position + 1
        assert sorted(target) == list(range(1, n)), (n, block_size, stride)
        context = position + 1
        first = target <= length
        assert (context[first] == target[first]).all(), (n, block_size, stride)
        assert (context[~first] >= length - stride + 1).all(), (n, block_size, stride)


@pytest.mark.parametrize("stride", [32, 7])
def test_eval_equals_the_model_run_window_by_window(run: Path, stride: int) -> None:
    ckpt = run / "checkpoints" / "last.ckpt"
    text = (run / "heldout.txt").read_text()
    numbers = evaluate(f"ckpt={ckpt}", f"data.path={run / 'heldout.txt'}", f"stride={stride}", "batch_size=5")
    loaded = minitx.load(ckpt)
    tokens = [loaded.tokenizer.token_to_id(EOT), *loaded.tokenizer.encode(text).ids]
    nats, count = reference_nats(loaded.model, tokens, loaded.config.block_size, stride)
    assert numbers["tokens"] == count == len(text)  # a plain file is one document: every character, once
    assert numbers["loss"] == pytest.approx(nats / count, rel=1e-5)
    assert numbers["ppl"] == pytest.approx(math.exp(nats / count), rel=1e-5)
    # char model, ASCII text: one byte per token, so bits per byte are bits per character
    assert numbers["bytes"] == len(text.encode()) == count
    assert numbers["bpb"] == pytest.approx(numbers["loss"] / math.log(2), rel=1e-9)


def test_documents_are_joined_by_scored_separators_of_no_bytes(run: Path, tmp_path: Path) -> None:
    ckpt = run / "checkpoints" / "last.ckpt"
    docs = make_text(20, seed=2).splitlines(keepends=True)[:3]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    numbers = evaluate(f"ckpt={ckpt}", f"data.path={tmp_path / 'docs.jsonl'}", "stride=5")
    loaded = minitx.load(ckpt)
    eot = loaded.tokenizer.token_to_id(EOT)
    tokens = [eot]
    for i, doc in enumerate(docs):
        tokens += [eot] * (i > 0) + loaded.tokenizer.encode(doc).ids
    nats, count = reference_nats(loaded.model, tokens, loaded.config.block_size, 5)
    assert numbers["tokens"] == count == sum(map(len, docs)) + 2  # the two separators between three documents
    assert numbers["bytes"] == sum(len(d.encode()) for d in docs)
    assert numbers["loss"] == pytest.approx(nats / count, rel=1e-5)
    assert numbers["bpb"] == pytest.approx(nats / (math.log(2) * numbers["bytes"]), rel=1e-5)


def test_a_model_trained_with_document_masks_is_scored_with_them(run: Path, tmp_path: Path) -> None:
    """data.document_mask=true in the checkpoint's run config: attention never crosses <|endoftext|>, as in training."""
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    state["minitx"]["config"]["data"]["document_mask"] = True
    torch.save(state, tmp_path / "masked.ckpt")
    docs = make_text(20, seed=2).splitlines(keepends=True)[:3]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    masked = evaluate(f"ckpt={tmp_path / 'masked.ckpt'}", f"data.path={tmp_path / 'docs.jsonl'}", "stride=5")
    plain = evaluate(f"ckpt={run / 'checkpoints' / 'last.ckpt'}", f"data.path={tmp_path / 'docs.jsonl'}", "stride=5")
    loaded = minitx.load(tmp_path / "masked.ckpt")
    assert loaded.document_mask
    eot = loaded.tokenizer.token_to_id(EOT)
    tokens = [eot]
    for i, doc in enumerate(docs):
        tokens += [eot] * (i > 0) + loaded.tokenizer.encode(doc).ids
    nats, count = reference_nats(loaded.model, tokens, loaded.config.block_size, 5, eot=eot)
    assert masked["loss"] == pytest.approx(nats / count, rel=1e-5)
    assert abs(masked["loss"] - plain["loss"]) > 1e-4  # the mask changes what the model sees


def test_a_dataset_is_scored_on_its_validation_split_unless_split_says(run: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.txt").write_text(make_text(30, seed=4))
    (data / "validation.txt").write_text(make_text(10, seed=5))
    args = [f"ckpt={run / 'checkpoints' / 'last.ckpt'}", f"data.path={data}"]
    scored = evaluate(*args)
    assert scored["bytes"] == (data / "validation.txt").stat().st_size
    assert scored["data"] == f"data.path={data} (validation split)"
    scored = evaluate(*args, "split=train")
    assert scored["bytes"] == (data / "train.txt").stat().st_size and scored["data"].endswith("(train split)")
    (data / "validation.txt").unlink()  # training files only: scored, and named, as the train split
    assert evaluate(*args)["data"] == f"data.path={data} (train split)"


def test_batches_change_nothing(run: Path, tmp_path: Path) -> None:
    """Windows go through batch by batch and only sums are kept: one window at a time gives the same numbers."""
    (tmp_path / "large.txt").write_text(make_text(150, seed=3))
    args = [f"ckpt={run / 'checkpoints' / 'last.ckpt'}", f"data.path={tmp_path / 'large.txt'}", "stride=8"]
    one, eight = evaluate(*args, "batch_size=1"), evaluate(*args, "batch_size=8")
    assert one["tokens"] == eight["tokens"] > 4000
    assert one["loss"] == pytest.approx(eight["loss"], rel=1e-5)


def test_cli_prints_a_table_and_writes_json(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "eval.json"
    main([f"ckpt={run / 'checkpoints' / 'last.ckpt'}", f"data.path={run / 'heldout.txt'}", f"out={out}"])
    printed = capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved["tokens"] == len((run / "heldout.txt").read_text()) and saved["stride"] == 32
    header = next(line for line in printed.splitlines() if line.startswith("source"))
    assert header.split() == ["source", "tokens", "bytes", "loss", "ppl", "bpb", "tokens/s"]
    assert f"{saved['bpb']:.4f}" in printed and f"wrote {out}" in printed


def test_help_lists_the_keys(capsys: pytest.CaptureFixture[str]) -> None:
    main(["--help"])
    keys = [line.split("=")[0].strip() for line in capsys.readouterr().out.splitlines() if line.startswith("  ")
            and "=" in line and not line.startswith("  minitx-eval")]
    assert keys == ["ckpt", "data.path", "data.hub_id", "data.hub_config", "data.text_column", "data.val_split",
                    "split", "stride", "batch_size", "device", "backend", "out"]


def one_line_error(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(list(args))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1, err
    return err


def test_bad_inputs_are_one_line_errors(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A masked-LM checkpoint above all (minitx-eval scores causal LMs), and bad keys."""
    from minitx.checkpoint import CHECKPOINT_KEY
    from minitx.config import ModelConfig
    from minitx.model import Encoder
    from minitx.tokenizer import ENCODER_TOKENS, SPECIAL_TOKENS

    tokenizer = train_char_tokenizer([make_text(10)], SPECIAL_TOKENS + ENCODER_TOKENS)
    config = ModelConfig(vocab_size=tokenizer.get_vocab_size(), block_size=16, n_layer=1, n_head=2,
                         n_embd=16).validate()
    encoder = Encoder(config, 0, "cls")  # what minitx-train's masked_lm task saves
    torch.save({CHECKPOINT_KEY: {"task": "masked_lm", "model": dataclasses.asdict(config),
                                 "tokenizer": tokenizer.to_str()},
                "state_dict": {f"model.{k}": v for k, v in encoder.state_dict().items()}}, tmp_path / "mlm.ckpt")
    err = one_line_error(capsys, f"ckpt={tmp_path / 'mlm.ckpt'}", f"data.path={run / 'heldout.txt'}")
    assert err.startswith(f"error: ckpt='{tmp_path / 'mlm.ckpt'}': a masked_lm checkpoint"), err
    assert one_line_error(capsys, f"ckpt={tmp_path / 'mlm.ckpt'}").startswith("error: data.path=None: required")
    assert one_line_error(capsys, "ckpt=x", "data.path=y", "stride=-1").startswith("error: stride=-1: must be >= 0")
    assert one_line_error(capsys, "ckpt=x.ckpt", "data.path=y", "backend=transformers").startswith(
        "error: backend='transformers': scores a transformers model: needs ckpt=hf:<dir>")
    err = one_line_error(capsys, f"ckpt={run / 'checkpoints' / 'last.ckpt'}", f"data.path={run / 'heldout.txt'}",
                         "split=test")
    assert err.startswith(f"error: split='test': data.path={run / 'heldout.txt'} has no such split; its splits are "
                          "['train']"), err
    err = one_line_error(capsys, f"ckpt={run / 'checkpoints' / 'last.ckpt'}", f"data.path={run / 'heldout.txt'}",
                         "stride=33")
    assert err.startswith("error: stride=33: must be <= the model's block_size=32"), err


def test_transformers_backend_without_transformers_is_a_one_line_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # what `import transformers` meets where it is missing
    for name in ("config.json", "tokenizer.json"):
        (tmp_path / name).write_text("{}")
    err = one_line_error(capsys, f"ckpt=hf:{tmp_path}", "backend=transformers", f"data.path={tmp_path}",
                         "device=cpu")
    assert err.startswith("error: backend='transformers': needs the transformers package: pip install 'minitx[hf]'")


def test_token_bytes_count_the_text_for_bpe_and_char_tokenizers() -> None:
    text = make_text(50) + "naïve café – ☃ 𝔘\n"
    for tokenizer in (train_bpe_tokenizer([text], 300), train_char_tokenizer([text])):
        table = token_bytes(tokenizer)
        ids = tokenizer.encode(text).ids
        assert tokenizer.decode(ids) == text
        assert table[ids].sum() == len(text.encode()) > len(text)
        assert table[tokenizer.token_to_id(EOT)] == 0 and table[tokenizer.token_to_id("[UNK]")] == 0


def spaced_tokenizers(text: str) -> list[Tokenizer]:
    """A Metaspace BPE and a WordPiece tokenizer, as a user's tokenizer.json may be: tokens decoded one by one do not
    add up to the text (spaces are dropped or added)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    metaspace = Tokenizer(models.BPE(unk_token="[UNK]"))
    metaspace.pre_tokenizer, metaspace.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    metaspace.train_from_iterator([text], trainers.BpeTrainer(vocab_size=300, special_tokens=[EOT, "[UNK]"]))
    wordpiece = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wordpiece.pre_tokenizer, wordpiece.decoder = pre_tokenizers.Whitespace(), decoders.WordPiece()
    wordpiece.train_from_iterator([text], trainers.WordPieceTrainer(vocab_size=300, special_tokens=[EOT, "[UNK]"]))
    return [metaspace, wordpiece]


def test_other_tokenizers_have_no_byte_count_and_eval_counts_the_text(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    """token_bytes is None for them; minitx-eval divides by the text's bytes (no warning: nothing to compare), and
    training logs no val/bpb or val/bytes_per_token, saying so once."""
    from minitx.checkpoint import CHECKPOINT_KEY
    from minitx.config import ModelConfig, OptimConfig, TrainerConfig
    from minitx.model import GPT
    from minitx.tasks.causal_lm import CausalLM

    text = make_text(50) + "naïve café – ☃\n"
    tokenizers = spaced_tokenizers(text)
    assert [token_bytes(t) for t in tokenizers] == [None, None]
    metaspace = tokenizers[0]
    config = ModelConfig(vocab_size=metaspace.get_vocab_size(), block_size=16, n_layer=1, n_head=2,
                         n_embd=16).validate()
    torch.save({CHECKPOINT_KEY: {"task": "causal_lm", "model": dataclasses.asdict(config),
                                 "tokenizer": metaspace.to_str()},
                "state_dict": {f"model.{k}": v for k, v in GPT(config).state_dict().items()}}, tmp_path / "m.ckpt")
    heldout = make_text(5, seed=1) + "naïve\n"
    (tmp_path / "heldout.txt").write_text(heldout)
    numbers = evaluate(f"ckpt={tmp_path / 'm.ckpt'}", f"data.path={tmp_path / 'heldout.txt'}")
    assert numbers["bytes"] == len(heldout.encode()) > len(heldout)
    assert numbers["bpb"] == pytest.approx(numbers["loss"] * numbers["tokens"] / (math.log(2) * numbers["bytes"]))
    assert "warning" not in capsys.readouterr().err

    with caplog.at_level("INFO", logger="minitx"):
        task = CausalLM(config, OptimConfig(), TrainerConfig(), metaspace.to_str(), char_level=False)
    assert sum("val/bpb is not logged" in r.getMessage() for r in caplog.records) == 1
    batch = torch.randint(0, config.vocab_size, (2, 2, 16)).unbind(0)
    with torch.no_grad():
        means = {k: total / count for k, (total, count) in task.val_metrics(batch, 0).items()}
    assert set(means) | set(task.derived_metrics(means)) == {"loss", "ppl"}


def test_val_bpb_is_logged_and_is_bpc_for_ascii_chars(run: Path) -> None:
    with open(run / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["val/loss"]]
    assert [int(r["step"]) for r in rows] == [0, 10, 20]
    for r in rows:
        bpc, bpb = float(r["val/bpc"]), float(r["val/bpb"])
        # one byte per character; only the <|endoftext|> that ends the held-out stream (the last window's last
        # target) counts 0 bytes: 1 of the 16 × 4 × 32 = 2048 targets
        assert float(r["val/bytes_per_token"]) == pytest.approx(2047 / 2048, rel=1e-7)
        assert bpb == pytest.approx(bpc * 2048 / 2047, rel=1e-6)


def test_hf_directory_scores_with_transformers_own_loss(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from minitx.tokenizer import id_limit

    text = "the cat sat on the mat. naïve café ☃\n"
    tokenizer = train_bpe_tokenizer([make_text(100), text], 300)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=id_limit(tokenizer), n_positions=64, n_embd=32, n_layer=2,
                                       n_head=2)).eval()
    model.save_pretrained(tmp_path / "gpt2")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOT).save_pretrained(tmp_path / "gpt2")
    (tmp_path / "short.txt").write_text(text)
    numbers = evaluate(f"ckpt=hf:{tmp_path / 'gpt2'}", "backend=transformers", f"data.path={tmp_path / 'short.txt'}")
    ids = torch.tensor([[tokenizer.token_to_id(EOT), *tokenizer.encode(text).ids]])
    assert ids.size(1) <= 64  # one window: transformers' loss over the same targets
    with torch.no_grad():
        own = model(input_ids=ids, labels=ids).loss.item()
    assert numbers["tokens"] == ids.size(1) - 1 and numbers["bytes"] == len(text.encode())
    assert numbers["loss"] == pytest.approx(own, rel=1e-5)
    assert "warning" not in capsys.readouterr().err  # byte-level BPE: the tokens stand for exactly the text's bytes


def test_eval_imports_no_lightning(run: Path) -> None:
    """Like minitx-sample, minitx-eval needs torch, tokenizers, datasets and the model code: no Lightning, no Hydra."""
    code = ("import sys; from minitx.evaluate import main\n"
            f"main(['ckpt={run / 'checkpoints' / 'last.ckpt'}', 'data.path={run / 'heldout.txt'}'])\n"
            "print(sorted(k for k in sys.modules if k.split('.')[0] in ('lightning', 'pytorch_lightning', 'hydra')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "bpb" in result.stdout and result.stdout.strip().endswith("[]"), result.stdout
