"""Experiment configs: every variant builds, is locked, validates and builds its model; bad configs fail early
with messages that list what was expected; the schema comes from the library's dataclasses."""
import dataclasses
import importlib
import json
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from teco_ssm import backbones, optim, schema
from teco_ssm.config_check import validate
from teco_ssm.config_io import load_config
from teco_ssm.teco import Teco, build, init_variables

DATASETS = ("dmlab", "minecraft", "habitat", "mazelab", "memory_maze")
ADDED = ("kinetics",)  # configs added after tests/data/config_dump.json was written


def get_config(dataset, arg=None):
    return importlib.import_module(f"configs.{dataset}").get_config(arg)


@pytest.mark.parametrize("dataset", DATASETS + ADDED)
@pytest.mark.parametrize("backbone", backbones.NAMES)
def test_every_variant_builds_validates_and_is_locked(dataset, backbone):
    config = get_config(dataset, backbone)
    assert config.backbone == backbone
    validate(config, check_paths=False)
    model = build(config)
    assert isinstance(model, Teco) and type(model.backbone).__module__ == f"teco_ssm.backbones.{backbone}"
    assert model.backbone.settings == backbones.settings_class(backbone)(**config[backbone])
    assert set(config.optim) == set(backbones.NAMES)
    with pytest.raises(AttributeError):
        config.model.typo = 1
    with pytest.raises(AttributeError):
        config.typo = 1
    assert config.dataset.path is None and config.tokenizer.path is None


def test_blocks_are_the_dataclasses_fields_and_defaults():
    fields = {f.name: f.default for f in dataclasses.fields(Teco) if f.name not in ("backbone", "parent", "name")}
    assert schema.model_block().to_dict() == fields
    for name in backbones.NAMES:
        defaults = dataclasses.asdict(backbones.settings_class(name)())
        assert schema.backbone_block(name).to_dict() == defaults == backbones.default_config(name).to_dict()
    optimizer_defaults = {f.name: f.default for f in dataclasses.fields(optim.OptimizerSettings)
                          if f.name not in ("lr", "total_steps")}
    assert schema.optimizer_block(lr=0.5).to_dict() == {"lr": 0.5, **optimizer_defaults}
    with pytest.raises(ValueError, match="config.optim needs a value for lr"):
        schema.optimizer_block()
    with pytest.raises(ValueError, match="config.model has no field.s. drop_loss; valid fields: .*drop_loss_rate"):
        schema.model_block(drop_loss=0.5)


# Every variant's `config.to_dict()` before the optimiser became per backbone (written by the configs of that
# time), as JSON, with one structural change applied to it: the single `optim` block is now `optim.<backbone>`,
# one block per backbone (the variant's own block the old one; each other backbone's block the one of that
# backbone's variant), and ssm_lr, which every config set equal to lr, is None (= lr). Added since: eval_every and
# eval_batches (the held-out loss during training); the MazeLab (and Memory Maze) budget of 3,000 steps (was 700, then
# 2,000; docs/training.md); scan_mode auto (was associative; the same on accelerators); sampling.feedback (MazeLab and
# Memory Maze: posterior); optim.<backbone>.schedule_start (0: the schedule starts at step 0, as before).
EXPECTED_DUMP = "tests/data/config_dump.json"


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("backbone", backbones.NAMES)
def test_every_value_is_the_one_of_before(dataset, backbone):
    with open(EXPECTED_DUMP) as file:
        expected = json.load(file)[f"{dataset}:{backbone}"]
    got = json.loads(json.dumps(get_config(dataset, backbone).to_dict()))
    assert got == expected


