"""Sweeps (`minitx-train -m`): the summary table and summary.csv (minitx.sweep), and the Optuna search
(conf/hparams_search/optuna.yaml), through the real console script."""

from __future__ import annotations

import atexit
import csv
import importlib.util
import json
from pathlib import Path

import pytest
import yaml
from conftest import make_text
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf
from test_train import TINY, run_cli

from minitx.sweep import COLUMNS, UNFINISHED, SweepSummary

SEARCHED = ("model.n_layer=", "model.n_embd=", "optim.lr=")  # the Optuna search space: not fixed on its command line
QUICK = [*TINY, "trainer.max_steps=10", "trainer.val_check_interval=5", "sample.max_new_tokens=0",
         "data.path=corpus.txt"]


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def best_logged(run_dir: Path) -> float:
    """The lowest val/loss in the run's metrics.csv (logger=csv): what its best checkpoint scored."""
    return min(float(r["val/loss"]) for r in read_rows(run_dir / "csv" / "metrics.csv") if r["val/loss"])


def check_summary_json_columns(row: dict[str, str], run_dir: Path) -> None:
    """final_val_loss and steps come from the run's summary.json when train() writes one; blank without it."""
    if (run_dir / "summary.json").is_file():
        summary = json.loads((run_dir / "summary.json").read_text())
        assert float(row["final_val_loss"]) == pytest.approx(summary["final_val_loss"])
        assert int(row["steps"]) == summary["steps"]
    else:
        assert row["final_val_loss"] == row["steps"] == ""


@pytest.mark.slow
def test_grid_sweep_prints_and_writes_one_row_per_job(tmp_path: Path) -> None:
    (tmp_path / "corpus.txt").write_text(make_text(500))
    sweep = tmp_path / "sweep"
    result = run_cli("minitx-train", "-m", *QUICK, "model.n_layer=1,2", "logger=csv", f"hydra.sweep.dir={sweep}",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_rows(sweep / "summary.csv")
    assert list(rows[0]) == COLUMNS
    assert [(r["job"], r["overrides"]) for r in rows] == [("0", "model.n_layer=1"), ("1", "model.n_layer=2")]
    for row in rows:
        run_dir = sweep / row["job"]
        assert float(row["best_val_loss"]) == pytest.approx(best_logged(run_dir))  # the job's return value
        assert float(row["wall_time_s"]) > 0 and row["error"] == ""
        check_summary_json_columns(row, run_dir)
    table = result.stdout[result.stdout.index(f"sweep: 2 jobs, in {sweep / 'summary.csv'}"):].splitlines()
    assert table[1].split() == ["job", "overrides", *COLUMNS[2:]]
    for line, row in zip(table[2:4], rows, strict=True):
        assert line.split()[:3] == [row["job"], row["overrides"], f"{float(row['best_val_loss']):.4f}"]


@pytest.mark.slow
def test_a_job_that_stops_the_sweep_is_a_row(tmp_path: Path) -> None:
    """A user error in the second job ends the sweep (one line, exit status 2); the table still has both jobs."""
    (tmp_path / "corpus.txt").write_text(make_text(500))
    sweep = tmp_path / "sweep"
    result = run_cli("minitx-train", "-m", *QUICK, "model.n_embd=32,31", "logger=none", f"hydra.sweep.dir={sweep}",
                     cwd=tmp_path)
    assert result.returncode == 2
    assert "error: model.n_embd=31 is not divisible by model.n_head=2" in result.stderr
    rows = read_rows(sweep / "summary.csv")
    assert [(r["overrides"], r["error"]) for r in rows] == [("model.n_embd=32", ""), ("model.n_embd=31", UNFINISHED)]
    assert float(rows[0]["best_val_loss"]) > 0
    assert f"sweep: 2 jobs, in {sweep / 'summary.csv'}" in result.stdout


def test_a_failed_job_is_a_row_with_its_error(tmp_path: Path) -> None:
    """An exception in a job (Hydra's JobStatus.FAILED) is the row's error; the rows after it carry on."""
    hydra = {"sweep": {"dir": str(tmp_path)}, "overrides": {"task": ["model.n_layer=1,2", "logger=none"]},
             "runtime": {"output_dir": str(tmp_path / "0")}, "job": {"num": 0}}
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "summary.json").write_text(json.dumps({"final_val_loss": 2.75, "steps": 10}))  # train()'s
    summary = SweepSummary()
    summary.on_multirun_start(OmegaConf.create({"hydra": hydra}))
    atexit.unregister(summary.report)
    for num, (status, value) in enumerate([(JobStatus.FAILED, RuntimeError("loss is nan\nat step 3")),
                                           (JobStatus.COMPLETED, 2.5)]):
        job = OmegaConf.create({"hydra": {**hydra, "overrides": {"task": [f"model.n_layer={num + 1}", "logger=none"]},
                                          "runtime": {"output_dir": str(tmp_path / str(num))}, "job": {"num": num}}})
        summary.on_job_start(job)
        summary.on_job_end(job, JobReturn(status=status, _return_value=value))
    rows = read_rows(tmp_path / "summary.csv")
    assert [(r["overrides"], r["best_val_loss"], r["final_val_loss"], r["steps"], r["error"]) for r in rows] == [
        ("model.n_layer=1", "", "", "", "RuntimeError: loss is nan"), ("model.n_layer=2", "2.5", "2.75", "10", "")]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is None,
                    reason="needs the sweep extra: pip install 'minitx[sweep]'")
def test_optuna_search_minimizes_the_best_val_loss(tmp_path: Path) -> None:
    (tmp_path / "corpus.txt").write_text(make_text(500))
    sweep = tmp_path / "sweep"
    fixed = [o for o in QUICK if not o.startswith(SEARCHED)]
    result = run_cli("minitx-train", "-m", "hparams_search=optuna", "hydra.sweeper.n_trials=2", *fixed,
                     "logger=csv", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    rows = read_rows(sweep / "summary.csv")
    assert len(rows) == 2
    for row in rows:
        assert sorted(o.split("=")[0] for o in row["overrides"].split()) == ["model.n_embd", "model.n_layer",
                                                                             "optim.lr"]
        assert float(row["best_val_loss"]) == pytest.approx(best_logged(sweep / row["job"]))
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    best = min(rows, key=lambda r: float(r["best_val_loss"]))
    assert results["best_value"] == pytest.approx(float(best["best_val_loss"]))
    assert {f"{k}={v}" for k, v in results["best_params"].items()} == set(best["overrides"].split())
