"""TECO on MazeLab, the built-in benchmark, sized to train on 2 CPU cores in minutes (any backbone).

  python scripts/train_vqgan.py --config=configs/vqgan_mazelab.py --config.data.path=/data/mazelab \
      --workdir=/tmp/vqgan_mazelab
  python scripts/train.py --config configs/mazelab.py:convs5 --workdir /tmp/teco_mazelab \
      --config.dataset.path=/data/mazelab --config.tokenizer.path=/tmp/vqgan_mazelab

Variants: transformer, s5, convs5 (default), convt3. 64x64 frames, 16x16 codes from the MazeLab VQGAN
(256 codes of 32 channels, `configs/vqgan_mazelab.py`), an 8x8 latent, tiny widths, 32-frame clips, batch 8.
The protocols are shortened to MazeLab's scale and roll out past the training length.
"""
import ml_collections

from configs import common

CONVS5 = dict(d_model=64, ssm_size=64, B_kernel_size=3, C_kernel_size=3, n_layers=2, dropout=0.0)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    backbone = common.backbone_name(arg, "configs/mazelab.py")
    sampling = common.sampling(num_videos=64, batch_size=8)
    sampling.draft_steps, sampling.revise_steps, sampling.revise_rounds = 4, 4, 1
    sampling.action_conditioned.update(dict(context=16, horizon=48))
    sampling.unconditioned.update(dict(context=8, horizon=56))
    return common.teco_config(
        dataset="mazelab", backbone=backbone,
        model_fields=dict(
            code_shape=(16, 16), vqgan_codes=256, vqgan_embedding_dim=32,
            encoder_depths=(32, 64), encoder_blocks=1, decoder_depths=(32, 64), decoder_blocks=1,
            latent_codes=64, latent_proj_dim=16, latent_dim=16,
            prior_width=64, prior_mlp_dim=128, prior_heads=4, prior_layers=2, prior_token_dim=32,
            num_actions=4, action_embed_dim=8, action_dropout=0.5, mask_future_frames=False, mask_future_after=16,
            drop_loss_rate=0.5),
        per_backbone=dict(
            convs5=CONVS5, convt3=CONVS5,
            s5=dict(d_model=256, ssm_size=128, downsample=4, embed_dim=32, n_layers=2, dropout=0.0),
            transformer=dict(d_model=64, downsample=2, embed_dim=64, mlp_dim=128, num_heads=4, n_layers=2,
                             dropout=0.0, max_len=32)),
        optim=common.optimizer(1e-3, warmup_steps=100, weight_decay=1e-5),
        batch_size=8, seq_len=32, steps=2000, log_every=20, checkpoint_every=500, keep_checkpoints=2,
        visualise_every=500, sampling_config=sampling, seed=0)
