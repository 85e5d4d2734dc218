"""One entry point for every dataset format: `open_dataset` and `inspect_dataset`.

Order arithmetic (pure functions, the basis of exact resume and of multi-process training):
- Training is defined on the GLOBAL batch of `global_batch = batch_size * process_count` examples. Global
  example `g = step * global_batch + row` is item `perm_e[g mod n]` of epoch `e = g div n`, where the
  permutation `perm_e` of all n videos of the split and the per-item crop fractions come from
  `np.random.default_rng([seed, e])`. Process p loads rows `[p * batch_size, (p + 1) * batch_size)` of it by
  random access. The examples of step s therefore depend on (seed, s, global_batch) only, not on the number of
  processes, and `start_step=k` resumes without reading the first k batches.
- Evaluation follows the same rule without the permutation: global batch k holds videos `[k * global_batch,
  (k + 1) * global_batch)` in file order, from frame 0, and process p loads rows `[p * batch_size, (p + 1) *
  batch_size)` of it, so each video is read once by one process and batch k is the same videos whatever the
  number of processes; all processes yield `ceil(n / global_batch)` batches, rows past the last video padded and
  `valid=False`.

Loading runs on `grain`: a `MapDataset` of local batch numbers mapped to a function that reads and stacks one
batch, read ahead in order by threads; no Python generator feeds tf.data.
"""
from __future__ import annotations

import functools
import math
import threading
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from teco_ssm.data import formats, tfds_folder
from teco_ssm.data.formats import DataError, DatasetInfo, ExampleSpec

# ------------------------------------------------------------------------------------- arithmetic

@functools.lru_cache(maxsize=8)
def epoch_order(seed: int, epoch: int, num_items: int) -> tuple[np.ndarray, np.ndarray]:
    """Permutation (num_items,) int64 and crop fractions (num_items,) float64 in [0, 1) of one training epoch."""
    rng = np.random.default_rng([seed, epoch])
    return rng.permutation(num_items), rng.random(num_items)


def train_example(seed: int, num_items: int, example: int) -> tuple[int, float]:
    """(item, crop fraction) of global training example `example` (`step * global_batch + row`)."""
    epoch, pos = divmod(example, num_items)
    order, fractions = epoch_order(seed, epoch, num_items)
    item = int(order[pos])
    return item, float(fractions[item])


def batch_rows(step: int, batch_size: int, process_index: int, process_count: int) -> range:
    """Global row indices of the rows process `process_index` loads at `step` (`batch_size` per process): training
    example numbers (see `train_example`), or video indices in evaluation."""
    if not 0 <= process_index < process_count:
        raise ValueError(f'process_index {process_index} outside [0, {process_count})')
    first = (step * process_count + process_index) * batch_size
    return range(first, first + batch_size)


def eval_num_batches(num_items: int, process_count: int, batch_size: int) -> int:
    """Batches every process yields in evaluation: enough global batches of `batch_size * process_count` rows for
    every video."""
    return max(1, math.ceil(num_items / (batch_size * process_count)))


def crop_start(length: int, seq_len: int, fraction: float) -> int:
    """Start frame of a crop of `seq_len` frames chosen by `fraction` in [0, 1)."""
    return min(int(fraction * (length - seq_len + 1)), length - seq_len)


# --------------------------------------------------------------------------------------- sources

class _Source:
    """The videos of one split: `num_items` global items; `locate(i)` a readable description of item i."""

    fmt: str
    kind: str
    num_items: int

    def locate(self, item: int) -> str:
        raise NotImplementedError

    def read_field(self, item: int, key: str) -> Optional[np.ndarray]:
        raise NotImplementedError


class _FileSource(_Source):
    def __init__(self, fmt: str, files: list[str]):
        self.fmt, self.kind, self.files, self.num_items = fmt, 'frames', files, len(files)

    def locate(self, item: int) -> str:
        return self.files[item]

    def read(self, item: int) -> tuple[np.ndarray, np.ndarray]:
        return formats.read_npz(self.files[item]) if self.fmt == 'npz' else formats.read_mp4(self.files[item])

    def read_field(self, item: int, key: str) -> Optional[np.ndarray]:
        path = self.files[item]
        if self.fmt != 'npz' or key not in formats.npz_header(path):
            return None
        return formats.load_npz_arrays(path, (key,))[key]


