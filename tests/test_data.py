"""teco_ssm.data: round trips for npz / mp4 / TFDS folders, order arithmetic, resume, sharding, bad input."""
import itertools
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from teco_ssm.data import DataError, TfdsWriter, inspect_dataset, open_dataset
from teco_ssm.data import pipeline, tfds_folder

ONE = dict(process_index=0, process_count=1)


def _video(rng, length, size=8):
    return rng.integers(0, 256, (length, size, size, 3), dtype=np.uint8)


def write_npz_dataset(root, lengths, *, split='test', size=8, action_dim=4, seed=0, per_shard=3):
    """Writes <root>/<split>/<shard>/<i>.npz; returns [(video, actions)] in file order."""
    rng = np.random.default_rng(seed)
    out = []
    for i, length in enumerate(lengths):
        folder = os.path.join(root, split, f'{i // per_shard:02d}')
        os.makedirs(folder, exist_ok=True)
        video, actions = _video(rng, length, size), rng.integers(0, action_dim, length)
        np.savez(os.path.join(folder, f'{i:04d}.npz'), video=video, actions=actions)
        out.append((video, actions))
    return out


def reference_frames(video):
    return video.astype(np.float64) / 127.5 - 1.0


# ----------------------------------------------------------------------------------------- npz

def test_npz_evaluation_reads_every_video_once_in_order_with_padding(tmp_path):
    data = write_npz_dataset(tmp_path, [10, 12, 9, 11, 10])
    ds = open_dataset(tmp_path, 'test', seq_len=9, batch_size=2, **ONE)
    assert (ds.info.format, ds.info.kind, ds.info.num_videos, ds.info.frame_shape) == ('npz', 'frames', 5, (8, 8, 3))
    batches = list(ds)
    assert len(batches) == len(ds) == 3
    index = np.concatenate([b['index'] for b in batches])
    valid = np.concatenate([b['valid'] for b in batches])
    np.testing.assert_array_equal(index, [0, 1, 2, 3, 4, -1])
    np.testing.assert_array_equal(valid, [True] * 5 + [False])
    assert all(set(b) == {'frames', 'actions', 'valid', 'index', 'start'} for b in batches)
    video = np.concatenate([b['frames'] for b in batches])
    actions = np.concatenate([b['actions'] for b in batches])
    assert video.dtype == np.float32 and actions.dtype == np.int32
    for i, (v, a) in enumerate(data):  # first seq_len frames, scaled to [-1, 1]
        np.testing.assert_allclose(video[i], reference_frames(v[:9]), atol=1e-6)
        np.testing.assert_array_equal(actions[i], a[:9])
    assert np.all(video[5] == -1.0) and np.all(actions[5] == 0)
    again = list(open_dataset(tmp_path, 'test', seq_len=9, batch_size=2, **ONE))
    for a, b in zip(batches, again):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    raw = list(open_dataset(tmp_path, 'test', seq_len=9, batch_size=2, frames_dtype='uint8', **ONE))
    assert raw[0]['frames'].dtype == np.uint8
    np.testing.assert_array_equal(raw[1]['frames'][1], data[3][0][:9])


def test_npz_training_crops_match_source_and_vary(tmp_path):
    data = write_npz_dataset(tmp_path, [20, 16, 30], split='train')
    ds = open_dataset(tmp_path, 'train', seq_len=6, batch_size=3, seed=3, **ONE)
    starts = []
    for batch in itertools.islice(ds, 6):
        assert batch['valid'].all()
        for row in range(3):
            v, a = data[batch['index'][row]]
            s = batch['start'][row]
            assert 0 <= s <= len(v) - 6
            np.testing.assert_allclose(batch['frames'][row], reference_frames(v[s:s + 6]), atol=1e-6)
            np.testing.assert_array_equal(batch['actions'][row], a[s:s + 6])
            starts.append(s)
    assert len(set(starts)) > 5  # random temporal crops


