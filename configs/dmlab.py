"""TECO on the DMLab long-range benchmark (64x64 frames, 16x16 VQGAN codes, 300-frame videos, 6 actions).

  python scripts/train.py --config configs/dmlab.py:convs5 --workdir /tmp/teco_dmlab \
      --config.dataset.path=/data/dmlab --config.tokenizer.path=/ckpt/dmlab_vqgan

Variants: transformer, s5, convs5 (default), convt3. Settings from the ConvS5 paper: Table 18 (TECO-ConvS5),
Table 19 (TECO-S5), Table 20 (TECO-Transformer); ConvT3 is TECO-ConvS5 with the structured 3x3 state kernel.
Learning rates are the paper's per backbone (5e-4, 1e-3, 1e-4); pick the variant rather than
--config.backbone to get them. DMLab masks future frame inputs when actions are given (Appendix D.5).
"""
import ml_collections

from configs import common

LEARNING_RATES = dict(convs5=5e-4, convt3=5e-4, s5=1e-3, transformer=1e-4)
CONVS5 = dict(d_model=512, ssm_size=1024, B_kernel_size=3, C_kernel_size=3, n_layers=8, dropout=0.0)

# The latent width (TECO's embedding_dim); S5 and the Transformer project their tokens back to it, as TECO does.
LATENT_DIM = 64


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    backbone = common.backbone_name(arg, "configs/dmlab.py")
    return common.teco_config(
        dataset="dmlab", backbone=backbone,
        model_fields=dict(num_actions=6, latent_dim=LATENT_DIM, encoder_blocks=2, decoder_blocks=4,
                          mask_future_frames=True, mask_future_after=144, action_dropout=0.5),
        per_backbone=dict(
            convs5=CONVS5, convt3=CONVS5,
            s5=dict(d_model=2048, ssm_size=2048, downsample=8, out_dim=LATENT_DIM, n_layers=8, dropout=0.0),
            transformer=dict(
                d_model=LATENT_DIM, downsample=8, embed_dim=1024, mlp_dim=4096, num_heads=16, n_layers=8, dropout=0.0,
                max_len=300)),
        optim=common.optimizer(LEARNING_RATES[backbone], warmup_steps=5000, weight_decay=1e-5),
        batch_size=16, seq_len=300, steps=500_000)
