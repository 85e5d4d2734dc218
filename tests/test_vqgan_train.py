"""vqgan.train on a few MazeLab trajectories: it learns, resumes exactly, stops on NaN, and its workdir loads."""
import json
import math
import shutil

import jax
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache

import vqgan
from configs.vqgan_mazelab import get_config
from teco_ssm import mazelab
from teco_ssm.progress import check_finite
from vqgan import train as vqgan_train

NUM_STEPS, CRASH_AT, SAVE_EVERY = 40, 25, 10


def write_maze_videos(root, num_train=6, num_test=2, length=16):
    """MazeLab trajectories downscaled 4x to 16x16 frames, in the raw npz layout."""
    for split, count in (('train', num_train), ('test', num_test)):
        for i in range(count):
            traj = mazelab.make_trajectory(mazelab.trajectory_seed(11, split, i), length)
            video = traj['video'].reshape(length, 16, 4, 16, 4, 3).mean(axis=(2, 4)).round().astype(np.uint8)
            path = root / split / '0000' / f'{i:06d}.npz'
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(path, video=video, actions=traj['actions'])
    (root / 'metadata.json').write_text(json.dumps({'action_dim': mazelab.ACTION_DIM}))


def toy_config(data_path):
    c = get_config('quick')
    c.data.path = str(data_path)
    c.num_steps, c.log_every, c.checkpoint_every, c.eval_every = NUM_STEPS, 1, SAVE_EVERY, 10 ** 6
    c.keep_checkpoints = 100
    c.data.seq_len, c.data.videos_per_batch, c.data.frames_per_video = 8, 4, 4
    c.data.eval_frames, c.eval_batch = 16, 16
    c.model.update(dict(resolution=16, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                        z_channels=8, n_embed=32, embed_dim=8, num_groups=4))
    c.disc.update(dict(ch=8, num_layers=2, num_groups=4))
    c.loss.disc_start = 10 ** 6
    c.loss.reinit_every = 10
    c.optim.learning_rate, c.optim.warmup_steps = 3e-3, 5
    return c


def read_metrics(workdir):
    with open(workdir / 'metrics.jsonl') as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope='module')
def shared_compilations(tmp_path_factory):
    """A persistent compilation cache for this module: the three runs below compile the same programs once."""
    names = ('jax_compilation_cache_dir', 'jax_persistent_cache_min_compile_time_secs',
             'jax_persistent_cache_min_entry_size_bytes')
    saved = {name: getattr(jax.config, name) for name in names}
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
    jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
    compilation_cache.reset_cache()
    compilation_cache.set_cache_dir(str(tmp_path_factory.mktemp('xla_cache')))
    yield
    for name, value in saved.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()


@pytest.fixture(scope='module')
def runs(tmp_path_factory, shared_compilations):
    """One uninterrupted run, and one run that hits NaN frames at step CRASH_AT and is then resumed."""
    data = tmp_path_factory.mktemp('maze')
    write_maze_videos(data)
    config = toy_config(data)
    full = tmp_path_factory.mktemp('full')
    result = vqgan_train.train_and_evaluate(config, str(full))

    resumed = tmp_path_factory.mktemp('resumed')
    original = vqgan_train.sample_frames
    # the trainer draws the frames of step k with np.random.default_rng((seed, k - 1))
    crash_state = np.random.default_rng((config.seed, CRASH_AT - 1)).bit_generator.state

    def poisoned(batch, frames_per_video, rng):
        hit = rng.bit_generator.state == crash_state
        frames = original(batch, frames_per_video, rng)
        return frames * np.nan if hit else frames

    vqgan_train.sample_frames = poisoned
    try:
        with pytest.raises(FloatingPointError) as crash:
            vqgan_train.train_and_evaluate(config, str(resumed))
    finally:
        vqgan_train.sample_frames = original
    resumed_result = vqgan_train.train_and_evaluate(config, str(resumed))
    return dict(config=config, full=full, result=result, resumed=resumed, resumed_result=resumed_result,
                crash=str(crash.value))


def test_reconstruction_loss_falls(runs):
    l1 = [m['train/l1'] for m in read_metrics(runs['full']) if 'train/l1' in m]
    assert len(l1) == NUM_STEPS
    assert np.mean(l1[-5:]) < 0.5 * l1[0], (l1[0], l1[-5:])
    assert runs['result']['step'] == NUM_STEPS and runs['result']['codes_used'] > 4