def test_training_epochs_are_permutations_and_seed_dependent():
    n = 7
    plan = [pipeline.train_example(5, n, g) for g in range(3 * n)]
    for epoch in range(3):
        assert sorted(i for i, _ in plan[epoch * n:(epoch + 1) * n]) == list(range(n))
    assert [i for i, _ in plan[:n]] != [i for i, _ in plan[n:2 * n]]
    assert plan != [pipeline.train_example(6, n, g) for g in range(3 * n)]
    # crop arithmetic: every start is valid and the extremes are reachable
    assert pipeline.crop_start(10, 4, 0.0) == 0 and pipeline.crop_start(10, 4, 0.999999) == 6
    assert all(0 <= pipeline.crop_start(10, 4, f) <= 6 for f in np.linspace(0, 0.9999, 101))


def test_resume_yields_the_same_batches_without_replaying(tmp_path, monkeypatch):
    write_npz_dataset(tmp_path, [12, 14, 13, 15, 12], split='train')
    kwargs = dict(seq_len=5, batch_size=2, seed=11, **ONE)
    fresh = list(itertools.islice(open_dataset(tmp_path, 'train', **kwargs), 9))
    planned = []
    resumed_ds = open_dataset(tmp_path, 'train', start_step=6, **kwargs)
    plan = resumed_ds.plan
    monkeypatch.setattr(resumed_ds, 'plan', lambda step: planned.append(step) or plan(step))
    resumed = list(itertools.islice(resumed_ds, 3))
    for a, b in zip(fresh[6:], resumed):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert min(planned) == 6  # the first six batches are never planned nor read


def test_order_of_a_training_step_does_not_depend_on_the_process_count(tmp_path):
    """Global batch of step s: examples chosen by (seed, s); process p reads rows [p B, (p + 1) B) of it."""
    write_npz_dataset(tmp_path, [8, 9, 10, 11, 12, 13, 14], split='train')
    kwargs = dict(seq_len=4, seed=2, frames_dtype='uint8')
    one = list(itertools.islice(open_dataset(tmp_path, 'train', batch_size=4, **kwargs, **ONE), 5))
    for count in (2, 4):
        parts = [list(itertools.islice(open_dataset(tmp_path, 'train', batch_size=4 // count, process_index=p,
                                                    process_count=count, **kwargs), 5)) for p in range(count)]
        for step in range(5):
            for key in ('frames', 'actions', 'index', 'start'):
                np.testing.assert_array_equal(np.concatenate([part[step][key] for part in parts]), one[step][key])
    index = np.concatenate([b['index'] for b in one])  # 20 examples: every video of the first two epochs
    assert sorted(index[:7]) == list(range(7)) and sorted(index[7:14]) == list(range(7))
    assert [list(pipeline.batch_rows(3, 2, p, 2)) for p in range(2)] == [[12, 13], [14, 15]]


@pytest.mark.parametrize('ending', ['return', 'raise'])
def test_a_process_that_stops_reading_part_way_exits(tmp_path, ending):
    """An endless training iterator still open at exit (a script that stops reading, or an uncaught exception whose
    traceback holds it) must not hang the interpreter's shutdown."""
    write_npz_dataset(tmp_path, [12, 14, 13], split='train')
    script = "\n".join([
        "from teco_ssm.data import open_dataset",
        "def main():",
        f"    batches = iter(open_dataset({str(tmp_path)!r}, 'train', seq_len=5, batch_size=2, process_index=0, "
        "process_count=1))",
        "    next(batches)",
        "    raise RuntimeError('stopped')" if ending == 'raise' else "    return batches",
        "kept = main()"])
    done = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=120)
    assert done.returncode == (1 if ending == 'raise' else 0), done.stderr[-2000:]
    assert ('RuntimeError: stopped' in done.stderr) == (ending == 'raise')


def test_evaluation_batches_are_global_batches_split_over_processes(tmp_path):
    """Evaluation batch k holds videos [k G, (k + 1) G) whatever the process count; every video read once by one
    process; every process yields the same number of batches, padding marked invalid."""
    write_npz_dataset(tmp_path, [9] * 7)
    one = list(open_dataset(tmp_path, 'test', seq_len=9, batch_size=4, **ONE))
    assert [b['index'].tolist() for b in one] == [[0, 1, 2, 3], [4, 5, 6, -1]]
    assert [b['valid'].tolist() for b in one] == [[True] * 4, [True] * 3 + [False]]
    for count in (2, 4):
        parts = [list(open_dataset(tmp_path, 'test', seq_len=9, batch_size=4 // count, process_index=p,
                                   process_count=count)) for p in range(count)]
        assert [len(part) for part in parts] == [2] * count
        for k in range(2):
            for key in ('frames', 'actions', 'index', 'valid'):
                np.testing.assert_array_equal(np.concatenate([part[k][key] for part in parts]), one[k][key])
    parts = [list(open_dataset(tmp_path, 'test', seq_len=9, batch_size=2, process_index=p, process_count=2))
             for p in range(2)]
    seen = [np.concatenate([b['index'] for b in part]) for part in parts]
    seen = [set(s[s >= 0].tolist()) for s in seen]
    assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == set(range(7))
    assert [len(part) for part in parts] == [2, 2]  # 4 and 3 videos, the same number of batches


