"""Checks an experiment config before anything is compiled: every problem is a ValueError naming the field and what
was expected. The fields are those of `teco_ssm.schema` (derived from `Teco`, each backbone's settings and
`OptimizerSettings`); the value checks are those of the classes themselves (`teco.field_errors`, the settings
dataclasses, `OptimizerSettings`), run here on the model and the active backbone's blocks, plus the run's own.

    validate(config)                      # structure, values, and the dataset and tokenizer folders
    validate(config, check_paths=False)   # structure and values only (e.g. for tests and dry runs)
"""
from __future__ import annotations

import os
from typing import Any, Callable, Mapping

import ml_collections

from teco_ssm import backbones, optim, schema, teco

_FILE = "teco_ssm/config_check.py"


def _as_dict(value: Any) -> Mapping[str, Any] | None:
    if isinstance(value, ml_collections.ConfigDict):
        return value
    if isinstance(value, Mapping):
        return value
    return None


def _compare_fields(config: Mapping[str, Any], reference: Mapping[str, Any], prefix: str, errors: list[str]) -> None:
    """Unknown and missing fields of `config` against `reference` (`schema.structure()`: None for a value, a dict
    for a group), each named with the group's valid fields."""
    given, expected = set(config.keys()), set(reference.keys())
    for key in sorted(given - expected):
        errors.append(f"{prefix}{key} is not a field; expected fields of {prefix.rstrip('.') or 'config'}: "
                      f"{', '.join(sorted(expected))}")
    for key in sorted(expected - given):
        errors.append(f"{prefix}{key} is missing; expected fields of {prefix.rstrip('.') or 'config'}: "
                      f"{', '.join(sorted(expected))}")
    for key in sorted(given & expected):
        sub_config, sub_reference = _as_dict(config[key]), reference[key]
        if sub_reference is not None:
            if sub_config is None:
                errors.append(f"{prefix}{key} must be a group with fields {', '.join(sorted(sub_reference))}")
            else:
                _compare_fields(sub_config, sub_reference, f"{prefix}{key}.", errors)


def _check_values(config: ml_collections.ConfigDict, errors: list[str]) -> None:
    model = config.model

    def positive(name: str, value: Any) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            errors.append(f"config.{name} must be a positive integer, got {value!r}")

    for name in ("batch_size", "seq_len", "steps", "log_every", "checkpoint_every", "keep_checkpoints",
                 "visualise_every", "eval_batches"):
        positive(name, config[name])
    if not isinstance(config.eval_every, int) or isinstance(config.eval_every, bool) or config.eval_every < 0:
        errors.append(f"config.eval_every must be an integer >= 0 (0: no held-out loss), got {config.eval_every!r}")
    errors.extend(f"config.model.{error}" for error in teco.field_errors(model))
    if isinstance(config.seq_len, int) and config.seq_len <= model.condition_frames:
        errors.append(f"config.seq_len={config.seq_len} must exceed config.model.condition_frames="
                      f"{model.condition_frames} (at least one frame to predict)")
    name = config.backbone  # the other backbones' blocks are checked when they are chosen
    try:
        backbones.settings(name, config[name])
    except (ValueError, TypeError) as error:
        errors.append(f"config.{name}: {error}")
    try:
        optim.OptimizerSettings.of_experiment(config)
    except (ValueError, TypeError) as error:
        errors.append(f"config.optim.{name}: {error}")
    _check_sampling(config.sampling, model.condition_frames, positive, errors)


