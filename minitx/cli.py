"""What every minitx command shares: `key=value` arguments read into a validated dataclass, `--help` that lists the
keys with their defaults, and one error path (a user error is one line on stderr and exit status 2).

minitx-train reads its arguments through Hydra (it composes conf/); the other commands read them here."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import typing
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from minitx.config import ConfigError, MinitxError, fail, field_notes, from_mapping

T = TypeVar("T")


@contextlib.contextmanager
def exit_on_user_error() -> Iterator[None]:
    """A MinitxError becomes one line on stderr and exit status 2 (HYDRA_FULL_ERROR=1 shows the traceback)."""
    try:
        yield
    except MinitxError as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def resolve_device(setting: str) -> str:
    """device=auto | cpu | cuda as the device to run on: auto is cuda where there is one; cuda without one is a
    one-line error."""
    import torch

    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cuda" and not torch.cuda.is_available():
        fail("device", setting, "no CUDA device here; use device=cpu")
    return setting


def parse_key_values(cls: type[T], argv: list[str]) -> T:
    """Dataclass `cls` from `key=value` arguments over its defaults; a field that is itself a dataclass takes
    `field.key=value` (data.path=...). Values are taken literally (no YAML parsing): a string keeps its spaces and
    quotes (prompt="def "); a number or a bool (true/false/1/0) is read where the key's type says so."""
    keys = _key_types(cls)
    values: dict[str, Any] = {}
    for arg in argv:
        key, sep, raw = arg.partition("=")
        if not sep:
            raise ConfigError(f"{arg!r}: expected key=value (--help lists the keys)")
        if key not in keys:
            raise ConfigError(f"{key}: unknown key; known keys are {sorted(keys)}")
        *sections, name = key.split(".")
        into = values
        for section in sections:
            into = into.setdefault(section, {})
        into[name] = _read(raw, keys[key], key)
    return from_mapping(cls, values)


def _key_types(cls: type, prefix: str = "") -> dict[str, Any]:
    """Every key of dataclass `cls` and its type, a nested dataclass's keys as `field.key`, in field order."""
    hints = typing.get_type_hints(cls)
    keys: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            keys |= _key_types(hint, f"{prefix}{f.name}.")  # type: ignore[arg-type]
        else:
            keys[prefix + f.name] = hint
    return keys


def _read(raw: str, hint: Any, key: str) -> Any:
    """A command-line string as the value a field of type `hint` holds; strings stay exactly as typed."""
    options = typing.get_args(hint) or (hint,)
    if str in options:
        return raw
    try:
        if bool in options:
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return raw.lower() in ("true", "1")
        return int(raw) if int in options else float(raw)
    except ValueError:
        wanted = " or ".join(o.__name__ for o in options if o is not type(None))
        raise ConfigError(f"{key}={raw!r}: expected {wanted}") from None


def help_text(cls: type, usage: str) -> str:
    """`usage`, then each key with its default and what it means (the dataclass's trailing comments)."""
    rows = _help_rows(cls, cls())
    width = max(len(key) for key, _ in rows) + 2
    return usage.rstrip() + "\n\nkeys (key=value; default shown):\n" + "".join(
        f"{key:<{width}}{note}".rstrip() + "\n" for key, note in rows)


def _help_rows(cls: type, defaults: Any, prefix: str = "") -> list[tuple[str, str]]:
    from minitx.config_files import scalar

    notes = field_notes(cls)
    rows: list[tuple[str, str]] = []
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(value):
            rows += _help_rows(type(value), value, f"{prefix}{f.name}.")
        else:
            rows.append((f"  {prefix}{f.name}={scalar(value)}", notes.get(f.name, "")))
    return rows


def run_command(cls: type[T], usage: str, action: Callable[[T], None], argv: list[str] | None = None) -> None:
    """A console script: `--help` prints the keys; otherwise parse, validate (cls.validate) and run `action`."""
    argv = sys.argv[1:] if argv is None else argv
    if any(arg in ("-h", "--help") for arg in argv):
        print(help_text(cls, usage), end="")
        return
    with exit_on_user_error():
        config = parse_key_values(cls, argv)
        action(config.validate() if hasattr(config, "validate") else config)
