"""The sampler: one compiled rollout per backbone (1,000 frames, deterministic, equal to a per-frame loop), the
context kept, teacher-forced steps against the parallel predictions, the protocols' frame arithmetic, the configs'
sampling blocks made from `SamplerSettings` and `PROTOCOLS`, and the sample files (contents, MazeLab `seen` mask,
sharding over 4 devices, actions ignored when unconditioned, resume, checkpoint step and settings override), and
the MazeLab poses read from an encoded dataset."""
import dataclasses
import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from teco_ssm import backbones, checkpoint, config_io, evaluate, lock, sample, sample_files
from teco_ssm.data import DataError, TfdsWriter, open_dataset
from teco_ssm.sample import PROTOCOLS, Protocol, SamplerSettings
from teco_ssm.teco import Teco, init_variables
from vqgan.model import VQGAN
from vqgan.model import init_variables as vqgan_init
from vqgan.tokenizer import Tokenizer

from toy import TOY_MODEL, TOY_BACKBONES as _TOY_BACKBONES

# the sampler tests roll the Transformer past a shorter window
TOY_BACKBONES = dict(_TOY_BACKBONES, transformer=dict(_TOY_BACKBONES["transformer"], max_len=8))
SAMPLER = SamplerSettings(draft_steps=2, revise_steps=2, revise_rounds=1, temperature=1.0)
CONTEXT, LONG = 3, 1000
# RBG keys compile to far smaller programs than threefry on CPU; the sampler takes any key type.
KEY = functools.partial(jax.random.key, impl="rbg")


def toy_model(name):
    return Teco(backbone=backbones.build(name, TOY_BACKBONES[name]), **TOY_MODEL)


@functools.lru_cache(maxsize=None)
def toy_variables(name):
    """Variables of the toy model: the backbone initialised by its own `init` (SSM eigenvalues and timescales
    matter over 1,000 frames), the other parts drawn on the host like Flax's defaults (LeCun-normal kernels, zero
    biases, unit scales, small embeddings), which spares compiling the whole training loss per backbone."""
    model = toy_model(name)
    abstract = jax.eval_shape(lambda key: init_variables(model, key), KEY(0))
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        field = path[-1].key
        if field == "kernel":
            return jnp.asarray(rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1])), leaf.dtype)
        if field in ("bias", "scale"):
            return jnp.full(leaf.shape, 1.0 if field == "scale" else 0.0, leaf.dtype)
        return jnp.asarray(rng.normal(size=leaf.shape) * (1.0 if field == "code_embeddings" else 0.02), leaf.dtype)

    variables = jax.tree_util.tree_map_with_path(draw, abstract)
    h, w = model.latent_shape
    x = jnp.zeros((1, 2, h, w, TOY_MODEL["latent_dim"] + TOY_MODEL["action_embed_dim"]))
    backbone = jax.jit(model.backbone.init)(KEY(1), x)["params"]
    shapes = lambda tree: jax.tree.map(lambda a: (a.shape, a.dtype), tree)
    assert shapes(backbone) == shapes(abstract["params"]["backbone"])
    variables["params"]["backbone"] = backbone
    return variables


def toy_inputs(batch=2, frames=CONTEXT + LONG, seed=1):
    codes = jax.random.randint(jax.random.key(seed), (batch, CONTEXT, 8, 8), 0, 12)
    actions = jax.random.randint(jax.random.key(seed + 1), (batch, frames), 0, 3)
    return codes, actions


def test_toy_backbones_cover_the_registry():
    assert set(TOY_BACKBONES) == set(backbones.NAMES)


# ------------------------------------------------------------------------------------------------- protocols
def test_protocol_frame_arithmetic():
    conditioned = sample.resolve_protocol("action_conditioned")
    assert (conditioned.context, conditioned.horizon, conditioned.use_actions) == (144, 156, True)
    assert conditioned.num_frames == 300 and conditioned.generated == slice(144, 300)
    assert len(range(300)[conditioned.generated]) == 156
    unconditioned = sample.resolve_protocol("unconditioned")
    assert (unconditioned.context, unconditioned.horizon, unconditioned.use_actions) == (36, 264, False)
    assert unconditioned.num_frames == 300 and len(range(300)[unconditioned.generated]) == 264
    assert sample.resolve_protocol((10, 5)) == Protocol(10, 5, True)
    assert sample.resolve_protocol([10, 5, False]) == Protocol(10, 5, False)


