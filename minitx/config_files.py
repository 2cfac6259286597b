"""conf/'s group files and train.yaml, written from the dataclasses in minitx.config: every default has one home.

The dataclasses hold each default and, in a trailing comment, what it means; the YAML files Hydra composes are
renderings of them (a test fails when one is out of date). After changing a default or a comment there:

    python -m minitx.config_files          # rewrites conf/ in the source tree
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from minitx.config import (
    DataConfig,
    LoggerConfig,
    ModelConfig,
    OptimConfig,
    TokenizerConfig,
    TrainConfig,
    TrainerConfig,
    field_notes,
)

GENERATED = "# Written by `python -m minitx.config_files` from minitx/config.py, each default's one home: edit there."

TRAIN_HEADER = """\
# minitx-train: a run is composed from the groups below, in this order; any key can be overridden:
#   minitx-train model.n_layer=6 optim.lr=3e-4 trainer.max_steps=500
#   minitx-train experiment=shakespeare_char data.path=input.txt
#   minitx-train -m model.attention=naive,sdpa          # a sweep, one run per value; a table at its end
defaults:
  - model: gpt
  - tokenizer: char            # tokenizer=bpe, or tokenizer.path=<tokenizer.json>
  - data: builtin              # data.path=<file or dir> or data.hub_id=<Hub dataset> instead
  - optim: adamw
  - trainer: default
  - logger: wandb              # logger=csv, logger=none
  - hydra: default
  - _self_
  - experiment: null           # experiment=<name>: a file in conf/experiment/ that overrides all of the above
  - hparams_search: null       # -m hparams_search=optuna: an Optuna search (conf/hparams_search/optuna.yaml)
