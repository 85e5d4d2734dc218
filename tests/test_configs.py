"""Experiment configs: every variant builds, is locked, validates and builds its model; bad configs fail early
with messages that list what was expected."""
import dataclasses
import importlib

import jax
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from configs import common
from teco_ssm import backbones
from teco_ssm.config_check import validate
from teco_ssm.teco import Teco, build, init_variables

DATASETS = ("dmlab", "minecraft", "habitat", "mazelab")


def get_config(dataset, arg=None):
    return importlib.import_module(f"configs.{dataset}").get_config(arg)


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("backbone", backbones.NAMES)
def test_every_variant_builds_validates_and_is_locked(dataset, backbone):
    config = get_config(dataset, backbone)
    assert config.backbone == backbone
    validate(config, check_paths=False)
    model = build(config)
    assert isinstance(model, Teco) and type(model.backbone).__module__ == f"teco_ssm.backbones.{backbone}"
    assert model.backbone.n_layers == config[backbone].n_layers
    with pytest.raises(AttributeError):
        config.model.typo = 1
    with pytest.raises(AttributeError):
        config.typo = 1
    assert config.dataset.path is None and config.tokenizer.path is None


def test_model_block_has_exactly_the_teco_fields():
    fields = {f.name for f in dataclasses.fields(Teco)} - {"backbone", "parent", "name"}
    assert set(common.model().keys()) == fields
    defaults = {f.name: f.default for f in dataclasses.fields(Teco) if f.name in fields}
    for key, value in common.model().items():
        assert tuple(value) == tuple(defaults[key]) if isinstance(value, tuple) else value == defaults[key], key


def test_paper_settings():
    dmlab = {name: get_config("dmlab", name) for name in backbones.NAMES}
    assert [dmlab[n].optim.lr for n in ("convs5", "s5", "transformer", "convt3")] == [5e-4, 1e-3, 1e-4, 5e-4]
    c = dmlab["convs5"]
    assert (c.batch_size, c.seq_len, c.steps, c.optim.warmup_steps, c.optim.weight_decay) == (16, 300, 500_000,
                                                                                             5000, 1e-5)
    assert c.model.drop_loss_rate == 0.9 and c.model.mask_future_frames and c.model.action_dropout == 0.5
    assert (c.convs5.d_model, c.convs5.ssm_size, c.convs5.n_layers) == (512, 1024, 8)
    assert tuple(c.model.encoder_depths) == (256, 512) and c.model.encoder_blocks == 2 and c.model.decoder_blocks == 4
    assert (c.model.latent_codes, c.model.latent_proj_dim) == (1024, 32)
    assert (c.model.prior_width, c.model.prior_mlp_dim, c.model.prior_heads, c.model.prior_layers) == (512, 2048, 8, 8)
    assert (dmlab["s5"].s5.d_model, dmlab["s5"].s5.ssm_size, dmlab["s5"].s5.downsample) == (2048, 2048, 8)
    t = dmlab["transformer"].transformer
    assert (t.embed_dim, t.mlp_dim, t.num_heads, t.n_layers, t.downsample) == (1024, 4096, 16, 8, 8)
    # ConvT3 is ConvS5's settings plus the structured state kernel's.
    ct3 = dmlab["convt3"].convt3
    for key, value in c.convs5.items():
        if key in ct3:
            assert ct3[key] == value, key
    assert set(ct3.keys()) - set(c.convs5.keys())
    mc, hab = get_config("minecraft"), get_config("habitat")
    assert (mc.optim.lr, mc.steps, mc.convs5.n_layers, mc.convs5.ssm_size, mc.model.prior_layers) == (
        5e-4, 1_000_000, 12, 512, 6)
    assert mc.sampling.unconditioned.use_actions and mc.model.action_dropout == 0.0
    assert (hab.optim.lr, hab.model.prior_width, hab.model.prior_layers, hab.model.decoder_blocks) == (
        1e-4, 1024, 16, 8)
    for config in (c, mc, hab):
        p = config.sampling
        assert (p.action_conditioned.context, p.action_conditioned.horizon) == (144, 156)
        assert (p.unconditioned.context, p.unconditioned.horizon) == (36, 264)
        assert (p.draft_steps, p.revise_steps, p.revise_rounds) == (8, 8, 2)


# Parameter counts of the DMLab models in the ConvS5 paper's Tables 18 (TECO-ConvS5), 19 (TECO-S5) and 20
# (TECO-Transformer); ConvT3 adds a few thousand structured-kernel parameters to ConvS5.
PAPER_DMLAB_PARAMS = {"convs5": 175e6, "convt3": 175e6, "s5": 180e6, "transformer": 173e6}