def _check_sampling(sampling: ml_collections.ConfigDict, condition_frames: int,
                    positive: Callable[[str, Any], None], errors: list[str]) -> None:
    """The sampling block read as the values the sampler takes, `Protocol` and `SamplerSettings` (their own range
    checks: temperature, top_p, draft_schedule, ...), after the checks against the model: each protocol's context
    covers the conditioning frames and its horizon is positive; draft and revision steps are positive integers."""
    from teco_ssm.sample import Protocol, SamplerSettings

    for protocol in ("action_conditioned", "unconditioned"):
        block, before = sampling[protocol], len(errors)
        if block.context < condition_frames:
            errors.append(f"config.sampling.{protocol}.context={block.context} must be at least "
                          f"config.model.condition_frames={condition_frames}")
        positive(f"sampling.{protocol}.horizon", block.horizon)
        if len(errors) == before:
            try:
                Protocol.from_config(block)
            except (TypeError, ValueError) as error:
                errors.append(f"config.sampling.{protocol}: {error}")
    before = len(errors)
    for name in ("draft_steps", "revise_steps", "num_videos", "batch_size"):
        positive(f"sampling.{name}", sampling[name])
    if len(errors) == before:
        try:
            SamplerSettings.from_config(sampling)
        except (TypeError, ValueError) as error:
            errors.append(f"config.sampling: {error}")


def _check_paths(config: ml_collections.ConfigDict, errors: list[str]) -> None:
    name = config.dataset.name
    path = config.dataset.path
    if path is None or path == "":
        errors.append(f"config.dataset.path is unset; pass --data /path/to/{name} (a folder holding "
                      f"the {config.dataset.train_split!r} and {config.dataset.eval_split!r} splits)")
    elif not os.path.isdir(path):
        errors.append(f"config.dataset.path={path!r} is not a folder; expected the {name} dataset root holding the "
                      f"{config.dataset.train_split!r} and {config.dataset.eval_split!r} splits")
    else:
        from teco_ssm.data import inspect_dataset

        try:
            info = inspect_dataset(path, config.dataset.train_split, seq_len=config.seq_len,
                                   action_dim=config.model.num_actions if config.model.use_actions else None)
        except ValueError as error:
            errors.append(f"config.dataset.path={path!r}: {error}")
        else:
            if info.kind == "codes" and tuple(info.code_shape) != tuple(config.model.code_shape):
                errors.append(f"config.dataset.path={path!r} holds codes of shape {tuple(info.code_shape)}, but "
                              f"config.model.code_shape={tuple(config.model.code_shape)}")
        if config.eval_every:
            try:
                inspect_dataset(path, config.dataset.eval_split, seq_len=config.seq_len)
            except ValueError as error:
                errors.append(f"config.dataset.path={path!r}: the held-out loss (config.eval_every="
                              f"{config.eval_every}) reads split {config.dataset.eval_split!r}: {error}; set "
                              "eval_every=0 to train without one")
    tokenizer = config.tokenizer.path
    if tokenizer is None or tokenizer == "":
        errors.append("config.tokenizer.path is unset; pass --tokenizer /path/to/vqgan (a TECO VQGAN "
                      "checkpoint folder with args and checkpoints/, or a VQGAN workdir with config.json)")
    elif not os.path.isdir(tokenizer):
        errors.append(f"config.tokenizer.path={tokenizer!r} is not a folder; expected a TECO VQGAN checkpoint folder "
                      f"(args + checkpoints/) or a VQGAN workdir (config.json + checkpoints/)")
    elif not (os.path.isfile(os.path.join(tokenizer, "args")) or
              os.path.isfile(os.path.join(tokenizer, "config.json"))):
        errors.append(f"config.tokenizer.path={tokenizer!r} holds neither 'args' (TECO VQGAN checkpoint folder) nor "
                      f"'config.json' (VQGAN workdir)")


def validate(config: ml_collections.ConfigDict, *, check_paths: bool = True) -> None:
    """Raises ValueError listing every problem found (unknown backbone, unknown or missing fields, bad values,
    unset or wrong dataset and tokenizer paths when `check_paths`). Returns None for a valid config."""
    backbone = config.get("backbone")
    if backbone not in backbones.NAMES:
        raise ValueError(f"config.backbone={backbone!r} is not a known backbone; valid backbones: "
                         f"{', '.join(backbones.NAMES)}")
    errors: list[str] = []
    _compare_fields(config, schema.structure(), "config.", errors)
    if errors:  # value checks need the fields
        raise ValueError("invalid config:\n  " + "\n  ".join(errors))
    _check_values(config, errors)
    if check_paths:
        _check_paths(config, errors)
    if errors:
        raise ValueError("invalid config:\n  " + "\n  ".join(errors))
