"""Several processes compute what one does: a global batch stated in tokens sets the accumulation for any number of
processes, the processes draw the batches one process would accumulate, and a 2-process DDP run (gloo, on CPU)
equals a 1-process run of the same global batch; only rank 0 writes run folders, checkpoints, logs and samples,
also in a sweep."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_text
from test_train import compose_config, run_cli

from minitx.config import ConfigError
from minitx.data import RandomWindows, prepare_data
from minitx.train import launched_argv, parse_config

TINY = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32", "data.batch_size=4",
        "data.val_batches=4", "data.path=corpus.txt", "trainer.max_steps=6", "trainer.log_every_n_steps=1",
        "trainer.val_check_interval=1000", "trainer.tokens_per_step=256", "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false", "optim.warmup_steps=2", "sample.max_new_tokens=8", "sample.prompt=the"]
DDP = ["trainer=ddp", "trainer.devices=2"]


def test_tokens_per_step_sets_the_accumulation_for_the_world_size() -> None:
    """256 tokens a step, 4 windows of 32 tokens a batch: 2 batches accumulated on one process, 1 on two."""
    base = ["model.block_size=32", "data.batch_size=4", "trainer.tokens_per_step=256", "trainer.accelerator=cpu",
            "trainer.val_check_interval=10"]
    assert parse_config(compose_config(*base)).trainer.accumulate_grad_batches == 2
    assert parse_config(compose_config(*base, *DDP)).trainer.accumulate_grad_batches == 1
    nodes = parse_config(compose_config(*base, *DDP, "trainer.num_nodes=2", "trainer.tokens_per_step=1024")).trainer
    assert (nodes.world_size(), nodes.accumulate_grad_batches) == (4, 2)
    with pytest.raises(ConfigError, match=r"^trainer\.tokens_per_step=300: must be a multiple of data.batch_size x "
                                          r"model.block_size x processes = 256; nearest: 256 or 512$"):
        parse_config(compose_config(*base, *DDP, "trainer.tokens_per_step=300"))
    with pytest.raises(ConfigError, match=r"^trainer\.accumulate_grad_batches=4: trainer.tokens_per_step=256 sets it"):
        parse_config(compose_config(*base, "trainer.accumulate_grad_batches=4"))


def test_two_processes_draw_the_batches_one_process_accumulates(tmp_path: Path) -> None:
    """Batch s of rank r of 2 is batch 2s + r of one process; one process draws from rng([seed, 0, step]), as it
    did before ranks were interleaved (the recipes' windows do not move)."""
    (tmp_path / "corpus.txt").write_text(make_text(300))
    config = parse_config(compose_config(f"data.path={tmp_path / 'corpus.txt'}", f"data.cache_dir={tmp_path}"))
    stream = prepare_data(config.data, config.tokenizer, 17).train
    one = RandomWindows(stream, 16, 4, seed=7)
    ranks = [RandomWindows(stream, 16, 4, seed=7, rank=r, world_size=2) for r in (0, 1)]
    for step in (0, 3):
        for r in (0, 1):
            assert torch.equal(ranks[r].batch(step)[0], one.batch(2 * step + r)[0])
    starts = np.random.default_rng([7, 0, 5]).integers(0, len(stream) - 16, size=4)
    assert torch.equal(one.batch(5)[0], stream.windows(starts, 17)[:, :-1])


def test_torchrun_and_srun_processes_share_one_run_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under torchrun (or srun) each process composes the config: without one hydra.run.dir they would make a
    directory each; rank 0 alone writes .hydra/, as under Lightning's own launcher."""
    assert launched_argv(["x=1"]) == ["x=1"]  # not launched from outside
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ConfigError, match=r"^hydra\.run\.dir: under torchrun or srun every process needs the same"):
        launched_argv(["trainer=ddp"])
    with pytest.raises(ConfigError, match=r"^-m: a sweep cannot run under torchrun or srun"):
        launched_argv(["-m", "hydra.run.dir=/r"])
    assert launched_argv(["hydra.run.dir=/r"]) == ["hydra.run.dir=/r", "hydra.output_subdir=null",
                                                   "hydra.job.name=train_rank_1"]
    monkeypatch.setenv("RANK", "0")
    assert launched_argv(["hydra.run.dir=/r"]) == ["hydra.run.dir=/r"]


def metrics(run_dir: Path) -> dict[int, dict[str, float]]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    by_step: dict[int, dict[str, float]] = {}
    for row in rows:
        by_step.setdefault(int(row["step"]), {}).update({k: float(v) for k, v in row.items() if v and k != "step"})
    return by_step


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]