@pytest.mark.parametrize("backbone", backbones.NAMES)
def test_dmlab_parameter_counts_match_the_paper(backbone):
    """Counted from shapes only (jax.eval_shape): within 2% of the tables, so a wrong layer width or an extra
    projection (a 2048-wide S5 output alone is 30M) shows."""
    model = build(get_config("dmlab", backbone))
    variables = jax.eval_shape(lambda key: init_variables(model, key), jax.random.key(0))
    count = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(variables["params"]))
    assert abs(count / PAPER_DMLAB_PARAMS[backbone] - 1) < 0.02, count


def test_ssm_parameter_group_matches_only_ssm_parameters():
    import re

    pattern = re.compile(common.SSM_PARAMS)
    for path in ("backbone/layers_0/ssm/diagonal/Lambda_re", "backbone/layer_3/diagonal/log_step",
                 "backbone/layers_1/ssm/diagonal/B", "backbone/layers_0/ssm/raw_b_H"):
        assert pattern.search(path), path
    for path in ("backbone/layers_0/ssm/diagonal/C", "backbone/layers_0/D", "decoder/Dense_0/kernel",
                 "prior/block_0/Dense_0/bias", "codebook/codes"):
        assert not pattern.search(path), path


def _parse(argv):
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=values, lock_config=True, sys_argv=argv)
    values(argv)
    return values.config


def test_command_line_overrides_and_typos():
    config = _parse(["prog", "--config=configs/dmlab.py:convt3", "--config.batch_size=8", "--config.backbone=s5",
                     "--config.model.drop_loss_rate=0.5"])
    assert (config.batch_size, config.backbone, config.model.drop_loss_rate) == (8, "s5", 0.5)
    validate(config, check_paths=False)
    with pytest.raises(Exception, match="typo"):
        _parse(["prog", "--config=configs/dmlab.py:convt3", "--config.model.typo=1"])


def test_unknown_backbone_lists_the_valid_ones():
    with pytest.raises(ValueError, match="configs/dmlab.py: unknown backbone .lstm.; valid backbones: transformer, s5, convs5, convt3"):
        get_config("dmlab", "lstm")
    config = get_config("mazelab")
    config.backbone = "lstm"
    with pytest.raises(ValueError, match=r"valid backbones: transformer, s5, convs5, convt3"):
        validate(config, check_paths=False)


def test_unknown_and_missing_fields_are_named():
    config = get_config("mazelab")
    config.unlock()
    config.model.drop_loss = 0.5
    config.convs5.state_size = 3
    del config.sampling["draft_steps"]
    config.lock()
    with pytest.raises(ValueError) as error:
        validate(config, check_paths=False)
    message = str(error.value)
    assert "config.model.drop_loss is not a field" in message and "drop_loss_rate" in message
    assert "config.convs5.state_size is not a field" in message and "ssm_size" in message
    assert "config.sampling.draft_steps is missing" in message


def test_bad_values_are_named():
    config = get_config("mazelab")
    config.model.drop_loss_rate = 1.0
    config.seq_len = 1
    config.sampling.unconditioned.context = 0
    with pytest.raises(ValueError) as error:
        validate(config, check_paths=False)
    message = str(error.value)
    assert "config.model.drop_loss_rate must lie in [0, 1)" in message
    assert "config.seq_len=1 must exceed config.model.condition_frames=1" in message
    assert "config.sampling.unconditioned.context=0" in message


def _write_dataset(root, length=40, image=64, num_actions=4):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        folder = root / split / "0"
        folder.mkdir(parents=True)
        for i in range(2):
            np.savez(folder / f"{i}.npz", video=rng.integers(0, 255, (length, image, image, 3), dtype=np.uint8),
                     actions=rng.integers(0, num_actions, (length,)).astype(np.int32))


def test_paths_fail_fast_with_what_was_expected(tmp_path):
    config = get_config("mazelab")
    with pytest.raises(ValueError) as error:
        validate(config)
    message = str(error.value)
    assert "config.dataset.path is unset; pass --config.dataset.path=" in message
    assert "config.tokenizer.path is unset" in message

    config.dataset.path = str(tmp_path / "nowhere")
    config.tokenizer.path = str(tmp_path)
    with pytest.raises(ValueError) as error:
        validate(config)
    message = str(error.value)
    assert "is not a folder; expected the mazelab dataset root" in message
    assert "holds neither 'args' (TECO VQGAN checkpoint folder) nor 'config.json'" in message

    empty = tmp_path / "empty"
    empty.mkdir()
    config.dataset.path = str(empty)
    with pytest.raises(ValueError, match="split folder not found"):
        validate(config)

    data = tmp_path / "data"
    _write_dataset(data, length=20)
    config.dataset.path = str(data)
    with pytest.raises(ValueError, match="shorter than seq_len=32"):
        validate(config)

    data = tmp_path / "data_ok"
    _write_dataset(data)
    (tmp_path / "args").write_bytes(b"")
    config.dataset.path = str(data)
    validate(config)  # a good dataset and a tokenizer folder of the TECO layout
