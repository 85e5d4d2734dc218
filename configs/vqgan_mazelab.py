"""VQGAN for 64x64 MazeLab frames with 16x16 codes, small enough to train on a laptop CPU.

  teco-ssm data --out /data/mazelab --num_train 200 --num_test 32 --length 96
  teco-ssm tokenizer --config configs/vqgan_mazelab.py --data /data/mazelab --workdir /tmp/vqgan_mazelab
  teco-ssm tokenizer --config configs/vqgan_mazelab.py:quick --data /data/mazelab --workdir /tmp/vqgan_quick

Variants: '' (default: mean held-out PSNR 24.2 dB after 1300 steps in 10 minutes on 2 idle CPU cores, about
0.9 CPU-s per step; see docs/tokenizer.md for what was measured) and 'quick' (a smoke test: 41 CPU-seconds in all). The LPIPS term is off by default here (its VGG16 would dominate CPU time); set
--set loss.perceptual_weight=1.0 --set loss.lpips_dir=DIR to use it.
"""
import ml_collections


def get_config(variant: str = '') -> ml_collections.ConfigDict:
    if variant not in ('', 'quick'):
        raise ValueError(f"configs/vqgan_mazelab.py: unknown variant {variant!r} (use '' or 'quick')")
    quick = variant == 'quick'
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.num_steps = 30 if quick else 1300
    c.log_every = 10 if quick else 50
    c.eval_every = 1000000 if quick else 300
    c.eval_batch = 32 if quick else 64
    c.checkpoint_every = 30 if quick else 300
    c.keep_checkpoints = 2

    c.data = ml_collections.ConfigDict()
    c.data.path = ml_collections.config_dict.placeholder(str)
    c.data.train_split = 'train'
    c.data.eval_split = 'test'
    c.data.seq_len = 16
    c.data.videos_per_batch = 4
    c.data.frames_per_video = 4
    c.data.eval_frames = 32 if quick else 256

    # Most of the cost is at 64x64, so the first two levels keep ch channels: ch_mult (1, 1, 2).
    c.model = ml_collections.ConfigDict(dict(
        resolution=64, ch=8 if quick else 16, ch_mult=(1, 1, 2), num_res_blocks=1, attn_resolutions=(),
        z_channels=16 if quick else 32, n_embed=64 if quick else 512, embed_dim=16 if quick else 32, dropout=0.0,
        num_groups=4 if quick else 8))

    c.disc = ml_collections.ConfigDict(dict(ch=16 if quick else 32, num_layers=2, num_groups=8))

    c.loss = ml_collections.ConfigDict()
    c.loss.beta = 0.25
    c.loss.codebook_weight = 1.0
    c.loss.perceptual_weight = 0.0
    c.loss.lpips_dir = ''
    c.loss.disc_weight = 0.1
    # The adversarial phase starts after num_steps here (a CPU budget buys reconstruction, not texture);
    # lower disc_start, or raise num_steps, to train it.
    c.loss.disc_start = c.num_steps
    c.loss.reinit_every = 10 if quick else 25
    c.loss.reinit_threshold = 1.0
    c.loss.codebook_init_scale = 0.0   # 0: uniform(-1/K, 1/K) as taming-transformers

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 1e-3
    c.optim.disc_learning_rate = 1e-3
    c.optim.b1 = 0.5
    c.optim.b2 = 0.9
    c.optim.weight_decay = 0.0
    c.optim.warmup_steps = 5 if quick else 100
    c.optim.final_lr_fraction = 0.1
    c.optim.grad_clip = 1.0
    return c
