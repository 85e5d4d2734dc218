"""encode_dataset: whole videos to codes read back by the data layer, MazeLab poses kept, resume after a crash, no
silent overwrite."""
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds

from teco_ssm import lock, mazelab
from teco_ssm.data import DataError, open_dataset
from teco_ssm.data import tfds_folder
from vqgan.encode import encode_dataset
from vqgan.model import VQGAN, init_variables
from vqgan.tokenizer import Tokenizer

MODEL = VQGAN(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), z_channels=4, resolution=16,
              n_embed=16, embed_dim=4, num_groups=4)
LENGTHS = {'train': [6, 9, 7, 6, 8], 'test': [7, 6]}


def small_frames(video: np.ndarray) -> np.ndarray:
    """MazeLab frames (T, 64, 64, 3) uint8 -> (T, 16, 16, 3) uint8 by 4x4 mean pooling."""
    t = video.shape[0]
    return video.reshape(t, 16, 4, 16, 4, 3).mean(axis=(2, 4)).round().astype(np.uint8)


def write_videos(root: Path, lengths=LENGTHS, poses: bool = False) -> dict[str, list[tuple[np.ndarray, ...]]]:
    """A raw npz dataset of downscaled MazeLab trajectories; returns {split: [(video, actions)]}, with the
    trajectory's poses (T, 3) int32 also stored and returned third when `poses`."""
    out = {}
    for split, lens in lengths.items():
        out[split] = []
        for i, length in enumerate(lens):
            traj = mazelab.make_trajectory(mazelab.trajectory_seed(5, split, i), length)
            arrays = dict(video=small_frames(traj['video']), actions=traj['actions'].astype(np.int32))
            if poses:
                arrays['poses'] = traj['poses'].astype(np.int32)
            path = root / split / '0000' / f'{i:06d}.npz'
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(path, **arrays)
            out[split].append(tuple(arrays.values()))
    (root / 'metadata.json').write_text(json.dumps({'action_dim': mazelab.ACTION_DIM}))
    return out


def make_tokenizer(seed: int, frames: np.ndarray) -> Tokenizer:
    """Random weights; codebook drawn from encoder outputs of `frames` so that many codes are in use."""
    variables = init_variables(MODEL, seed)
    latents = np.asarray(MODEL.apply(variables, frames.astype(np.float32) / 127.5 - 1.0,
                                     method=VQGAN.encode_latents)).reshape(-1, MODEL.embed_dim)
    picks = np.random.default_rng(seed).choice(len(latents), MODEL.n_embed, replace=False)
    variables['stats']['quantize']['embeddings'] = latents[picks]
    return Tokenizer(MODEL, variables, chunk_size=8, source=f'random seed {seed}')


class CrashingTokenizer(Tokenizer):
    """Counts `encode` calls and raises on call `crash_at` (never, when None); shares the compiled functions."""

    def __init__(self, base: Tokenizer, crash_at=None):
        self.model, self.variables, self.chunk_size, self.source = base.model, base.variables, 8, base.source
        self._encode, self._decode = base._encode, base._decode
        self.calls, self.crash_at = 0, crash_at

    def encode(self, video):
        self.calls += 1
        if self.crash_at is not None and self.calls == self.crash_at:
            raise RuntimeError('simulated crash')
        return super().encode(video)


def stored(out: Path, name: str, split: str) -> list[dict[str, np.ndarray]]:
    """Every record of a split, whole, in order, as tensorflow_datasets itself reads the folder."""
    builder = tfds.builder_from_directory(str(tfds_folder.find_version_dir(out / name)))
    return list(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)))


def features_of(version_dir: Path) -> dict[str, tuple]:
    """{feature: (shape, numpy dtype)} of a TFDS folder's features.json, read by tensorflow_datasets."""
    features = tfds.builder_from_directory(str(version_dir)).info.features
    return {key: (features[key].shape, np.dtype(features[key].np_dtype)) for key in features.keys()}


def expected_codes(tok: Tokenizer, video: np.ndarray) -> np.ndarray:
    return tok.encode(video[None].astype(np.float32) / 127.5 - 1.0)[1][0]


