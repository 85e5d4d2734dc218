"""TECO on the DMLab long-range benchmark (64x64 frames, 16x16 VQGAN codes, 300-frame videos, 6 actions).

  teco-ssm train --config configs/dmlab.py:convs5 --workdir /tmp/teco_dmlab \
      --data /data/dmlab --tokenizer /ckpt/dmlab_vqgan

Variants: transformer, s5, convs5 (default), convt3. Values are those of the ConvS5 release, which produced the
paper's numbers: NVlabs/ConvSSM `configs/3D_ENV_BENCHMARK/dmlab/dmlab_teco_{convS5,S5,transformer}.yaml` (the
paper's Tables 18, 19, 20); ConvT3 is TECO-ConvS5 with the structured 3x3 state kernel. Only values that differ
from the library's defaults (`teco_ssm.schema`: `Teco`, each backbone's settings and `OptimizerSettings`, which
are DMLab's) are set here. Learning rates are the release's per backbone (5e-4, 1e-3, 1e-4), one optimiser block
each (`config.optim.<backbone>`), so `--set backbone=s5` also gets S5's. DMLab masks future frame inputs when
actions are given (the YAMLs' causal_masking, open_loop_ctx_1 144).
"""
import ml_collections

from configs import common
from teco_ssm import schema

LEARNING_RATES = dict(convs5=5e-4, convt3=5e-4, s5=1e-3, transformer=1e-4)

# dmlab_teco_convS5.yaml: d_model 512, ssm_size 1024, 8 layers, 3x3 B and C kernels, 32 HiPPO blocks (ssm.blocks;
# not in Table 18), num_groups 32, gelu, no D term (C_D_config resnet): all defaults but the blocks.
CONVS5 = dict(blocks=32)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    backbone = common.backbone_name(arg, "configs/dmlab.py")
    return schema.experiment(
        dataset="dmlab", backbone=backbone,
        model=dict(mask_future_frames=True),
        # dmlab_teco_S5.yaml (d_model 2048, ssm_size 2048, z_ds 8, 8 layers) and dmlab_teco_transformer.yaml
        # (z_ds 8, embed 1024, mlp 4096, 16 heads, 8 layers) are the S5 and Transformer defaults.
        backbone_settings=dict(convs5=CONVS5, convt3=CONVS5),
        optim={name: common.release_optimizer(lr) for name, lr in LEARNING_RATES.items()},
        sampling=common.sampling())