def test_protocols_from_dataset_configs():
    from configs import mazelab, minecraft

    minecraft_sampling = minecraft.get_config("convs5").sampling
    assert sample.resolve_protocol("unconditioned", minecraft_sampling) == Protocol(36, 264, True)
    assert sample.resolve_protocol("action_conditioned", minecraft_sampling) == Protocol(144, 156, True)
    assert sample.resolve_protocol("unconditioned", mazelab.get_config().sampling) == Protocol(8, 40, False)
    with pytest.raises(ValueError, match="unknown protocol 'open_loop'.*action_conditioned, unconditioned"):
        sample.resolve_protocol("open_loop")
    with pytest.raises(ValueError, match="context >= 1 and horizon >= 0"):
        sample.resolve_protocol((0, 5))
    with pytest.raises(ValueError, match=r"\(context, horizon\)"):
        sample.resolve_protocol((1, 2, True, 4))


def test_config_sampling_blocks_are_the_dataclass_defaults_unless_overridden():
    """Every dataset config's sampling block reads back as `SamplerSettings` at its defaults (TECO's 8, 8, 2,
    temperature 1, top_p 1, linear draft) and the paper's `PROTOCOLS`, except the fields the config overrides
    (MazeLab, and Memory Maze after it: fewer steps and shorter protocols; Minecraft: unconditioned with actions);
    `--set sampling.temperature=0.5` reaches the settings."""
    from configs import common
    from teco_ssm.config_io import load_config

    assert SamplerSettings() == SamplerSettings(8, 8, 2, 1.0, 1.0, "linear", "sample")
    block = common.sampling()
    assert set(block) == {f.name for f in dataclasses.fields(SamplerSettings)} | {
        "num_videos", "batch_size", "action_conditioned", "unconditioned"}
    assert SamplerSettings.from_config(block) == SamplerSettings()
    for name, protocol in PROTOCOLS.items():
        assert Protocol.from_config(block[name]) == protocol and block[name].to_dict() == dataclasses.asdict(protocol)
    paper = dict(PROTOCOLS)
    overrides = {
        "dmlab": ({}, paper), "habitat": ({}, paper),
        "minecraft": ({}, dict(paper, unconditioned=Protocol(36, 264, True))),
        "mazelab": (dict(draft_steps=4, revise_steps=4, revise_rounds=1, feedback="posterior"),
                    dict(action_conditioned=Protocol(32, 16, True), unconditioned=Protocol(8, 40, False))),
    }
    overrides["memory_maze"] = overrides["mazelab"]
    for dataset, (settings, protocols) in overrides.items():
        for backbone in backbones.NAMES:
            config = load_config(f"configs/{dataset}.py:{backbone}")
            assert SamplerSettings.from_config(config.sampling) == SamplerSettings(**settings), (dataset, backbone)
            for name, protocol in protocols.items():
                assert sample.resolve_protocol(name, config.sampling) == protocol, (dataset, backbone, name)
    config = load_config("configs/dmlab.py:convs5", ["sampling.temperature=0.5", "sampling.draft_schedule='cosine'"])
    assert SamplerSettings.from_config(config.sampling) == SamplerSettings(temperature=0.5, draft_schedule="cosine")