class _TfdsSource(_Source):
    """The records of one split of a TFDS folder, by global index: shards read by `tfds_folder` (metadata and
    decoding by tensorflow_datasets), records located by our own per-shard offset index (random access)."""

    def __init__(self, version_dir: Path, split: str):
        self.fmt, self.kind = 'tfds', 'codes'
        self.version_dir = version_dir
        self.encoding = tfds_folder.read_encoding(version_dir)
        expected = (self.encoding or {}).get('splits', {}).get(split)
        unfinished = (f"; {version_dir / tfds_folder.ENCODING_FILE} lists {expected} videos for it: an interrupted "
                      "`teco-ssm encode` leaves this, run it again with the same arguments to finish")
        try:
            self.features, self.shards = tfds_folder.split_shards(version_dir, split)
        except DataError as error:
            if expected:
                raise DataError(f'{error}{unfinished}') from None
            raise
        where = version_dir / 'features.json'
        for key, rank in (('video', 3), ('actions', 1)):
            if key not in self.features:
                raise DataError(f"{where}: no feature {key!r}; features are {sorted(self.features.keys())}")
            f = self.features[key]
            shape = getattr(f, 'shape', ())
            if len(shape) != rank or not np.issubdtype(np.dtype(f.np_dtype), np.integer):
                raise DataError(f"{where}: feature {key!r} is {f}, expected an integer Tensor of rank {rank}"
                                + (' (T, h, w) codes' if key == 'video' else ' (T,) action ids'))
        self.code_shape = tuple(self.features['video'].shape[1:])
        self.starts = np.cumsum([0] + [n for _, n in self.shards])
        self.num_items = int(self.starts[-1])
        if expected is not None and self.num_items < expected:
            raise DataError(f'{version_dir}: split {split!r} holds {self.num_items} videos{unfinished}')
        self._index: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def _shard_of(self, item: int) -> tuple[int, int]:
        shard = int(np.searchsorted(self.starts, item, side='right') - 1)
        return shard, item - int(self.starts[shard])

    def locate(self, item: int) -> str:
        shard, pos = self._shard_of(item)
        return f'{self.shards[shard][0]} (record {pos})'

    def _record(self, item: int) -> tuple[str, int, int]:
        """(shard path, payload offset, payload length) of one item; indexes its shard on first use."""
        shard, pos = self._shard_of(item)
        path, expected = self.shards[shard]
        with self._lock:
            if shard not in self._index:
                index = tfds_folder.index_tfrecord(path)
                if len(index) != expected:
                    raise DataError(f'{path}: holds {len(index)} records, dataset_info.json lists {expected}')
                self._index[shard] = index
        offset, length = self._index[shard][pos]
        return path, int(offset), int(length)

    def _decoded(self, item: int) -> dict[str, np.ndarray]:
        return tfds_folder.deserialize(self.features, tfds_folder.read_record(*self._record(item)), self.locate(item))

    def read(self, item: int) -> tuple[np.ndarray, np.ndarray]:
        data = self._decoded(item)
        return data['video'], data['actions']

    def read_field(self, item: int, key: str) -> Optional[np.ndarray]:
        return self._decoded(item)[key] if key in self.features else None


def _open_source(path: str | Path, split: str) -> _Source:
    path = Path(path)
    if not path.exists():
        raise DataError(f'{path}: dataset folder not found')
    version_dir = tfds_folder.find_version_dir(path)
    if version_dir is not None:
        return _TfdsSource(version_dir, split)
    fmt, files = formats.list_videos(path, split)
    return _FileSource(fmt, files)


def _metadata(path: Path, source: _Source) -> dict:
    root = source.version_dir if isinstance(source, _TfdsSource) else path
    return formats.read_metadata(root)


def _image_shape(image_size: Any) -> Optional[tuple[int, int, int]]:
    if image_size is None:
        return None
    if isinstance(image_size, int):
        return (image_size, image_size, 3)
    h, w = image_size[:2]
    return (int(h), int(w), 3)


