"""End to end: the Hydra config trains a model whose loss falls, checkpoints it, and samples from it."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import os
import random
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_text
from hydra import compose, initialize_config_dir

import minitx
from minitx.config import ConfigError, MinitxError
from minitx.sample import main as sample_main
from minitx.sample import parse_args, sample
from minitx.train import CONF_DIR, parse_config, train

TINY = [
    "model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32",
    "data.batch_size=16", "data.val_batches=4", "trainer.max_steps=150", "trainer.val_check_interval=60",
    "trainer.log_every_n_steps=10", "trainer.enable_progress_bar=false", "optim.warmup_steps=10",
    "optim.lr=3e-3", "sample.max_new_tokens=20", "sample.prompt=the ",
]


def compose_config(*overrides: str) -> object:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("train", overrides=list(overrides))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model trained for 150 steps on a small generated corpus; its run directory."""
    root = tmp_path_factory.mktemp("run")
    corpus = root / "corpus.txt"
    corpus.write_text(make_text(3000))
    cfg = compose_config(*TINY, f"data.path={corpus}", "logger=csv")
    train(parse_config(cfg), root)
    return root


def test_loss_falls_and_checkpoints_are_written(trained: Path) -> None:
    with open(trained / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["val/loss"]]
    steps = [int(r["step"]) for r in rows]
    losses = [float(r["val/loss"]) for r in rows]
    assert steps[0] == 0 and steps[-1] == 150  # initial evaluation ... after the last step (not a multiple of 60)
    assert losses[-1] < 0.5 * losses[0], losses
    assert (trained / "checkpoints" / "best.ckpt").is_file()
    assert (trained / "checkpoints" / "last.ckpt").is_file()


def test_training_metrics_are_logged_at_optimizer_steps(trained: Path) -> None:
    from minitx.tasks import lr_at

    with open(trained / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["train/loss"]]
    assert [int(r["step"]) for r in rows] == list(range(10, 151, 10))  # every log_every_n_steps=10, to the end
    optim = parse_config(compose_config(*TINY)).optim
    for r in rows:  # the rate step s ran with (s counts steps done)
        assert float(r["lr"]) == pytest.approx(lr_at(int(r["step"]) - 1, optim, 150))
        assert float(r["tokens_per_sec"]) > 0 and 0 < float(r["mfu"]) < 1
    assert float(rows[-1]["train/loss"]) < 0.6 * float(rows[0]["train/loss"])


def test_training_metrics_count_optimizer_steps_when_accumulating(trained: Path, tmp_path: Path) -> None:
    from minitx.tasks import lr_at

    overrides = [*TINY, f"data.path={trained / 'corpus.txt'}", "trainer.max_steps=20", "trainer.log_every_n_steps=5",
                 "trainer.accumulate_grad_batches=2", "trainer.val_check_interval=1000", "optim.warmup_steps=4",
                 "sample.max_new_tokens=0", "logger=csv"]
    config = parse_config(compose_config(*overrides))
    train(config, tmp_path)
    with open(tmp_path / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["train/loss"]]
    assert [int(r["step"]) for r in rows] == [5, 10, 15, 20]
    for r in rows:
        assert float(r["lr"]) == pytest.approx(lr_at(int(r["step"]) - 1, config.optim, 20))