def test_sampler_settings_are_one_checked_hashable_value():
    one = SamplerSettings(temperature=1)  # a config's integer: the same value and the same jit cache entry
    assert one == SamplerSettings() and hash(one) == hash(SamplerSettings())
    assert isinstance(SamplerSettings(temperature=1).temperature, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        SAMPLER.temperature = 0.5
    for field, value, message in [("draft_steps", 0, "draft_steps must be >= 1"), ("revise_rounds", -1, ">= 0"),
                                  ("temperature", -0.5, "temperature must be >= 0"), ("top_p", 0.0, r"\(0, 1\]"),
                                  ("draft_schedule", "exp", "draft_schedule must be one of cosine, linear")]:
        with pytest.raises(ValueError, match=message):
            SamplerSettings(**{field: value})
    with pytest.raises(KeyError, match="lacks field.*top_p"):
        SamplerSettings.from_config({k: v for k, v in dataclasses.asdict(SamplerSettings()).items() if k != "top_p"})
    # A config written before `feedback` existed sampled with the prior's latent fed back.
    older = {k: v for k, v in dataclasses.asdict(SamplerSettings(feedback="posterior")).items() if k != "feedback"}
    assert SamplerSettings.from_config(older).feedback == "sample"
    stored = ml_collections.ConfigDict({"sampling": older})  # a config.json of then, read back
    SamplerSettings.fill_added_later(stored.sampling)
    assert stored.sampling.feedback == "sample" and stored.sampling.temperature == older["temperature"]
    config_io.apply_override(stored, "sampling.feedback=posterior")
    assert SamplerSettings.from_config(stored.sampling).feedback == "posterior"


# --------------------------------------------------------------------------------------------------- rollout
def test_context_only_rollout_reproduces_the_context():
    model, variables = toy_model("convs5"), toy_variables("convs5")
    codes, actions = toy_inputs(frames=CONTEXT)
    out = sample.rollout(model, variables, codes, actions, KEY(0), horizon=0, settings=SAMPLER)
    np.testing.assert_array_equal(out, codes)
    assert out.dtype == jnp.int32
    with pytest.raises(ValueError, match=r"actions must be \(B, Tc \+ horizon\) = \(2, 5\)"):
        sample.rollout(model, variables, codes, actions, KEY(0), horizon=2, settings=SAMPLER)
    with pytest.raises(ValueError, match="codes_ctx must be"):
        sample.rollout(model, variables, codes[..., :4], None, KEY(0), horizon=2, settings=SAMPLER)


@pytest.mark.parametrize("name", backbones.NAMES)
def test_thousand_frame_rollout_is_deterministic(name):
    """1,000 frames in one compiled call, past the Transformer's 8-frame window and far past training lengths."""
    model, variables = toy_model(name), toy_variables(name)
    codes, actions = toy_inputs()
    run = functools.partial(sample.rollout, model, variables, codes, actions, horizon=LONG, settings=SAMPLER)
    out, carry = run(KEY(0), return_carry=True)
    again = run(KEY(0))
    other = run(KEY(1))
    assert out.shape == (2, CONTEXT + LONG, 8, 8) and out.dtype == jnp.int32
    np.testing.assert_array_equal(out[:, :CONTEXT], codes)
    np.testing.assert_array_equal(out, again)
    assert np.mean(np.asarray(out[:, CONTEXT:]) != np.asarray(other[:, CONTEXT:])) > 0.1
    assert int(out.min()) >= 0 and int(out.max()) < TOY_MODEL["vqgan_codes"]
    assert int(carry["time"]) == CONTEXT + LONG
    for leaf in jax.tree.leaves(carry["state"]):
        if jnp.issubdtype(leaf.dtype, jnp.inexact):
            assert np.all(np.isfinite(np.asarray(leaf))), "backbone state diverged"
        else:
            assert int(leaf) == CONTEXT + LONG  # the Transformer's absolute time


def test_compiled_rollout_equals_a_per_frame_loop():
    """The scan and a Python loop over the same jitted one-frame step give the same frames, past the
    Transformer's window (its ring buffer wraps), so chunked or frame-by-frame generation equals one call."""
    model, variables = toy_model("transformer"), toy_variables("transformer")
    codes, actions = toy_inputs()
    compiled = sample.rollout(model, variables, codes, actions, KEY(0), horizon=LONG, settings=SAMPLER)
    carry = jax.jit(functools.partial(model.apply, method=Teco.condition))(variables, codes, actions[:, :CONTEXT])
    step = jax.jit(functools.partial(sample.sample_frame, model, settings=SAMPLER))
    frames = []
    for t in range(CONTEXT, CONTEXT + 12):
        carry, frame = step(variables, carry, actions[:, t], KEY(0))
        frames.append(frame)
    np.testing.assert_array_equal(np.stack(frames, axis=1), compiled[:, CONTEXT:CONTEXT + 12])
    # Actions steer the rollout: other future actions, other frames (same key).
    flipped = actions.at[:, CONTEXT:].set((actions[:, CONTEXT:] + 1) % 3)
    steered = sample.rollout(model, variables, codes, flipped, KEY(0), horizon=LONG, settings=SAMPLER)
    assert not np.array_equal(steered[:, CONTEXT:], compiled[:, CONTEXT:])


def test_teacher_forced_steps_equal_the_parallel_predictions():
    """Stepping the generation path with the true latents gives the training forward pass's logits, here past
    the Transformer's window (12 frames, window 8; tests/test_teco.py checks every backbone's step path)."""
    model, variables = toy_model("transformer"), toy_variables("transformer")
    codes = jax.random.randint(jax.random.key(3), (2, 12, 8, 8), 0, 12)
    actions = jax.random.randint(jax.random.key(4), (2, 12), 0, 3)
    run = jax.jit(lambda v, c, a: (sample.teacher_forced(model, v, c, a, context=CONTEXT),
                                   model.apply(v, c, a, method=Teco.predict)["logits"]))
    stepped, parallel = run(variables, codes, actions)
    expected = np.asarray(parallel)[:, CONTEXT - model.condition_frames:]
    assert stepped.shape == expected.shape == (2, 12 - CONTEXT, 8, 8, 12)
    np.testing.assert_allclose(stepped, expected, atol=2e-3, rtol=2e-3)
    np.testing.assert_array_equal(np.asarray(stepped).argmax(-1), expected.argmax(-1))


# ------------------------------------------------------------------------------------------------ sample files
TOKENIZER_FIELDS = dict(ch=4, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), z_channels=6, resolution=16,
                        n_embed=12, embed_dim=8)
