"""The summary of a sweep (`minitx-train -m ...`): one row per job, printed when the sweep ends and kept as
`<sweep dir>/summary.csv`, so that a grid or an Optuna search reads as one table rather than N run directories.

A Hydra callback (conf/hydra/default.yaml, hydra.callbacks.summary). Hydra's basic launcher runs the jobs in this
process, one after another; the table is rewritten after every job, so it is complete up to a job that stops the
sweep. A job that fails is a row with its error."""

from __future__ import annotations

import atexit
import csv
import json
import time
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

COLUMNS = ["job", "overrides", "best_val_loss", "final_val_loss", "steps", "wall_time_s", "error"]
UNFINISHED = "did not finish (the sweep stopped: its error is above)"  # a job that exits (a user error) ends it


def job_summary(run_dir: Path) -> dict[str, Any]:
    """The run's summary.json (written by train() at its end), or {} for a run without one."""
    try:
        return json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return {}


def format_table(rows: list[dict[str, Any]]) -> str:
    """`rows` as aligned text columns (losses to 4 decimals, seconds to 1), blanks where a value is missing."""
    def cell(column: str, value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.1f}" if column == "wall_time_s" else f"{value:.4f}"
        return "" if value is None else str(value)

    cells = [COLUMNS] + [[cell(c, row.get(c)) for c in COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip() for line in cells)


class SweepSummary(Callback):
    """Collects a row per job (its overrides, return value, summary.json, wall time) into summary.csv and a table."""

    def __init__(self, filename: str = "summary.csv") -> None:
        self.filename = filename
        self.sweep_dir: Path | None = None
        self.fixed: set[str] = set()  # keys the command line sets for every job: not what tells rows apart
        self.rows: list[dict[str, Any]] = []
        self.started = 0.0
        self.reported = False

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.sweep_dir = Path(config.hydra.sweep.dir)
        parsed = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
        swept = {o.get_key_element() for o in parsed if o.is_sweep_override()}
        self.fixed = {o.get_key_element() for o in parsed} - swept
        atexit.register(self.report)  # a failed job raises out of the sweeper before on_multirun_end

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if self.sweep_dir is None:  # a single run (no -m): nothing to summarize
            return
        self.started = time.perf_counter()
        overrides = {o.partition("=")[0]: o for o in config.hydra.overrides.task}  # a key given twice: the last
        shown = " ".join(o for key, o in overrides.items() if key not in self.fixed)
        self.rows.append({"job": config.hydra.job.num, "overrides": shown, "error": UNFINISHED})
        self.write()

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if self.sweep_dir is None:
            return
        row = self.rows[-1]
        row["wall_time_s"] = round(time.perf_counter() - self.started, 2)
        if job_return.status == JobStatus.COMPLETED:
            row["error"] = None
            row["best_val_loss"] = float(job_return.return_value)
        else:
            error = job_return._return_value  # .return_value would raise it
            row["error"] = f"{type(error).__name__}: {error}".splitlines()[0]
        summary = job_summary(Path(config.hydra.runtime.output_dir))
        row["final_val_loss"], row["steps"] = summary.get("final_val_loss"), summary.get("steps")
        self.write()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self.report()

    def write(self) -> None:
        assert self.sweep_dir is not None
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        with open(self.sweep_dir / self.filename, "w", newline="") as f:
            writer = csv.DictWriter(f, COLUMNS)
            writer.writeheader()
            writer.writerows({c: row.get(c) for c in COLUMNS} for row in self.rows)

    def report(self) -> None:
        """Print the table once, at the end of the sweep (or at exit, when a failed job ended it)."""
        if self.reported or not self.rows:
            return
        self.reported = True
        print(f"\nsweep: {len(self.rows)} jobs, in {self.sweep_dir / self.filename}")
        print(format_table(self.rows), flush=True)
