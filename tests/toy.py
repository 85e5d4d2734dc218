"""Toy sizes of the TECO model and its backbones shared by the model, sampler and training tests, and a toy VQGAN
written in TECO's checkpoint layout (`write_tokenizer`)."""
import argparse
import pickle
from pathlib import Path

TOY_BACKBONES = {
    "transformer": dict(d_model=16, n_layers=1, embed_dim=16, mlp_dim=32, num_heads=2, downsample=2, max_len=16),
    "s5": dict(d_model=16, n_layers=1, ssm_size=8, downsample=4, out_dim=8),
    "convs5": dict(d_model=16, n_layers=1, ssm_size=8, num_groups=4),
    "convt3": dict(d_model=16, n_layers=1, ssm_size=8, num_groups=4),
}
TOY_MODEL = dict(code_shape=(8, 8), vqgan_codes=12, vqgan_embedding_dim=8, encoder_depths=(16, 16),
                 encoder_blocks=1, decoder_depths=(16, 16), decoder_blocks=1, latent_codes=16, latent_proj_dim=8,
                 latent_dim=8, prior_width=16, prior_mlp_dim=32, prior_heads=2, prior_layers=1, prior_token_dim=8,
                 num_actions=3, action_embed_dim=4)
# A VQGAN of 12 codes of 4 channels on an (8, 8) grid of 16 x 16 frames.
TOY_VQGAN = dict(ch=4, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), z_channels=4, resolution=16, n_embed=12,
                 embed_dim=4, num_groups=2)


def write_tokenizer(folder, fields=TOY_VQGAN, seed=0) -> str:
    """A VQGAN of `fields` with initial weights of `seed` in TECO's checkpoint layout (args +
    checkpoints/checkpoint_<step>), read by `vqgan.load`; returns the folder."""
    import flax.serialization
    import jax
    import numpy as np

    import vqgan

    folder = Path(folder)
    variables = vqgan.init_variables(vqgan.VQGAN(**fields), seed)
    args = argparse.Namespace(**{k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()},
                              double_z=False, dropout=0.0)
    (folder / "checkpoints").mkdir(parents=True)
    with open(folder / "args", "wb") as f:
        pickle.dump(args, f)
    tree = {"step": 1, "params": jax.tree_util.tree_map(np.asarray, variables["params"]), "opt_state": None,
            "model_state": {"stats": {"quantize": {"embeddings": np.asarray(
                variables["stats"]["quantize"]["embeddings"])}}}}
    (folder / "checkpoints" / "checkpoint_1").write_bytes(flax.serialization.msgpack_serialize(tree))
    return str(folder)