FILE_CONTEXT, FILE_HORIZON = 4, 3


def toy_config():
    from configs import mazelab

    config = mazelab.get_config("convs5")
    config.model.update(TOY_MODEL)
    config.convs5.update(TOY_BACKBONES["convs5"])
    config.sampling.update(dataclasses.asdict(SAMPLER))
    return config


def write_dataset(root, num_videos, frames):
    """MazeLab-layout npz files with poses: video i stands still at pose i during the context except at frame 1,
    then revisits frame 1's pose, a context pose, and a new pose."""
    rng = np.random.default_rng(0)
    (root / "test" / "0000").mkdir(parents=True)
    (root / "metadata.json").write_text(json.dumps({"action_dim": 3}))
    for i in range(num_videos):
        poses = np.zeros((frames, 3), np.int32)
        poses[:, 0] = i
        poses[1] = (i, 5, 0)
        poses[FILE_CONTEXT:FILE_CONTEXT + 3] = [(i, 5, 0), (i, 0, 0), (i, 7, 7)]
        np.savez(root / "test" / "0000" / f"{i:06d}.npz",
                 video=rng.integers(0, 256, (frames, 16, 16, 3), dtype=np.uint8),
                 actions=rng.integers(0, 3, frames).astype(np.int32), poses=poses)