# ----------------------------------------------------------------------------------------- mp4

def _write_mp4(path, video):
    import imageio_ffmpeg

    writer = imageio_ffmpeg.write_frames(path, (video.shape[2], video.shape[1]), fps=10, codec='libx264',
                                         macro_block_size=1, quality=None, pix_fmt_out='yuv444p',
                                         output_params=['-crf', '0'])
    writer.send(None)
    for frame in video:
        writer.send(np.ascontiguousarray(frame))
    writer.close()


def test_mp4_round_trip_with_and_without_action_sidecar(tmp_path):
    rng = np.random.default_rng(0)
    videos = []
    for i in range(2):
        video = np.repeat(np.repeat(rng.integers(0, 256, (6, 4, 4, 3)), 4, 1), 4, 2).astype(np.uint8)
        os.makedirs(tmp_path / 'test' / '0', exist_ok=True)
        _write_mp4(str(tmp_path / 'test' / '0' / f'{i}.mp4'), video)
        videos.append(video)
    actions = np.array([0, 1, 2, 3, 2, 1])
    np.savez(tmp_path / 'test' / '0' / '0.npz', actions=actions)
    ds = open_dataset(tmp_path, 'test', seq_len=6, batch_size=2, image_size=16, action_dim=4, **ONE)
    assert (ds.info.format, ds.info.frame_shape, ds.info.video_length) == ('mp4', (16, 16, 3), 6)
    (batch,) = list(ds)
    for i in range(2):  # lossless H.264 up to RGB <-> YUV rounding
        np.testing.assert_allclose(batch['frames'][i], reference_frames(videos[i]), atol=3 / 127.5)
    np.testing.assert_array_equal(batch['actions'][0], actions)
    np.testing.assert_array_equal(batch['actions'][1], np.zeros(6))


# ---------------------------------------------------------------------------------------- TFDS

def _codes(rng, n, length=7):
    return [(rng.integers(0, 1024, (length + i % 3, 4, 4)), rng.integers(0, 4, length + i % 3)) for i in range(n)]


def test_tfds_writer_round_trip_and_layout(tmp_path):
    examples = _codes(np.random.default_rng(0), 5)
    with TfdsWriter(tmp_path, 'enc', 'test', (4, 4), action_dim=4, codebook_size=1024, examples_per_shard=2) as w:
        for video, actions in examples:
            w.write(video, actions)
    folder = tmp_path / 'enc' / '1.0.0'
    info = json.loads((folder / 'dataset_info.json').read_text())
    assert info['splits'][0]['shardLengths'] == ['2', '2', '1']
    assert sorted(p.name for p in folder.glob('enc-test.tfrecord-*')) == [
        f'enc-test.tfrecord-0000{i}-of-00003' for i in range(3)]
    features = tfds.builder_from_directory(str(folder)).info.features
    assert (features['video'].shape, features['video'].np_dtype) == ((None, 4, 4), np.int32)
    ds = open_dataset(tmp_path / 'enc', 'test', seq_len=7, batch_size=2, **ONE)
    assert (ds.info.format, ds.info.kind, ds.info.code_shape, ds.info.action_dim) == ('tfds', 'codes', (4, 4), 4)
    batches = list(ds)
    video = np.concatenate([b['codes'] for b in batches])
    actions = np.concatenate([b['actions'] for b in batches])
    assert video.dtype == np.int32
    for i, (v, a) in enumerate(examples):
        np.testing.assert_array_equal(video[i], v[:7])
        np.testing.assert_array_equal(actions[i], a[:7])
    # tensorflow_datasets reads the folder in the same order; our record index points at the same records
    read_by_tfds = list(tfds.builder_from_directory(str(folder)).as_dataset(split='test', shuffle_files=False))
    for (v, a), record in zip(examples, read_by_tfds):
        np.testing.assert_array_equal(record['video'].numpy(), v)
        np.testing.assert_array_equal(record['actions'].numpy(), a)
    path = str(folder / 'enc-test.tfrecord-00001-of-00003')
    offset, length = tfds_folder.index_tfrecord(path)[1]
    decoded = tfds_folder.deserialize(features, tfds_folder.read_record(path, offset, length), path)
    np.testing.assert_array_equal(decoded['video'], examples[3][0])


