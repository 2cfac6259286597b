"""A wandb run as a user finds it: a tiny training logged offline, read back from the run's own .wandb file with
wandb's record format (wandb 0.31 ships no Python reader of it); summary.json and the printed end-of-run block."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import make_text
from test_train import TINY, compose_config

from minitx.train import parse_config, train

SUMMARY_KEYS = ["name", "task", "best_val_loss", "best_step", "final_val_loss", "steps", "tokens_seen", "wall_time_s",
                "tokens_per_sec", "mfu", "checkpoint", "tokens_per_step"]


def wandb_records(path: Path) -> Iterator[Any]:
    """The Records of a run-<id>.wandb file: a 7-byte header (":W&B", magic, version), then LevelDB's log format
    (32 KiB blocks of chunks: crc32, length, type FULL=1 / FIRST / MIDDLE / LAST=4), each record a protobuf."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if pos + 7 + length > len(data):  # still being written
            return
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def items(updates: Any) -> dict[str, Any]:
    """A config / history / summary record's items as {"a/b" or "a.b.c": value}."""
    return {item.key or ".".join(item.nested_key): json.loads(item.value_json) for item in updates}


@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A 40-step run logged to wandb offline, with two table prompts and log_model; its directory and its stdout."""
    import contextlib
    import io

    root = tmp_path_factory.mktemp("wandb-run")
    (root / "corpus.txt").write_text(make_text(1000))
    cfg = compose_config(*TINY, f"data.path={root / 'corpus.txt'}", "logger=wandb", "trainer.max_steps=40",
                         "trainer.val_check_interval=20", "logger.log_model=true", 'sample.prompts=["the ","a b"]',
                         "sample.table_tokens=8", "sample.max_new_tokens=10", "name=tiny")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        train(parse_config(cfg), root)
    return root, out.getvalue()


def records_of(root: Path) -> dict[str, list[Any]]:
    """The run's records by kind, once its exit record is written (wandb's service writes the file on its own time:
    run.finish() may return first)."""
    import time

    [path] = (root / "wandb").glob("offline-run-*/run-*.wandb")
    deadline = time.monotonic() + 30
    while True:
        records = list(wandb_records(path))
        if (records and records[-1].WhichOneof("record_type") == "exit") or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    kinds: dict[str, list[Any]] = {}
    for record in records:
        kind = record.WhichOneof("record_type")
        kinds.setdefault(kind, []).append(getattr(record, kind))
    return kinds


def test_the_wandb_run_holds_config_metrics_samples_and_summary(wandb_run: tuple[Path, str]) -> None:
    root, _ = wandb_run
    records = records_of(root)
    [run] = records["run"]
    assert (run.display_name, run.run_group, run.job_type) == ("tiny", "tiny", "causal_lm")
    config = {k: v for c in records["config"] for k, v in items(c.update).items()}
    assert config["model"]["n_layer"] == 2 and config["optim"]["lr"] == 3e-3  # nested as in conf/
    assert config["sample"]["prompts"] == ["the ", "a b"]

    history = [items(h.item) for h in records["history"]]
    val = [(h["trainer/global_step"], h["val/loss"]) for h in history if "val/loss" in h]
    assert [step for step, _ in val] == [0, 20, 40] and val[-1][1] < val[0][1]
    assert [h["trainer/global_step"] for h in history if "train/loss" in h] == [10, 20, 30, 40]

    tables = [h for h in history if "samples._type" in h]  # one table per evaluation, all rows so far
    assert [h["samples.nrows"] for h in tables] == [2, 4, 6]
    table = json.loads(next((root / "wandb").glob(f"offline-run-*/files/{tables[-1]['samples.path']}")).read_text())
    assert table["columns"] == ["step", "prompt", "continuation"]
    assert [row[:2] for row in table["data"]] == [[s, p] for s in (0, 20, 40) for p in ("the ", "a b")]
    assert all(isinstance(row[2], str) and row[2] for row in table["data"])

    summary = {k: v for s in records["summary"] for k, v in items(s.update).items()}
    written = json.loads((root / "summary.json").read_text())
    assert {k: summary[f"run/{k}"] for k in SUMMARY_KEYS[2:]} == {k: written[k] for k in SUMMARY_KEYS[2:]}
    assert summary["run/best_val_loss"] == pytest.approx(val[-1][1])


def test_log_model_stores_best_ckpt_as_a_model_artifact(wandb_run: tuple[Path, str]) -> None:
    root, _ = wandb_run
    [model] = [a for a in records_of(root)["artifact"] if a.type == "model"]
    assert model.name.startswith("model-")
    assert json.loads(model.metadata)["model"]["n_embd"] == 32  # the run config
    assert [f.path for f in model.manifest.contents] == ["best.ckpt"]


def test_summary_json_and_the_printed_block(wandb_run: tuple[Path, str]) -> None:
    root, stdout = wandb_run
    summary = json.loads((root / "summary.json").read_text())
    assert list(summary) == SUMMARY_KEYS
    assert (summary["name"], summary["task"], summary["steps"], summary["best_step"]) == ("tiny", "causal_lm", 40, 40)
    assert summary["tokens_seen"] == 40 * 16 * 32  # batches x batch_size x block_size
    assert summary["final_val_loss"] == summary["best_val_loss"] < 3.5
    assert summary["wall_time_s"] > 0 and summary["tokens_per_sec"] > 0 and 0 < summary["mfu"] < 1
    assert summary["checkpoint"] == str(root / "checkpoints" / "best.ckpt")
    [sync_dir] = (root / "wandb").glob("offline-run-*")
    block = stdout[stdout.index("run tiny (causal_lm): 40 steps, 20,480 tokens in "):]
    lines = block.splitlines()
    best, final = summary["best_val_loss"], summary["final_val_loss"]
    assert lines[1] == f"val/loss: best {best:.4f} at step 40, final {final:.4f}"
    assert lines[2:5] == [f"checkpoint: {summary['checkpoint']}", f"wandb (offline): wandb sync {sync_dir}", "sample:"]


def test_a_masked_lm_logs_its_fills(tmp_path: Path) -> None:
    (tmp_path / "corpus.txt").write_text(make_text(500))
    cfg = compose_config(*TINY, f"data.path={tmp_path / 'corpus.txt'}", "logger=wandb", "task=masked_lm",
                         "trainer.max_steps=10", "trainer.val_check_interval=10",
                         'sample.prompts=["the [MASK] cat", "no mask here"]', "sample.prompt='the [MASK]'")
    train(parse_config(cfg), tmp_path)
    [run] = records_of(tmp_path)["run"]
    assert run.job_type == "masked_lm"
    [path] = sorted((tmp_path / "wandb").glob("offline-run-*/files/media/table/samples_*.table.json"),
                    key=lambda p: int(p.name.split("_")[1]))[-1:]
    table = json.loads(path.read_text())
    assert table["columns"] == ["step", "prompt", "fills"]
    assert [row[:2] for row in table["data"]] == [[0, "the [MASK] cat"], [10, "the [MASK] cat"]]  # no [MASK]: no row
    assert table["data"][-1][2].count("'") == 10  # five fills, each a quoted token with its probability
    assert json.loads((tmp_path / "summary.json").read_text())["task"] == "masked_lm"


def test_a_failed_run_finishes_its_wandb_run(tmp_path: Path) -> None:
    """A job of a sweep that fails must not leave its wandb run open for the next job to log into."""
    import lightning as L
    import wandb

    class Boom(L.Callback):
        def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
            if trainer.global_step == 3:
                raise RuntimeError("boom")

    (tmp_path / "corpus.txt").write_text(make_text(500))
    config = parse_config(compose_config(*TINY, f"data.path={tmp_path / 'corpus.txt'}", "logger=wandb",
                                         "trainer.max_steps=10", "sample.table_tokens=0"))
    with pytest.raises(RuntimeError, match="boom"):
        train(config, tmp_path / "run", callbacks=[Boom()])
    assert wandb.run is None
