"""Nothing lost: a run killed with SIGKILL resumes exactly; a kill during a save leaves the last checkpoint
whole; a non-finite loss or gradient stops the run (or skips the step) with the last good checkpoint named."""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import make_text
from test_tracking import records_of
from test_train import compose_config, run_cli

import minitx
from minitx.checkpoint import read_checkpoint
from minitx.tasks import NonFiniteError
from minitx.train import check_same_run, parse_config, train

RUN = [
    "model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32", "model.dropout=0.1",
    "data.batch_size=8", "data.val_batches=4", "trainer.max_steps=40", "trainer.val_check_interval=15",
    "trainer.enable_progress_bar=false", "optim.warmup_steps=5", "checkpoint.every_n_steps=10",
    "checkpoint.keep_last=2", "sample.max_new_tokens=0", "logger=csv",
]

CHILD = """
import os, signal, sys, torch
from pathlib import Path
import lightning as L
from hydra import compose, initialize_config_dir
from minitx.train import CONF_DIR, parse_config, train

mode, arg, out, *overrides = sys.argv[1:]

class KillAtStep(L.Callback):
    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == int(arg):
            os.kill(os.getpid(), signal.SIGKILL)

if mode == "kill-during-save":  # the n-th checkpoint write gets half its bytes out, then the process dies
    real_save, calls = torch.save, []
    def dying_save(obj, f, *a, **k):
        calls.append(1)
        if len(calls) < int(arg):
            return real_save(obj, f, *a, **k)
        import io
        buffer = io.BytesIO()
        real_save(obj, buffer)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    torch.save = dying_save

with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
    cfg = compose("train", overrides=overrides)
train(parse_config(cfg), Path(out), callbacks=[KillAtStep()] if mode == "kill-at-step" else [])
"""


def run_child(tmp_path: Path, mode: str, arg: int, out: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CHILD, mode, str(arg), str(out), *overrides],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)


def final_state(run_dir: Path) -> tuple[dict[str, torch.Tensor], float]:
    checkpoint = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    val_loss = float(checkpoint["callbacks"][next(k for k in checkpoint["callbacks"] if "val/loss" in k)]
                     ["current_score"])
    return checkpoint["state_dict"], val_loss


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(make_text(1500))
    return path