def test_nan_guard_names_step_and_terms(runs):
    assert f'step {CRASH_AT}: non-finite training terms' in runs['crash']
    assert 'l1=nan' in runs['crash'] and 'loss=nan' in runs['crash']
    with pytest.raises(FloatingPointError) as only:
        check_finite(3, {'l1': 0.5, 'commitment': math.inf, 'codes': np.zeros(4)})
    assert 'commitment=inf' in str(only.value) and 'l1' not in str(only.value)


def test_resume_continues_at_saved_step_with_identical_parameters(runs):
    steps = [m['step'] for m in read_metrics(runs['resumed']) if 'train/l1' in m]
    saved = (CRASH_AT - 1) // SAVE_EVERY * SAVE_EVERY
    assert steps == list(range(1, CRASH_AT)) + list(range(saved + 1, NUM_STEPS + 1))
    assert runs['resumed_result']['step'] == NUM_STEPS
    full, resumed = vqgan.load(runs['full']), vqgan.load(runs['resumed'])
    leaves = jax.tree_util.tree_leaves_with_path(full.variables)
    for (path, a), b in zip(leaves, jax.tree_util.tree_leaves(resumed.variables)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))


def test_checkpoints_only_at_the_interval_and_the_end(runs):
    saved = sorted(int(p.name) for p in (runs['full'] / 'checkpoints').iterdir() if p.name.isdigit())
    assert saved == list(range(SAVE_EVERY, NUM_STEPS + 1, SAVE_EVERY))


def test_workdir_loads_as_tokenizer_with_training_metrics(runs):
    tok = vqgan.load(runs['full'])
    assert tok.latent_shape == (8, 8) and tok.n_codes == 32
    frames = vqgan_train.load_eval_frames(runs['config'])
    recon = tok.decode(tok.encode(frames[None])[1])[0]
    mse = np.mean(((frames - recon) / 2.0) ** 2, axis=(1, 2, 3))
    psnr = float(np.mean(-10 * np.log10(mse)))
    assert abs(psnr - runs['result']['psnr']) < 0.01


@pytest.mark.parametrize('field, value, message', [
    ('num_steps', 5, r'config.optim.warmup_steps=5 must be an integer in \[0, config.num_steps=5\)'),
    ('optim.warmup_steps', -1, r'config.optim.warmup_steps=-1 must be an integer in \[0'),
    ('num_steps', 0, r'config.num_steps=0 must be an integer >= 1'),
    ('data.frames_per_video', 9, r'config.data.frames_per_video=9 must be at most config.data.seq_len=8'),
    ('optim.learning_rate', 0.0, r'config.optim.learning_rate=0.0 must be a number > 0'),
    ('model.n_embed', 0, r'config.model.n_embed=0 must be an integer >= 1'),
    ('model.num_groups', 3, r'config.model.num_groups=3 must divide every width'),
    ('model.resolution', 15, r'config.model.resolution=15 must be divisible by 2 \*\* \(len\(ch_mult\) - 1\) = 2'),
    ('loss.beta', -1.0, r'config.loss.beta=-1.0 must be a number >= 0'),
])
def test_a_bad_tokenizer_setting_is_refused_naming_the_field_before_any_work(tmp_path, field, value, message):
    config = toy_config(tmp_path / 'data')
    node = config
    *parents, leaf = field.split('.')
    for key in parents:
        node = node[key]
    node[leaf] = value
    with pytest.raises(ValueError, match=message):
        vqgan_train.train_and_evaluate(config, str(tmp_path / 'run'))
    assert not (tmp_path / 'run').exists()


def test_a_tokenizer_config_edited_after_training_is_named(runs, tmp_path):
    edited = tmp_path / 'edited'
    shutil.copytree(runs['full'], edited)
    config = json.loads((edited / 'config.json').read_text())
    config['model']['z_channels'] = 16
    (edited / 'config.json').write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r'edited/config.json: field model \(.*z_channels=16.*\) does not describe '
                                         r'the VQGAN saved beside it'):
        vqgan.load(edited)