def _inspect(path: str | Path, split: str, source: _Source, *, image_size: Any = None,
             action_dim: Optional[int] = None, seq_len: Optional[int] = None, max_headers: Optional[int] = 1
             ) -> DatasetInfo:
    path = Path(path)
    meta = _metadata(path, source)
    if action_dim is not None and meta.get('action_dim') not in (None, action_dim):
        raise DataError(f'{path}: metadata.json gives action_dim={meta["action_dim"]}, the configuration '
                        f'expects {action_dim}')
    action_dim = action_dim if action_dim is not None else meta.get('action_dim')
    if source.num_items == 0:
        raise DataError(f'{path}: empty dataset, split {split!r} holds no videos')
    count = source.num_items if max_headers is None else min(max_headers, source.num_items)
    lengths, shape = [], None
    for item in range(count):
        where = source.locate(item)
        if isinstance(source, _FileSource) and source.fmt == 'npz':
            item_shape, length = formats.header_spec('npz', where)
            if action_dim is not None and item == 0:  # action values need the array: first file only
                actions = formats.load_npz_arrays(where, ('actions',))['actions']
                formats.check_action_ids(actions, where, action_dim)
        else:
            video, actions = source.read(item)
            formats.check_example(video, actions, where, ExampleSpec(source.kind, action_dim=action_dim))
            item_shape, length = tuple(video.shape[1:]), int(video.shape[0])
        if shape is not None and item_shape != shape:
            raise DataError(f'{where}: frames of shape {item_shape}, expected {shape} like {source.locate(0)}')
        shape = item_shape
        lengths.append(length)
        spec = ExampleSpec(source.kind, seq_len=seq_len,
                           frame_shape=_image_shape(image_size) if source.kind == 'frames' else None)
        if spec.frame_shape is not None and item_shape != spec.frame_shape:
            raise DataError(f'{where}: frames of shape {item_shape}, expected {spec.frame_shape} from the '
                            f'configuration (image_size={image_size})')
        if seq_len is not None and length < seq_len:
            raise DataError(f'{where}: video has {length} frames, shorter than seq_len={seq_len}')
    encoding = getattr(source, 'encoding', None) or {}
    return DatasetInfo(path=str(path), split=split, format=source.fmt, kind=source.kind,
                       num_videos=source.num_items, video_length=min(lengths),
                       frame_shape=shape if source.kind == 'frames' else None,
                       code_shape=shape if source.kind == 'codes' else None, action_dim=action_dim,
                       tokenizer_sha256=encoding.get('tokenizer_sha256'),
                       tokenizer_source=encoding.get('tokenizer_source'))


def check_tokenizer(info: DatasetInfo, tokenizer: Any) -> None:
    """Raises DataError when a dataset of codes records (in its encoding.json) a tokenizer other than `tokenizer`
    (compared by `tokenizer.fingerprint`, `vqgan.Tokenizer`'s sha256 of its hyperparameters and weights): codes
    mean something else to another tokenizer, even one of the same size. Does nothing for frames, a dataset without
    a record, or a tokenizer without a fingerprint."""
    fingerprint = getattr(tokenizer, 'fingerprint', None)
    if info.kind != 'codes' or info.tokenizer_sha256 is None or fingerprint is None:
        return
    if fingerprint != info.tokenizer_sha256:
        raise DataError(f'{info.path}: codes made by the tokenizer {info.tokenizer_source} (sha256 '
                        f'{info.tokenizer_sha256[:12]}, {tfds_folder.ENCODING_FILE}), but this run uses the tokenizer '
                        f"{getattr(tokenizer, 'source', '?')} (sha256 {fingerprint[:12]}); use the tokenizer that "
                        'encoded the dataset, or encode it again with this one')


def inspect_dataset(path: str | Path, split: str, *, seq_len: Optional[int] = None, image_size: Any = None,
                    action_dim: Optional[int] = None, max_headers: Optional[int] = 1) -> DatasetInfo:
    """Quick up-front check of one split: the file list and `max_headers` headers (None: all).

    Raises DataError naming the file and what was expected: missing split folder, empty dataset,
    corrupt/truncated file, video shorter than `seq_len`, frames not of `image_size`, actions whose
    length differs from the video's, action ids outside [0, action_dim) (first file), a TFDS folder
    whose spec or shards do not match dataset_info.json.
    """
    source = _open_source(path, split)
    return _inspect(path, split, source, image_size=image_size, action_dim=action_dim, seq_len=seq_len,
                    max_headers=max_headers)