@pytest.mark.slow
@pytest.mark.parametrize(
    ("accumulate", "val_check_interval", "last_saved", "optim"),
    # with 2: evaluations (and their checkpoints) at steps 8, 16, 24; periodic at 10, 20. Muon: two optimizers' state
    [(1, 15, 20, "adamw"), (2, 8, 24, "adamw"), (1, 15, 20, "muon")],
)
def test_sigkill_then_resume_equals_training_straight(tmp_path: Path, corpus: Path, accumulate: int,
                                                       val_check_interval: int, last_saved: int, optim: str) -> None:
    overrides = [*RUN, f"data.path={corpus}", f"trainer.accumulate_grad_batches={accumulate}",
                 f"trainer.val_check_interval={val_check_interval}", f"optim={optim}"]
    if optim == "muon":
        overrides += ["optim.schedule=wsd", "model.qk_norm=true"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    train(parse_config(compose_config(*overrides)), straight)

    result = run_child(tmp_path, "kill-at-step", 25, killed, *overrides)
    assert result.returncode == -9, result.stderr[-2000:]  # SIGKILL: no clean-up ran
    assert read_checkpoint(killed / "checkpoints" / "last.ckpt")["global_step"] == last_saved
    assert sorted(p.name for p in (killed / "checkpoints").glob("step-*")) == ["step-000010.ckpt", "step-000020.ckpt"]

    result = run_cli("minitx-train", *overrides, f"resume={killed}", f"hydra.run.dir={tmp_path / 'resumed'}",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming" in result.stderr + result.stdout

    weights, val_loss = final_state(straight)
    resumed_weights, resumed_val_loss = final_state(killed)
    assert read_checkpoint(killed / "checkpoints" / "last.ckpt")["global_step"] == 40
    assert resumed_val_loss == pytest.approx(val_loss, abs=1e-6)
    for name, tensor in weights.items():
        torch.testing.assert_close(resumed_weights[name], tensor, atol=1e-6, rtol=0, msg=name)
    # keep-last-k: only the two newest periodic checkpoints remain
    assert sorted(p.name for p in (killed / "checkpoints").glob("step-*")) == ["step-000030.ckpt", "step-000040.ckpt"]


@pytest.mark.slow
def test_kill_during_a_checkpoint_write_leaves_the_previous_one_whole(tmp_path: Path, corpus: Path) -> None:
    overrides = [*RUN, f"data.path={corpus}"]
    run_dir = tmp_path / "run"
    # saves: step 10 (step-000010, last), val at 15 (best, last), step 20: the 5th write dies half-way
    result = run_child(tmp_path, "kill-during-save", 5, run_dir, *overrides)
    assert result.returncode == -9, result.stderr[-2000:]
    leftovers = list((run_dir / "checkpoints").glob(".*.tmp*"))
    assert leftovers, "the interrupted write should have left its temporary file"
    last = run_dir / "checkpoints" / "last.ckpt"
    assert read_checkpoint(last)["global_step"] == 15  # the previous last.ckpt, intact
    minitx.load(last)

    result = run_cli("minitx-train", *overrides, f"resume={run_dir}", f"hydra.run.dir={tmp_path / 'resumed'}",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_checkpoint(last)["global_step"] == 40


class PoisonWeights(L.Callback):
    """Make a LayerNorm weight NaN before step `at`: that step's loss is NaN."""

    def __init__(self, at: int):
        self.at = at

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        if trainer.global_step + 1 == self.at:
            with torch.no_grad():
                pl_module.model.transformer.ln_f.weight[0] = float("nan")


class PoisonGradient(L.Callback):
    """Make one gradient infinite at step `at` only."""

    def __init__(self, at: int):
        self.at = at

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: object) -> None:
        if trainer.global_step + 1 == self.at:
            pl_module.model.lm_head.weight.grad[0, 0] = float("inf")


@pytest.mark.slow
def test_nan_loss_stops_the_run_naming_the_step_and_last_good_checkpoint(tmp_path: Path, corpus: Path) -> None:
    config = parse_config(compose_config(*RUN, f"data.path={corpus}", "checkpoint.every_n_steps=5"))
    with pytest.raises(NonFiniteError) as e:
        train(config, tmp_path / "run", callbacks=[PoisonWeights(at=13)])
    message = str(e.value)
    assert "non-finite loss (nan) at step 13" in message
    good = Path(message.split("Last good checkpoint: ")[1].split(" ")[0])
    assert good.parent == tmp_path / "run" / "checkpoints"
    loaded = minitx.load(good)
    assert all(torch.isfinite(p).all() for p in loaded.model.parameters())
    assert read_checkpoint(good)["global_step"] == 10


@pytest.mark.slow
def test_nonfinite_gradient_stops_or_is_skipped(tmp_path: Path, corpus: Path) -> None:
    overrides = [*RUN, f"data.path={corpus}", "trainer.max_steps=12"]
    with pytest.raises(NonFiniteError, match=r"non-finite gradient norm \(inf\) at step 7"):
        train(parse_config(compose_config(*overrides)), tmp_path / "stop", callbacks=[PoisonGradient(at=7)])
    train(parse_config(compose_config(*overrides, "guard.on_nonfinite=skip")), tmp_path / "skip",
          callbacks=[PoisonGradient(at=7)])
    checkpoint = read_checkpoint(tmp_path / "skip" / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == 12 and checkpoint["minitx"]["skipped_steps"] == 1
    assert all(torch.isfinite(t).all() for t in checkpoint["state_dict"].values())


@pytest.mark.slow
def test_command_line_nan_stop_is_one_line(tmp_path: Path, corpus: Path) -> None:
    """The guard's error through the real entry point: one line, exit 2 (poisoned with lr=inf)."""
    result = run_cli("minitx-train", *RUN, f"data.path={corpus}", "optim.lr=1e30", "optim.min_lr=0",
                     f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: non-finite") and "Last good checkpoint" in line
    assert "Traceback" not in result.stderr
    assert os.path.exists(tmp_path / "run")


@pytest.mark.slow
def test_resume_continues_the_same_wandb_run(tmp_path: Path, corpus: Path) -> None:
    base = [*RUN, f"data.path={corpus}", "logger=wandb", "trainer.max_steps=10"]
    first, second = tmp_path / "first", tmp_path / "second"
    assert run_cli("minitx-train", *base, f"hydra.run.dir={first}", cwd=tmp_path).returncode == 0
    [run] = (first / "wandb").glob("offline-run-*")
    run_id = run.name.rsplit("-", 1)[1]
    [first_run] = records_of(first)["run"]  # tagged with the command line's overrides
    assert {"logger=wandb", "trainer.max_steps=10", "model.n_layer=2"} <= set(first_run.tags)
    assert all(len(tag) <= 64 for tag in first_run.tags)
    # resuming a finished run with a larger max_steps extends it
    result = run_cli("minitx-train", *base, "trainer.max_steps=20", f"resume={first}", f"hydra.run.dir={second}",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    [resumed] = (second / "wandb").glob("offline-run-*")
    assert resumed.name.endswith(f"-{run_id}")
    assert read_checkpoint(first / "checkpoints" / "last.ckpt")["global_step"] == 20


def test_checkpoint_from_automatic_optimization_resumes_at_its_step(tmp_path: Path, corpus: Path) -> None:
    """Checkpoints written before minitx wrote its optimizer step itself keep their step count in Lightning's
    automatic-optimization counter; resuming one must continue from that step, not from 0."""
    overrides = [*RUN, f"data.path={corpus}", "trainer.max_steps=20"]
    train(parse_config(compose_config(*overrides)), tmp_path / "run")
    path = tmp_path / "run" / "checkpoints" / "step-000010.ckpt"
    checkpoint = torch.load(path, weights_only=True)
    loops = checkpoint["loops"]["fit_loop"]
    manual = loops["epoch_loop.manual_optimization.optim_step_progress"]
    loops["epoch_loop.automatic_optimization.optim_progress"]["optimizer"]["step"] = copy.deepcopy(manual)
    for counters in manual.values():  # as the old code left it
        counters.update(ready=0, completed=0)
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)
    train(parse_config(compose_config(*overrides, f"resume={old}", "trainer.max_steps=30")), tmp_path / "resumed")
    last = read_checkpoint(tmp_path / "last.ckpt")  # a resumed run writes beside the checkpoint it came from
    assert last["global_step"] == 30 and last["minitx"]["batches_seen"] == 30  # 20 more steps, not 30


@pytest.mark.slow
def test_resume_accepts_how_the_model_runs_and_a_finished_run_says_so(tmp_path: Path, corpus: Path) -> None:
    """The kernel (attention=auto included), sdpa_backend and compile are how the model runs, not what it is:
    a resume may change them. Resuming a run that has reached trainer.max_steps is one line, exit status 2."""
    overrides = [*RUN, f"data.path={corpus}", "trainer.max_steps=10", "model.attention=auto"]
    run = tmp_path / "run"
    train(parse_config(compose_config(*overrides)), run)
    train(parse_config(compose_config(*overrides, f"resume={run}", "trainer.max_steps=15")), tmp_path / "auto")
    train(parse_config(compose_config(*overrides, f"resume={run}", "trainer.max_steps=20", "model.attention=naive")),
          tmp_path / "naive")
    checkpoint = read_checkpoint(run / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == 20
    model = parse_config(compose_config(*overrides)).model
    for change in ({"compile": True}, {"sdpa_backend": "math"}, {"attention": "naive"}, {"attention_check": False}):
        check_same_run(checkpoint["minitx"], dataclasses.replace(model, **change), None, str(run))

    for max_steps in (20, 12):
        result = run_cli("minitx-train", *overrides, f"resume={run}", f"trainer.max_steps={max_steps}",
                         f"hydra.run.dir={tmp_path / f'finished{max_steps}'}", cwd=tmp_path)
        assert result.returncode == 2, result.stderr[-3000:]
        assert "Traceback" not in result.stderr
        assert result.stderr.strip().splitlines()[-1] == (
            f"error: resume={str(run)!r}: the run is finished at step 20 (trainer.max_steps={max_steps}); "
            "to train further, resume with trainer.max_steps above 20")


def as_written_before_this_layout(state: dict) -> dict:
    """A checkpoint reduced to what commit e4798b5 wrote (before the defaults moved into the dataclasses, the tasks into
    minitx/tasks/ and tracking gained callbacks): only the two checkpoint callbacks' states, and the run config's sample
    and logger sections without the keys added since."""
    state["callbacks"] = {k: v for k, v in state["callbacks"].items() if k.startswith("Checkpoint{")}
    config = state["minitx"]["config"]
    config["sample"] = {k: config["sample"][k] for k in ("prompt", "max_new_tokens")}
    config["logger"] = {k: config["logger"][k] for k in ("kind", "project", "offline")}
    return state


def test_a_checkpoint_from_before_the_config_schema_loads_samples_and_resumes(tmp_path: Path) -> None:
    """A checkpoint in the shape commit e4798b5 wrote (4 steps of the overrides below on make_text(300)) loads,
    samples and resumes with today's code."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(make_text(300))
    overrides = [f"data.path={corpus}", "logger=csv", "model.n_layer=1", "model.n_head=2", "model.n_embd=16",
                 "model.block_size=16", "data.batch_size=4", "data.val_batches=2", "trainer.val_check_interval=4",
                 "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", "optim.warmup_steps=1",
                 "sample.max_new_tokens=5"]
    train(parse_config(compose_config(*overrides, "trainer.max_steps=4")), tmp_path / "written")
    run = tmp_path / "old" / "checkpoints"
    run.mkdir(parents=True)
    old = run / "last.ckpt"
    state = torch.load(tmp_path / "written" / "checkpoints" / "last.ckpt", weights_only=True)
    torch.save(as_written_before_this_layout(state), old)
    loaded = minitx.load(old)
    assert (loaded.step, loaded.task, loaded.config.n_embd, loaded.config.block_size) == (4, "causal_lm", 16, 16)
    from minitx.generation import generate

    assert len(loaded.tokenizer.decode(list(generate(loaded.model, loaded.tokenizer.encode("the ").ids, 20)))) > 0
    best = train(parse_config(compose_config(*overrides, f"resume={tmp_path / 'old'}", "trainer.max_steps=8")),
                 tmp_path / "resumed")
    assert math.isfinite(best) and best < 3.0  # it was 2.9984 at step 4
    assert read_checkpoint(run / "last.ckpt")["global_step"] == 8
