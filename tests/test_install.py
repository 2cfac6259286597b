"""minitx as an installed package: the wheel ships conf/, an installed copy trains and samples from outside the repo,
and a user's own config directory composes with minitx's (`minitx-train --config-dir ./my_conf experiment=my_exp`)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, make_text

import minitx

GROUPS = ("data", "experiment", "hparams_search", "hydra", "logger", "model", "optim", "tokenizer", "trainer")
SMOKE = ["model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=32", "data.batch_size=8",
         "data.val_batches=2", "trainer.max_steps=5", "trainer.val_check_interval=5", "trainer.log_every_n_steps=1",
         "trainer.enable_progress_bar=false", "sample.max_new_tokens=10", "logger=csv"]


def repo_configs() -> set[str]:
    return {p.relative_to(ROOT / "conf").as_posix() for p in (ROOT / "conf").rglob("*.yaml")}


def run(args: list[str], cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    """A child process that imports minitx only from `pythonpath` (the installed copy) or, without it, as the
    parent does."""
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run(args, capture_output=True, text=True, cwd=cwd, env=env, timeout=240)


def test_config_dir_holds_every_config() -> None:
    from minitx.resources import config_dir

    found = Path(config_dir())
    assert (found / "train.yaml").is_file()
    for group in GROUPS:
        assert list((found / group).glob("*.yaml")), f"no configs in {found / group}"
    assert {p.relative_to(found).as_posix() for p in found.rglob("*.yaml")} == repo_configs()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel `pip install .` would build, from a copy of the sources (the build leaves build/ and egg-info)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("minitx", "conf"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("dist")
    result = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                  "-w", str(out), str(src)], cwd=src)
    assert result.returncode == 0, result.stderr[-3000:]
    (path,) = out.glob("minitx-*.whl")
    return path


@pytest.mark.slow
def test_wheel_ships_every_config(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {n.removeprefix("minitx/conf/") for n in names if n.startswith("minitx/conf/") and n.endswith(".yaml")}
    assert shipped == repo_configs()
    assert not [n for n in names if n.startswith(("conf/", "tests/"))], "only the minitx package is installed"


@pytest.mark.slow
def test_installed_wheel_trains_and_samples_outside_the_repo(wheel: Path, tmp_path: Path) -> None:
    """The wheel's contents alone on the import path (the venv supplies torch etc.), run from a directory that has
    no conf/: what `pip install .` gives a user."""
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    work = tmp_path / "elsewhere"
    work.mkdir()
    (work / "corpus.txt").write_text(make_text(500))
    run_dir = tmp_path / "run"
    result = run([sys.executable, "-m", "minitx.train", *SMOKE, "data.path=corpus.txt", f"hydra.run.dir={run_dir}"],
                 cwd=work, pythonpath=site)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = run_dir / "checkpoints" / "best.ckpt"
    assert f"checkpoint: {ckpt}" in result.stdout
    result = run([sys.executable, "-m", "minitx.sample", f"ckpt={ckpt}", "prompt=the ", "max_new_tokens=20"],
                 cwd=work, pythonpath=site)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("the ") and len(result.stdout) >= 20
    # the run used the installed copy and its configs, not a source checkout's
    where = run([sys.executable, "-c", "import minitx.resources as r; print(r.__file__); print(r.config_dir())"],
                cwd=work, pythonpath=site)
    assert where.returncode == 0, where.stderr[-3000:]
    assert where.stdout.split() == [str(site / "minitx" / "resources.py"), str(site / "minitx" / "conf")]


def write_user_conf(root: Path) -> Path:
    """A user's config directory outside minitx: an experiment that picks their own model option and overrides it."""
    conf = root / "my_conf"
    (conf / "model").mkdir(parents=True)
    (conf / "experiment").mkdir()
    (conf / "model" / "tiny.yaml").write_text(
        "defaults:\n  - gpt            # minitx's model/gpt.yaml, then these\n  - _self_\n"
        "n_layer: 1\nn_head: 2\nn_embd: 24\nblock_size: 32\n")
    (conf / "experiment" / "my_exp.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /model: tiny\n  - override /logger: csv\n\n"
        "name: my_exp\nmodel:\n  n_layer: 2\n")
    return conf


@pytest.mark.slow
def test_user_config_dir_composes_with_minitx_configs(tmp_path: Path) -> None:
    conf = write_user_conf(tmp_path)
    (tmp_path / "corpus.txt").write_text(make_text(500))
    run_dir = tmp_path / "run"
    overrides = [o for o in SMOKE if not o.startswith(("model.", "logger="))]
    result = run(["minitx-train", "--config-dir", str(conf), "experiment=my_exp", *overrides, "data.path=corpus.txt",
                  f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    assert saved["name"] == "my_exp"
    assert (saved["model"]["n_layer"], saved["model"]["n_embd"]) == (2, 24)  # the experiment's, the user's tiny's
    assert saved["model"]["attention"] == "sdpa"  # minitx's gpt.yaml underneath
    assert (run_dir / "csv" / "metrics.csv").is_file()  # logger=csv from the experiment
    config = minitx.load(run_dir / "checkpoints" / "best.ckpt").config
    assert (config.n_layer, config.n_head, config.n_embd) == (2, 2, 24)


def test_user_group_option_is_found_on_the_command_line(tmp_path: Path) -> None:
    """`model=tiny` from the user's directory with no experiment; `--cfg job` composes and prints without training."""
    conf = write_user_conf(tmp_path)
    result = run(["minitx-train", "--config-dir", str(conf), "model=tiny", "--cfg", "job"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = yaml.safe_load(result.stdout)
    assert (printed["name"], printed["model"]["n_layer"], printed["model"]["n_embd"]) == ("default", 1, 24)
    assert printed["data"]["batch_size"] == 16  # the rest still from minitx's groups
