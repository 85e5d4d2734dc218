"""teco_ssm.train at toy size on a synthetic code set: learning for every backbone, exact resume after a crash,
the NaN guard, frames and codes giving the same run, the rollout GIF, and bad configs failing before compilation.

Compiled steps are shared between runs of the same configuration (the jitted functions take the model as a static
argument), so the tests reuse a few configurations."""
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

import vqgan
from configs import mazelab
from teco_ssm import backbones, checkpoint as ckpt, train
from teco_ssm.data import TfdsWriter, pipeline

import toy

CODES, CODE_GRID, FRAME = 12, (8, 8), 16
NUM_VIDEOS, VIDEO_LENGTH, SEQ_LEN, BATCH = 16, 12, 8, 4
# the shared toy sizes, with the Transformer's window at the training clip length
TOY_BACKBONES = dict(toy.TOY_BACKBONES, transformer=dict(toy.TOY_BACKBONES["transformer"], max_len=SEQ_LEN))
TOY_MODEL = dict(toy.TOY_MODEL, code_shape=CODE_GRID, vqgan_codes=CODES, vqgan_embedding_dim=4, drop_loss_rate=0.5,
                 mask_future_after=SEQ_LEN)
VQGAN_FIELDS = dict(toy.TOY_VQGAN, resolution=FRAME, n_embed=CODES)


def test_toy_backbones_cover_the_registry():
    assert set(TOY_BACKBONES) == set(backbones.NAMES)


# ------------------------------------------------------------------------------------------------- fixtures
def synthetic_videos(seed=0):
    """Codes that a world model can learn: a diagonal pattern that shifts by the action (0, 1 or 2) each frame."""
    rng = np.random.default_rng(seed)
    rows, cols = np.meshgrid(np.arange(CODE_GRID[0]), np.arange(CODE_GRID[1]), indexing="ij")
    videos = []
    for _ in range(NUM_VIDEOS):
        actions = rng.integers(0, 3, VIDEO_LENGTH).astype(np.int32)
        offsets = rng.integers(0, CODES) + np.cumsum(actions)
        codes = (rows[None] + cols[None] + offsets[:, None, None]) % CODES
        videos.append((codes.astype(np.int32), actions))
    return videos


def write_codes(root, videos, name="toy"):
    with TfdsWriter(root, name, "train", CODE_GRID, action_dim=3, examples_per_shard=8) as writer:
        for codes, actions in videos:
            writer.write(codes, actions)
    return os.path.join(root, name)


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    """A tiny VQGAN in TECO's checkpoint layout, read by `vqgan.load`."""
    return toy.write_tokenizer(tmp_path_factory.mktemp("vqgan") / "tokenizer", VQGAN_FIELDS)


@pytest.fixture(scope="module")
def tokenizer(tokenizer_path):
    return vqgan.load(tokenizer_path)


@pytest.fixture(scope="module")
def codes_path(tmp_path_factory):
    return write_codes(tmp_path_factory.mktemp("codes"), synthetic_videos())


def toy_config(backbone, data, tokenizer, **top):
    config = mazelab.get_config(backbone)
    config.dataset.path, config.tokenizer.path = data, tokenizer
    config[backbone].update(TOY_BACKBONES[backbone])
    config.model.update(TOY_MODEL)
    config.optim[backbone].update(dict(lr=3e-3, warmup_steps=5))
    config.sampling.update(dict(draft_steps=2, revise_steps=2, revise_rounds=1))
    settings = dict(batch_size=BATCH, seq_len=SEQ_LEN, steps=12, log_every=2, checkpoint_every=4,
                    keep_checkpoints=50, visualise_every=1000, eval_every=0)
    settings.update(top)
    for key, value in settings.items():
        config[key] = value
    return config


def metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def saved_params(workdir, config, step=None):
    model = train.teco.build(config)
    abstract = jax.eval_shape(lambda k: train.teco.init_variables(model, k), jax.random.key(0))
    mngr = ckpt.manager(workdir, read_only=True)
    try:
        return ckpt.restore(mngr, {"model": abstract}, step)["model"]["params"], mngr.all_steps()
    finally:
        mngr.close()


def assert_trees_equal(a, b):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


# ------------------------------------------------------------------------------------------------- learning
@pytest.mark.parametrize("name", backbones.NAMES)
def test_every_backbone_learns(tmp_path, codes_path, tokenizer_path, tokenizer, name):
    """120 steps drive the training loss (interval means of 10 steps) far below its start: the reconstruction term
    to under a third, the total (with the prior's term, which follows the still-moving latents) to under half."""
    config = toy_config(name, codes_path, tokenizer_path, steps=120, log_every=10, checkpoint_every=120)
    result = train.train_and_evaluate(config, str(tmp_path), tokenizer)
    logged = metrics(str(tmp_path))
    first, last = logged[0], logged[-1]
    assert result["step"] == 120 and last["step"] == 120
    assert last["loss"] < 0.5 * first["loss"], (name, first, last)
    assert last["recon_loss"] < 0.33 * first["recon_loss"], (name, first, last)
    assert logged[-1]["recon_accuracy"] > 0.5, logged[-1]
    assert all(np.isfinite(r["grad_norm"]) and r["lr"] > 0 for r in logged)


def test_held_out_loss_is_the_models_eval_loss_on_the_eval_split(tmp_path, tokenizer_path, tokenizer):
    """eval_every: the eval split's loss (train=False: every frame, true actions) at the interval and the last step,
    equal to the model applied by hand to the same clips with the final parameters; it falls as the model learns."""
    videos = synthetic_videos(seed=3)
    root = tmp_path / "codes"
    for split, part in (("train", videos[:12]), ("test", videos[12:])):
        with TfdsWriter(root, "toy", split, CODE_GRID, action_dim=3, examples_per_shard=8) as writer:
            for codes, actions in part:
                writer.write(codes, actions)
    config = toy_config("convs5", str(root / "toy"), tokenizer_path, steps=30, eval_every=10, eval_batches=3,
                        checkpoint_every=30, log_every=10)
    result = train.train_and_evaluate(config, str(tmp_path / "run"), tokenizer)
    held_out = [r for r in metrics(str(tmp_path / "run")) if "eval/loss" in r]
    assert [r["step"] for r in held_out] == [10, 20, 30]
    assert held_out[-1]["eval/loss"] == pytest.approx(result["eval_loss"])
    assert held_out[-1]["eval/loss"] < 0.9 * held_out[0]["eval/loss"]
    again = train.train_and_evaluate(config, str(tmp_path / "run"), tokenizer)  # finished: read from the workdir
    assert again == result and again["eval_loss"] == held_out[-1]["eval/loss"]
    # stopped after the last checkpoint, before the last held-out loss was written: the rerun computes it
    path = tmp_path / "run" / "metrics.jsonl"
    path.write_text("".join(line for line in path.read_text().splitlines(keepends=True)
                            if not ('"step": 30' in line and "eval/loss" in line)))
    recovered = train.train_and_evaluate(config, str(tmp_path / "run"), tokenizer)
    assert recovered["eval_loss"] == pytest.approx(result["eval_loss"], rel=1e-6)
    assert recovered == pytest.approx(result, rel=1e-6)

    model = train.teco.build(config)
    params, _ = saved_params(str(tmp_path / "run"), config)
    eval_rng = jax.random.split(jax.random.key(config.seed), 3)[2]
    codes = np.stack([c[:SEQ_LEN] for c, _ in videos[12:16]])  # the only full batch: 4 test videos, from frame 0
    actions = np.stack([a[:SEQ_LEN] for _, a in videos[12:16]])
    variables = {"params": params, "tokenizer": {"code_embeddings": np.asarray(tokenizer.codebook, np.float32)}}
    _, terms = model.apply(variables, codes, actions, train=False, rng=eval_rng, rngs={"dropout": eval_rng})
    assert float(terms["loss"]) == pytest.approx(held_out[-1]["eval/loss"], rel=1e-4)


