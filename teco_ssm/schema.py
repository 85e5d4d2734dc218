"""The fields of an experiment config and their defaults, each block derived from the class it configures.

    config = schema.experiment(dataset="dmlab", backbone="convs5", sampling=sampling_block,
                               model=dict(mask_future_frames=True), backbone_settings=dict(convs5=dict(blocks=32)),
                               optim={name: dict(lr=5e-4) for name in backbones.NAMES})

A config has exactly these fields (`teco_ssm.config_check` rejects others and reports missing ones):

    dataset.{name, path, train_split, eval_split}   path: a placeholder that must be set
    tokenizer.path                                   VQGAN checkpoint folder: a placeholder that must be set
    backbone                                         'transformer' | 's5' | 'convs5' | 'convt3'
    transformer, s5, convs5, convt3                  each backbone's settings dataclass
                                                     (`teco_ssm.backbones.settings_class(name)`)
    model                                            the fields of `teco_ssm.teco.Teco` (all but backbone)
    optim.{transformer, s5, convs5, convt3}          one optimiser per backbone: the fields of
                                                     `teco_ssm.optim.OptimizerSettings` (all but total_steps = steps);
                                                     the active backbone's block is the one used
    seed, batch_size, seq_len, steps, log_every, checkpoint_every, keep_checkpoints, visualise_every,
    shard_params, model_parallelism                  `RUN`
    sampling                                         the fields of `teco_ssm.maskgit.SamplerSettings`, num_videos,
                                                     batch_size, and one `teco_ssm.sample.Protocol` block per
                                                     protocol of `PROTOCOLS` (the configs give its values)

The defaults live on the dataclasses; a config file states only what differs from them.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import ml_collections

from teco_ssm import backbones
from teco_ssm.maskgit import SamplerSettings
from teco_ssm.optim import OptimizerSettings
from teco_ssm.sample import PROTOCOLS, Protocol
from teco_ssm.teco import Teco

# The run's own fields and their defaults (the 3D benchmarks' 300-frame clips and the DMLab schedule).
RUN = dict(seed=1, batch_size=16, seq_len=300, steps=500_000, log_every=100, checkpoint_every=2000,
           keep_checkpoints=3, visualise_every=10_000,
           eval_every=2000,  # steps between held-out losses on dataset.eval_split; 0: never
           eval_batches=4,  # batches of the eval split (clips from frame 0) each held-out loss averages
           shard_params=False,  # True: large weight matrices split over the mesh's 'model' axis
           model_parallelism=1)  # size of the 'model' axis; the 'data' axis takes the remaining devices
DATASET = ("name", "path", "train_split", "eval_split")
_NOT_CONFIG = {"model": ("backbone", "parent", "name"), "optim": ("total_steps",)}


def _fields(cls: type, exclude: tuple[str, ...]) -> dict[str, Any]:
    """Field name -> default (dataclasses.MISSING when it has none) of dataclass `cls`, in declaration order."""
    return {f.name: f.default for f in dataclasses.fields(cls) if f.name not in exclude}


def _block(cls: type, values: Mapping[str, Any], where: str,
           exclude: tuple[str, ...] = ()) -> ml_collections.ConfigDict:
    """The fields of `cls` with their defaults, updated by `values`; ValueError naming `where` for a field `cls` does
    not have (listing the valid ones) or one without a default that `values` does not give."""
    fields = _fields(cls, exclude)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"{where} has no field(s) {', '.join(unknown)}; valid fields: {', '.join(sorted(fields))}")
    fields.update(values)
    missing = [name for name, value in fields.items() if value is dataclasses.MISSING]
    if missing:
        raise ValueError(f"{where} needs a value for {', '.join(missing)} (no default)")
    return ml_collections.ConfigDict(fields)


def model_block(**values: Any) -> ml_collections.ConfigDict:
    """The `model` block: the fields of `teco_ssm.teco.Teco` with their defaults, updated by `values`."""
    return _block(Teco, values, "config.model", _NOT_CONFIG["model"])


def optimizer_block(**values: Any) -> ml_collections.ConfigDict:
    """One optimiser block: the fields of `teco_ssm.optim.OptimizerSettings` but total_steps, updated by `values`
    (lr has no default)."""
    return _block(OptimizerSettings, values, "config.optim", _NOT_CONFIG["optim"])


def backbone_block(name: str, **values: Any) -> ml_collections.ConfigDict:
    """The block of backbone `name`: its settings dataclass's fields and defaults, updated by `values`."""
    return _block(backbones.settings_class(name), values, f"config.{name}")


def structure() -> dict[str, Any]:
    """The field names of a config, nested as its groups: name -> None for a value, or the dict of a group."""
    names = lambda cls, exclude=(): dict.fromkeys(_fields(cls, exclude))
    sampling = {**names(SamplerSettings), "num_videos": None, "batch_size": None,
                **{protocol: names(Protocol) for protocol in PROTOCOLS}}
    optim_fields = names(OptimizerSettings, _NOT_CONFIG["optim"])
    return {"seed": None, "dataset": dict.fromkeys(DATASET), "tokenizer": {"path": None}, "backbone": None,
            **{name: names(backbones.settings_class(name)) for name in backbones.NAMES},
            "model": names(Teco, _NOT_CONFIG["model"]),
            "optim": {name: dict(optim_fields) for name in backbones.NAMES},
            **dict.fromkeys(RUN), "sampling": sampling}


def experiment(*, dataset: str, backbone: str, sampling: ml_collections.ConfigDict,
               optim: Mapping[str, Mapping[str, Any]], model: Mapping[str, Any] | None = None,
               backbone_settings: Mapping[str, Mapping[str, Any]] | None = None,
               **run: Any) -> ml_collections.ConfigDict:
    """A complete, locked experiment config (see the module docstring for its fields).

    optim: backbone name -> what its optimiser block changes from the `OptimizerSettings` defaults (every backbone
    needs one: lr has no default); model: what the model block changes from `Teco`'s defaults; backbone_settings:
    backbone name -> what its block changes; run: the `RUN` fields that differ. Raises ValueError naming the field
    for an unknown backbone or field.
    """
    _known(backbone, "backbone")
    per_backbone = dict(backbone_settings or {})
    for name in (*per_backbone, *optim):
        _known(name, "block for backbone")
    missing = [name for name in backbones.NAMES if name not in optim]
    if missing:
        raise ValueError(f"config.optim needs a block for every backbone; missing: {', '.join(missing)}")
    unknown = sorted(set(run) - set(RUN))
    if unknown:
        raise ValueError(f"config has no field(s) {', '.join(unknown)}; run fields: {', '.join(RUN)}")
    config = ml_collections.ConfigDict()
    config.seed = run.get("seed", RUN["seed"])
    config.dataset = ml_collections.ConfigDict(dict(
        name=dataset, path=ml_collections.config_dict.placeholder(str), train_split="train", eval_split="test"))
    config.tokenizer = ml_collections.ConfigDict(dict(path=ml_collections.config_dict.placeholder(str)))
    config.backbone = backbone
    for name in backbones.NAMES:
        config[name] = backbone_block(name, **per_backbone.get(name, {}))
    config.model = model_block(**(model or {}))
    config.optim = ml_collections.ConfigDict({name: optimizer_block(**optim[name]) for name in backbones.NAMES})
    for key, default in RUN.items():
        if key != "seed":
            config[key] = run.get(key, default)
    config.sampling = sampling
    config.lock()
    return config


def _known(name: str, what: str) -> None:
    if name not in backbones.NAMES:
        raise ValueError(f"unknown {what} {name!r}; valid backbones: {', '.join(backbones.NAMES)}")