def test_backbone_override_takes_that_backbones_optimiser():
    """`--set backbone=s5` on a ConvS5 variant trains with S5's learning rate; one backbone's rate is overridden by
    its name, and the SSM group follows it."""
    convs5 = load_config("configs/dmlab.py:convs5")
    assert optim.OptimizerSettings.of_experiment(convs5).lr == 5e-4
    s5 = load_config("configs/dmlab.py:convs5", ["backbone=s5"])
    validate(s5, check_paths=False)
    assert optim.OptimizerSettings.of_experiment(s5).lr == 1e-3
    assert optim.OptimizerSettings.of_experiment(s5) == optim.OptimizerSettings.of_experiment(get_config("dmlab", "s5"))
    tuned = load_config("configs/dmlab.py:convs5", ["backbone=s5", "optim.s5.lr=3e-4"])
    settings = optim.OptimizerSettings.of_experiment(tuned)
    assert (settings.lr, settings.peak_ssm_lr) == (3e-4, 3e-4)
    with pytest.raises(ValueError, match="no field optim.lr; fields of optim: convs5, convt3, s5, transformer"):
        load_config("configs/dmlab.py:convs5", ["optim.lr=1e-3"])


def test_the_library_does_not_import_configs():
    code = ("import sys; import teco_ssm.config_check, teco_ssm.train, teco_ssm.schema, teco_ssm.teco; "
            "print(sorted(m for m in sys.modules if m == 'configs' or m.startswith('configs.')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# The release's values, by config path. Every 3D-benchmark config of both releases shares these (NVlabs/ConvSSM
# configs/3D_ENV_BENCHMARK/*/*_teco_*.yaml, wilson1yan/teco configs/{dmlab,minecraft,habitat}.yaml; the optimiser
# is train_utils.get_optimizer in both: optax.adamw(b1=0.9, b2=0.95), no clipping, weight decay on everything).
RELEASE_SHARED = {
    "seq_len": 300, "seed": 1, "optim.{backbone}.warmup_steps": 5000, "optim.{backbone}.weight_decay": 1e-5,
    "optim.{backbone}.schedule": "cosine", "optim.{backbone}.end_lr_factor": 0.0, "optim.{backbone}.b1": 0.9,
    "optim.{backbone}.b2": 0.95, "optim.{backbone}.grad_clip": float("inf"), "optim.{backbone}.ssm_weight_decay": 1e-5,
    "model.code_shape": (16, 16), "model.vqgan_embedding_dim": 256,  # TECO's VQGANs: 16x16 codes of 256 channels
    "model.encoder_depths": (256, 512), "model.decoder_depths": (256, 512), "model.latent_proj_dim": 32,
    "model.prior_token_dim": 256, "model.mask_schedule": "cosine", "model.prior_dropout": 0.0,
    "model.num_actions": 6, "model.action_embed_dim": 16, "model.use_actions": True, "model.condition_frames": 1,
    "model.drop_loss_rate": 0.9, "model.label_smoothing": 0.01, "model.commitment_cost": 0.25,
    "sampling.draft_steps": 8, "sampling.revise_steps": 8, "sampling.revise_rounds": 2,
    "sampling.action_conditioned.context": 144, "sampling.action_conditioned.horizon": 156,
    "sampling.action_conditioned.use_actions": True,
    "sampling.unconditioned.context": 36, "sampling.unconditioned.horizon": 264,
}
DMLAB_MODEL = {  # the dmlab_teco_*.yaml model, shared by the three backbones
    "steps": 500_000, "batch_size": 16, "model.vqgan_codes": 1024, "model.latent_dim": 64,
    "model.latent_codes": 1024, "model.encoder_blocks": 2, "model.decoder_blocks": 4, "model.prior_width": 512,
    "model.prior_mlp_dim": 2048, "model.prior_heads": 8, "model.prior_layers": 8, "model.action_dropout": 0.5,
    "model.mask_future_frames": True, "model.mask_future_after": 144, "sampling.unconditioned.use_actions": False}
MINECRAFT_MODEL = {  # minecraft_teco_convS5.yaml and TECO's configs/minecraft.yaml (Table 21: 8 decoder blocks)
    "steps": 1_000_000, "model.vqgan_codes": 1024, "model.latent_dim": 128, "model.latent_codes": 1024,
    "model.encoder_blocks": 4, "model.decoder_blocks": 6, "model.prior_width": 768, "model.prior_mlp_dim": 3072,
    "model.prior_heads": 12, "model.prior_layers": 6, "model.action_dropout": 0.0, "model.mask_future_frames": False,
    "sampling.unconditioned.use_actions": True}
HABITAT_MODEL = {  # habitat_teco_convS5.yaml and TECO's configs/habitat.yaml (Table 21: 1024 latent codes)
    "steps": 1_000_000, "model.vqgan_codes": 8192, "model.latent_dim": 256, "model.latent_codes": 2048,
    "model.encoder_blocks": 4, "model.decoder_blocks": 8, "model.prior_width": 1024, "model.prior_mlp_dim": 4096,
    "model.prior_heads": 16, "model.prior_layers": 16, "model.action_dropout": 0.5, "model.mask_future_frames": False,
    "sampling.unconditioned.use_actions": False, "optim.{backbone}.lr": 1e-4}
CONVS5_SHARED = {"d_model": 512, "B_kernel_size": 3, "C_kernel_size": 3, "D_kernel_size": 3, "dt_min": 0.001,
                 "dt_max": 0.1, "clip_eigs": False, "dropout": 0.0, "num_groups": 32, "D_term": False,
                 "ssm_init": "he_normal"}
TRANSFORMER_SHARED = {"embed_dim": 1024, "mlp_dim": 4096, "num_heads": 16, "dropout": 0.0, "attention_dropout": 0.0,
                      "max_len": 300, "start_token": True}


def convs5(**values):
    return {f"{{backbone}}.{k}": v for k, v in {**CONVS5_SHARED, **values}.items()}


def transformer(**values):
    return {f"transformer.{k}": v for k, v in {**TRANSFORMER_SHARED, **values}.items()}


RELEASE_VALUES = {
    # NVlabs/ConvSSM configs/3D_ENV_BENCHMARK/dmlab/dmlab_teco_convS5.yaml (ssm.blocks 32 is not in Table 18)
    ("dmlab", "convs5"): {**DMLAB_MODEL, "optim.convs5.lr": 5e-4, **convs5(ssm_size=1024, blocks=32, n_layers=8)},
    # dmlab_teco_S5.yaml
    ("dmlab", "s5"): {**DMLAB_MODEL, "optim.s5.lr": 1e-3, "s5.d_model": 2048, "s5.ssm_size": 2048, "s5.blocks": 1,
                      "s5.downsample": 8, "s5.n_layers": 8, "s5.out_dim": 64, "s5.dt_min": 0.001, "s5.dt_max": 0.1,
                      "s5.clip_eigs": False, "s5.dropout": 0.0},
    # dmlab_teco_transformer.yaml
    ("dmlab", "transformer"): {**DMLAB_MODEL, "optim.transformer.lr": 1e-4,
                               **transformer(d_model=64, downsample=8, n_layers=8)},
    # NVlabs/ConvSSM configs/3D_ENV_BENCHMARK/minecraft/minecraft_teco_convS5.yaml
    ("minecraft", "convs5"): {**MINECRAFT_MODEL, "optim.convs5.lr": 5e-4, "batch_size": 16,
                              **convs5(ssm_size=512, blocks=1, n_layers=12)},
    # wilson1yan/teco configs/minecraft.yaml
    ("minecraft", "transformer"): {**MINECRAFT_MODEL, "optim.transformer.lr": 1e-4, "batch_size": 8,
                                   **transformer(d_model=128, downsample=8, n_layers=12)},
    # NVlabs/ConvSSM configs/3D_ENV_BENCHMARK/habitat/habitat_teco_convS5.yaml
    ("habitat", "convs5"): {**HABITAT_MODEL, "batch_size": 16, **convs5(ssm_size=512, blocks=1, n_layers=8)},
    # wilson1yan/teco configs/habitat.yaml
    ("habitat", "transformer"): {**HABITAT_MODEL, "batch_size": 32,
                                 **transformer(d_model=256, downsample=4, n_layers=8)},
}
# ConvT3 is TECO-ConvS5 with the structured state kernel; S5 has no release on Minecraft and Habitat and takes the
# ConvS5 YAML's model and training values.
RELEASE_VALUES.update({(d, "convt3"): {k.replace("optim.convs5.", "optim.{backbone}."): v
                                       for k, v in RELEASE_VALUES[d, "convs5"].items()}
                       for d in ("dmlab", "minecraft", "habitat")})
NO_RELEASE = {("minecraft", "s5"): ("minecraft", "convs5"), ("habitat", "s5"): ("habitat", "convs5")}


def lookup(config, path):
    value = config
    for key in path.split("."):
        value = value[key]
    return tuple(value) if isinstance(value, list) else value


@pytest.mark.parametrize("dataset, backbone", sorted(RELEASE_VALUES))
def test_release_values(dataset, backbone):
    config = get_config(dataset, backbone)
    wanted = {**RELEASE_SHARED, **RELEASE_VALUES[dataset, backbone]}
    wrong = {}
    for path, value in wanted.items():
        path = path.format(backbone=backbone)
        if lookup(config, path) != value:
            wrong[path] = (lookup(config, path), value)
    assert not wrong, f"config value, release value: {wrong}"


@pytest.mark.parametrize("dataset, reference", [(d, r) for (d, _), (_, r) in NO_RELEASE.items()])
def test_s5_without_a_release_takes_the_convs5_training_and_model_values(dataset, reference):
    s5, convs5_config = get_config(dataset, "s5"), get_config(dataset, reference)
    assert s5.model == convs5_config.model and s5.optim.s5 == convs5_config.optim.convs5
    assert (s5.batch_size, s5.steps, s5.seq_len) == (convs5_config.batch_size, convs5_config.steps, 300)
    assert s5.s5.out_dim == s5.model.latent_dim and (s5.s5.d_model, s5.s5.ssm_size) == (2048, 2048)


def test_release_optimizer_is_adamw_without_clipping():
    """The paper configs' optimiser gives the releases' updates (`train_utils.get_optimizer`: one optax.adamw, b2 0.95,
    weight decay on every parameter, cosine with decay_steps = total_steps - warmup_steps) on a weight, a bias and
    an SSM parameter, over steps whose gradient norms change (1e2, 1e-2): a global-norm clip would change their
    ratio, hence Adam's steps. A short schedule (10 steps, 3 of warm-up) reaches its end inside the test."""
    import jax.numpy as jnp
    import optax

    config = get_config("dmlab", "convs5")
    config.unlock()
    config.steps, config.optim.convs5.warmup_steps = 10, 3
    settings = optim.OptimizerSettings.of_experiment(config)
    schedule = optax.warmup_cosine_decay_schedule(0.0, config.optim.convs5.lr, 3, decay_steps=10 - 3)
    reference = optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=1e-5)
    ours = optim.build(settings)
    params = {"w": jnp.ones((3, 4)), "b": jnp.full((4,), 2.0), "diagonal": {"Lambda_re": jnp.full((4,), -0.5)}}
    state, reference_state = ours.init(params), reference.init(params)
    for step in range(10):
        scale = (1e2, 1e-2)[step % 2]
        grads = jax.tree_util.tree_map(lambda p: (jnp.arange(p.size, dtype=jnp.float32).reshape(p.shape) - 2) * scale,
                                       params)
        update, state = ours.update(grads, state, params)
        expected, reference_state = reference.update(grads, reference_state, params)
        for got, want in zip(jax.tree_util.tree_leaves(update), jax.tree_util.tree_leaves(expected)):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-12)
        params = optax.apply_updates(params, update)


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

    pattern = re.compile(optim.SSM_PARAMS)
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


