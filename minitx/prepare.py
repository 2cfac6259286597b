"""`minitx-prepare`: tokenize a corpus into the token-shard cache ahead of training, with the same arguments.

It composes the same Hydra config as minitx-train (conf/train.yaml, `experiment=`, `data.*`, `tokenizer.*`, and
`prepare.*` for how), so `minitx-prepare experiment=X` prepares exactly what `minitx-train experiment=X` reads,
through the task's own data preparation; it creates no run directory. Resumable: run it again after an interruption.

    minitx-prepare data.path=corpus/ tokenizer=bpe tokenizer.vocab_size=8192 prepare.num_proc=8
"""

from __future__ import annotations

import logging
import sys
import time

USAGE = """usage: minitx-prepare [key=value ...]   (the keys of minitx-train; see `minitx-train --help`)

Tokenizes the corpus minitx-train would read (data.*, tokenizer.*, experiment=) into token shards in
data.cache_dir (default $MINITX_CACHE or ~/.cache/minitx). prepare.num_proc=N tokenizes with N processes;
prepare.shard_bytes sets the text per shard. An interrupted run resumes; a prepared corpus is reused.
"""


def compose(overrides: list[str]):
    """The TrainConfig minitx-train would run with these overrides, from conf/ (no Hydra run directory)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    from minitx.config import ConfigError
    from minitx.train import CONF_DIR, parse_config

    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = hydra_compose(config_name="train", overrides=overrides)
    except HydraException as e:  # an unknown key or group option: Hydra's own one-line message
        raise ConfigError(str(e).strip().splitlines()[0]) from None
    return parse_config(cfg)


def main(argv: list[str] | None = None) -> None:
    from minitx.cli import exit_on_user_error

    argv = sys.argv[1:] if argv is None else argv
    if any(arg in ("-h", "--help") for arg in argv):
        print(USAGE, end="")
        return
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    with exit_on_user_error():
        from minitx.tasks import task_class

        config = compose(argv)
        t0 = time.perf_counter()
        prepared = task_class(config.task).prepare(config)
        data = prepared.data
        where = f" in {data.cache_dir}" if hasattr(data, "cache_dir") else ""
        print(f"prepared: {prepared.description}{where} ({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
