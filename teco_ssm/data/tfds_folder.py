"""TFDS folders of encoded videos, read and written without `tensorflow_datasets`.

A TFDS folder (what `tfds.builder(...).download_and_prepare()` leaves on disk, and how TECO published
its encoded datasets) is::

    <root>/<name>/<version>/dataset_info.json   name, splits[{name, shardLengths, filepathTemplate}]
    <root>/<name>/<version>/features.json       the feature spec (FeaturesDict of Tensor features)
    <root>/<name>/<version>/metadata.json       optional free-form metadata (here: action_dim, ...)
    <root>/<name>/<version>/<name>-<split>.tfrecord-00000-of-00004

Each tfrecord record is a serialised `tf.train.Example`. A `Tensor` feature with encoding 'none' is a
flat Int64List/FloatList (a leading None dimension is recovered from the length); with encoding
'bytes'/'zlib' it is the raw (optionally zlib-compressed) little-endian buffer in a BytesList; a tensor
with more than one unknown dimension also stores `<key>/shape`. Both the current proto-JSON
`features.json` ({"featuresDict": {"features": ...}}) and the older {"type": ..., "content": ...}
layout are understood.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import re
import struct
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np

from teco_ssm.data.formats import DataError, check_example, ExampleSpec

DEFAULT_TEMPLATE = '{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}'
VERSION_RE = re.compile(r'^\d+\.\d+\.\d+$')
_TENSOR_CLASS = 'tensorflow_datasets.core.features.tensor_feature.Tensor'
_DICT_CLASS = 'tensorflow_datasets.core.features.features_dict.FeaturesDict'


@dataclasses.dataclass(frozen=True)
class TensorFeature:
    """One tensor of the feature spec: shape (None for unknown dimensions), numpy dtype name, encoding."""

    shape: tuple[Optional[int], ...]
    dtype: str
    encoding: str = 'none'


# ----------------------------------------------------------------------------------------------- spec

def find_version_dir(path: Path) -> Optional[Path]:
    """The folder holding dataset_info.json: `path` itself, or its highest `X.Y.Z` subfolder; else None."""
    path = Path(path)
    if (path / 'dataset_info.json').exists():
        return path
    if not path.is_dir():
        return None
    versions = [p for p in path.iterdir() if p.is_dir() and VERSION_RE.match(p.name)
                and (p / 'dataset_info.json').exists()]
    if not versions:
        return None
    return max(versions, key=lambda p: tuple(int(x) for x in p.name.split('.')))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError as e:
        raise DataError(f'{path}: missing (a TFDS folder needs dataset_info.json and features.json)') from e
    except (OSError, ValueError) as e:
        raise DataError(f'{path}: expected valid JSON ({e})') from e


def _shape_from_json(shape: Any) -> tuple[Optional[int], ...]:
    if isinstance(shape, dict):  # proto JSON: {"dimensions": ["-1", "16", "16"]}; {} for scalars
        dims = [int(d) for d in shape.get('dimensions', [])]
    else:  # legacy JSON: [null, 16, 16]
        dims = [-1 if d is None else int(d) for d in shape]
    return tuple(None if d < 0 else d for d in dims)


def _parse_feature(node: dict, where: str) -> dict[str, TensorFeature]:
    """Flattened {key: TensorFeature} of one features.json node (keys of nested dicts joined by '/')."""
    if 'featuresDict' in node or node.get('type') == _DICT_CLASS or node.get('pythonClassName') == _DICT_CLASS:
        if 'featuresDict' in node:
            children = node['featuresDict'].get('features', {})
        else:
            content = node.get('content', {})
            children = content.get('features', content) if isinstance(content, dict) else {}
        out = {}
        for key, child in children.items():
            for sub, feature in _parse_feature(child, where).items():
                out[f'{key}/{sub}' if sub else key] = feature
        return out
    if 'tensor' in node:
        t = node['tensor']
        return {'': TensorFeature(_shape_from_json(t.get('shape', {})), t['dtype'], t.get('encoding', 'none') or 'none')}
    if 'sequence' in node or node.get('type', '').endswith('sequence_feature.Sequence'):
        seq = node.get('sequence') or node.get('content', {})
        length = seq.get('length')
        length = None if length in (None, '-1', -1) else int(length)
        inner = _parse_feature(seq['feature'], where)
        if set(inner) != {''}:
            raise DataError(f'{where}: only Sequence(Tensor) features are supported, got a nested sequence')
        f = inner['']
        return {'': TensorFeature((length,) + f.shape, f.dtype, f.encoding)}
    if node.get('type', '').endswith('.Tensor'):  # legacy Tensor
        c = node['content']
        return {'': TensorFeature(_shape_from_json(c['shape']), c['dtype'], c.get('encoding', 'none') or 'none')}
    kind = node.get('pythonClassName') or node.get('type') or sorted(node)
    raise DataError(f'{where}: unsupported feature {kind}; expected Tensor features for video and actions')


def read_features(version_dir: Path) -> dict[str, TensorFeature]:
    """{key: TensorFeature} from `<version_dir>/features.json`."""
    path = Path(version_dir) / 'features.json'
    return _parse_feature(_read_json(path), str(path))


def read_split_shards(version_dir: Path, split: str) -> tuple[str, list[tuple[str, Optional[int]]]]:
    """Dataset name and [(shard path, number of records)] of one split, as dataset_info.json lists them."""
    version_dir = Path(version_dir)
    info_path = version_dir / 'dataset_info.json'
    info = _read_json(info_path)
    name = info.get('name') or version_dir.parent.name
    splits = {s['name']: s for s in info.get('splits', [])}
    if split not in splits:
        raise DataError(f'{info_path}: split {split!r} not found; the dataset has splits {sorted(splits)}')
    entry = splits[split]
    lengths = [int(n) for n in entry.get('shardLengths', [])]
    num_shards = len(lengths) or int(entry.get('numShards', 0))
    template = entry.get('filepathTemplate') or DEFAULT_TEMPLATE
    file_format = info.get('fileFormat', 'tfrecord')
    if file_format != 'tfrecord':
        raise DataError(f"{info_path}: fileFormat {file_format!r} not supported, expected 'tfrecord'")
    if num_shards == 0:
        raise DataError(f'{info_path}: empty dataset, split {split!r} lists no shards')
    shards = []
    for i in range(num_shards):
        fname = template.format(DATASET=name, SPLIT=split, FILEFORMAT=file_format, SHARD_INDEX=i,
                                NUM_SHARDS=num_shards, SHARD_X_OF_Y=f'{i:05d}-of-{num_shards:05d}')
        shard = version_dir / fname
        if not shard.exists():
            raise DataError(f'{shard}: shard listed in {info_path} is missing')
        shards.append((str(shard), lengths[i] if lengths else None))
    return name, shards


# ------------------------------------------------------------------------------------------ records

def index_tfrecord(path: str) -> np.ndarray:
    """(n, 2) int64 [payload offset, payload length] of every record of a tfrecord file.

    Reads only the 12-byte record headers; a record running past the end of the file is a DataError.
    """
    size = os.path.getsize(path)
    out = []
    with open(path, 'rb') as f:
        pos = 0
        while pos < size:
            header = f.read(12)
            if len(header) < 12:
                raise DataError(f'{path}: truncated tfrecord (partial record header at byte {pos})')
            (length,) = struct.unpack('<Q', header[:8])
            end = pos + 12 + length + 4
            if end > size:
                raise DataError(f'{path}: truncated tfrecord (record at byte {pos} needs {end} bytes, file has {size})')
            out.append((pos + 12, length))
            pos = end
            f.seek(pos)
    return np.asarray(out, np.int64).reshape(-1, 2)


def read_record(path: str, offset: int, length: int) -> bytes:
    """The payload of one tfrecord record."""
    with open(path, 'rb') as f:
        f.seek(offset)
        data = f.read(length)
    if len(data) != length:
        raise DataError(f'{path}: truncated tfrecord (record at byte {offset} cut short)')
    return data


def _parse_dtype(dtype: str):
    import tensorflow as tf

    np_dtype = np.dtype(dtype)
    if np.issubdtype(np_dtype, np.integer) or np_dtype == np.bool_:
        return tf.int64
    if np.issubdtype(np_dtype, np.floating):
        return tf.float32
    raise DataError(f'unsupported tensor dtype {dtype!r} in features.json')


def parse_spec(features: dict[str, TensorFeature], keys: Sequence[str]) -> dict[str, Any]:
    """`tf.io.parse_single_example` spec for `keys` of the feature spec."""
    import tensorflow as tf

    spec = {}
    for key in keys:
        f = features[key]
        if f.encoding == 'none':
            if f.shape.count(None) > 1:
                raise DataError(f"feature {key!r} has several unknown dimensions without bytes encoding")
            if f.shape and f.shape[0] is None:
                spec[key] = tf.io.FixedLenSequenceFeature(f.shape[1:], _parse_dtype(f.dtype), allow_missing=True)
            else:
                spec[key] = tf.io.FixedLenFeature(f.shape, _parse_dtype(f.dtype))
        elif f.encoding in ('bytes', 'zlib'):
            spec[key if f.shape.count(None) <= 1 else f'{key}/value'] = tf.io.FixedLenFeature([], tf.string, '')
            if f.shape.count(None) > 1:
                spec[f'{key}/shape'] = tf.io.FixedLenFeature([len(f.shape)], tf.int64, [0] * len(f.shape))
        else:
            raise DataError(f'feature {key!r}: unknown encoding {f.encoding!r}')
    return spec


def decode_feature(parsed: dict[str, Any], key: str, feature: TensorFeature):
    """The tensor `key` (TF graph op) from the output of `tf.io.parse_single_example(parse_spec(...))`."""
    import tensorflow as tf

    if feature.encoding == 'none':
        return parsed[key]
    dynamic = feature.shape.count(None) > 1
    value = parsed[f'{key}/value'] if dynamic else parsed[key]
    if feature.encoding == 'zlib':
        value = tf.io.decode_compressed(value, compression_type='ZLIB')
    value = tf.io.decode_raw(value, tf.as_dtype(np.dtype(feature.dtype)))
    shape = parsed[f'{key}/shape'] if dynamic else [-1 if d is None else d for d in feature.shape]
    return tf.reshape(value, shape)


def decode_example_np(serialized: bytes, features: dict[str, TensorFeature], where: str) -> dict[str, np.ndarray]:
    """All Tensor features of one serialised example as numpy arrays (slow path: inspection and tests)."""
    import tensorflow as tf

    try:
        example = tf.train.Example.FromString(serialized)
    except Exception as e:
        raise DataError(f'{where}: corrupt record, expected a serialised tf.train.Example ({e})') from e
    fmap = example.features.feature
    out = {}
    for key, f in features.items():
        dynamic = f.shape.count(None) > 1
        store = f'{key}/value' if (dynamic and f.encoding != 'none') else key
        if store not in fmap:
            raise DataError(f'{where}: record lacks feature {key!r}; it holds {sorted(fmap)}')
        if f.encoding == 'none':
            values = fmap[store]
            arr = np.asarray(values.int64_list.value if values.HasField('int64_list') else values.float_list.value)
            arr = arr.astype(np.dtype(f.dtype))
        else:
            import zlib

            raw = fmap[store].bytes_list.value[0]
            arr = np.frombuffer(zlib.decompress(raw) if f.encoding == 'zlib' else raw, np.dtype(f.dtype))
        if dynamic:
            shape = list(fmap[f'{key}/shape'].int64_list.value)
        else:
            shape = [-1 if d is None else d for d in f.shape]
        out[key] = arr.reshape(shape)
    return out


# ------------------------------------------------------------------------------------------- writer

def _shard_name(name: str, split: str, index: int, total: int) -> str:
    return f'{name}-{split}.tfrecord-{index:05d}-of-{total:05d}'


def _int64_feature(values: np.ndarray):
    import tensorflow as tf

    return tf.train.Feature(int64_list=tf.train.Int64List(value=values.ravel().tolist()))


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    with open(folder / '.dataset_info.lock', 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _atomic_write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + '.tmp')
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


class TfdsWriter:
    """Writes one split of an encoded dataset as a TFDS folder, incrementally and resumably.

    `<root>/<name>/1.0.0/` gets features.json (`video`: Tensor (None, h, w) of `code_dtype`, `actions`:
    Tensor (None,) int32, and one Tensor (None, *shape) int32 per entry {name: shape} of `extra_features`,
    e.g. {'poses': (3,)} for MazeLab's per-frame poses), metadata.json (action_dim, codebook_size, when given)
    and `<name>-<split>.tfrecord-XXXXX-of-YYYYY` shards of `examples_per_shard` trajectories each. A writer
    opened on an existing folder must declare the same features.

    A shard is written to a `.tmp` file and becomes part of the dataset only once closed, synced and
    renamed; dataset_info.json is then rewritten atomically. Opening a writer on a folder left by a crash
    deletes unfinished `.tmp` shards, renumbers the finished ones and recounts their records, so
    `num_examples` says how many trajectories (in the caller's order) are safely stored: skip that many
    and keep writing. Leaving a `with` block through an exception drops the unfinished shard.

    Example::

        with TfdsWriter(root, 'mazelab_encoded', 'train', (16, 16), action_dim=4) as writer:
            for video, actions in trajectories[writer.num_examples:]:
                writer.write(codes, actions)

        with TfdsWriter(root, 'mazelab_encoded', 'train', (16, 16), extra_features={'poses': (3,)}) as writer:
            writer.write(codes, actions, poses=poses)        # poses (T, 3) int
    """

    def __init__(self, root: str | os.PathLike, name: str, split: str, code_shape: tuple[int, int], *,
                 action_dim: Optional[int] = None, codebook_size: Optional[int] = None,
                 code_dtype: str = 'int32', examples_per_shard: int = 64, description: str = '',
                 version: str = '1.0.0', extra_features: Optional[Mapping[str, Sequence[int]]] = None):
        if not re.match(r'^[a-z0-9_]+$', name):
            raise ValueError(f'dataset name {name!r}: use lowercase letters, digits and underscores')
        if not re.match(r'^[a-z0-9_]+$', split):
            raise ValueError(f'split name {split!r}: use lowercase letters, digits and underscores')
        self.folder = Path(root) / name / version
        self.name, self.split, self.version = name, split, version
        self.code_shape = tuple(int(d) for d in code_shape)
        self.code_dtype = np.dtype(code_dtype).name
        self.action_dim, self.codebook_size = action_dim, codebook_size
        self.extra_features = {key: tuple(int(d) for d in shape) for key, shape in (extra_features or {}).items()}
        for key, shape in self.extra_features.items():
            if key in ('video', 'actions') or not re.match(r'^[a-z0-9_]+$', key):
                raise ValueError(f'extra feature {key!r}: use lowercase letters, digits and underscores, '
                                 "other than 'video' and 'actions'")
            if any(d <= 0 for d in shape):
                raise ValueError(f'extra feature {key!r}: trailing shape {shape} must be positive')
        self.examples_per_shard = int(examples_per_shard)
        self.description = description
        self.folder.mkdir(parents=True, exist_ok=True)
        self._spec = ExampleSpec('codes', frame_shape=self.code_shape, action_dim=action_dim)
        self._writer = None
        self._pending = 0
        with _locked(self.folder):
            self._write_spec()
            self._shard_lengths = self._recover()
            self._write_info()

    # features.json / metadata.json, checked against an existing folder
    def _write_spec(self) -> None:
        def tensor(shape, dtype):
            return {'pythonClassName': _TENSOR_CLASS,
                    'tensor': {'shape': {'dimensions': [str(-1 if d is None else d) for d in shape]},
                               'dtype': dtype, 'encoding': 'none'}}

        features = {'pythonClassName': _DICT_CLASS, 'featuresDict': {'features': {
            'video': tensor((None,) + self.code_shape, self.code_dtype),
            'actions': tensor((None,), 'int32'),
            **{key: tensor((None,) + shape, 'int32') for key, shape in self.extra_features.items()}}}}
        path = self.folder / 'features.json'
        if path.exists():
            existing = read_features(self.folder)
            wanted = _parse_feature(features, str(path))
            if existing != wanted:
                raise DataError(f'{path}: existing feature spec {existing} differs from this writer\'s {wanted}')
        else:
            _atomic_write_json(path, features)
        meta = {k: v for k, v in (('action_dim', self.action_dim), ('codebook_size', self.codebook_size))
                if v is not None}
        meta_path = self.folder / 'metadata.json'
        if meta_path.exists():
            old = _read_json(meta_path)
            clash = {k: (old[k], v) for k, v in meta.items() if k in old and old[k] != v}
            if clash:
                raise DataError(f'{meta_path}: metadata {clash} (stored, given) differ')
            meta = {**old, **meta}
        _atomic_write_json(meta_path, meta)

    def _recover(self) -> list[int]:
        pattern = re.compile(rf'^{re.escape(self.name)}-{re.escape(self.split)}\.tfrecord-(\d{{5}})-of-(\d{{5}})$')
        for tmp in self.folder.glob(f'{self.name}-{self.split}.tfrecord-*.tmp'):
            tmp.unlink()
        found = {}
        for p in self.folder.iterdir():
            m = pattern.match(p.name)
            if m:
                index = int(m.group(1))
                if index in found:
                    raise DataError(f'{p}: two finished shards with index {index} ({found[index].name})')
                found[index] = p
        if sorted(found) != list(range(len(found))):
            raise DataError(f'{self.folder}: finished shards of split {self.split!r} have indices {sorted(found)}, '
                            'expected 0..n-1 without gaps')
        lengths = []
        total = len(found)
        for index in range(total):
            target = self.folder / _shard_name(self.name, self.split, index, total)
            if found[index] != target:
                os.replace(found[index], target)
            lengths.append(len(index_tfrecord(str(target))))
        return lengths

    def _write_info(self) -> None:
        path = self.folder / 'dataset_info.json'
        info = _read_json(path) if path.exists() else {}
        info.update({'name': self.name, 'version': self.version, 'fileFormat': 'tfrecord',
                     'moduleName': 'teco_ssm.data.tfds_folder', 'description': info.get('description') or
                     self.description, 'citation': info.get('citation', ''),
                     'releaseNotes': info.get('releaseNotes') or {self.version: 'Initial release.'}})
        total = len(self._shard_lengths)
        num_bytes = sum(os.path.getsize(self.folder / _shard_name(self.name, self.split, i, total))
                        for i in range(total))
        entry = {'name': self.split, 'filepathTemplate': DEFAULT_TEMPLATE, 'numBytes': str(num_bytes),
                 'shardLengths': [str(n) for n in self._shard_lengths]}
        splits = [s for s in info.get('splits', []) if s.get('name') != self.split] + [entry]
        info['splits'] = sorted(splits, key=lambda s: s['name'])
        _atomic_write_json(path, info)

    @property
    def num_examples(self) -> int:
        """Trajectories stored in finished shards (the ones a crash cannot lose)."""
        return sum(self._shard_lengths)

    def write(self, video: np.ndarray, actions: np.ndarray, **extra: np.ndarray) -> None:
        """Appends one trajectory: video (T, h, w) integer codes, actions (T,) integer ids, and one (T, *shape)
        integer array per extra feature of the writer (e.g. `poses=` (T, 3))."""
        import tensorflow as tf

        video, actions = np.asarray(video), np.asarray(actions)
        where = f'{self.name}/{self.split} example {self.num_examples + self._pending}'
        check_example(video, actions, where, self._spec)
        info = np.iinfo(self.code_dtype)
        if video.size and (video.min() < info.min or video.max() > info.max):
            raise DataError(f'codes outside the range of {self.code_dtype}: [{video.min()}, {video.max()}]')
        if set(extra) != set(self.extra_features):
            raise DataError(f'{where}: got extra fields {sorted(extra)}, the writer declares '
                            f'{sorted(self.extra_features)}')
        extra = {key: np.asarray(value) for key, value in extra.items()}
        for key, value in extra.items():
            shape = (video.shape[0],) + self.extra_features[key]
            if value.shape != shape or not np.issubdtype(value.dtype, np.integer):
                raise DataError(f"{where}: field {key!r} expected {shape} integers (one row per video frame), got "
                                f'{value.shape} {value.dtype}')
            limits = np.iinfo(np.int32)
            if value.size and (value.min() < limits.min or value.max() > limits.max):
                raise DataError(f"{where}: field {key!r} outside the range of int32: [{value.min()}, {value.max()}]")
        if self._writer is None:
            index = len(self._shard_lengths)
            self._tmp = self.folder / f'{_shard_name(self.name, self.split, index, index + 1)}.tmp'
            self._writer = tf.io.TFRecordWriter(str(self._tmp))
        example = tf.train.Example(features=tf.train.Features(feature={
            'video': _int64_feature(video.astype(np.int64)), 'actions': _int64_feature(actions.astype(np.int64)),
            **{key: _int64_feature(value.astype(np.int64)) for key, value in extra.items()}}))
        self._writer.write(example.SerializeToString())
        self._pending += 1
        if self._pending >= self.examples_per_shard:
            self.flush()

    def flush(self) -> None:
        """Finishes the open shard (if any): close, sync, rename into the dataset, rewrite dataset_info.json."""
        if self._writer is None:
            return
        self._writer.close()
        with open(self._tmp, 'rb') as f:
            os.fsync(f.fileno())
        self._writer = None
        with _locked(self.folder):
            index = len(self._shard_lengths)
            total = index + 1
            for i in range(index):
                os.replace(self.folder / _shard_name(self.name, self.split, i, index),
                           self.folder / _shard_name(self.name, self.split, i, total))
            os.replace(self._tmp, self.folder / _shard_name(self.name, self.split, index, total))
            self._shard_lengths.append(self._pending)
            self._pending = 0
            self._write_info()

    def abort(self) -> None:
        """Drops the unfinished shard; finished shards stay."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            self._tmp.unlink(missing_ok=True)
            self._pending = 0

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> 'TfdsWriter':
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
