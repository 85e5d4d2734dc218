"""TFDS folders of encoded videos: read with `tensorflow_datasets`, written shard by shard, crash-safely.

A TFDS folder (what `tfds.builder(...).download_and_prepare()` leaves on disk, and how TECO published
its encoded datasets) is::

    <root>/<name>/<version>/dataset_info.json   name, splits[{name, shardLengths, filepathTemplate}]
    <root>/<name>/<version>/features.json       the feature spec (FeaturesDict of Tensor features)
    <root>/<name>/<version>/metadata.json       optional free-form metadata (here: action_dim, ...)
    <root>/<name>/<version>/<name>-<split>.tfrecord-00000-of-00004

`tfds.builder_from_directory` reads the metadata (both features.json layouts TFDS has written: the proto-JSON
one and the older {"type": ..., "content": ...} one), and `info.features.deserialize_example_np` decodes a
record (Tensor encodings 'none', 'bytes' and 'zlib'). What TFDS does not give is random access into tfrecord
files (its random-access `as_data_source` needs the array_record format, which TECO's folders do not use), and
shuffled, exactly resumable training reads example i of a split: `index_tfrecord` keeps the byte offsets of a
shard's records, from its 12-byte record headers, for that.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import struct
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np

from teco_ssm.data.formats import DataError, ExampleSpec, check_example, read_metadata

DEFAULT_TEMPLATE = '{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}'
ENCODING_FILE = 'encoding.json'  # what produced a folder of codes (`vqgan.encode`): tokenizer, input, split sizes
VERSION_RE = re.compile(r'^\d+\.\d+\.\d+$')


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


def read_encoding(version_dir: Path) -> Optional[dict]:
    """`<version_dir>/encoding.json` (`vqgan.encode` writes it before the first shard: the tokenizer's fingerprint
    and source, the input, and the number of videos every split will hold), or None when absent."""
    path = Path(version_dir) / ENCODING_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise DataError(f'{path}: expected JSON describing the encoding ({e})') from None


def open_builder(version_dir: Path):
    """`tfds.builder_from_directory(version_dir)`; DataError naming the folder when TFDS cannot read it."""
    import tensorflow_datasets as tfds

    try:
        return tfds.builder_from_directory(str(version_dir))
    except Exception as e:  # missing or malformed dataset_info.json / features.json
        raise DataError(f'{version_dir}: not a readable TFDS folder, expected dataset_info.json and features.json '
                        f'({type(e).__name__}: {e})') from e


def split_shards(version_dir: Path, split: str) -> tuple[Any, list[tuple[str, int]]]:
    """The feature spec (`tfds.features.FeaturesDict`) and [(shard path, number of records)] of one split.

    Raises DataError naming dataset_info.json for a missing split or an empty split, and naming the shard when a
    listed shard file is missing.
    """
    info = open_builder(version_dir).info
    info_path = Path(version_dir) / 'dataset_info.json'
    if split not in info.splits:
        raise DataError(f'{info_path}: split {split!r} not found; the dataset has splits {sorted(info.splits)}')
    entry = info.splits[split]
    if info.file_format is not None and info.file_format.value != 'tfrecord':
        raise DataError(f"{info_path}: fileFormat {info.file_format.value!r} not supported, expected 'tfrecord'")
    if not entry.shard_lengths:
        raise DataError(f'{info_path}: empty dataset, split {split!r} lists no shards')
    shards = []
    for path, length in zip(entry.filepaths, entry.shard_lengths):
        if not os.path.exists(path):
            raise DataError(f'{path}: shard listed in {info_path} is missing')
        shards.append((str(path), int(length)))
    return info.features, shards


def deserialize(features: Any, serialized: bytes, where: str) -> dict[str, np.ndarray]:
    """Every feature of one serialised record as numpy arrays (`features.deserialize_example_np`)."""
    try:
        return dict(features.deserialize_example_np(serialized))
    except Exception as e:
        raise DataError(f'{where}: corrupt record, expected a serialised tf.train.Example of the features in '
                        f'features.json ({type(e).__name__}: {e})') from e


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


# ------------------------------------------------------------------------------------------- writer

def _shard_name(name: str, split: str, index: int, total: int) -> str:
    return f'{name}-{split}.tfrecord-{index:05d}-of-{total:05d}'


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    with open(folder / '.dataset_info.lock', 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def check_name(what: str, value: str) -> None:
    """Raises ValueError unless `value` (a dataset, split or feature name) is lowercase letters, digits and
    underscores, as TFDS file names need."""
    if not re.match(r'^[a-z0-9_]+$', value):
        raise ValueError(f'{what} {value!r}: use lowercase letters, digits and underscores')


class TfdsWriter:
    """Writes one split of an encoded dataset as a TFDS folder, incrementally and resumably.

    `<root>/<name>/1.0.0/` gets a `tfds.features.FeaturesDict` (`video`: Tensor (None, h, w) of `code_dtype`,
    `actions`: Tensor (None,) int32, and one Tensor (None, *shape) int32 per entry {name: shape} of
    `extra_features`, e.g. {'poses': (3,)} for MazeLab's per-frame poses) that serialises every record, the
    metadata files of `tfds.folder_dataset.write_metadata` (dataset_info.json, features.json, metadata.json with
    action_dim and codebook_size when given), and `<name>-<split>.tfrecord-XXXXX-of-YYYYY` shards of
    `examples_per_shard` trajectories each. A writer opened on an existing folder must declare the same features.
    (`tfds.core.SequentialWriter` states that a split it does not close may lose data; this writer keeps every
    finished shard of an unfinished split, so a killed encoder resumes where it stopped.)

    A shard is written to a `.tmp` file and becomes part of the dataset only once closed, synced and
    renamed; the metadata files are then replaced atomically. Opening a writer on a folder left by a crash
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
        check_name('dataset name', name)
        check_name('split name', split)
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
        self._tfds_features = self._features()
        with _locked(self.folder):
            self._check_existing()
            self._shard_lengths = self._recover()
            self._write_info()

    def _features(self):
        """The `tfds.features.FeaturesDict` this writer declares."""
        import tensorflow_datasets as tfds

        tensor = tfds.features.Tensor
        return tfds.features.FeaturesDict({
            'video': tensor(shape=(None,) + self.code_shape, dtype=np.dtype(self.code_dtype)),
            'actions': tensor(shape=(None,), dtype=np.int32),
            **{key: tensor(shape=(None,) + shape, dtype=np.int32) for key, shape in self.extra_features.items()}})

    def _check_existing(self) -> None:
        """An existing folder must hold the same feature spec and agree on the metadata given."""
        import tensorflow_datasets as tfds

        path = self.folder / 'features.json'
        if path.exists():
            existing = tfds.features.FeatureConnector.from_config(str(self.folder))
            if existing.to_json() != self._tfds_features.to_json():
                raise DataError(f"{path}: existing feature spec {existing} differs from this writer's "
                                f'{self._tfds_features}')
        meta = {k: v for k, v in (('action_dim', self.action_dim), ('codebook_size', self.codebook_size))
                if v is not None}
        old = read_metadata(self.folder)
        clash = {k: (old[k], v) for k, v in meta.items() if k in old and old[k] != v}
        if clash:
            raise DataError(f'{self.folder / "metadata.json"}: metadata {clash} (stored, given) differ')
        self._metadata = {**old, **meta}

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
        """dataset_info.json, features.json and metadata.json by `tfds.folder_dataset.write_metadata`, written in a
        scratch folder and moved in file by file (each replace is atomic, so a reader or a crash never sees half a
        file), keeping the other splits' entries."""
        import tensorflow_datasets as tfds

        def template(split: str):
            return tfds.core.ShardedFileTemplate(data_dir=self.folder, template=DEFAULT_TEMPLATE,
                                                 dataset_name=self.name, split=split, filetype_suffix='tfrecord')

        splits = []
        if (self.folder / 'dataset_info.json').exists():
            stored = open_builder(self.folder).info.splits
            splits = [tfds.core.SplitInfo(name=s, shard_lengths=list(stored[s].shard_lengths),
                                          num_bytes=int(stored[s].num_bytes), filename_template=template(s))
                      for s in stored if s != self.split]
        total = len(self._shard_lengths)
        num_bytes = sum(os.path.getsize(self.folder / _shard_name(self.name, self.split, i, total))
                        for i in range(total))
        splits.append(tfds.core.SplitInfo(name=self.split, shard_lengths=list(self._shard_lengths),
                                          num_bytes=num_bytes, filename_template=template(self.split)))
        with tempfile.TemporaryDirectory(dir=self.folder, prefix='.metadata') as scratch:
            # write_metadata takes the dataset's name and splits from the shard files it finds: empty stand-ins
            for entry in splits:
                Path(scratch, _shard_name(self.name, entry.name, 0, 1)).touch()
            tfds.folder_dataset.write_metadata(
                data_dir=scratch, features=self._tfds_features, split_infos=sorted(splits, key=lambda s: s.name),
                version=self.version, check_data=False, description=self.description,
                metadata=tfds.core.MetadataDict(self._metadata))
            for name in ('features.json', 'metadata.json', 'dataset_info.json'):  # dataset_info.json last
                os.replace(os.path.join(scratch, name), self.folder / name)

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
        example = self._tfds_features.serialize_example({
            'video': video.astype(self.code_dtype), 'actions': actions.astype(np.int32),
            **{key: value.astype(np.int32) for key, value in extra.items()}})
        # features in key order: the same trajectory always gives the same bytes (a resumed run writes what one run
        # would); TFDS serialises the features map in no fixed order
        self._writer.write(tf.train.Example.FromString(example).SerializeToString(deterministic=True))
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