"""

# conf/<group>/<option>.yaml: (what the option is, its settings)
GROUP_FILES: dict[str, tuple[str, Any]] = {
    "model/gpt.yaml": ("The transformer: a GPT (task=causal_lm) or an encoder (masked_lm, classify) on the same "
                       "blocks.\n# Sized to train the built-in corpus in 1-2 minutes on 2 CPU cores.", ModelConfig()),
    "tokenizer/char.yaml": ("One token per character of the training split (plus the special tokens).",
                            TokenizerConfig(kind="char", vocab_size=0)),
    "tokenizer/bpe.yaml": ("Byte-level BPE trained on the training split.", TokenizerConfig(kind="bpe")),
    "data/builtin.yaml": ("The built-in corpus (the running Python's top-level standard-library modules) unless "
                          "path or hub_id is set.", DataConfig()),
    "optim/adamw.yaml": ("AdamW, weight decay on matrices only; linear warmup, then cosine decay to min_lr "
                         "(schedule=wsd: hold, then a linear decay).", OptimConfig()),
    "optim/muon.yaml": ("Muon (torch.optim.Muon) for the blocks' matrices at muon_lr, AdamW at lr for embeddings, "
                        "head, norms and biases;\n# one schedule scales both.", OptimConfig(name="muon")),
    "trainer/default.yaml": ("Passed to lightning.Trainer under the same names; gradient_clip_val and "
                             "accumulate_grad_batches are applied\n# by minitx's own optimizer step "
                             "(minitx.tasks.Task), with the same meaning.", TrainerConfig()),
    "trainer/ddp.yaml": ("Data parallel (DDP): one process per device, gradients all-reduced; multi-node: "
                         "trainer.num_nodes=N under torchrun or srun\n# (docs/distributed.md). With "
                         "trainer.tokens_per_step set, the optimizer steps do not depend on the number of processes.",
                         TrainerConfig(strategy="ddp", devices="auto")),
    "trainer/fsdp.yaml": ("Fully sharded data parallel (FSDP2 through Lightning's ModelParallelStrategy): parameters, "
                          "gradients and optimizer\n# state sharded over the processes; launched and sized as "
                          "trainer=ddp (docs/distributed.md).", TrainerConfig(strategy="fsdp", devices="auto")),
    "logger/wandb.yaml": ("Weights & Biases, offline unless an API key is set and the server answers "
                          "(sync later: wandb sync outputs/...).", LoggerConfig(kind="wandb")),
    "logger/csv.yaml": ("metrics.csv in the run directory.", LoggerConfig(kind="csv")),
    "logger/none.yaml": ("No logger: the console only.", LoggerConfig(kind="none")),
}
GROUPS = {name.split("/")[0] for name in GROUP_FILES}  # TrainConfig's sections that come from a group


def scalar(value: Any) -> str:
    """`value` as a YAML scalar that Hydra (OmegaConf's YAML loader) reads back as the same value."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return ".nan" if math.isnan(value) else ("-.inf" if value < 0 else ".inf")
        text = repr(value)
        return text.replace("e", ".0e", 1) if "e" in text and "." not in text else text  # YAML 1.1 wants 1.0e-05
    if isinstance(value, list):  # a flow list, each item quoted: a comma or a bracket in it stays inside it
        return "[" + ", ".join(json.dumps(item.replace("${", "\\${")) if isinstance(item, str) else scalar(item)
                               for item in value) + "]"
    if isinstance(value, str):
        text = value.replace("${", "\\${")  # text, not an interpolation
        return text if value and _reads_back(text, value) else json.dumps(text)
    return json.dumps(value)


def _reads_back(text: str, value: str) -> bool:
    try:
        return OmegaConf.to_container(OmegaConf.create(f"k: {text}"), resolve=True) == {"k": value}
    except Exception:  # not valid YAML unquoted
        return False


def section_lines(obj: Any, indent: str = "", skip: set[str] = frozenset()) -> list[tuple[str, str]]:
    """(line, trailing comment) for every field of dataclass `obj`, nested sections indented."""
    notes = field_notes(type(obj))
    lines: list[tuple[str, str]] = []
    for f in dataclasses.fields(obj):
        if f.name in skip:
            continue
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            lines.append((f"{indent}{f.name}:", notes.get(f.name, "")))
            lines += section_lines(value, indent + "  ")
        else:
            lines.append((f"{indent}{f.name}: {scalar(value)}", notes.get(f.name, "")))
    return lines


def aligned(lines: list[tuple[str, str]]) -> str:
    width = max(len(line) for line, _ in lines) + 2
    return "".join(f"{line:<{width}}# {note}".rstrip() + "\n" if note else line + "\n" for line, note in lines)


def render(name: str) -> str:
    """The text of conf/`name` (train.yaml or a file of GROUP_FILES)."""
    if name == "train.yaml":
        header = TRAIN_HEADER.replace("defaults:", f"{GENERATED}\ndefaults:", 1)  # after what the file is for
        return f"{header}\n" + aligned(section_lines(TrainConfig(), skip=GROUPS))
    about, settings = GROUP_FILES[name]
    return f"# {about}\n{GENERATED}\n" + aligned(section_lines(settings))


def rendered_files() -> list[str]:
    return ["train.yaml", *GROUP_FILES]


SOURCE_CONF = Path(__file__).resolve().parent.parent / "conf"  # the repository's conf/ (an installed copy has none)


def stale_files(conf: Path) -> list[str]:
    """The rendered files of `conf` that are missing or differ from their rendering."""
    return [name for name in rendered_files()
            if not (conf / name).is_file() or (conf / name).read_text(encoding="utf-8") != render(name)]


def main(argv: list[str] | None = None) -> None:
    """python -m minitx.config_files [--check] [CONF_DIR]: rewrite the stale files of CONF_DIR (the repository's conf/
    by default); with --check, only name them and exit 1 if there are any."""
    argv = sys.argv[1:] if argv is None else argv
    folders = [arg for arg in argv if arg != "--check"]
    conf = Path(folders[0]) if folders else SOURCE_CONF
    if not (conf / "experiment").is_dir():
        print(f"error: {conf} is not a minitx conf/ folder (an installed minitx has none to write; name one)",
              file=sys.stderr)
        sys.exit(2)
    stale = stale_files(conf)
    if "--check" in argv:
        for name in stale:
            print(f"{conf / name} is out of date with minitx/config.py", file=sys.stderr)
        sys.exit(1 if stale else 0)
    for name in stale:
        (conf / name).write_text(render(name), encoding="utf-8")
        print(f"wrote {conf / name}")


if __name__ == "__main__":
    main()