@pytest.mark.slow
def test_two_process_ddp_equals_one_process_accumulating(tmp_path: Path) -> None:
    """The same 256-token global batch as 2 gloo processes x 1 batch and as 1 process x 2 accumulated batches:
    the same train/loss at every logged step (rel 1e-6), the same validation, the same final weights (abs 1e-6;
    measured: identical). The DDP run, from a fresh directory with the default hydra.run.dir, leaves one run
    directory, whose sample and summary rank 0 alone prints."""
    (tmp_path / "corpus.txt").write_text(make_text(600))
    one = run_cli("minitx-train", *TINY, "logger=csv", f"hydra.run.dir={tmp_path / 'one'}", cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_cli("minitx-train", *TINY, *DDP, "logger=csv", cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]

    runs = [p for p in (tmp_path / "outputs").glob("*/*")]
    assert len(runs) == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt", "one", "outputs"], runs
    assert "4 x 32 tokens x 2 accumulated x 1 processes = 256 tokens" in one.stdout
    assert "4 x 32 tokens x 1 accumulated x 2 processes = 256 tokens" in two.stdout
    assert two.stdout.count("sample:") == 1 and two.stdout.count("checkpoint: ") == 1, two.stdout

    single, ddp = metrics(tmp_path / "one"), metrics(runs[0])
    train_steps = [s for s in ddp if "train/loss" in ddp[s]]
    assert train_steps == [2, 3, 4, 5, 6]  # (the first batch only starts the clock)
    for step in train_steps:
        assert ddp[step]["train/loss"] == pytest.approx(single[step]["train/loss"], rel=1e-6), step
        assert ddp[step]["grad_norm"] == pytest.approx(single[step]["grad_norm"], rel=1e-6), step
    for step in (0, 6):
        assert ddp[step]["val/loss"] == pytest.approx(single[step]["val/loss"], rel=1e-6), step
    a, b = weights(tmp_path / "one"), weights(runs[0])
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6)
    assert sorted(p.name for p in (runs[0] / "checkpoints").iterdir()) == \
        sorted(p.name for p in (tmp_path / "one" / "checkpoints").iterdir())


@pytest.mark.slow
def test_a_sweep_of_ddp_jobs_runs_each_job_once(tmp_path: Path) -> None:
    """minitx-train -m with trainer=ddp: Lightning starts the second process with the first one's command line,
    which would run the sweep again in a second multirun/ tree; it runs its job instead. One sweep folder, one job
    folder, one wandb run, one sample, nothing under outputs/."""
    (tmp_path / "corpus.txt").write_text(make_text(600))
    result = run_cli("minitx-train", "-m", *TINY, *DDP, "logger=wandb", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt", "multirun"]
    sweeps = list((tmp_path / "multirun").glob("*/*"))
    assert len(sweeps) == 1, sweeps
    jobs = sorted(p.name for p in sweeps[0].iterdir() if p.is_dir())
    assert jobs == ["0"], jobs
    job = sweeps[0] / "0"
    assert len(list((job / "wandb").glob("offline-run-*"))) == 1
    assert (job / "checkpoints" / "last.ckpt").is_file()
    assert result.stdout.count("sample:") == 1
    assert result.stdout.count("sweep: ") == 1  # one table: the sweep ran once
    assert re.search(r"^0\s+\d\.\d{4}\s+\d\.\d{4}\s+6\s", result.stdout, re.M), result.stdout  # 6 steps


def test_resuming_on_another_number_of_processes_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint records its world size: each rank's batch count and the evaluation steps are laid out for it."""
    from minitx.train import train

    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus.txt").write_text(make_text(400))
    run = [*TINY, "trainer.max_steps=2", "sample.max_new_tokens=0", "logger=none"]
    train(parse_config(compose_config(*run)), tmp_path / "run")
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    state = torch.load(last, weights_only=True)
    assert state["minitx"]["world_size"] == 1
    state["minitx"]["world_size"] = 2  # as a 2-process run writes it
    torch.save(state, last)
    config = parse_config(compose_config(*run, "trainer.max_steps=4", f"resume={tmp_path / 'run'}"))
    with pytest.raises(ConfigError, match=r"^resume: the checkpoint's run trained on 2 process\(es\), this one has 1; "
                                          r"resume with trainer.devices x trainer.num_nodes = 2$"):
        train(config, tmp_path / "resumed")