def test_tfds_writer_resumes_after_a_crash(tmp_path):
    examples = _codes(np.random.default_rng(1), 9)
    with pytest.raises(RuntimeError):
        with TfdsWriter(tmp_path, 'enc', 'train', (4, 4), examples_per_shard=2) as w:
            for video, actions in examples[:5]:
                w.write(video, actions)
            raise RuntimeError('crash')          # the unfinished shard (example 4) is dropped
    folder = tmp_path / 'enc' / '1.0.0'
    (folder / 'enc-train.tfrecord-00002-of-00003.tmp').write_bytes(b'partial')  # left by a killed process
    os.replace(folder / 'enc-train.tfrecord-00001-of-00002', folder / 'enc-train.tfrecord-00001-of-00007')
    with TfdsWriter(tmp_path, 'enc', 'train', (4, 4), examples_per_shard=2) as w:
        assert w.num_examples == 4
        for video, actions in examples[w.num_examples:]:
            w.write(video, actions)
    ds = open_dataset(tmp_path / 'enc', 'train', seq_len=7, batch_size=3, shuffle=False, **ONE)
    assert ds.info.num_videos == 9
    video = np.concatenate([b['codes'] for b in ds])
    for i, (v, _) in enumerate(examples):
        np.testing.assert_array_equal(video[i], v[:7])
    assert not list(folder.glob('*.tmp'))
    with pytest.raises(DataError, match='feature spec'):
        TfdsWriter(tmp_path, 'enc', 'train', (8, 8))


def test_tfds_writer_extra_per_frame_feature(tmp_path):
    """MazeLab poses (T, 3) stored beside the codes, read back whole by `Dataset.read_field`; the spec is checked."""
    rng = np.random.default_rng(4)
    examples = [(v, a, rng.integers(0, 9, (len(a), 3))) for v, a in _codes(rng, 3)]
    with TfdsWriter(tmp_path, 'enc', 'test', (4, 4), examples_per_shard=2, extra_features={'poses': (3,)}) as w:
        for video, actions, poses in examples:
            w.write(video, actions, poses=poses)
        with pytest.raises(DataError, match=r"example 3: field 'poses' expected \(7, 3\) integers"):
            w.write(*examples[0][:2], poses=examples[0][2][:, :2])
        with pytest.raises(DataError, match=r"example 3: got extra fields \[\], the writer declares \['poses'\]"):
            w.write(*examples[0][:2])
    folder = tmp_path / 'enc' / '1.0.0'
    poses = tfds.builder_from_directory(str(folder)).info.features['poses']
    assert (poses.shape, poses.np_dtype) == ((None, 3), np.int32)
    ds = open_dataset(tmp_path / 'enc', 'test', seq_len=7, batch_size=3, **ONE)
    (batch,) = list(ds)                                    # the tf.data path reads video and actions as before
    for i, (video, actions, poses) in enumerate(examples):
        np.testing.assert_array_equal(batch['codes'][i], video[:7])
        np.testing.assert_array_equal(batch['actions'][i], actions[:7])
        np.testing.assert_array_equal(ds.read_field(i, 'poses'), poses)
    assert ds.read_field(0, 'depth') is None
    with pytest.raises(DataError, match='feature spec'):  # a writer without the poses on the same folder
        TfdsWriter(tmp_path, 'enc', 'train', (4, 4))
    with pytest.raises(DataError, match='feature spec'):
        TfdsWriter(tmp_path, 'enc', 'train', (4, 4), extra_features={'poses': (2,)})
    with TfdsWriter(tmp_path, 'enc', 'train', (4, 4), extra_features={'poses': [3]}) as w:
        assert w.num_examples == 0                         # the same spec: another split of the folder
    write_npz_dataset(tmp_path / 'raw', [6])              # npz files without poses
    assert open_dataset(tmp_path / 'raw', 'test', seq_len=6, batch_size=1, **ONE).read_field(0, 'poses') is None