def folder_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob('*')):
        if path.is_file():
            digest.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp('raw')
    videos = write_videos(root)
    frames = np.concatenate([v for v, _ in videos['train']])
    return root, videos, make_tokenizer(0, frames), make_tokenizer(1, frames)


def check_output(out: Path, name: str, tok: Tokenizer, videos) -> None:
    for split, items in videos.items():
        records = stored(out, name, split)
        assert len(records) == len(items)
        for record, (video, actions) in zip(records, items):
            np.testing.assert_array_equal(record['video'], expected_codes(tok, video))   # whole video
            np.testing.assert_array_equal(record['actions'], actions)


def test_round_trip_reads_back_as_codes(dataset, tmp_path):
    root, videos, tok, _ = dataset
    result = encode_dataset(tok, root, tmp_path, 'maze_codes', examples_per_shard=2, progress=False)
    assert result['splits'] == {'train': 5, 'test': 2} and result['code_shape'] == (8, 8)
    check_output(tmp_path, 'maze_codes', tok, videos)

    ds = open_dataset(tmp_path / 'maze_codes', 'train', seq_len=6, batch_size=5, shuffle=False)
    assert ds.info.kind == 'codes' and ds.info.code_shape == (8, 8) and ds.info.action_dim == mazelab.ACTION_DIM
    batch = next(iter(ds))
    for row, (video, actions) in enumerate(videos['train']):
        codes = expected_codes(tok, video)
        np.testing.assert_array_equal(batch['codes'][row], codes[:6])
        np.testing.assert_array_equal(batch['actions'][row], actions[:6])
    assert len(np.unique(batch['codes'])) > 4      # the comparison is not between constant arrays
    meta = json.loads((tmp_path / 'maze_codes' / '1.0.0' / 'metadata.json').read_text())
    assert meta['codebook_size'] == MODEL.n_embed
    # files without poses (TECO's datasets) give the two features they always did
    assert set(features_of(tmp_path / 'maze_codes' / '1.0.0')) == {'video', 'actions'}
    assert ds.read_field(0, 'poses') is None


def test_mazelab_poses_survive_encoding(dataset, tmp_path):
    _, _, tok, _ = dataset
    raw = tmp_path / 'raw'
    videos = write_videos(raw, {'train': [6, 7], 'test': [6]}, poses=True)
    encode_dataset(tok, raw, tmp_path / 'out', 'maze_codes', examples_per_shard=1, progress=False)
    assert features_of(tmp_path / 'out' / 'maze_codes' / '1.0.0')['poses'] == ((None, 3), np.dtype(np.int32))
    for split, items in videos.items():
        records = stored(tmp_path / 'out', 'maze_codes', split)
        assert len(records) == len(items)
        for record, (video, actions, poses) in zip(records, items):
            np.testing.assert_array_equal(record['video'], expected_codes(tok, video))
            np.testing.assert_array_equal(record['actions'], actions)
            np.testing.assert_array_equal(record['poses'], poses)       # the same poses per trajectory
    assert len(np.unique(videos['train'][1][2], axis=0)) > 1            # not a constant pose
    ds = open_dataset(tmp_path / 'out' / 'maze_codes', 'train', seq_len=6, batch_size=2, shuffle=False)
    np.testing.assert_array_equal(ds.read_field(1, 'poses'), videos['train'][1][2])

    # every split must agree: a test split without poses is refused before anything is written
    np.savez(raw / 'test' / '0000' / '000000.npz', video=videos['test'][0][0], actions=videos['test'][0][1])
    with pytest.raises(DataError, match='disagree on the per-frame poses'):
        encode_dataset(tok, raw, tmp_path / 'out2', 'maze_codes', progress=False)
    assert not (tmp_path / 'out2').exists()
    # a later file of a split whose first file holds poses must hold them too
    np.savez(raw / 'train' / '0000' / '000001.npz', video=videos['train'][1][0], actions=videos['train'][1][1])
    with pytest.raises(DataError, match=r"000001\.npz: missing field\(s\) \['poses'\]"):
        encode_dataset(tok, raw, tmp_path / 'out3', 'maze_codes', splits=('train',), progress=False)