def test_sample_dataset_files_sharding_and_resume(tmp_path):
    config = toy_config()
    model = toy_model("convs5")
    variables = toy_variables("convs5")
    workdir = tmp_path / "workdir"
    earlier = jax.tree.map(lambda x: x * 0.5 if jnp.issubdtype(x.dtype, jnp.floating) else x, variables)
    mngr = checkpoint.manager(str(workdir), config)
    checkpoint.save(mngr, 5, {"model": earlier}, force=True)
    checkpoint.save(mngr, 10, {"model": variables}, force=True)
    checkpoint.close(mngr)
    vq = VQGAN(**TOKENIZER_FIELDS, num_groups=2)
    tokenizer = Tokenizer(vq, vqgan_init(vq, 3), chunk_size=16)
    data = tmp_path / "data"
    write_dataset(data, num_videos=6, frames=FILE_CONTEXT + FILE_HORIZON + 2)
    out = tmp_path / "samples"
    run = functools.partial(sample_files.sample_dataset, config, str(workdir), tokenizer, str(data), str(out),
                            protocol=(FILE_CONTEXT, FILE_HORIZON, False), num_videos=5, batch_size=4, seed=7)

    first = run()
    assert first["written"] == 2 and first["skipped"] == 0 and first["num_videos"] == 5
    files = [out / "batch_00000.npz", out / "batch_00001.npz"]
    assert first["files"] == [str(f) for f in files]
    kept = (lock.LOCK_FILE, sample_files.TIMES_FILE)
    assert sorted(p for p in out.iterdir() if p.name not in kept) == files  # no temporary files left
    assert sample_files.sampling_speed(out)["frames"] == 5 * FILE_HORIZON
    with np.load(files[0]) as f0, np.load(files[1]) as f1:
        batch0, batch1 = dict(f0), dict(f1)
    assert batch0["fake"].shape == batch0["real"].shape == (4, 7, 16, 16, 3)
    assert batch1["real"].shape[0] == 1  # the fifth video only: num_videos=5 of 6
    assert batch0["fake"].dtype == np.uint8 and int(batch0["context"]) == FILE_CONTEXT
    assert int(batch0["horizon"]) == FILE_HORIZON and int(batch0["seed"]) == 7 and not bool(batch0["use_actions"])
    assert first["settings"] == SAMPLER
    assert SamplerSettings(**{k: batch0[k].item() for k in dataclasses.asdict(SAMPLER)}) == SAMPLER
    np.testing.assert_array_equal(batch0["index"], [0, 1, 2, 3])
    np.testing.assert_array_equal(batch1["index"], [4])
    for i, index in enumerate(batch0["index"]):
        with np.load(data / "test" / "0000" / f"{index:06d}.npz") as video:
            np.testing.assert_array_equal(batch0["real"][i], video["video"][:7])
            np.testing.assert_array_equal(batch0["actions"][i], video["actions"][:7])
    # seen: context frames trivially; then a revisit of frame 1's pose, of frame 0's pose, and a new place.
    np.testing.assert_array_equal(batch0["seen"], np.tile([True] * 4 + [True, True, False], (4, 1)))

    # The sample equals an unsharded rollout of the same codes with the file's key (4 devices vs 1), and the
    # unconditioned protocol ignores the actions (other actions here, same frames).
    codes = tokenizer.encode(batch0["real"].astype(np.float32) / 127.5 - 1.0)[1]
    loaded = checkpoint.load_variables(config, str(workdir))
    loaded = {**loaded, "tokenizer": {"code_embeddings": tokenizer.codebook}}
    direct = sample.rollout(model, loaded, codes[:, :FILE_CONTEXT], (batch0["actions"] + 1) % 3,
                            jax.random.fold_in(jax.random.key(7), 0), horizon=FILE_HORIZON, use_actions=False,
                            settings=SamplerSettings.from_config(config.sampling))
    np.testing.assert_array_equal(batch0["fake"], sample_files.to_uint8(tokenizer.decode(np.asarray(direct))))

    # Resume: the finished file is kept untouched, the missing one is written again, identically.
    stamp = os.stat(files[0]).st_mtime_ns
    files[1].unlink()
    second = run()
    assert second["written"] == 1 and second["skipped"] == 1 and second["num_videos"] == 5
    assert os.stat(files[0]).st_mtime_ns == stamp
    with np.load(files[1]) as f1:
        for key, value in batch1.items():
            np.testing.assert_array_equal(f1[key], value)
    # The workdir alone (config.json, a tokenizer folder) reaches the same files: nothing left to write.
    tokenizer_dir = tmp_path / "tokenizer"
    mngr = checkpoint.manager(str(tokenizer_dir), {"model": dict(TOKENIZER_FIELDS, num_groups=2)})
    checkpoint.save(mngr, 1, {"model": tokenizer.variables}, force=True)
    checkpoint.close(mngr)
    third = sample_files.sample_workdir(str(workdir), str(out), protocol=(FILE_CONTEXT, FILE_HORIZON, False),
                                  data_path=str(data), tokenizer_path=str(tokenizer_dir), num_videos=5,
                                  batch_size=4, seed=7)
    assert third["written"] == 0 and third["skipped"] == 2 and os.stat(files[0]).st_mtime_ns == stamp
    with pytest.raises(ValueError, match="batch_00000.npz: field 'seed' is 7, this run asks for 8"):
        sample_files.sample_dataset(config, str(workdir), tokenizer, str(data), str(out),
                                    protocol=(FILE_CONTEXT, FILE_HORIZON, False), num_videos=5, batch_size=4, seed=8)
    hotter = dataclasses.replace(SAMPLER, temperature=0.5)
    with pytest.raises(ValueError, match="batch_00000.npz: field 'temperature' is 1.0, this run asks for 0.5"):
        run(settings=hotter)
    # A file written before the `feedback` field existed was sampled with 'sample': kept for it, refused otherwise.
    assert SAMPLER.feedback == "sample"
    with np.load(files[0]) as f0:
        older = {key: f0[key] for key in f0.files if key != "feedback"}
    np.savez(files[0], **older)
    assert run()["skipped"] == 2
    with pytest.raises(ValueError, match="batch_00000.npz: field 'feedback' is absent, this run asks for posterior"):
        run(settings=dataclasses.replace(SAMPLER, feedback="posterior"))

    # Another checkpoint step and other sampler settings, without editing the config: the file equals a rollout
    # of that step's variables with those settings, and records them.
    jax.tree.map(np.testing.assert_array_equal, checkpoint.load_variables(config, str(workdir), 5), earlier)
    at_step5 = sample_files.sample_workdir(str(workdir), str(tmp_path / "step5"), protocol=(FILE_CONTEXT, FILE_HORIZON,
                                           False), data_path=str(data), tokenizer_path=str(tokenizer_dir),
                                           num_videos=4, batch_size=4, seed=7, step=5, settings=hotter)
    assert at_step5["written"] == 1 and at_step5["settings"] == hotter
    with np.load(at_step5["files"][0]) as f:
        step5 = dict(f)
    assert float(step5["temperature"]) == 0.5 and int(step5["draft_steps"]) == SAMPLER.draft_steps
    earlier = {**earlier, "tokenizer": {"code_embeddings": tokenizer.codebook}}
    direct = sample.rollout(model, earlier, codes[:, :FILE_CONTEXT], None, jax.random.fold_in(jax.random.key(7), 0),
                            horizon=FILE_HORIZON, use_actions=False, settings=hotter)
    np.testing.assert_array_equal(step5["fake"], sample_files.to_uint8(tokenizer.decode(np.asarray(direct))))
    assert not np.array_equal(step5["fake"], batch0["fake"])


