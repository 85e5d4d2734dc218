"""Temporal backbones behind one protocol, built by name.

Every backbone is a Flax linen module over latent frames, batch-major:

    y, final_state = model.apply(variables, x, state=None, train=False)
        x: (B, T, H, W, C) float  ->  y: (B, T, H, W, D); the whole sequence in parallel.
    state = model.apply(variables, batch_size, (H, W), method=model.init_state)
    y_t, state = model.apply(variables, x_t, state, method=model.step)
        x_t: (B, H, W, C)  ->  y_t: (B, H, W, D); one frame, for generation.

D = `model.output_width`: d_model for ConvS5, ConvT3 and the Transformer, `out_dim` for S5 (whose d_model is the
width of its tokens).

`state` is a list with one pytree per layer. Output at time t depends only on inputs at times <= t, and
running the parallel call on a sequence equals `init_state` followed by one `step` per frame.

Each backbone's configuration is one frozen dataclass, `Settings` in its module (`TransformerSettings`,
`S5Settings`, `ConvS5Settings`, `ConvT3Settings`), whose defaults are the ConvS5 paper's DMLab models. `build`
turns a config block into that value once and the module hands it down unchanged (stack -> layer -> SSM):

    settings = backbones.settings("convs5", {"ssm_size": 512})   # ConvS5Settings(..., ssm_size=512, ...)
    model = backbones.build("convs5", {"ssm_size": 512})         # convs5.Backbone(settings=settings)

Adding a backbone means adding one module that defines `Settings` and `Backbone` (the linen module, with the one
field `settings`), and naming it in `_MODULES` below.
"""
from __future__ import annotations

import dataclasses
import importlib
from types import ModuleType
from typing import Any, Mapping

import ml_collections

_MODULES = {
    "transformer": "teco_ssm.backbones.transformer",
    "s5": "teco_ssm.backbones.s5",
    "convs5": "teco_ssm.backbones.convs5",
    "convt3": "teco_ssm.backbones.convt3",
}

NAMES = tuple(_MODULES)


def _module(name: str) -> ModuleType:
    if name not in _MODULES:
        raise ValueError(f"unknown backbone {name!r}; valid backbones: {', '.join(NAMES)}")
    return importlib.import_module(_MODULES[name])


def settings_class(name: str) -> type:
    """The frozen settings dataclass of backbone `name`; ValueError for an unknown name, listing the valid ones."""
    return _module(name).Settings


def default_config(name: str) -> ml_collections.ConfigDict:
    """The defaults of backbone `name` (its settings dataclass) as a ConfigDict, a fresh copy each call."""
    return ml_collections.ConfigDict(dataclasses.asdict(settings_class(name)()))


def settings(name: str, config: Mapping[str, Any] | None = None) -> Any:
    """The settings value of backbone `name` from a config block (fields missing from it take their defaults).

    Raises ValueError for an unknown name, a field the backbone does not have (listing the valid ones), or a value
    the settings reject.
    """
    cls = settings_class(name)
    if isinstance(config, cls):
        return config
    given = {}
    if config is not None:
        given = dict(config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config)
    valid = sorted(f.name for f in dataclasses.fields(cls))
    unknown = sorted(set(given) - set(valid))
    if unknown:
        raise ValueError(f"backbone {name!r} has no field(s) {', '.join(unknown)}; valid fields: {', '.join(valid)}")
    return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in given.items()})


def build(name: str, config: Mapping[str, Any] | None = None):
    """Backbone `name` built from `config` (a config block, or its settings value): `Backbone(settings=...)`.

    Raises ValueError as `settings` does.
    """
    return _module(name).Backbone(settings=settings(name, config))