def _example(features):
    import tensorflow as tf

    return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString()


def test_reads_tfds_folders_in_legacy_and_bytes_layouts(tmp_path):
    """Stand-ins for folders written by tensorflow_datasets itself (uint16 codes as TECO published)."""
    import tensorflow as tf

    rng = np.random.default_rng(2)
    examples = [(rng.integers(0, 1024, (6, 4, 4)).astype(np.uint16), rng.integers(0, 4, 6)) for _ in range(3)]
    for layout in ('legacy', 'bytes'):
        folder = tmp_path / layout / 'dmlab_encoded' / '1.0.0'
        folder.mkdir(parents=True)
        if layout == 'legacy':  # tfds 4.x before the proto-JSON features.json; no filepathTemplate
            features = {'type': 'tensorflow_datasets.core.features.features_dict.FeaturesDict', 'content': {
                'video': {'type': 'tensorflow_datasets.core.features.feature.Tensor',
                          'content': {'shape': [None, 4, 4], 'dtype': 'uint16'}},
                'actions': {'type': 'tensorflow_datasets.core.features.feature.Tensor',
                            'content': {'shape': [None], 'dtype': 'int32'}}}}
            split = {'name': 'test', 'numShards': '1', 'shardLengths': ['3']}
        else:
            tensor = {'pythonClassName': 'tensorflow_datasets.core.features.tensor_feature.Tensor'}
            features = {'pythonClassName': 'tensorflow_datasets.core.features.features_dict.FeaturesDict',
                        'featuresDict': {'features': {
                            'video': {**tensor, 'tensor': {'shape': {'dimensions': ['-1', '4', '4']},
                                                           'dtype': 'uint16', 'encoding': 'zlib'}},
                            'actions': {**tensor, 'tensor': {'shape': {'dimensions': ['-1']}, 'dtype': 'int32',
                                                             'encoding': 'bytes'}}}}}
            split = {'name': 'test', 'shardLengths': ['3'], 'filepathTemplate': '{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}'}
        (folder / 'features.json').write_text(json.dumps(features))
        (folder / 'dataset_info.json').write_text(json.dumps({'name': 'dmlab_encoded', 'version': '1.0.0',
                                                               'splits': [split]}))
        with tf.io.TFRecordWriter(str(folder / 'dmlab_encoded-test.tfrecord-00000-of-00001')) as writer:
            for video, actions in examples:
                if layout == 'legacy':
                    feats = {'video': tf.train.Feature(int64_list=tf.train.Int64List(value=video.ravel().tolist())),
                             'actions': tf.train.Feature(int64_list=tf.train.Int64List(value=actions.tolist()))}
                else:
                    import zlib

                    feats = {'video': tf.train.Feature(bytes_list=tf.train.BytesList(
                        value=[zlib.compress(video.astype('<u2').tobytes())])),
                             'actions': tf.train.Feature(bytes_list=tf.train.BytesList(
                                 value=[actions.astype('<i4').tobytes()]))}
                writer.write(_example(feats))
        ds = open_dataset(tmp_path / layout / 'dmlab_encoded', 'test', seq_len=6, batch_size=4, **ONE)
        (batch,) = list(ds)
        np.testing.assert_array_equal(batch['valid'], [True, True, True, False])
        for i, (v, a) in enumerate(examples):
            np.testing.assert_array_equal(batch['codes'][i], v)
            np.testing.assert_array_equal(batch['actions'][i], a)


# ----------------------------------------------------------------------------------- bad input

def test_missing_split_and_empty_dataset(tmp_path):
    write_npz_dataset(tmp_path, [5])
    with pytest.raises(DataError, match=r'train: split folder not found'):
        open_dataset(tmp_path, 'train', seq_len=4, batch_size=1, **ONE)
    (tmp_path / 'train' / '0').mkdir(parents=True)
    with pytest.raises(DataError, match='empty dataset'):
        inspect_dataset(tmp_path, 'train')
    assert issubclass(DataError, ValueError)


