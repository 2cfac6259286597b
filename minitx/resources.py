"""Where minitx's YAML configs are, installed or not.

The repository keeps one copy of them in `conf/` at its root; the wheel maps that folder into the package as
`minitx/conf/` (pyproject.toml's `package-dir`), so the same function serves a wheel, an editable install and a
source checkout on PYTHONPATH.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def config_dir() -> str:
    """The directory holding train.yaml and the config groups, as an absolute path for Hydra."""
    installed = files("minitx") / "conf"  # a wheel (pip install ., a Docker image, a cluster node)
    if isinstance(installed, Path) and installed.is_dir():
        return str(installed.resolve())
    return str(Path(__file__).resolve().parent.parent / "conf")  # a source checkout or an editable install
