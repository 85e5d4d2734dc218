"""Loading experiment configs by the same spelling as `ml_collections.config_flags`: `configs/dmlab.py:convt3`
and `--config.backbone=s5`-style overrides, for callers that do not use absl flags (the `teco-ssm` command).
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path
from typing import Sequence

import ml_collections


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Builds the config `path.py[:arg]` and applies overrides `a.b=value` (values parsed as Python literals).

    A path that does not exist on disk is looked up among the installed `configs` package
    (`configs/mazelab.py` -> `configs.mazelab`). A `.json` file is a workdir's `config.json` (as `train` and
    `teco-ssm convert-teco` write it), read as it is. Unknown fields are an error naming the field.
    """
    path, _, arg = spec.partition(":")
    config = _json_config(Path(path)) if path.endswith(".json") else _python_config(path, arg)
    for item in overrides:
        apply_override(config, item)
    return config


def _python_config(path: str, arg: str) -> ml_collections.ConfigDict:
    """`get_config(arg)` of the config file `path`, or of the installed `configs` module of that name."""
    file = Path(path)
    if file.exists():
        module_spec = importlib.util.spec_from_file_location(f"_config_{file.stem}", file)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(f"configs.{file.stem}")
        except ModuleNotFoundError:
            raise FileNotFoundError(f"config file {path} does not exist (nor an installed configs.{file.stem})")
    return module.get_config(arg) if arg else module.get_config()


def _json_config(file: Path) -> ml_collections.ConfigDict:
    """A workdir's config.json as a config: FileNotFoundError / ValueError naming the file."""
    import json

    try:
        with open(file) as f:
            values = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"config file {file} does not exist") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{file}: not valid JSON ({error})") from None
    if not isinstance(values, dict):
        raise ValueError(f"{file}: expected a config (a JSON object), found {type(values).__name__}")
    return ml_collections.ConfigDict(values)


def apply_override(config: ml_collections.ConfigDict, item: str) -> None:
    """Sets one `a.b.c=value` override; the value is a Python literal or else a plain string."""
    key, sep, text = item.partition("=")
    if not sep:
        raise ValueError(f"override {item!r} must look like field.name=value")
    key = key.removeprefix("--").removeprefix("config.")
    *parents, leaf = key.split(".")
    node = config
    for i, name in enumerate(parents):
        if name not in node:
            raise ValueError(f"override {item!r}: config has no field {'.'.join(parents[:i + 1])}")
        node = node[name]
    if leaf not in node:
        raise ValueError(f"override {item!r}: config has no field {key}; fields of "
                         f"{'.'.join(parents) or 'config'}: {', '.join(sorted(node.keys()))}")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    current = node[leaf]
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    try:
        node[leaf] = value  # a locked config still takes new values for existing fields, type-checked
    except TypeError as error:  # the field's type refuses the value: a mistake in the request
        raise ValueError(f"override {item!r}: field {key} holds {type(current).__name__} "
                         f"({current!r}); {text!r} is not one") from error