# --------------------------------------------------------------------------------------------------- resume
def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path, codes_path, tokenizer_path, tokenizer):
    config = toy_config("convs5", codes_path, tokenizer_path, steps=12, checkpoint_every=4)
    straight = str(tmp_path / "straight")
    train.train_and_evaluate(config, straight, tokenizer)

    crashed = str(tmp_path / "crashed")

    def crash(step):
        if step == 7:
            raise KeyboardInterrupt("simulated kill at step 7")

    with pytest.raises(KeyboardInterrupt):
        train.train_and_evaluate(config, crashed, tokenizer, hooks=[crash])
    assert saved_params(crashed, config)[1] == [4]
    assert os.path.isfile(os.path.join(crashed, "config.json"))
    result = train.train_and_evaluate(config, crashed, tokenizer)  # resumes at step 4: same batches and keys
    assert result["step"] == 12
    expected, steps = saved_params(straight, config)
    got, resumed_steps = saved_params(crashed, config)
    assert steps == resumed_steps == [4, 8, 12]
    assert_trees_equal(got, expected)
    # A finished run restarted trains nothing and reports the same figures, read back from the workdir: the
    # last interval's loss and speed, the held-out loss, the parameter count (a run stopped after its last
    # checkpoint, before its caller recorded it, loses none of them).
    again = train.train_and_evaluate(config, crashed, tokenizer)
    assert again == result
    assert {"loss", "recon_loss", "steps_per_second", "num_params", "num_processes"} <= set(again)
    assert again["num_params"] == sum(np.size(x) for x in jax.tree_util.tree_leaves(got))
    assert saved_params(crashed, config)[1] == [4, 8, 12]


# ---------------------------------------------------------------------------------------------- NaN guard
def test_nan_loss_stops_naming_the_step_and_term_and_keeps_the_good_checkpoints(tmp_path, tokenizer_path,
                                                                                 tokenizer):
    """One video uses a code whose embedding is NaN: the loss turns NaN at the first batch holding it."""
    videos = synthetic_videos()
    order, _ = pipeline.epoch_order(0, 0, NUM_VIDEOS)  # the data layer's order for seed 0 (one process)
    poisoned = int(order[3 * BATCH + 1])                   # read by the 4th batch, i.e. step 4
    videos[poisoned][0][3, 2, 2] = CODES - 1
    for i, (codes, _) in enumerate(videos):
        if i != poisoned:
            codes[codes == CODES - 1] = 0
    data = write_codes(str(tmp_path / "data"), videos)
    table = np.asarray(tokenizer.codebook).copy()
    table[CODES - 1] = np.nan

    class PoisonedTokenizer:
        n_codes, embedding_dim, latent_shape, frame_shape = (tokenizer.n_codes, tokenizer.embedding_dim,
                                                             tokenizer.latent_shape, tokenizer.frame_shape)
        codebook = table

    config = toy_config("convs5", data, tokenizer_path, steps=12, checkpoint_every=1, log_every=1)
    workdir = str(tmp_path / "run")
    with pytest.raises(FloatingPointError, match=r"^step 4: non-finite training terms: .*\bloss=nan.*recon_loss=nan"):
        train.train_and_evaluate(config, workdir, PoisonedTokenizer())
    params, steps = saved_params(workdir, config)
    assert steps == [1, 2, 3]
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(params))
    assert [r["step"] for r in metrics(workdir)] == [1, 2, 3]


