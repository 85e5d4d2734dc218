"""Blocks shared by the experiment configs (`configs/<dataset>.py`).

A TECO experiment config has these fields (every one of them exists in every config; `teco_ssm.config_check`
rejects others):

    dataset.{name, path, train_split, eval_split}   path: a placeholder that must be set
    tokenizer.path                                   VQGAN checkpoint folder: a placeholder that must be set
    backbone                                         'transformer' | 's5' | 'convs5' | 'convt3'
    transformer, s5, convs5, convt3                  settings of each backbone (`teco_ssm.backbones`)
    model                                            fields of `teco_ssm.teco.Teco`
    optim                                            AdamW, warm-up + cosine decay, clipping, SSM parameter group
    seed, batch_size, seq_len, steps, log_every, checkpoint_every, keep_checkpoints, visualise_every
    shard_params, model_parallelism                  parameter sharding over the mesh's 'model' axis
    sampling                                         the MaskGit sampler and the two benchmark protocols
"""
from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from teco_ssm import backbones
from teco_ssm.maskgit import SamplerSettings
from teco_ssm.sample import PROTOCOLS

# Parameters trained as S5 trains its SSM parameters (own learning rate, no weight decay): the eigenvalues,
# timescales and input matrix of every diagonal SSM, and ConvT3's stencils. Matched with re.search against the
# parameter path joined by '/'.
SSM_PARAMS = r"(^|/)diagonal/(Lambda_re|Lambda_im|log_step|B)$|(^|/)raw_b_[HW]$"


def backbone_name(arg: str | None, source: str) -> str:
    """The backbone a config variant names (ConvS5 when none); ValueError naming `source` and the valid ones."""
    name = arg or "convs5"
    if name not in backbones.NAMES:
        raise ValueError(f"{source}: unknown backbone {name!r}; valid backbones: {', '.join(backbones.NAMES)}")
    return name


def backbone_settings(**per_backbone: dict[str, Any]) -> dict[str, ml_collections.ConfigDict]:
    """One ConfigDict per registered backbone: its defaults updated with `per_backbone[name]`."""
    unknown = set(per_backbone) - set(backbones.NAMES)
    if unknown:
        raise ValueError(f"configs/common.py: unknown backbone(s) {sorted(unknown)}; valid: {backbones.NAMES}")
    settings = {}
    for name in backbones.NAMES:
        config = backbones.default_config(name)
        config.update(per_backbone.get(name, {}))
        settings[name] = config
    return settings


def optimizer(lr: float, *, warmup_steps: int = 5000, weight_decay: float = 1e-5, b2: float = 0.999,
              grad_clip: float = 1.0, ssm_weight_decay: float = 0.0) -> ml_collections.ConfigDict:
    """AdamW with linear warm-up to `lr`, cosine decay to `end_lr_factor * lr` at config.steps.

    The SSM group (`ssm_params`) gets `ssm_lr` (the same rate unless overridden) and `ssm_weight_decay`.
    grad_clip is a global-norm clip; float('inf') clips nothing.
    """
    return ml_collections.ConfigDict(dict(
        lr=lr, warmup_steps=warmup_steps, schedule="cosine", end_lr_factor=0.0, b1=0.9, b2=b2,
        weight_decay=weight_decay, grad_clip=grad_clip, ssm_lr=lr, ssm_weight_decay=ssm_weight_decay,
        ssm_params=SSM_PARAMS, decay_all=False, schedule_ends_early=False))


def release_optimizer(lr: float) -> ml_collections.ConfigDict:
    """The optimiser of the TECO and ConvS5 releases (`train_utils.get_optimizer` in both, with the 3D-benchmark
    YAMLs' warmup_steps 5000 and weight_decay 1e-5): `optax.adamw(b1=0.9, b2=0.95)`, weight decay on every
    parameter (biases, norms and the SSM group included: `decay_all`), no gradient clipping, and the cosine ending
    at total_steps - warmup_steps (`schedule_ends_early`: the releases pass that as optax's decay_steps, which
    counts the warm-up).

    The papers' tables give neither b2 nor clipping.
    """
    config = optimizer(lr, warmup_steps=5000, weight_decay=1e-5, b2=0.95, grad_clip=float("inf"),
                       ssm_weight_decay=1e-5)
    config.decay_all, config.schedule_ends_early = True, True
    return config


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


def model(**overrides: Any) -> ml_collections.ConfigDict:
    """The `Teco` fields: TECO's DMLab model (ConvS5 paper Table 18 and the TECO release), updated by `overrides`.

    vqgan_codes and vqgan_embedding_dim must equal the tokenizer's codebook shape (checked when its codebook is
    copied in with `teco_ssm.teco.set_code_embeddings`).
    """
    fields = dict(
        code_shape=(16, 16), vqgan_codes=1024, vqgan_embedding_dim=256, learn_code_embeddings=False,
        encoder_depths=(256, 512), encoder_blocks=2, decoder_depths=(256, 512), decoder_blocks=4,
        latent_codes=1024, latent_proj_dim=32, latent_dim=64, commitment_cost=0.25,
        prior_width=512, prior_mlp_dim=2048, prior_heads=8, prior_layers=8, prior_token_dim=256,
        prior_dropout=0.0, mask_schedule="cosine",
        num_actions=6, action_embed_dim=16, use_actions=True, action_dropout=0.5,
        condition_frames=1, start_position=False, mask_future_frames=False, mask_future_after=144,
        drop_loss_rate=0.9, label_smoothing=0.01, remat=False, dtype="float32")
    unknown = set(overrides) - set(fields)
    if unknown:
        raise ValueError(f"configs/common.py: model has no field(s) {sorted(unknown)}; valid: {sorted(fields)}")
    fields.update(overrides)
    return ml_collections.ConfigDict(fields)


def teco_config(*, dataset: str, backbone: str, model_fields: dict[str, Any], per_backbone: dict[str, dict],
                optim: ml_collections.ConfigDict, batch_size: int = 16, seq_len: int = 300, steps: int = 500_000,
                log_every: int = 100, checkpoint_every: int = 2000, keep_checkpoints: int = 3,
                visualise_every: int = 10_000, sampling_config: ml_collections.ConfigDict | None = None,
                seed: int = 1) -> ml_collections.ConfigDict:
    """A complete, locked experiment config (see the module docstring for its fields)."""
    if backbone not in backbones.NAMES:
        raise ValueError(f"unknown backbone {backbone!r}; valid backbones: {', '.join(backbones.NAMES)}")
    config = ml_collections.ConfigDict()
    config.seed = seed
    config.dataset = ml_collections.ConfigDict(dict(
        name=dataset, path=ml_collections.config_dict.placeholder(str), train_split="train", eval_split="test"))
    config.tokenizer = ml_collections.ConfigDict(dict(path=ml_collections.config_dict.placeholder(str)))
    config.backbone = backbone
    for name, settings in backbone_settings(**per_backbone).items():
        config[name] = settings
    config.model = model(**model_fields)
    config.optim = optim
    config.batch_size = batch_size
    config.seq_len = seq_len
    config.steps = steps
    config.log_every = log_every
    config.checkpoint_every = checkpoint_every
    config.keep_checkpoints = keep_checkpoints
    config.visualise_every = visualise_every
    config.shard_params = False  # True: large weight matrices split over the mesh's 'model' axis
    config.model_parallelism = 1  # size of the 'model' axis; the 'data' axis takes the remaining devices
    config.sampling = sampling_config if sampling_config is not None else sampling()
    config.lock()
    return config