def test_an_override_of_the_wrong_type_names_the_field_and_its_type():
    """A value the field's type refuses is a mistake in the request (ValueError: one line from `teco-ssm`), not an
    unexpected error with a traceback."""
    from teco_ssm import config_io

    config = get_config("mazelab")
    with pytest.raises(ValueError, match=r"override 'steps=abc': field steps holds int \(3000\); 'abc' is not one"):
        config_io.apply_override(config, "steps=abc")
    config_io.apply_override(config, "steps=12")
    assert config.steps == 12


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
    assert "config.dataset.path is unset; pass --data " in message
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

    shutil.rmtree(data / "test")  # the held-out loss needs the eval split, unless it is off
    with pytest.raises(ValueError, match="held-out loss .config.eval_every=100. reads split 'test'.*eval_every=0"):
        validate(config)
    config.eval_every = 0
    validate(config)


@pytest.mark.parametrize("field, value, message", [
    ("model.latent_codes", 0, r"config.model.latent_codes=0 must be an integer >= 1"),
    ("model.prior_heads", -1, r"config.model.prior_heads=-1 must be an integer >= 1"),
    ("model.prior_heads", 3, r"config.model.prior_width=512 must be divisible by prior_heads=3"),
    ("model.encoder_depths", (0, 4), r"config.model.encoder_depths=\(0, 4\) must be a non-empty tuple of integers"),
    ("model.mask_future_after", -1, r"config.model.mask_future_after=-1 must be an integer >= 0"),
    ("convs5.ssm_size", 0, r"config.convs5: field ssm_size=0 must be an integer >= 1"),
    ("convs5.n_layers", 0, r"config.convs5: field n_layers=0 must be an integer >= 1"),
    ("convs5.B_kernel_size", -3, r"config.convs5: field B_kernel_size=-3 must be an integer >= 1"),
    ("convs5.dt_min", 0.0, r"config.convs5: field dt_min=0.0 must be a number > 0"),
    ("convs5.dt_max", 1e-4, r"config.convs5: fields dt_min=0.001 and dt_max=0.0001: need dt_min <= dt_max"),
    ("convs5.dropout", 1.0, r"config.convs5: field dropout=1.0 must lie in \[0, 1\)"),
    ("convs5.blocks", 3, r"config.convs5: fields ssm_size=1024 and blocks=3: ssm_size must split into blocks"),
    ("convs5.num_groups", 3, r"config.convs5: fields d_model=512 and num_groups=3: d_model must be a multiple"),
    ("sampling.num_videos", 0, r"config.sampling.num_videos must be a positive integer, got 0"),
    ("sampling.batch_size", 0, r"config.sampling.batch_size must be a positive integer, got 0"),
])
def test_a_field_outside_its_range_is_refused_naming_field_value_and_range(field, value, message):
    config = load_config("configs/dmlab.py:convs5", [f"{field}={value!r}"])
    with pytest.raises(ValueError, match=message):
        validate(config, check_paths=False)


