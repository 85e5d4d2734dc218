"""Parameter counts of the paper configs equal those of the released models, module by module.

The release counts were measured by initialising the released model code on its YAML config (shapes only, with
`jax.eval_shape`, under current JAX with API shims) with a stand-in for TECO's VQGAN of that dataset (16x16
codes of 256 channels; 1024 codes for DMLab and Minecraft, 8192 for Habitat), counting the world model's own
parameters: NVlabs/ConvSSM at cb08bb3 (`src/models/sequence_models/VQ/teco_{convS5,S5,transformer}.py`,
`configs/3D_ENV_BENCHMARK/*/*teco*.yaml`) and wilson1yan/teco at 1e92c08 (`teco/models/teco.py`,
`configs/{minecraft,habitat}.yaml`). They are the papers' Params rows: DMLab 175M (Table 18), 180M (19), 173M (20);
Minecraft 214M and Habitat 351M (21).

In both releases the VQGAN codebook is not a parameter of the world model (it is read through the tokenizer's
`lookup`); here it is the 'tokenizer' collection, so neither count includes it.
"""
import functools
import importlib

import jax
import numpy as np
import pytest

from teco_ssm.teco import build, init_variables

# Top-level parameter counts of the released models, by the release's module names.
RELEASE = {
    # dmlab_teco_convS5.yaml: 175,374,000
    ("dmlab", "convs5"): dict(sos_post=65_536, encoder=10_788_160, codebook=36_864, action_embeds=112,
                              action_conv=41_472, sequence_model=113_291_264, z_git=26_275_840,
                              decoder=24_874_752),
    # dmlab_teco_S5.yaml: 180,409,520
    ("dmlab", "s5"): dict(sos_post=65_536, encoder=10_788_160, codebook=36_864, action_embeds=112,
                          z_proj=10_485_760, sequence_model=100_753_408, z_unproj=8_388_608, sos=2_048,
                          z_git=26_046_464, decoder=23_842_560),
    # dmlab_teco_transformer.yaml: 173,088,944 (TECO's configs/dmlab.yaml gives the same model)
    ("dmlab", "transformer"): dict(sos_post=65_536, encoder=10_788_160, codebook=36_864, action_embeds=112,
                                   z_proj=5_242_880, sos=1_024, z_tfm=102_871_040, z_unproj=4_194_304,
                                   z_git=26_046_464, decoder=23_842_560),
    # minecraft_teco_convS5.yaml: 214,754,544
    ("minecraft", "convs5"): dict(sos_post=65_536, encoder=20_264_320, codebook=40_960, action_embeds=112,
                                  action_conv=74_240, sequence_model=113_304_576, z_git=44_176_896,
                                  decoder=36_827_904),
    # TECO configs/minecraft.yaml: 271,278,832
    ("minecraft", "transformer"): dict(sos_post=65_536, encoder=20_264_320, codebook=40_960, action_embeds=112,
                                       z_proj=9_437_184, sos=1_024, z_tfm=153_255_936, z_unproj=8_388_608,
                                       z_git=43_881_984, decoder=35_943_168),
    # habitat_teco_convS5.yaml: 351,100,784
    ("habitat", "convs5"): dict(sos_post=65_536, encoder=20_329_984, codebook=81_920, action_embeds=112,
                                action_conv=139_776, sequence_model=75_536_384, z_git=204_176_384,
                                decoder=50_770_688),
    # TECO configs/habitat.yaml: 386,098,544
    ("habitat", "transformer"): dict(sos_post=65_536, encoder=20_329_984, codebook=81_920, action_embeds=112,
                                     z_proj=4_456_448, sos=4_096, z_tfm=102_871_040, z_unproj=4_194_304,
                                     z_git=203_914_240, decoder=50_180_864),
}
RELEASE_TOTALS = {("dmlab", "convs5"): 175_374_000, ("dmlab", "s5"): 180_409_520,
                  ("dmlab", "transformer"): 173_088_944, ("minecraft", "convs5"): 214_754_544,
                  ("minecraft", "transformer"): 271_278_832, ("habitat", "convs5"): 351_100_784,
                  ("habitat", "transformer"): 386_098_544}

# The release's module -> ours. The temporal model is everything between the latents and the prior and decoder:
# ConvS5's 1x1 input conv (action_conv); S5's and the Transformer's frame-to-token conv and back (z_proj,
# z_unproj) and the Transformer's start frame (sos).
OURS = dict(sos_post="start_code_embedding", encoder="encoder", codebook="codebook", action_embeds="action_embedding",
            action_conv="backbone", sequence_model="backbone", z_proj="backbone", z_tfm="backbone",
            z_unproj="backbone", sos="backbone", z_git="prior", decoder="decoder")
# Release parameters that nothing reads: TECO-S5 creates a start frame `sos` its condition() never uses.
UNUSED = {("dmlab", "s5"): ("sos",)}


def get_config(dataset, backbone):
    return importlib.import_module(f"configs.{dataset}").get_config(backbone)


@functools.lru_cache(maxsize=None)
def abstract_variables(dataset, backbone):
    model = build(get_config(dataset, backbone))
    return jax.eval_shape(lambda key: init_variables(model, key), jax.random.key(0))


def count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def expected_counts(dataset, backbone, config) -> dict[str, int]:
    expected: dict[str, int] = {}
    for name, n in RELEASE[dataset, backbone].items():
        if name not in UNUSED.get((dataset, backbone), ()):
            expected[OURS[name]] = expected.get(OURS[name], 0) + n
    if config.model.mask_future_frames:
        # Documented difference: the latent that stands in for masked future frames is learned here, where ConvSSM
        # fills the constant frame_mask_id.
        h, w = (s // 2 ** (len(config.model.encoder_depths) - 1) for s in config.model.code_shape)
        expected["future_mask_latent"] = h * w * config.model.latent_dim
    return expected


def test_release_tables_add_up():
    for key, modules in RELEASE.items():
        assert sum(modules.values()) == RELEASE_TOTALS[key], key


@pytest.mark.parametrize("dataset, backbone", sorted(RELEASE))
def test_parameter_count_equals_the_release(dataset, backbone):
    config = get_config(dataset, backbone)
    variables = abstract_variables(dataset, backbone)
    assert "code_embeddings" not in variables["params"]  # the VQGAN codebook is the tokenizer's, as released
    ours = {name: count(tree) for name, tree in variables["params"].items()}
    expected = expected_counts(dataset, backbone, config)
    gaps = {name: ours.get(name, 0) - expected.get(name, 0) for name in sorted(set(ours) | set(expected))
            if ours.get(name, 0) != expected.get(name, 0)}
    assert not gaps, f"ours minus release, by module: {gaps} (ours {ours}, release {expected})"
    assert sum(ours.values()) == sum(expected.values())


@pytest.mark.parametrize("dataset", ["dmlab", "minecraft", "habitat"])
def test_convt3_adds_two_stencil_parameters_per_state_channel(dataset):
    """ConvT3 is ConvS5 plus the raw_b_H and raw_b_W stencils: 2 * P per layer, P = ssm_size / 2."""
    convt3 = get_config(dataset, "convt3").convt3
    extra = convt3.n_layers * 2 * (convt3.ssm_size // 2)
    assert count(abstract_variables(dataset, "convt3")["params"]) == count(
        abstract_variables(dataset, "convs5")["params"]) + extra