def test_training_reads_back_only_what_the_guard_checks(trained: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Lightning's self.log(prog_bar=True) calls .item() on every logged value after every later batch: on a GPU a
    host sync per step. minitx reads back the loss and the gradient norm once a step (the non-finite guard) and both
    once more per log interval, nothing else."""
    import lightning as L

    reads: list[int] = []
    counting = {"on": False}
    item, to_float = torch.Tensor.item, torch.Tensor.__float__

    def counted(original: Callable[[torch.Tensor], Any]) -> Callable[[torch.Tensor], Any]:
        def read(self: torch.Tensor) -> Any:
            if counting["on"]:
                reads.append(1)
            return original(self)
        return read

    @contextlib.contextmanager
    def counted_off() -> Iterator[None]:
        on, counting["on"] = counting["on"], False
        yield
        counting["on"] = on

    monkeypatch.setattr(torch.Tensor, "item", counted(item))
    monkeypatch.setattr(torch.Tensor, "__float__", counted(to_float))

    rows_during_training: list[int] = []

    class Window(L.Callback):  # counts from the 2nd batch's start to the last batch's end (before the final eval)
        def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: object, i: int) -> None:
            counting["on"] = counting["on"] or i == 1

        def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, out: object, batch: object,
                               i: int) -> None:
            counting["on"] = counting["on"] and i + 1 < trainer.max_steps
            if i == 45:  # a run killed now keeps what it logged: the CSV is flushed at every write
                with counted_off(), open(tmp_path / "csv" / "metrics.csv") as f:
                    rows_during_training.append(sum(1 for r in csv.DictReader(f) if r["train/loss"]))

    overrides = [*TINY, f"data.path={trained / 'corpus.txt'}", "trainer.max_steps=60", "logger=csv",
                 "trainer.val_check_interval=1000", "trainer.enable_progress_bar=true", "sample.max_new_tokens=0"]
    train(parse_config(compose_config(*overrides)), tmp_path, callbacks=[Window()])
    assert len(reads) == 2 * 59 + 2 * 6, len(reads)  # batches 1..59 (0-based), logged at steps 10, 20, ..., 60
    assert rows_during_training == [4]


def test_checkpoint_is_self_contained(trained: Path) -> None:
    loaded = minitx.load(trained / "checkpoints" / "best.ckpt")
    assert loaded.config.n_layer == 2 and loaded.config.block_size == 32
    assert not loaded.model.training
    assert loaded.tokenizer.decode(loaded.tokenizer.encode("the cat").ids) == "the cat"
    assert loaded.step == 150


def test_inference_imports_no_lightning(trained: Path) -> None:
    """minitx.load and minitx-sample need torch, tokenizers and the model code only: no Lightning, no Hydra."""
    ckpt = trained / "checkpoints" / "best.ckpt"
    code = ("import sys, minitx; from minitx.sample import main\n"
            f"m = minitx.load({str(ckpt)!r}); main(['ckpt={ckpt}', 'prompt=the ', 'max_new_tokens=5'])\n"
            "print(sorted(k for k in sys.modules if k.split('.')[0] in ('lightning', 'pytorch_lightning', 'hydra')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("the ") and result.stdout.strip().endswith("[]"), result.stdout


def test_sample_help_lists_every_key_with_its_default(capsys: pytest.CaptureFixture[str]) -> None:
    from minitx.sample import SampleConfig

    sample_main(["--help"])
    text = capsys.readouterr().out
    assert text.startswith("usage: minitx-sample ckpt=")
    for field in dataclasses.fields(SampleConfig):
        assert f"  {field.name}=" in text, field.name
    assert "  temperature=0.8" in text and "<= 0: greedy" in text and '  prompt=""' in text


def test_sample_arguments_are_literal(trained: Path) -> None:
    """No YAML or interpolation: what is typed is the prompt."""
    config = parse_args([f"ckpt={trained}", "prompt=${oops} 'x' #1 ", "attention=sdpa"])
    assert config.prompt == "${oops} 'x' #1 " and config.attention == "sdpa"


def sample_text(*args: str) -> str:
    out = io.StringIO()
    sample(parse_args(list(args)), out=out)
    return out.getvalue()


def test_sample_streams_text_from_the_checkpoint(trained: Path) -> None:
    ckpt = f"ckpt={trained / 'checkpoints' / 'best.ckpt'}"
    text = sample_text(ckpt, "prompt=the ", "max_new_tokens=60", "temperature=0")
    assert text.startswith("the ") and len(text) == 4 + 60 + 1  # prompt, 60 characters, newline
    assert " the " in text  # it learnt the corpus's most common word
    # within one block (4 + 28 = block_size) greedy text is the same with and without the KV cache
    cached = sample_text(ckpt, "prompt=the ", "max_new_tokens=28", "temperature=0")
    assert sample_text(ckpt, "prompt=the ", "max_new_tokens=28", "temperature=0", "use_cache=false") == cached
    assert cached == text[:32] + "\n"


def test_sample_edge_inputs(trained: Path) -> None:
    ckpt = f"ckpt={trained / 'checkpoints' / 'best.ckpt'}"
    assert len(sample_text(ckpt, "prompt=", "max_new_tokens=20")) == 21  # empty prompt starts from <|endoftext|>
    # top_k beyond the vocabulary is the whole vocabulary; temperature <= 0 is greedy whatever top_k/top_p say
    assert sample_text(ckpt, "top_k=100000", "max_new_tokens=20") == sample_text(ckpt, "top_k=0", "max_new_tokens=20")
    greedy = sample_text(ckpt, "prompt=the ", "temperature=0", "max_new_tokens=20")
    assert sample_text(ckpt, "prompt=the ", "temperature=-1", "top_p=0.3", "max_new_tokens=20") == greedy
    two = sample_text(ckpt, "num_samples=2", "max_new_tokens=10")
    assert two.count("--- sample") == 2
    # the same greedy text with every kernel that samples here (flex: compiled, forward only)
    for kernel in ("naive", "flex"):
        assert sample_text(ckpt, "prompt=the ", "temperature=0", "max_new_tokens=20", f"attention={kernel}") == greedy
    # and with the compiled decoding step, which refuses kernels that cannot attend from a static cache
    assert sample_text(ckpt, "prompt=the ", "temperature=0", "max_new_tokens=20", "compile=true",
                       "compile_aot=false") == greedy
    with pytest.raises(ConfigError, match="compile=True: the compiled step attends with sdpa or naive, not 'flex'"):
        sample_text(ckpt, "compile=true", "attention=flex")


def test_sample_batches_samples_and_stops_them(trained: Path) -> None:
    """num_samples decode in one batch: greedy, each sample is the single sample; stop= ends a sample at a text
    spanning tokens, streamed alone or batched, eager or compiled."""
    ckpt = f"ckpt={trained / 'checkpoints' / 'best.ckpt'}"
    greedy = sample_text(ckpt, "prompt=the ", "temperature=0", "max_new_tokens=20")
    three = sample_text(ckpt, "prompt=the ", "temperature=0", "max_new_tokens=20", "num_samples=3")
    assert three == "".join(f"--- sample {i} ---\n{greedy}" for i in (1, 2, 3))
    generated = greedy[4:-1]
    stop = generated[5:7]
    cut = "the " + generated[: generated.index(stop)] + "\n"
    assert sample_text(ckpt, "prompt=the ", "temperature=0", "max_new_tokens=20", f"stop={stop}") == cut
    batched = sample_text(ckpt, "prompt=the ", "temperature=0", "max_new_tokens=20", f"stop={stop}", "num_samples=2",
                          "compile=true", "compile_aot=false")
    assert batched == f"--- sample 1 ---\n{cut}--- sample 2 ---\n{cut}"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ckpt=missing.ckpt"], "error: ckpt='missing.ckpt': no such file"),
        (["prompt=x"], "error: ckpt=None: required"),
        (["ckpt=x", "top_p=0"], "error: top_p=0.0: must be in (0, 1]"),
        (["ckpt=x", "temperatur=1"], "error: temperatur: unknown key"),
        (["ckpt=x", "max_new_tokens=many"], "error: max_new_tokens='many': expected int"),
        (["ckpt=x", "max_new_tokens=-1"], "error: max_new_tokens=-1: must be >= 0"),
        (["ckpt=x", "top_k=-1"], "error: top_k=-1: must be >= 0"),
        (["ckpt=x", "attention=nope"], "error: attention='nope': unknown kernel"),
        (["ckpt=x", "compile=true", "use_cache=false"], "error: compile=True: compiles the cached decoding step"),
    ],
)
def test_sample_bad_inputs(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        sample_main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message) and "\n" not in err


def test_sample_refuses_non_checkpoints(tmp_path: Path, trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes((trained / "checkpoints" / "best.ckpt").read_bytes()[:5000])
    plain = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {}}, plain)
    unknown_chars = [f"ckpt={trained / 'checkpoints' / 'best.ckpt'}", "prompt=the Ω"]
    for args, message in [
        ([f"ckpt={text}"], "not a checkpoint"),
        ([f"ckpt={truncated}"], "truncated or corrupt checkpoint"),
        ([f"ckpt={plain}"], "not a minitx checkpoint"),
        (unknown_chars, "characters the tokenizer has never seen: ['Ω']"),
    ]:
        with pytest.raises(SystemExit):
            sample_main(args)
        assert message in capsys.readouterr().err


def test_special_tokens_in_a_prompt_are_allowed(trained: Path) -> None:
    ckpt = f"ckpt={trained / 'checkpoints' / 'best.ckpt'}"
    text = sample_text(ckpt, "prompt=<|endoftext|>the ", "max_new_tokens=5", "temperature=0")
    assert text.startswith("<|endoftext|>the ") and len(text) == len("<|endoftext|>the ") + 5 + 1


def test_vocab_size_is_the_largest_token_id_plus_one(tmp_path: Path) -> None:
    """A tokenizer.json whose ids have gaps: the embedding table must reach its largest id."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    chars = sorted(set(make_text(500)))
    vocab = {"[UNK]": 0, **{c: i + 1 for i, c in enumerate(chars[:-1])}, chars[-1]: 70000}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "corpus.txt").write_text(make_text(500))
    train(parse_config(compose_config(*TINY, f"data.path={tmp_path / 'corpus.txt'}", "logger=none",
                                      f"tokenizer.path={tmp_path / 'tokenizer.json'}", "trainer.max_steps=2",
                                      "trainer.val_check_interval=2", "optim.warmup_steps=1", "data.val_batches=1",
                                      "sample.max_new_tokens=0")), tmp_path / "run")
    assert minitx.load(tmp_path / "run" / "checkpoints" / "last.ckpt").config.vocab_size == 70001


