"""Toy sizes of the TECO model and its backbones shared by the model, sampler and training tests."""
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
