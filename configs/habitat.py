"""TECO on the Habitat long-range benchmark (128x128 frames, 16x16 VQGAN codes, 300-frame videos).

  python scripts/train.py --config configs/habitat.py:convs5 --workdir /tmp/teco_habitat \
      --config.dataset.path=/data/habitat --config.tokenizer.path=/ckpt/habitat_vqgan

Variants: transformer, s5, convs5 (default), convt3. TECO-ConvS5 follows the ConvS5 paper's Table 21 (the paper
trained only ConvS5 here); the Transformer follows the TECO release's Habitat model (downsample 4); S5 takes
Table 19's widths. TECO's Habitat VQGAN has 8192 codes (set model.vqgan_codes to your tokenizer's).
"""
import ml_collections

from configs import common

CONVS5 = dict(d_model=512, ssm_size=512, B_kernel_size=3, C_kernel_size=3, n_layers=8, dropout=0.0)

# The latent width (TECO's embedding_dim); S5 and the Transformer project their tokens back to it, as TECO does.
LATENT_DIM = 256


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    backbone = common.backbone_name(arg, "configs/habitat.py")
    return common.teco_config(
        dataset="habitat", backbone=backbone,
        model_fields=dict(vqgan_codes=8192, num_actions=6, latent_dim=LATENT_DIM, encoder_blocks=4, decoder_blocks=8,
                          prior_width=1024, prior_mlp_dim=4096, prior_heads=16, prior_layers=16,
                          action_dropout=0.5, mask_future_frames=False),
        per_backbone=dict(
            convs5=CONVS5, convt3=CONVS5,
            s5=dict(d_model=2048, ssm_size=2048, downsample=8, out_dim=LATENT_DIM, n_layers=8, dropout=0.0),
            transformer=dict(
                d_model=LATENT_DIM, downsample=4, embed_dim=1024, mlp_dim=4096, num_heads=16, n_layers=8, dropout=0.0,
                max_len=300)),
        optim=common.optimizer(1e-4, warmup_steps=5000, weight_decay=1e-5),
        batch_size=16, seq_len=300, steps=1_000_000)
