"""`minitx-plot <run directory ...> [out=curves.png] [x=both]`: the learning curves of minitx-train runs in one picture,
val/loss (and train/loss, thinner) against the optimizer step and against wall time, one colour per run.

A run's numbers come from its csv/metrics.csv (logger=csv) or, without one, from its offline wandb run (logger=wandb;
wandb/offline-run-*/run-*.wandb, read record by record here: wandb 0.31 has no reader of its own in Python).
Shell globs give the directories: `minitx-plot outputs/shakespeare_char/* outputs/shakespeare_char_fast/*`.
"""

from __future__ import annotations

import csv
import json
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path

from minitx.cli import run_command
from minitx.config import fail

USAGE = """usage: minitx-plot <run directory ...> [key=value ...]
  minitx-plot outputs/shakespeare_char/* outputs/shakespeare_char_fast/* out=docs/curves.png"""


@dataclass
class PlotConfig:
    out: str = "curves.png"  # the PNG to write
    x: str = "both"  # step | time | both: panels against the optimizer step, wall seconds of training, or both
    dpi: int = 100  # the picture is (6.4 x panels) x 4.8 inches at this many pixels an inch

    def validate(self) -> PlotConfig:
        if self.x not in ("step", "time", "both"):
            fail("x", self.x, "choose step, time or both")
        if self.dpi <= 0:
            fail("dpi", self.dpi, "must be > 0")
        return self


@dataclass
class Curves:
    """One run's logged numbers: metric -> {step: (value, wall seconds of training when it was logged, if known)}."""

    label: str
    points: dict[str, dict[int, tuple[float, float | None]]] = field(default_factory=dict)

    def add(self, row: dict[str, float], step: int) -> None:
        """A logged row; a step logged twice (a resumed run) keeps the later value."""
        when = row.get("time")
        for name, value in row.items():
            if name not in ("time", "step"):
                self.points.setdefault(name, {})[step] = (value, when)

    def series(self, name: str, x: str) -> tuple[list[float], list[float]]:
        """`name` against the step (x="step") or against wall seconds (x="time"; rows without a time left out)."""
        points = sorted(self.points.get(name, {}).items())
        if x == "step":
            return [step for step, _ in points], [value for _, (value, _) in points]
        timed = [(when, value) for _, (value, when) in points if when is not None]
        return [when for when, _ in timed], [value for _, value in timed]


def run_label(run: Path) -> str:
    """The run's config name (.hydra/config.yaml's `name`, e.g. the experiment) and its folder name."""
    config = run / ".hydra" / "config.yaml"
    if config.is_file():
        from omegaconf import OmegaConf

        name = OmegaConf.load(config).get("name")
        if name and name != run.resolve().name:
            return f"{name}/{run.resolve().name}"
    return run.resolve().name


def read_csv(path: Path, curves: Curves) -> None:
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            numbers = {k: float(v) for k, v in row.items() if k and v not in ("", None)}
            if "step" in numbers:
                curves.add(numbers, int(numbers["step"]))


def wandb_records(path: Path) -> list[bytes]:
    """The records of a .wandb file: LevelDB's log format (32 KiB blocks of chunks, each a 7-byte header: crc32c,
    length, type FULL=1 | FIRST=2 | MIDDLE=3 | LAST=4) after a 7-byte header of its own (":W&B", magic, version)."""
    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError("not a .wandb file")
    records, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # too little room left in the block for a chunk header: padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 or pos + 7 + length > len(data):  # the end of a file still being written
            break
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            records.append(pending)
    return records


def read_wandb(path: Path, curves: Curves) -> None:
    """The history rows of an offline wandb run, at Lightning's step (trainer/global_step)."""
    from wandb.proto import wandb_internal_pb2

    for data in wandb_records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") != "history":
            continue
        row = {}
        for item in record.history.item:
            key = item.key or "/".join(item.nested_key)
            value = json.loads(item.value_json)
            if isinstance(value, (int, float)) and not key.startswith("_"):
                row[key] = float(value)
        if "trainer/global_step" in row:
            curves.add(row, int(row.pop("trainer/global_step")))


def read_run(directory: str) -> Curves:
    """A run directory's curves; one line naming the directory when it has none."""
    run = Path(directory)
    if not run.is_dir():
        fail("run", directory, "no such run directory")
    curves = Curves(run_label(run))
    if (run / "csv" / "metrics.csv").is_file():
        read_csv(run / "csv" / "metrics.csv", curves)
    else:
        from google.protobuf.message import DecodeError

        for path in sorted(run.glob("wandb/offline-run-*/run-*.wandb")):
            try:
                read_wandb(path, curves)
            except (ValueError, DecodeError) as e:  # a foreign or damaged file: say which
                fail("run", directory, f"cannot read {path}: {e}")
    if "val/loss" not in curves.points:
        fail("run", directory, "no val/loss logged (csv/metrics.csv or an offline wandb run; logger=none logs none)")
    return curves


def plot(runs: list[str], cfg: PlotConfig) -> None:
    """Draw every run's curves into cfg.out."""
    if not runs:
        fail("runs", runs, "name at least one run directory: minitx-plot outputs/<name>/* [key=value ...]")
    all_curves = [read_run(run) for run in runs]
    axes_x = ["step", "time"] if cfg.x == "both" else [cfg.x]
    if "time" in axes_x:
        for run, curves in zip(runs, all_curves, strict=True):
            if not curves.series("val/loss", "time")[0]:
                fail("run", run, "no `time` logged (runs from before minitx logged it); use x=step")

    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(axes_x), figsize=(6.4 * len(axes_x), 4.8), dpi=cfg.dpi, squeeze=False)
    for ax, x in zip(axes[0], axes_x, strict=True):
        for i, curves in enumerate(all_curves):
            color = f"C{i % 10}"
            ax.plot(*curves.series("train/loss", x), color=color, linewidth=0.8, alpha=0.5)
            ax.plot(*curves.series("val/loss", x), color=color, linewidth=2, marker="o", markersize=3,
                    label=curves.label)
        ax.set_xlabel("optimizer step" if x == "step" else "wall time of training (s)")
        ax.set_ylabel("loss")
        ax.set_title(f"val/loss (thin: train/loss) against {'step' if x == 'step' else 'wall time'}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(cfg.out)
    plt.close(fig)
    print(f"wrote {cfg.out} ({len(all_curves)} runs)")


def main(argv: list[str] | None = None) -> None:
    """The minitx-plot console script: arguments without '=' (or naming a directory) are run directories."""
    argv = sys.argv[1:] if argv is None else argv
    runs = [a for a in argv if not a.startswith("-") and ("=" not in a or Path(a).is_dir())]
    options = [a for a in argv if a not in runs]
    run_command(PlotConfig, USAGE, lambda cfg: plot(runs, cfg), options)


if __name__ == "__main__":
    main()