@pytest.mark.parametrize('damage', ['garbage', 'truncated'])
def test_corrupt_npz_named_up_front_and_during_reading(tmp_path, damage):
    write_npz_dataset(tmp_path, [6, 6, 6])
    for index in (0, 2):  # the first file is checked up front, a later one when it is read
        target = tmp_path / 'test' / '00' / f'{index:04d}.npz'
        backup = target.read_bytes()
        target.write_bytes(b'not a zip file' if damage == 'garbage' else backup[:len(backup) // 2])
        with pytest.raises(DataError, match=rf'{index:04d}\.npz: corrupt or truncated npz'):
            list(open_dataset(tmp_path, 'test', seq_len=4, batch_size=2, **ONE))
        target.write_bytes(backup)


def test_short_video_wrong_size_bad_actions(tmp_path):
    write_npz_dataset(tmp_path, [8, 8, 5])
    kwargs = dict(batch_size=2, **ONE)
    with pytest.raises(DataError, match=r'0002\.npz: video has 5 frames, shorter than seq_len=6'):
        list(open_dataset(tmp_path, 'test', seq_len=6, **kwargs))
    with pytest.raises(DataError, match=r'0000\.npz: frames of shape \(8, 8, 3\), expected \(64, 64, 3\)'):
        open_dataset(tmp_path, 'test', seq_len=4, image_size=64, **kwargs)
    with pytest.raises(DataError, match=r'0000\.npz: action id 3 at frame \d+ outside \[0, 2\)'):
        open_dataset(tmp_path, 'test', seq_len=4, action_dim=2, **kwargs)
    path = tmp_path / 'test' / '00' / '0001.npz'
    np.savez(path, video=np.zeros((8, 8, 8, 3), np.uint8), actions=np.zeros(7, np.int64))
    with pytest.raises(DataError, match=r"0001\.npz: field 'actions' has length 7, expected 8"):
        list(open_dataset(tmp_path, 'test', seq_len=4, **kwargs))
    np.savez(path, video=np.zeros((8, 8, 8, 3), np.uint8), actions=np.full(8, 9))
    with pytest.raises(DataError, match=r'0001\.npz: action id 9 at frame 0 outside \[0, 4\)'):
        list(open_dataset(tmp_path, 'test', seq_len=4, action_dim=4, **kwargs))
    (tmp_path / 'metadata.json').write_text(json.dumps({'action_dim': 4}))
    with pytest.raises(DataError, match=r'0001\.npz: action id 9'):  # action_dim from metadata.json
        list(open_dataset(tmp_path, 'test', seq_len=4, **kwargs))
    with pytest.raises(DataError, match='metadata.json gives action_dim=4'):
        open_dataset(tmp_path, 'test', seq_len=4, action_dim=6, **kwargs)
    np.savez(path, frames=np.zeros((8, 8, 8, 3), np.uint8))
    shutil.copy(path, tmp_path / 'test' / '00' / '0000.npz')
    with pytest.raises(DataError, match=r"0000\.npz: missing field 'video'"):
        inspect_dataset(tmp_path, 'test')


def test_bad_tfds_folders(tmp_path):
    examples = _codes(np.random.default_rng(3), 3)
    with TfdsWriter(tmp_path, 'enc', 'train', (4, 4), examples_per_shard=2) as w:
        for video, actions in examples:
            w.write(video, actions)
    with pytest.raises(DataError, match=r"split 'test' not found; the dataset has splits \['train'\]"):
        inspect_dataset(tmp_path / 'enc', 'test')
    with pytest.raises(DataError, match='shorter than seq_len=20'):
        open_dataset(tmp_path / 'enc', 'train', seq_len=20, batch_size=1, **ONE)
    shard = tmp_path / 'enc' / '1.0.0' / 'enc-train.tfrecord-00001-of-00002'
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])
    with pytest.raises(DataError, match=r'enc-train\.tfrecord-00001-of-00002: truncated tfrecord'):
        list(open_dataset(tmp_path / 'enc', 'train', seq_len=7, batch_size=1, shuffle=False, **ONE))
    shard.unlink()
    with pytest.raises(DataError, match=r'00001-of-00002: shard listed in .*dataset_info.json is missing'):
        inspect_dataset(tmp_path / 'enc', 'train')
    with pytest.raises(DataError, match='action id'):
        TfdsWriter(tmp_path, 'other', 'train', (4, 4), action_dim=2).write(examples[0][0], np.full(7, 3))