def test_resume_with_another_batch_size_or_process_count_keeps_each_video_once(tmp_path):
    """A folder begun with batch 4 by two processes (files batch_<k>_p<i>, the last one lost) and resumed by one
    process with batch 8 holds each requested video exactly once; `eval` refuses a repeated video and mixed
    origins, naming the files."""
    config = toy_config()
    workdir = tmp_path / "workdir"
    mngr = checkpoint.manager(str(workdir), config)
    checkpoint.save(mngr, 10, {"model": toy_variables("convs5")}, force=True)
    checkpoint.close(mngr)
    vq = VQGAN(**TOKENIZER_FIELDS, num_groups=2)
    tokenizer = Tokenizer(vq, vqgan_init(vq, 3), chunk_size=16)
    data = tmp_path / "data"
    write_dataset(data, num_videos=12, frames=FILE_CONTEXT + FILE_HORIZON)
    out = tmp_path / "samples"
    run = functools.partial(sample_files.sample_dataset, config, str(workdir), tokenizer, str(data), str(out),
                            protocol=(FILE_CONTEXT, FILE_HORIZON, False), seed=7)
    run(num_videos=8, batch_size=4)  # videos 0-3 | 4-7
    # as two processes of batch 4 name them (batch 0 of 8 videos: p0 holds 0-3 and p1 4-7); p1's file is lost
    (out / "batch_00000.npz").rename(out / "batch_00000_p0.npz")
    (out / "batch_00001.npz").rename(out / "batch_00000_p1.npz")
    (out / "batch_00000_p1.npz").unlink()
    result = run(num_videos=12, batch_size=8)
    assert result["num_videos"] == 12 and result["written"] == 2
    held = evaluate.held_videos(evaluate.sample_files(out), require_index=True)
    assert sorted(held) == list(range(12))  # each once: held_videos raises on a repeat
    assert {held[v] for v in range(4)} == {out / "batch_00000_p0.npz"}
    assert {held[v] for v in range(4, 8)} == {out / "batch_00000.npz"}  # batch 0 of 8 rows: the videos missing
    assert {held[v] for v in range(8, 12)} == {out / "batch_00001.npz"}
    assert run(num_videos=12, batch_size=8)["written"] == 0
    assert run(num_videos=12, batch_size=4)["written"] == 0  # and back: nothing twice
    evaluate.check_one_sample_set(evaluate.sample_files(out))

    shutil.copy(out / "batch_00001.npz", out / "batch_00009.npz")  # the same videos counted twice
    with pytest.raises(ValueError, match=r"batch_00009.npz and .*batch_00001.npz both hold video 8"):
        evaluate.evaluate_samples(out, None)
    with np.load(out / "batch_00009.npz") as f:
        other = dict(f, index=np.array([20, 21, 22, 23], np.int32), model_sha256=np.asarray("0" * 64))
    np.savez(out / "batch_00009.npz", **other)  # other videos, another model
    with pytest.raises(ValueError, match=r"batch_00009.npz and .*batch_00000.npz come from different runs: field "
                                         r"'model_sha256'"):
        evaluate.evaluate_samples(out, None)
    with pytest.raises(ValueError, match=r"batch_00009.npz: field 'model_sha256' is 0+, this run asks for"):
        run(num_videos=12, batch_size=8)  # resuming refuses it too
    (out / "batch_00009.npz").unlink()
    with np.load(out / "batch_00001.npz") as f:
        np.savez(tmp_path / "stray.npz", **{k: v for k, v in f.items() if k != "index"})
    shutil.copy(tmp_path / "stray.npz", out / "batch_00010.npz")
    with pytest.raises(ValueError, match=r"batch_00010.npz: field 'index' is absent"):
        run(num_videos=12, batch_size=8)


