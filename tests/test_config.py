"""Every default has one home: the dataclasses in minitx.config. conf/'s YAML files are renderings of them that must
agree key for key and value for value; experiments may only name keys the schema has."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from minitx.config import ConfigError, ModelConfig, TrainConfig, field_notes, from_mapping
from minitx.config_files import GROUP_FILES, GROUPS, main, render, rendered_files, stale_files
from minitx.resources import config_dir
from minitx.train import parse_config

CONF = Path(config_dir())


def schema_of(name: str) -> dict:
    """What conf/`name` must hold according to the dataclasses alone (not through the renderer)."""
    if name == "train.yaml":
        return {k: v for k, v in dataclasses.asdict(TrainConfig()).items() if k not in GROUPS}
    return dataclasses.asdict(GROUP_FILES[name][1])


@pytest.mark.parametrize("name", rendered_files())
def test_yaml_holds_exactly_the_schema_defaults(name: str) -> None:
    on_disk = OmegaConf.to_container(OmegaConf.load(CONF / name))
    on_disk.pop("defaults", None)
    expected = schema_of(name)
    assert set(on_disk) == set(expected), f"conf/{name}: keys only in the YAML {set(on_disk) - set(expected)}, " \
                                          f"only in the schema {set(expected) - set(on_disk)}"
    assert on_disk == expected, f"conf/{name} disagrees with minitx/config.py; run python -m minitx.config_files"
    assert (CONF / name).read_text() == render(name)  # and its comments are the dataclass's


def test_every_group_file_is_rendered_from_the_schema() -> None:
    """A hand-written option file would be a second home for its defaults (experiments, hydra/ and hparams_search/
    are not defaults)."""
    files = {p.relative_to(CONF).as_posix() for p in CONF.rglob("*.yaml")}
    assert ({f for f in files if f.split("/")[0] not in ("experiment", "hydra", "hparams_search")}
            == set(rendered_files()))


@pytest.mark.parametrize("value", ["def ", "\n", "", "1e-5", "@x", "`x", "*a", "!x", "%x", "${x}", "a: b", "#c",
                                   "yes", "null", "[MASK]", "import o[MASK]", "x\\y", 1e-5, 10000.0, float("inf"),
                                   None, True, 3, [], ["def "], ["a, b", "]x", "${x}", "it's \"q\"", "yes", "\n"]])
def test_rendered_values_read_back_as_the_same_value(value: object) -> None:
    from minitx.config_files import scalar

    assert OmegaConf.to_container(OmegaConf.create(f"k: {scalar(value)}"), resolve=True) == {"k": value}


def test_a_stale_yaml_file_is_found(tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    assert stale_files(conf) == []
    gpt = conf / "model" / "gpt.yaml"
    gpt.write_text(gpt.read_text().replace("block_size: 64", "block_size: 128"))  # disagrees
    bpe = conf / "tokenizer" / "bpe.yaml"
    bpe.write_text("\n".join(line for line in bpe.read_text().splitlines() if not line.startswith("path:")))  # lacks
    assert stale_files(conf) == ["model/gpt.yaml", "tokenizer/bpe.yaml"]
    with pytest.raises(SystemExit) as e:
        main(["--check", str(conf)])
    assert e.value.code == 1
    main([str(conf)])  # rewrites them
    assert stale_files(conf) == []


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_every_experiment_names_only_schema_keys(experiment: str) -> None:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        config = parse_config(compose("train", overrides=[f"experiment={experiment}"]))
    assert config.name == experiment


def test_every_field_is_documented_where_the_user_reads_it() -> None:
    """A key without a comment is fine when its name says it all; these say what their values mean."""
    notes = field_notes(ModelConfig)
    for key in ("attention", "pos_emb", "norm", "activation", "vocab_size", "init_from"):
        assert notes[key], key
    assert "naive | sdpa" in notes["attention"]


def test_typed_merge_keeps_one_line_errors_and_fills_defaults() -> None:
    model = from_mapping(ModelConfig, {"n_layer": 2, "dropout": 1})  # an int where a float goes is a float
    assert (model.n_layer, model.dropout, model.block_size) == (2, 1.0, ModelConfig().block_size)
    cases = [({"n_layer": "two"}, "model.n_layer='two': expected int"),
             ({"n_layr": 2}, "model.n_layr: unknown key; known keys are ['activation',"),
             ({"n_layer": None}, "model.n_layer=None: must be set"),
             ({"init_from": [1]}, "model.init_from=[1]: expected str"),
             ({"compile": 2}, "model.compile=2: expected bool"),  # a bool only where a bool goes
             ({"n_layer": True}, "model.n_layer=True: expected int"),
             ({"dropout": "0.1"}, "model.dropout='0.1': expected float")]
    for values, message in cases:
        with pytest.raises(ConfigError) as e:
            from_mapping(ModelConfig, values, "model.")
        assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)
    with pytest.raises(ConfigError, match=r"^model=5: expected a section of keys$"):
        from_mapping(TrainConfig, {"model": 5})
    assert from_mapping(TrainConfig, {"sample": {"prompts": ["def ", 3]}}).sample.prompts == ["def ", "3"]  # as str
    for prompts in ("def ", ["def ", True], [None]):
        with pytest.raises(ConfigError, match=r"^sample\.prompts=.*: expected list of str$"):
            from_mapping(TrainConfig, {"sample": {"prompts": prompts}})
    assert from_mapping(TrainConfig, {"sample": {"prompts": ["${x}", "a"]}}).sample.prompts == ["${x}", "a"]
    assert TrainConfig().sample.table_prompts == ["def "]
    resolved = {"sample": {"prompt": "echo ${HOME} \\${x}"}, "data": {"path": "a${b"}}  # already resolved: text
    config = from_mapping(TrainConfig, resolved)
    assert (config.sample.prompt, config.data.path) == ("echo ${HOME} \\${x}", "a${b")


def test_train_help_lists_the_groups_and_every_key() -> None:
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "minitx.train", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("usage: minitx-train")
    assert "experiment: classify, gpt2_124m, mlm, shakespeare_char" in result.stdout
    for field in dataclasses.fields(ModelConfig):
        assert f"  {field.name}: " in result.stdout, field.name


def test_every_config_file_says_what_it_is_for_on_its_first_line() -> None:
    """(After Hydra's `# @package` directive, which must come first.)"""
    for path in CONF.rglob("*.yaml"):
        lines = [line for line in path.read_text().splitlines() if not line.startswith("# @package")]
        assert lines[0].startswith("# ") and len(lines[0]) > 20, path