def test_resume_after_crash_skips_stored_trajectories(dataset, tmp_path):
    root, videos, tok, other = dataset
    crashing = CrashingTokenizer(tok, crash_at=4)
    with pytest.raises(RuntimeError, match='simulated crash'):
        encode_dataset(crashing, root, tmp_path, 'maze_codes', examples_per_shard=2, progress=False)
    version_dir = tmp_path / 'maze_codes' / '1.0.0'
    assert len(stored(tmp_path, 'maze_codes', 'train')) == 2          # one finished shard; the third video lost
    (version_dir / 'maze_codes-train.tfrecord-00001-of-00002.tmp').write_bytes(b'half a shard from a kill')

    with pytest.raises(FileExistsError, match='not produced by this tokenizer'):
        encode_dataset(other, root, tmp_path, 'maze_codes', examples_per_shard=2, progress=False)

    resumed = CrashingTokenizer(tok)
    encode_dataset(resumed, root, tmp_path, 'maze_codes', examples_per_shard=2, progress=False)
    assert resumed.calls == (5 - 2) + 2                               # stored trajectories are not re-encoded
    assert not list(version_dir.glob('*.tmp'))
    check_output(tmp_path, 'maze_codes', tok, videos)


def test_refuses_to_overwrite_unless_asked_and_failed_overwrite_keeps_old(dataset, tmp_path):
    root, videos, tok, other = dataset
    encode_dataset(tok, root, tmp_path, 'maze_codes', progress=False)
    before = folder_digest(tmp_path / 'maze_codes')
    again = encode_dataset(tok, root, tmp_path, 'maze_codes', progress=False)  # complete, same tokenizer: kept
    assert again['splits'] == {'train': len(videos['train']), 'test': len(videos['test'])}
    assert folder_digest(tmp_path / 'maze_codes') == before
    with pytest.raises(RuntimeError, match='simulated crash'):
        encode_dataset(CrashingTokenizer(other, crash_at=3), root, tmp_path, 'maze_codes', overwrite=True,
                       progress=False)
    assert folder_digest(tmp_path / 'maze_codes') == before           # nothing overwritten by a failed run

    encode_dataset(other, root, tmp_path, 'maze_codes', overwrite=True, progress=False)
    check_output(tmp_path, 'maze_codes', other, videos)
    assert sorted(set(os.listdir(tmp_path)) - {lock.LOCK_FILE}) == ['maze_codes']  # staging folders are gone


def test_mp4_source_and_bad_input_errors(dataset, tmp_path):
    import imageio_ffmpeg

    _, videos, tok, _ = dataset
    raw = tmp_path / 'raw_mp4'
    for i, (video, actions) in enumerate(videos['test']):
        path = raw / 'test' / '0000' / f'{i:06d}.mp4'
        path.parent.mkdir(parents=True, exist_ok=True)
        writer = imageio_ffmpeg.write_frames(str(path), (16, 16), fps=10, quality=10, macro_block_size=1)
        writer.send(None)
        for frame in video:
            writer.send(np.ascontiguousarray(frame))
        writer.close()
        np.savez(path.with_suffix('.npz'), actions=actions)
    encode_dataset(tok, raw, tmp_path / 'out', 'mp4_codes', splits=('test',), progress=False)
    from teco_ssm.data.formats import read_mp4
    for record, i in zip(stored(tmp_path / 'out', 'mp4_codes', 'test'), range(2)):
        decoded, actions = read_mp4(str(raw / 'test' / '0000' / f'{i:06d}.mp4'))
        np.testing.assert_array_equal(record['video'], expected_codes(tok, decoded))
        np.testing.assert_array_equal(record['actions'], videos['test'][i][1])

    with pytest.raises(DataError, match='expected'):   # 16x16 frames for a tokenizer of another resolution
        big = VQGAN(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), z_channels=4, resolution=32,
                    n_embed=16, embed_dim=4, num_groups=4)
        encode_dataset(Tokenizer(big, init_variables(big, 0)), raw, tmp_path / 'out2', 'x', splits=('test',),
                       progress=False)
    with pytest.raises(DataError, match='already holds codes'):
        encode_dataset(tok, tmp_path / 'out' / 'mp4_codes', tmp_path / 'out3', 'x', splits=('test',),
                       progress=False)
    assert not (tmp_path / 'out2' / 'x').exists() and not (tmp_path / 'out3' / 'x').exists()
