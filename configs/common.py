"""Blocks shared by the experiment configs (`configs/<dataset>.py`).

A config's fields, and the defaults of every block, come from the library (`teco_ssm.schema`: the model block from
`teco_ssm.teco.Teco`, each backbone's block from its settings dataclass, the optimiser blocks from
`teco_ssm.optim.OptimizerSettings`); `teco_ssm.config_check` rejects any other field. A config file states only
what differs from those defaults (the datasets' values from the papers and the release YAMLs); the shared ones
are here.

The optimiser is chosen by the backbone: `config.optim` holds one block per backbone name, and training uses
`config.optim[config.backbone]`. So `--set backbone=s5` trains with S5's learning rate, and one backbone's rate
is overridden with its name:

  teco-ssm train --config configs/dmlab.py:s5 --workdir /tmp/teco_dmlab --data /data/dmlab \
      --tokenizer /ckpt/dmlab_vqgan --set optim.s5.lr=3e-4

ssm_lr is None in every config, i.e. the SSM group follows lr.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from teco_ssm import backbones
from teco_ssm.maskgit import SamplerSettings
from teco_ssm.sample import PROTOCOLS


def backbone_name(arg: str | None, source: str) -> str:
    """The backbone a config variant names (ConvS5 when none); ValueError naming `source` and the valid ones."""
    name = arg or "convs5"
    if name not in backbones.NAMES:
        raise ValueError(f"{source}: unknown backbone {name!r}; valid backbones: {', '.join(backbones.NAMES)}")
    return name


def release_optimizer(lr: float) -> dict[str, Any]:
    """The optimiser of the TECO and ConvS5 releases (`train_utils.get_optimizer` in both, with the 3D-benchmark
    YAMLs' warmup_steps 5000 and weight_decay 1e-5, the `OptimizerSettings` defaults): `optax.adamw(b1=0.9,
    b2=0.95)`, weight decay on every parameter (biases, norms and the SSM group included: `decay_all`), no gradient
    clipping, and the cosine ending at total_steps - warmup_steps (`schedule_ends_early`: the releases pass that as
    optax's decay_steps, which counts the warm-up).

    The papers' tables give neither b2 nor clipping.
    """
    return dict(lr=lr, b2=0.95, grad_clip=float("inf"), ssm_weight_decay=1e-5, decay_all=True,
                schedule_ends_early=True)


def sampling(*, unconditioned_uses_actions: bool = False, num_videos: int = 1024,
             batch_size: int = 16) -> ml_collections.ConfigDict:
    """The MaskGit draft-and-revise settings, the fields of `teco_ssm.maskgit.SamplerSettings` at its defaults
    (TECO: 8, 8, 2), and the ConvS5 paper's protocols (Appendix D.5), `teco_ssm.sample.PROTOCOLS`:
    action-conditioned, 144 context frames then 156 generated with past and future actions (PSNR, SSIM, LPIPS);
    unconditioned, 36 then 264 without actions (FVD; Minecraft keeps its actions). Read back with
    `SamplerSettings.from_config(config.sampling)` and `Protocol.from_config(config.sampling.<protocol>)`."""
    unconditioned = dataclasses.replace(PROTOCOLS["unconditioned"], use_actions=unconditioned_uses_actions)
    return ml_collections.ConfigDict(dict(
        **dataclasses.asdict(SamplerSettings()), num_videos=num_videos, batch_size=batch_size,
        action_conditioned=ml_collections.ConfigDict(dataclasses.asdict(PROTOCOLS["action_conditioned"])),
        unconditioned=ml_collections.ConfigDict(dataclasses.asdict(unconditioned)),
    ))