# ------------------------------------------------------------------------------------------ dataset

ENDLESS_STEPS = 2 ** 62  # the length of a training dataset's step range (grain needs a finite one)


class Dataset:
    """Iterable of numpy batches; see `open_dataset`. `num_batches` is None for (endless) training."""

    def __init__(self, source: _Source, info: DatasetInfo, *, seq_len: int, batch_size: int, shuffle: bool,
                 seed: int, start_step: int, process_index: int, process_count: int,
                 num_parallel_reads: Optional[int], prefetch: Optional[int], frames_dtype: str = 'float32'):
        if frames_dtype not in ('float32', 'uint8'):
            raise ValueError(f"frames_dtype must be 'float32' or 'uint8', got {frames_dtype!r}")
        self.frames_dtype = frames_dtype
        self.info = info
        self.key = 'frames' if info.kind == 'frames' else 'codes'
        self.seq_len, self.batch_size, self.shuffle, self.seed = seq_len, batch_size, shuffle, seed
        self.start_step = start_step
        self.process_index, self.process_count = process_index, process_count
        self._source = source
        self.num_batches = None if shuffle else eval_num_batches(source.num_items, process_count, batch_size)
        self.num_parallel_reads = num_parallel_reads or 2
        self.prefetch = max(prefetch or self.num_parallel_reads, self.num_parallel_reads)
        frame_shape = info.frame_shape if info.kind == 'frames' else info.code_shape
        self._spec = ExampleSpec(info.kind, seq_len=seq_len, frame_shape=frame_shape, action_dim=info.action_dim)

    def locate(self, index: int) -> str:
        """The file (and record) of global video `index`, as yielded in batch['index']."""
        return self._source.locate(index)

    def read_field(self, index: int, key: str) -> Optional[np.ndarray]:
        """The whole per-video array `key` of global video `index` (e.g. MazeLab `poses` (T, 3)), from its npz file
        or its TFDS record; None when the dataset does not store that field (mp4, or no such npz array or feature)."""
        return self._source.read_field(int(index), key)

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError('a training dataset (shuffle=True) is endless')
        return self.num_batches

    def plan(self, step: int) -> list[tuple[int, float]]:
        """(global item index, or -1 for padding; crop fraction) of every row of local batch `step`."""
        rows = batch_rows(step, self.batch_size, self.process_index, self.process_count)
        if self.shuffle:
            return [train_example(self.seed, self._source.num_items, g) for g in rows]
        return [(g if g < self._source.num_items else -1, 0.0) for g in rows]

    def _example(self, item: int, fraction: float) -> tuple[np.ndarray, np.ndarray, int]:
        """Checked (seq_len, ...) crop of one item's video and int32 actions, and its start; zeros for padding."""
        shape = (self.seq_len,) + tuple(self._spec.frame_shape)
        dtype = np.uint8 if self.info.kind == 'frames' else np.int32
        if item < 0:
            return np.zeros(shape, dtype), np.zeros((self.seq_len,), np.int32), 0
        video, actions = self._source.read(item)
        formats.check_example(video, actions, self._source.locate(item), self._spec)
        start = crop_start(video.shape[0], self.seq_len, fraction) if self.shuffle else 0
        video = video[start:start + self.seq_len].astype(dtype, copy=False)
        return video, actions[start:start + self.seq_len].astype(np.int32), start

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """Local batch `step` (see `open_dataset`), read directly: the same arrays iteration yields."""
        plan = self.plan(step)
        examples = [self._example(item, fraction) for item, fraction in plan]
        video = np.stack([e[0] for e in examples])
        if self.key == 'frames' and self.frames_dtype == 'float32':
            frames = np.empty(video.shape, np.float32)
            np.divide(video, np.float32(127.5), out=frames)
            video = np.subtract(frames, np.float32(1.0), out=frames)
        items = np.asarray([item for item, _ in plan], np.int32)
        return {self.key: video, 'actions': np.stack([e[1] for e in examples]), 'valid': items >= 0,
                'index': items, 'start': np.asarray([e[2] for e in examples], np.int32)}

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        import grain

        stop = ENDLESS_STEPS if self.num_batches is None else self.num_batches
        steps = grain.MapDataset.range(min(self.start_step, stop), stop).map(self.batch)
        batches = steps.to_iter_dataset(grain.ReadOptions(num_threads=self.num_parallel_reads,
                                                          prefetch_buffer_size=self.prefetch))
        return iter(batches)


