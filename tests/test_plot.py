"""minitx-plot: two tiny runs trained for real, drawn into one PNG; the `time` and `grad_norm` metrics it relies on."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_text
from test_train import TINY, compose_config

from minitx.plot import PlotConfig, main
from minitx.train import parse_config, train


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two 40-step runs of different learning rates, logged to CSV."""
    root = tmp_path_factory.mktemp("plot")
    corpus = root / "corpus.txt"
    corpus.write_text(make_text(1500))
    dirs = []
    for lr in ("3e-3", "1e-3"):
        out = root / f"lr{lr}"
        overrides = [*TINY, f"data.path={corpus}", "logger=csv", "trainer.max_steps=40",
                     "trainer.val_check_interval=20", "sample.max_new_tokens=0", f"optim.lr={lr}"]
        train(parse_config(compose_config(*overrides)), out)
        dirs.append(out)
    return dirs


def rows(run: Path, metric: str) -> list[dict[str, str]]:
    with open(run / "csv" / "metrics.csv") as f:
        return [r for r in csv.DictReader(f) if r[metric]]


def test_time_and_grad_norm_are_logged(runs: list[Path]) -> None:
    train_rows = rows(runs[0], "train/loss")
    assert [int(r["step"]) for r in train_rows] == [10, 20, 30, 40]
    times = [float(r["time"]) for r in train_rows]
    assert times[0] > 0 and times == sorted(times) and len(set(times)) == len(times)
    assert all(0 < float(r["grad_norm"]) < 1e3 for r in train_rows)
    val_rows = rows(runs[0], "val/loss")  # evaluations carry the time too, so val/loss can be drawn against it
    assert [int(r["step"]) for r in val_rows] == [0, 20, 40]
    val_times = [float(r["time"]) for r in val_rows]
    assert val_times[0] == 0 and val_times == sorted(val_times) and val_times[-1] >= times[-1]


def test_time_continues_in_a_resumed_run(runs: list[Path], tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(runs[0], run)
    before = max(float(r["time"]) for r in rows(run, "val/loss"))
    overrides = [*TINY, f"data.path={runs[0].parent / 'corpus.txt'}", "logger=csv", "trainer.max_steps=60",
                 "trainer.val_check_interval=20", "sample.max_new_tokens=0", "optim.lr=3e-3", f"resume={run}"]
    train(parse_config(compose_config(*overrides)), run)
    after = {int(r["step"]): float(r["time"]) for r in rows(run, "train/loss")}
    assert before < after[50] < after[60], (before, after)


def test_plot_draws_both_runs(runs: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import matplotlib.image

    out = tmp_path / "curves.png"
    main([*map(str, runs), f"out={out}"])
    assert "wrote" in capsys.readouterr().out
    pixels = matplotlib.image.imread(out)
    assert pixels.shape[:2] == (480, 1280)  # two panels of 6.4 x 4.8 inches at 100 dpi
    colours = {tuple(p) for p in (pixels[..., :3] * 255).astype(np.uint8).reshape(-1, 3)}
    assert len(colours) > 50 and pixels[..., :3].std() > 0.05  # lines, text and two runs' colours, not blank
    main([str(runs[0]), f"out={tmp_path / 'one.png'}", "x=step", "dpi=50"])
    assert matplotlib.image.imread(tmp_path / "one.png").shape[:2] == (240, 320)


def test_plot_reads_an_offline_wandb_run(runs: list[Path], tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Without csv/metrics.csv, the run's offline .wandb file: the same numbers as the CSV of the same run."""
    import wandb

    from minitx.plot import read_run

    monkeypatch.setenv("WANDB_MODE", "offline")
    overrides = [*TINY, f"data.path={runs[0].parent / 'corpus.txt'}", "logger=wandb", "trainer.max_steps=40",
                 "trainer.val_check_interval=20", "sample.max_new_tokens=0", "optim.lr=3e-3"]
    train(parse_config(compose_config(*overrides)), tmp_path / "wandb_run")
    wandb.finish()  # what the end of a minitx-train process does: wandb writes out what it holds
    from_wandb, from_csv = read_run(str(tmp_path / "wandb_run")), read_run(str(runs[0]))
    for metric in ("val/loss", "train/loss", "grad_norm"):
        steps, values = from_wandb.series(metric, "step")
        assert (steps, values) == (from_csv.series(metric, "step")[0], pytest.approx(from_csv.series(metric, "step")[1],
                                                                                     rel=1e-4)), metric
        assert len(from_wandb.series(metric, "time")[0]) == len(steps)  # every row has its time
    main([str(tmp_path / "wandb_run"), str(runs[1]), f"out={tmp_path / 'mixed.png'}"])
    assert (tmp_path / "mixed.png").stat().st_size > 10_000


def test_plot_help_lists_the_keys(capsys: pytest.CaptureFixture[str]) -> None:
    main(["--help"])
    text = capsys.readouterr().out
    assert text.startswith("usage: minitx-plot <run directory ...>")
    for key in PlotConfig.__dataclass_fields__:
        assert f"  {key}=" in text, key


def test_plot_errors_are_one_line(runs: list[Path], tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        ([str(empty)], f"error: run={str(empty)!r}: no val/loss logged"),
        ([str(tmp_path / "nowhere")], "no such run directory"),
        ([str(runs[0]), "x=wall"], "error: x='wall': choose step, time or both"),
        ([f"out={tmp_path / 'x.png'}"], "error: runs=[]: name at least one run directory"),
    ]
    for args, expected in cases:
        result = subprocess.run([sys.executable, "-m", "minitx.plot", *args], capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert expected in result.stderr, result.stderr


def test_runs_are_named_by_config_and_folder(tmp_path: Path) -> None:
    from minitx.plot import run_label

    run = tmp_path / "2026-11-30_15-44-00"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("name: shakespeare_char_fast\nseed: 1\n")
    assert run_label(run) == "shakespeare_char_fast/2026-11-30_15-44-00"
    assert run_label(tmp_path) == tmp_path.name  # no .hydra/ (a run of minitx.train.train): the folder name