def test_origin_fields_are_what_sample_files_record():
    fields = {f.name for f in dataclasses.fields(SamplerSettings)} | {
        "context", "horizon", "use_actions", "seed", "checkpoint_step", "model_sha256", "tokenizer_sha256",
        "data_path", "split"}
    assert set(evaluate.ORIGIN_FIELDS) == fields
    assert set(sample_files.NOT_COMPARED) == {"tokenizer_source", "model_source"}


def test_dataset_poses_from_an_encoded_dataset(tmp_path):
    """`vqgan/encode.py` keeps the npz files' poses, so the encoded dataset (what `teco-ssm run` samples) gives the
    same poses and `seen` mask as the raw one; an encoded dataset without poses gives none."""
    from vqgan.encode import encode_dataset

    data, frames, num_frames = tmp_path / "data", FILE_CONTEXT + FILE_HORIZON + 2, FILE_CONTEXT + FILE_HORIZON
    write_dataset(data, num_videos=2, frames=frames)
    vq = VQGAN(**TOKENIZER_FIELDS, num_groups=2)
    encode_dataset(Tokenizer(vq, vqgan_init(vq, 3), chunk_size=16), data, tmp_path / "codes", "maze",
                   splits=("test",), progress=False)
    raw = open_dataset(data, "test", seq_len=num_frames, batch_size=2, shuffle=False)
    encoded = open_dataset(tmp_path / "codes" / "maze", "test", seq_len=num_frames, batch_size=2, shuffle=False)
    assert encoded.info.format == "tfds" and encoded.info.kind == "codes"
    for index in range(2):
        poses = evaluate.dataset_poses(encoded, index, 1, num_frames)
        with np.load(data / "test" / "0000" / f"{index:06d}.npz") as f:
            np.testing.assert_array_equal(poses, f["poses"][1:1 + num_frames])
        np.testing.assert_array_equal(poses, evaluate.dataset_poses(raw, index, 1, num_frames))
        seen = evaluate.seen_in_context(evaluate.dataset_poses(encoded, index, 0, num_frames), FILE_CONTEXT)
        np.testing.assert_array_equal(seen, [True] * 4 + [True, True, False])   # as in the raw files' samples
    with pytest.raises(DataError, match=r"\(record 0\): field 'poses' expected \(7, 3\) from frame 3, got \(6, 3\)"):
        evaluate.dataset_poses(encoded, 0, 3, num_frames)

    with TfdsWriter(tmp_path / "plain", "codes", "test", (8, 8)) as writer:   # TECO's encoded datasets
        writer.write(np.zeros((num_frames, 8, 8), np.int32), np.zeros(num_frames, np.int32))
    plain = open_dataset(tmp_path / "plain" / "codes", "test", seq_len=num_frames, batch_size=1, shuffle=False)
    assert evaluate.dataset_poses(plain, 0, 0, num_frames) is None