def batch_codes(batch: dict[str, np.ndarray], tokenizer: Any) -> np.ndarray:
    """Codes (B, T, h, w) int32 of a batch: `batch['codes']` as stored, or `tokenizer.encode(batch['frames'])`
    (frames float32 in [-1, 1] (B, T, H, W, 3)) for a dataset of frames. The one place frames become codes for
    training and sampling."""
    if 'codes' in batch:
        return np.asarray(batch['codes'], np.int32)
    return np.asarray(tokenizer.encode(batch['frames'])[1], np.int32)


def open_dataset(path: str | Path, split: str, *, seq_len: int, batch_size: int, shuffle: Optional[bool] = None,
                 seed: int = 0, start_step: int = 0, image_size: Any = None, action_dim: Optional[int] = None,
                 process_index: Optional[int] = None, process_count: Optional[int] = None,
                 num_parallel_reads: Optional[int] = None, prefetch: Optional[int] = None,
                 frames_dtype: str = 'float32') -> Dataset:
    """Batches of one split of a raw npz, raw mp4 or encoded TFDS dataset (format detected from the folder).

    Each batch is a numpy dict holding either `frames` or `codes`, as the dataset holds (`ds.key`):
      frames:  float32 in [-1, 1] (B, T, H, W, 3) (uint8 with frames_dtype='uint8'), for npz / mp4 datasets;
      codes:   int32 (B, T, h, w), for encoded (TFDS) datasets; T = seq_len.
      actions: int32 (B, T); actions[:, t] is the action taken between frames t-1 and t.
      valid:   bool (B,), False on padding rows of the last evaluation batch.
      index:   int32 (B,), global video index (`ds.locate(i)` names its file), -1 on padding.
      start:   int32 (B,), first frame of the crop within the video.

    Args:
      path: dataset root (`<root>/{train,test}/...`) or TFDS folder (`<root>/<name>` or its version dir).
      split: 'train', 'test', ...
      seq_len: frames per example.
      batch_size: examples per batch on this process; training and evaluation are defined on global batches of
        `batch_size * process_count` examples and this process reads its rows of each (see the module docstring).
      shuffle: training mode (endless, permuted, random crops); defaults to split == 'train'.
        Otherwise one deterministic pass over every video once, from frame 0.
      seed: seed of the permutations and crops.
      start_step: first batch to yield; batch k equals the k-th batch of a fresh iterator.
      image_size: expected frame size (int or (H, W)); other sizes are a DataError. Ignored for codes.
      action_dim: action ids must lie in [0, action_dim); defaults to the dataset's metadata.json.
      process_index, process_count: default `jax.process_index()`/`process_count()`.
      num_parallel_reads: batches read at the same time by threads (default 2).
      prefetch: batches prepared ahead (default: num_parallel_reads).
      frames_dtype: 'float32' (default, scaled to [-1, 1]) or 'uint8' (raw frames, a quarter of the host
        memory traffic; scale with `x / 127.5 - 1` on the accelerator).

    Raises:
      DataError naming the file and what was expected (see `inspect_dataset`), up front for the first file and
      while iterating for the others.
    """
    if seq_len <= 0 or batch_size <= 0 or start_step < 0:
        raise ValueError(f'seq_len={seq_len}, batch_size={batch_size} must be positive, start_step={start_step} >= 0')
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f'process_index {process_index} outside [0, {process_count})')
    shuffle = (split == 'train') if shuffle is None else shuffle
    source = _open_source(path, split)
    info = _inspect(path, split, source, image_size=image_size, action_dim=action_dim, seq_len=seq_len)
    return Dataset(source, info, seq_len=seq_len, batch_size=batch_size, shuffle=shuffle, seed=seed,
                   start_step=start_step, process_index=process_index, process_count=process_count,
                   num_parallel_reads=num_parallel_reads, prefetch=prefetch, frames_dtype=frames_dtype)
