"""TECO on Kinetics-600 (128x128 frames, 16x16 VQGAN codes, 100-frame clips, no actions).

  teco-ssm train --config configs/kinetics.py:transformer --workdir /tmp/teco_kinetics \
      --data /data/kinetics --tokenizer /ckpt/kinetics_vqgan

Variants: transformer (default: the model TECO trained and released here), s5, convs5, convt3. Values are TECO's,
wilson1yan/teco `configs/kinetics.yaml`: a 256-wide latent, 8 encoder and 10 decoder blocks, a 24-layer temporal
transformer over 4x4 tokens per frame (z_ds 2, width 1536, MLP 6144, 24 heads), a 24-layer prior (width 1024, MLP
4096, 16 heads), batch 32, learning rate 1e-4, 1M steps. The videos carry no actions (use_actions false; the
release feeds action id 0, which `teco-ssm convert-teco` maps onto this project's no-action id), so both protocols
give none; TECO samples with 20 context frames (open_loop_ctx) and generates the other 80. model.vqgan_codes must be
your tokenizer's (the default, 1024, is the DMLab VQGAN's).
"""
import ml_collections

from configs import common
from teco_ssm import backbones, schema

LATENT_DIM = 256
CONTEXT, LENGTH = 20, 100


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    backbone = common.backbone_name(arg or "transformer", "configs/kinetics.py")
    sampling = common.sampling()
    for protocol in ("action_conditioned", "unconditioned"):
        sampling[protocol].update(dict(context=CONTEXT, horizon=LENGTH - CONTEXT, use_actions=False))
    return schema.experiment(
        dataset="kinetics", backbone=backbone,
        model=dict(latent_dim=LATENT_DIM, encoder_blocks=8, decoder_blocks=10, prior_width=1024, prior_mlp_dim=4096,
                   prior_heads=16, prior_layers=24, use_actions=False, action_dropout=0.0),
        backbone_settings=dict(
            transformer=dict(d_model=LATENT_DIM, downsample=2, embed_dim=1536, mlp_dim=6144, num_heads=24,
                             n_layers=24, max_len=LENGTH),
            s5=dict(out_dim=LATENT_DIM)),
        optim={name: common.release_optimizer(1e-4) for name in backbones.NAMES},
        batch_size=32, seq_len=LENGTH, steps=1_000_000, sampling=sampling)