class CountingTokenizer(Tokenizer):
    """A tokenizer that counts the frames it decodes."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.decoded = 0

    def decode(self, codes):
        self.decoded += int(np.prod(np.shape(codes)[:2]))
        return super().decode(codes)


def test_sample_files_of_an_encoded_dataset_decode_each_frame_once(tmp_path):
    """An encoded dataset's files hold what decoding whole videos gives (real: the codes, fake: the rollout),
    while the sample's context frames are decoded once for both, and a `real_cache` shared between calls decodes
    the real videos once for every call of the same tokenizer and videos (never for another tokenizer)."""
    from vqgan.encode import encode_dataset

    config, model = toy_config(), toy_model("convs5")
    variables = toy_variables("convs5")
    vq = VQGAN(**TOKENIZER_FIELDS, num_groups=2)
    tokenizer = CountingTokenizer(vq, vqgan_init(vq, 3), chunk_size=16)
    data, num_frames = tmp_path / "data", FILE_CONTEXT + FILE_HORIZON
    write_dataset(data, num_videos=4, frames=num_frames)
    encode_dataset(tokenizer, data, tmp_path / "codes", "maze", splits=("test",), progress=False)
    encoded = tmp_path / "codes" / "maze"
    codes = next(iter(open_dataset(encoded, "test", seq_len=num_frames, batch_size=4, shuffle=False)))["codes"]
    protocol = (FILE_CONTEXT, FILE_HORIZON, True)
    cache = {}

    def run(out, protocol=protocol):
        tokenizer.decoded = 0
        result = sample_files.sample_dataset(config, variables, tokenizer, str(encoded), str(tmp_path / out),
                                             protocol=protocol, num_videos=4, batch_size=4, seed=7, real_cache=cache)
        with np.load(result["files"][0]) as f:
            return dict(f)

    first = run("first")
    assert tokenizer.decoded == 4 * (num_frames + FILE_HORIZON)  # real videos, then the generated frames only
    np.testing.assert_array_equal(first["real"], sample_files.to_uint8(tokenizer.decode(codes)))
    loaded = {**variables, "tokenizer": {"code_embeddings": tokenizer.codebook}}
    direct = sample.rollout(model, loaded, codes[:, :FILE_CONTEXT], first["actions"],
                            jax.random.fold_in(jax.random.key(7), 0), horizon=FILE_HORIZON,
                            settings=SamplerSettings.from_config(config.sampling))
    np.testing.assert_array_equal(first["fake"], sample_files.to_uint8(tokenizer.decode(np.asarray(direct))))

    again = run("again", protocol=(FILE_CONTEXT, FILE_HORIZON, False))  # the same videos: real from the cache
    assert tokenizer.decoded == 4 * FILE_HORIZON
    np.testing.assert_array_equal(again["real"], first["real"])
    assert not np.array_equal(again["fake"], first["fake"])

    # Another tokenizer (same shapes, other weights; the data layer refuses it for these codes, so the decoding
    # step is called directly) does not reuse the cached videos.
    other = CountingTokenizer(vq, vqgan_init(vq, 4), chunk_size=16)
    other_real, _ = sample_files._decode_videos(other, {"codes": codes}, codes, np.asarray(direct), FILE_CONTEXT,
                                                np.arange(4), cache)
    assert other.decoded == 4 * (num_frames + FILE_HORIZON)
    np.testing.assert_array_equal(other_real, sample_files.to_uint8(other.decode(codes)))
    assert not np.array_equal(other_real, first["real"])
