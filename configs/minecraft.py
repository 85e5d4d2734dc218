"""TECO on the Minecraft long-range benchmark (128x128 frames, 16x16 VQGAN codes, 300-frame videos, 6 actions).

  python scripts/train.py --config configs/minecraft.py:convs5 --workdir /tmp/teco_minecraft \
      --config.dataset.path=/data/minecraft --config.tokenizer.path=/ckpt/minecraft_vqgan

Variants: transformer, s5, convs5 (default), convt3. TECO-ConvS5 follows the ConvS5 paper's Table 21 (the paper
trained only ConvS5 here); the Transformer follows the TECO release's Minecraft model; S5 takes Table 19's
widths with Table 21's 12 layers. Actions are never dropped and both protocols give actions (Appendix D.5).
"""
import ml_collections

from configs import common

CONVS5 = dict(d_model=512, ssm_size=512, B_kernel_size=3, C_kernel_size=3, n_layers=12, dropout=0.0)

# The latent width (TECO's embedding_dim); S5 and the Transformer project their tokens back to it, as TECO does.
LATENT_DIM = 128


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    backbone = common.backbone_name(arg, "configs/minecraft.py")
    return common.teco_config(
        dataset="minecraft", backbone=backbone,
        model_fields=dict(num_actions=6, latent_dim=LATENT_DIM, encoder_blocks=4, decoder_blocks=8,
                          prior_width=768, prior_mlp_dim=3072, prior_heads=12, prior_layers=6,
                          action_dropout=0.0, mask_future_frames=False),
        per_backbone=dict(
            convs5=CONVS5, convt3=CONVS5,
            s5=dict(d_model=2048, ssm_size=2048, downsample=8, out_dim=LATENT_DIM, n_layers=12, dropout=0.0),
            transformer=dict(
                d_model=LATENT_DIM, downsample=8, embed_dim=1024, mlp_dim=4096, num_heads=16, n_layers=12, dropout=0.0,
                max_len=300)),
        optim=common.optimizer(5e-4, warmup_steps=5000, weight_decay=1e-5),
        batch_size=16, seq_len=300, steps=1_000_000,
        sampling_config=common.sampling(unconditioned_uses_actions=True))