def test_every_numeric_option_refuses_a_value_outside_its_range_naming_it(capsys):
    """Each numeric option of every subcommand takes its range from `stages.RANGES`; the stage functions check
    the same ranges when called directly, before any work."""
    from teco_ssm import cli, stages

    parser = cli.parser()
    options = [(name, action) for name, sub in parser._subparsers._group_actions[0].choices.items()
               for action in sub._actions if action.dest in stages.RANGES and action.option_strings]
    assert {action.dest for _, action in options} == set(stages.RANGES)
    for command, action in options:
        low, high = stages.RANGES[action.dest]
        for bad in (low - 1, *(() if high is None else (high + 1,))):
            with pytest.raises(SystemExit):
                parser.parse_args([command, action.option_strings[0], str(bad)])
            assert f"argument {action.option_strings[0]}: must be {stages.range_text(action.dest)}, got '{bad}'" in \
                capsys.readouterr().err
    assert stages.range_text("seed") == f"an integer in [0, {2 ** 31 - 1}]"
    with pytest.raises(stages.StageError, match=r"length=1 must be an integer >= 2"):
        stages.make_dataset("/nonexistent/never-written", length=1)
    with pytest.raises(stages.StageError, match=r"num_videos=0 must be an integer >= 1"):
        stages.sample("/nonexistent/workdir", "/nonexistent/samples", num_videos=0)