# ------------------------------------------------------------------------------------- frames, codes, GIF
def test_frames_and_codes_give_the_same_run_and_a_rollout_gif(tmp_path, tokenizer_path, tokenizer):
    """A dataset of frames (encoded in the loop) trains exactly as the dataset of their codes; the GIF shows ground
    truth next to the rollout."""
    rng = np.random.default_rng(3)
    frames_root = tmp_path / "frames"
    videos = []
    for i in range(NUM_VIDEOS):
        video = rng.integers(0, 256, (VIDEO_LENGTH, FRAME, FRAME, 3), dtype=np.uint8)
        actions = rng.integers(0, 3, VIDEO_LENGTH).astype(np.int32)
        os.makedirs(frames_root / "train" / "00", exist_ok=True)
        np.savez(frames_root / "train" / "00" / f"{i:04d}.npz", video=video, actions=actions)
        codes = tokenizer.encode(video[None].astype(np.float32) / 127.5 - 1.0)[1][0]
        videos.append((codes, actions))
    codes_data = write_codes(str(tmp_path / "codes"), videos)

    runs = {}
    for kind, data in (("frames", str(frames_root)), ("codes", codes_data)):
        config = toy_config("convs5", data, tokenizer_path, steps=12, checkpoint_every=12, log_every=1,
                            visualise_every=12 if kind == "codes" else 1000)
        train.train_and_evaluate(config, str(tmp_path / kind), tokenizer)
        runs[kind] = (metrics(str(tmp_path / kind)), saved_params(str(tmp_path / kind), config)[0])
    assert [r["loss"] for r in runs["frames"][0]] == [r["loss"] for r in runs["codes"][0]]
    assert_trees_equal(runs["frames"][1], runs["codes"][1])

    gif = Image.open(tmp_path / "codes" / train.ROLLOUT_DIR / "step_00000012.gif")
    assert gif.n_frames == SEQ_LEN
    assert gif.size == (2 * FRAME + 4, BATCH * FRAME)  # ground truth | band | rollout, one row per video
    gif.seek(0)  # the first (context) frame is the same on both sides
    first = np.asarray(gif.convert("RGB"))
    np.testing.assert_array_equal(first[:, :FRAME], first[:, FRAME + 4:])


# ----------------------------------------------------------------------------------------------- bad configs
def test_bad_configs_fail_before_compilation(tmp_path, codes_path, tokenizer_path, tokenizer, monkeypatch):
    def no_compilation(*args, **kwargs):
        raise AssertionError("compiled before the config was checked")

    monkeypatch.setattr(train, "init_state", no_compilation)
    monkeypatch.setattr(train, "train_step", no_compilation)

    def run(config):
        train.train_and_evaluate(config, str(tmp_path / "run"), tokenizer)

    config = toy_config("convs5", codes_path, tokenizer_path)
    with config.unlocked():
        config.backbone = "lstm"
    with pytest.raises(ValueError, match=r"config.backbone='lstm' is not a known backbone; valid backbones: "
                                         r"transformer, s5, convs5, convt3"):
        run(config)

    config = toy_config("convs5", None, tokenizer_path)
    with pytest.raises(ValueError, match=r"config.dataset.path is unset"):
        run(config)
    config = toy_config("convs5", str(tmp_path / "missing"), tokenizer_path)
    with pytest.raises(ValueError, match=r"config.dataset.path='.*missing' is not a folder"):
        run(config)
    config = toy_config("convs5", codes_path, str(tmp_path / "no_vqgan"))
    with pytest.raises(ValueError, match=r"config.tokenizer.path='.*no_vqgan' is not a folder"):
        run(config)

    config = toy_config("convs5", codes_path, tokenizer_path)
    with config.unlocked():
        config.model.hidden_size = 3
    with pytest.raises(ValueError, match=r"config.model.hidden_size is not a field; expected fields of config.model"):
        run(config)

    config = toy_config("convs5", codes_path, tokenizer_path)
    config.model.vqgan_codes = 13
    with pytest.raises(ValueError, match=r"tokenizer .* has 12 codes .* config.model gives vqgan_codes=13"):
        run(config)
    assert not os.path.exists(tmp_path / "run" / "checkpoints" / "0")
