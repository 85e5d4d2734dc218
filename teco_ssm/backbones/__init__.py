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

Adding a backbone means adding one module that defines `Backbone` (the linen module, whose dataclass fields are
its configuration) and `default_config()`, and naming it in `_MODULES` below.
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


def default_config(name: str) -> ml_collections.ConfigDict:
    """The defaults of backbone `name` as a ConfigDict (a fresh copy each call)."""
    return _module(name).default_config()


def build(name: str, config: Mapping[str, Any] | None = None):
    """Builds backbone `name` from `config` (fields missing from it take their defaults).

    Raises ValueError for an unknown name or a field the backbone does not have, listing the valid ones.
    """
    module = _module(name)
    fields = dict(module.default_config())
    if config is not None:
        given = dict(config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config)
        unknown = sorted(set(given) - set(fields))
        if unknown:
            raise ValueError(
                f"backbone {name!r} has no field(s) {', '.join(unknown)}; valid fields: {', '.join(sorted(fields))}")
        fields.update(given)
    valid = {f.name for f in dataclasses.fields(module.Backbone)}
    return module.Backbone(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in fields.items() if k in valid})