class _RunsCode:
    def __reduce__(self) -> tuple:
        return (os.system, ("touch pwned",))


def test_checkpoint_whose_pickle_runs_code_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "evil.ckpt"
    torch.save({"minitx": {}, "payload": _RunsCode()}, evil)
    with pytest.raises(minitx.checkpoint.CheckpointError, match="refused"):
        minitx.load(evil)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.n_embd=130", "model.n_head=4"], "model.n_embd=130 is not divisible by model.n_head=4"),
        (["model.attention=nope"],
         "model.attention='nope': unknown kernel; choose one of ['flash', 'flex', 'flex_eager', 'naive'"),
        (["model.sdpa_backend=fastest"], "model.sdpa_backend='fastest': choose auto or one of"),
        (["optim.warmup_steps=-1"], "optim.warmup_steps=-1: must be >= 0"),
        (["optim.lr=0"], "optim.lr=0.0: must be > 0"),
        (["trainer.precision=fp8"], "trainer.precision='fp8'"),
        (["tokenizer.kind=sentencepiece"], "tokenizer.kind='sentencepiece'"),
        (["model.n_layer=two"], "model.n_layer='two': expected int"),
        (["+model.n_layr=3"], "model.n_layr: unknown key"),
        (["guard.on_nonfinite=skip", "trainer.devices=2"], "guard.on_nonfinite='skip': skipping a step is for"),
        (["checkpoint.every_n_steps=0"], "checkpoint.every_n_steps=0: must be > 0"),
        (["data.mlm_probability=1.5"], "data.mlm_probability=1.5: must be in (0, 1); BERT uses 0.15"),
        (["tokenizer.path=missing.json"], "tokenizer.path='missing.json': no such file"),
        (["seed=-1"], "seed=-1: must be in [0, 2**32)"),
        (["sample.table_tokens=-1"], "sample.table_tokens=-1: must be >= 0"),
        (["sample.prompts=def"], "sample.prompts='def': expected list of str"),
        (["seed=4294967296"], "seed=4294967296: must be in [0, 2**32)"),
        pytest.param(["trainer.precision=16-mixed"], "trainer.precision='16-mixed': float16 needs a GPU",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU-only check")),
        pytest.param(["trainer.accelerator=gpu"], "trainer.accelerator='gpu': no CUDA GPU here",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU-only check")),
    ],
)
def test_bad_config_fails_at_start_up(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(compose_config(*overrides))
    assert str(e.value).startswith(message)


def test_a_warmup_longer_than_the_run_is_clamped_to_it(caplog: pytest.LogCaptureFixture) -> None:
    """trainer.max_steps=N alone shortens a run for any N >= 1: the warmup (100 by default) shrinks to fit."""
    from minitx.tasks import lr_at

    for steps in (1, 5, 99):
        with caplog.at_level("INFO", logger="minitx"):
            config = parse_config(compose_config(f"trainer.max_steps={steps}"))
        assert config.optim.warmup_steps == steps
        assert f"optim.warmup_steps=100 is longer than trainer.max_steps={steps}: warming up over all" in caplog.text
        lrs = [lr_at(step, config.optim, steps) for step in range(steps)]
        assert lrs == sorted(lrs) and lrs[-1] < config.optim.lr  # rising over the whole run
    assert parse_config(compose_config("trainer.max_steps=100")).optim.warmup_steps == 100  # fits: unchanged


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU-only check")
def test_skip_is_refused_under_float16_loss_scaling(monkeypatch: pytest.MonkeyPatch) -> None:
    """16-mixed needs a GPU, so the device check is lifted to reach the guard's own check."""
    from minitx.config import TrainerConfig

    monkeypatch.setattr(TrainerConfig, "_check_device", lambda self: None)
    with pytest.raises(ConfigError, match=r"^guard.on_nonfinite='skip': not with trainer.precision=16-mixed"):
        parse_config(compose_config("guard.on_nonfinite=skip", "trainer.precision=16-mixed"))


def test_kernels_that_cannot_train_here_are_refused_at_start_up(tmp_path: Path) -> None:
    for kernel, message in [
        ("flex", "model.attention='flex': flex_attention has no backward on CPU (torch 2.13): use it for evaluation "
                 "and sampling; kernels that work here: ['naive', 'sdpa']"),
        ("flash", "model.attention='flash': the flash-attn package is not installed"),
    ]:
        with pytest.raises(ConfigError) as e:
            train(parse_config(compose_config(*TINY, f"model.attention={kernel}", "data.path=missing")), tmp_path)
        assert str(e.value).startswith(message)  # before data.path is even looked at


def test_resume_refuses_what_does_not_match(trained: Path, tmp_path: Path) -> None:
    corpus = trained / "corpus.txt"
    base = [*TINY, f"data.path={corpus}", "logger=none"]
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes((trained / "checkpoints" / "last.ckpt").read_bytes()[:-1000])
    other = tmp_path / "other.txt"
    other.write_text(make_text(3000).upper())
    for overrides, message in [
        ([f"resume={tmp_path / 'nowhere'}"], "no such run directory or checkpoint"),
        ([f"resume={tmp_path}"], "no checkpoints/last.ckpt in that run directory"),
        ([f"resume={truncated}"], "truncated or corrupt checkpoint"),
        ([f"resume={trained}", "model.n_layer=3"], "model.n_layer=3 but the checkpoint in resume="),
        ([f"resume={trained}", "model.block_size=64"], "model.block_size=64 but the checkpoint"),
        ([f"resume={trained}", f"data.path={other}", "trainer.max_steps=300"],  # (150: the run is finished)
         "the tokenizer built from this data/tokenizer config differs"),
    ]:
        with pytest.raises(MinitxError, match=re.escape(message)):
            train(parse_config(compose_config(*base, *overrides)), tmp_path / "out")


def run_cli(*args: str, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(list(args), capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


@pytest.mark.slow
def test_command_line_train_then_sample(tmp_path: Path) -> None:
    """The real console scripts, the default wandb logger (offline), Hydra's output directory."""
    (tmp_path / "corpus.txt").write_text(make_text(500))
    run_dir = tmp_path / "run"
    result = run_cli("minitx-train", *TINY, "trainer.max_steps=30", "data.path=corpus.txt",
                     f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = run_dir / "checkpoints" / "best.ckpt"
    assert f"checkpoint: {ckpt}" in result.stdout
    assert "sample:\nthe" in result.stdout  # Hydra strips the trailing space of sample.prompt=the
    assert (run_dir / ".hydra" / "config.yaml").is_file()  # the resolved config is saved with the run
    assert list((run_dir / "wandb").glob("offline-run-*")), "wandb should have written an offline run"

    result = run_cli("minitx-sample", f"ckpt={ckpt}", "prompt=the ", "max_new_tokens=30", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("the ") and len(result.stdout) >= 30


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["model.n_embd=130", "model.n_head=4"], "error: model.n_embd=130 is not divisible by model.n_head=4"),
        (["data.path=missing.txt"], "error: data.path='missing.txt': no such file or directory"),
        (["data.path=short.txt"], "error: data.path=short.txt: the training split has"),
        (["data.path=empty.txt"], "error: data.path=empty.txt: empty.txt holds no text (it is empty); "),
        (["data.path=blank.txt"], "error: data.path=blank.txt: blank.txt holds no text (only whitespace); "),
        (["data.path=binary.txt"], "error: data.path=binary.txt: binary.txt is not UTF-8 text (byte 0x"),
        (["data.path=split"], "error: data.path=split: the validation split (validation.txt) holds no text"),
        (["seed=-1"], "error: seed=-1: must be in [0, 2**32)"),
        (["model.n_embd=1000000", "model.n_head=1"],
         "error: model.n_embd=1000000 with model.n_layer=4: ~48.0T parameters: it needs ~768,"),
        (["hydra.run.dir=/proc/minitx/run"], "error: hydra.run.dir=/proc/minitx/run: cannot create the output"),
    ],
)
def test_command_line_errors_are_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "short.txt").write_text("too short")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("\n \n\t\n")
    (tmp_path / "binary.txt").write_bytes(bytes(random.Random(0).randrange(256) for _ in range(4000)))
    (tmp_path / "split").mkdir()
    (tmp_path / "split" / "train.txt").write_text(make_text(500))
    (tmp_path / "split" / "validation.txt").write_text("")
    result = run_cli("minitx-train", "logger=none", f"hydra.run.dir={tmp_path / 'run'}", *args, cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(message), result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_multirun_sweep_writes_one_run_per_value(tmp_path: Path) -> None:
    (tmp_path / "corpus.txt").write_text(make_text(500))
    sweep = tmp_path / "sweep"
    result = run_cli("minitx-train", "-m", "model.attention=naive,sdpa", *TINY, "trainer.max_steps=20",
                     "sample.max_new_tokens=0", "logger=wandb", "data.path=corpus.txt", f"hydra.sweep.dir={sweep}",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    from test_tracking import records_of

    runs = []
    for job, kernel in ((0, "naive"), (1, "sdpa")):
        assert f"model.attention={kernel}" in (sweep / str(job) / ".hydra" / "overrides.yaml").read_text()
        assert minitx.load(sweep / str(job) / "checkpoints" / "best.ckpt").config.attention == kernel
        [run] = records_of(sweep / str(job))["run"]  # a wandb run of its own, in the sweep's group
        assert f"model.attention={kernel}" in run.tags and run.run_group == "default"
        runs.append(run.run_id)
        assert json.loads((sweep / str(job) / "summary.json").read_text())["steps"] == 20
    assert runs[0] != runs[1]


def loss_curve(run_dir: Path) -> list[float]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return [float(r["train/loss"]) for r in csv.DictReader(f) if r["train/loss"]]


@pytest.mark.slow
def test_every_cpu_kernel_trains_the_same_curve(trained: Path, tmp_path: Path) -> None:
    """50 steps from the same seed with each kernel that trains on this machine: the same loss curve."""
    corpus = trained / "corpus.txt"
    runs = {"naive": [], "sdpa": ["model.sdpa_backend=auto"], "sdpa-math": ["model.sdpa_backend=math"],
            "sdpa-flash": ["model.sdpa_backend=flash"]}
    curves = {}
    for name, extra in runs.items():
        kernel = name.split("-")[0]
        overrides = [*TINY, f"data.path={corpus}", "logger=csv", "trainer.max_steps=50", "trainer.log_every_n_steps=5",
                     "sample.max_new_tokens=0", f"model.attention={kernel}", *extra]
        train(parse_config(compose_config(*overrides)), tmp_path / name)
        curves[name] = loss_curve(tmp_path / name)
    assert len(curves["naive"]) == 10 and curves["naive"][-1] < curves["naive"][0] - 0.5
    for name, curve in curves.items():
        assert curve == pytest.approx(curves["naive"], abs=2e-3), name


@pytest.mark.slow
def test_document_mask_trains_end_to_end(trained: Path, tmp_path: Path) -> None:
    overrides = [*TINY, f"data.path={trained / 'corpus.txt'}", "logger=none", "trainer.max_steps=20",
                 "data.document_mask=true", "sample.max_new_tokens=0"]
    assert train(parse_config(compose_config(*overrides)), tmp_path) < 4.0


def test_more_gpus_than_exist_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    with pytest.raises(ConfigError, match=re.escape("trainer.devices=8: only 1 GPU(s) here")):
        parse_config(compose_config("trainer.accelerator=gpu", "trainer.devices=8"))


def test_bf16_on_a_cpu_without_bf16_warns(trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          caplog: pytest.LogCaptureFixture) -> None:
    import minitx.train as train_module

    monkeypatch.setattr(train_module, "cpu_has_bf16", lambda: False)
    overrides = [*TINY, f"data.path={trained / 'corpus.txt'}", "logger=none", "trainer.max_steps=2",
                 "optim.warmup_steps=1", "trainer.precision=bf16-mixed", "sample.max_new_tokens=0"]
    with caplog.at_level("WARNING", logger="minitx"):
        train(parse_config(compose_config(*overrides)), tmp_path)
    assert "trainer.precision=bf16-mixed on a CPU without bfloat16 hardware runs about 16x slower" in caplog.text


def test_training_step_equals_a_plain_loop(tmp_path: Path) -> None:
    """minitx's optimizer step (written out, not Lightning's automatic loop) is the textbook one: accumulate the
    gradients of `accumulate_grad_batches` batches, clip their global norm, AdamW step on the warmup + cosine
    schedule. Checked against a loop written here over the same batches."""
    import dataclasses

    from minitx.data import RandomWindows, prepare_data
    from minitx.model import GPT
    from minitx.tasks import adamw, lr_at

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(make_text(2000))
    config = parse_config(compose_config(
        *TINY, f"data.path={corpus}", "logger=csv", "trainer.log_every_n_steps=1", "trainer.max_steps=6",
        "trainer.accumulate_grad_batches=3",
        "trainer.gradient_clip_val=0.05", "optim.warmup_steps=2", "data.batch_size=4", "sample.max_new_tokens=0",
        "trainer.val_check_interval=2"))  # evaluations between optimizer steps (never inside a window)
    train(config, tmp_path / "run")
    trained = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert trained["global_step"] == 6 and trained["minitx"]["batches_seen"] == 18

    data = prepare_data(config.data, config.tokenizer, config.model.block_size + 1)
    torch.manual_seed(config.seed)
    model = GPT(dataclasses.replace(config.model, vocab_size=data.tokenizer.get_vocab_size()))
    optimizer = adamw(model.parameters(), config.optim)
    batches = iter(RandomWindows(data.train, config.model.block_size, 4, config.seed))
    norms = []
    for step in range(6):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config.optim, 6)
        for _ in range(3):
            x, y = next(batches)
            (model(x, y)[1] / 3).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert min(norms) > 0.05  # clipping was active on every step
    with open(tmp_path / "run" / "csv" / "metrics.csv") as f:  # the logged grad_norm is the norm before clipping
        logged_norms = {int(r["step"]): float(r["grad_norm"]) for r in csv.DictReader(f) if r["grad_norm"]}
    assert [logged_norms[s] for s in sorted(logged_norms)] == pytest.approx(norms, rel=1e-4)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(trained["state_dict"][f"model.{name}"], value, atol=1e-5, rtol=1e-4)
