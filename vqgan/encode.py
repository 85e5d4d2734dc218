"""Encoding a video dataset into codes once: `encode_dataset(tokenizer, data_path, out_root, name)`.

Every video of each split (npz or mp4 folders, whatever `teco_ssm.data.open_dataset` reads as frames) is
encoded whole, in file order, and written with its actions to `<out_root>/<name>/1.0.0/` by
`teco_ssm.data.TfdsWriter`: a TFDS folder with features `video` int32 (T, h, w) and `actions` int32 (T,), read
back by `open_dataset(out_root/name, split, ...)` as codes. When the npz files hold MazeLab `poses` (T, 3) (the
first file of every split decides, and all splits must agree), they are stored too, as a feature `poses` int32
(T, 3), so samples of the encoded dataset still get the revisit mask (`teco_ssm.sample`).

  <out_root>/<name>/1.0.0/encoding.json   what produced the folder: the tokenizer's fingerprint, its source,
                                          the input dataset, the number of videos of every split

Resume: the writer keeps only finished shards, so a crashed run leaves a prefix of every split; running again
with the same tokenizer and input skips the trajectories already stored. An output that is complete, or that
another tokenizer or input produced, is refused unless `overwrite=True`; an overwrite is written beside the old
folder and replaces it only once every split is complete, so a failed run never destroys an existing output.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from tqdm.auto import tqdm

from teco_ssm.data import DataError, TfdsWriter, inspect_dataset
from teco_ssm import lock
from teco_ssm.data import formats
from teco_ssm.data.tfds_folder import ENCODING_FILE, check_name, find_version_dir, open_builder, read_encoding
from vqgan.tokenizer import Tokenizer, load

VERSION = '1.0.0'


def list_split(data_path: str | os.PathLike, split: str, tok: Tokenizer) -> tuple[list[str], str, int | None]:
    """(video files in order, format 'npz' | 'mp4', action_dim or None) of one split, checked up front.

    Raises DataError naming the file when the split is missing or empty, already holds codes, or its first
    video's frames are not of the tokenizer's frame shape.
    """
    info = inspect_dataset(data_path, split, image_size=tok.frame_shape[:2])
    if info.kind != 'frames':
        raise DataError(f'{data_path}: split {split!r} already holds codes ({info.format}); encoding needs frames')
    fmt, files = formats.list_videos(Path(data_path), split)
    return files, fmt, info.action_dim


def pose_shape(files: Sequence[str], fmt: str) -> tuple[int, ...] | None:
    """Trailing shape of the per-frame `poses` of a split's npz files ((3,) for MazeLab), read from the first
    file's header; None for mp4 files or npz files without poses."""
    if fmt != 'npz':
        return None
    header = formats.npz_header(files[0])
    if 'poses' not in header:
        return None
    shape, dtype = header['poses']
    if len(shape) < 2 or not np.issubdtype(dtype, np.integer):
        raise DataError(f"{files[0]}: field 'poses' expected (T, 3) integers (one pose per video frame), got "
                        f'{shape} {dtype}')
    return tuple(shape[1:])


def read_video(path: str, fmt: str, frame_shape: tuple[int, int, int], action_dim: int | None
               ) -> tuple[np.ndarray, np.ndarray]:
    """One whole checked video: frames (T, H, W, 3) uint8 and actions (T,) int32; DataError naming the file."""
    video, actions = formats.read_npz(path) if fmt == 'npz' else formats.read_mp4(path)
    formats.check_example(video, actions, path, formats.ExampleSpec('frames', frame_shape=frame_shape,
                                                                     action_dim=action_dim))
    return video, actions.astype(np.int32)


def read_poses(path: str, length: int, shape: tuple[int, ...]) -> np.ndarray:
    """Poses (T, *shape) int32 of one npz trajectory of `length` frames; DataError naming the file."""
    poses = formats.load_npz_arrays(path, ('poses',))['poses']
    if poses.shape != (length,) + tuple(shape) or not np.issubdtype(poses.dtype, np.integer):
        raise DataError(f"{path}: field 'poses' expected {(length,) + tuple(shape)} integers (one pose per video "
                        f'frame), got {poses.shape} {poses.dtype}')
    return poses.astype(np.int32)


def encode_video(tok: Tokenizer, video: np.ndarray) -> np.ndarray:
    """Frames (T, H, W, 3) uint8 -> codes (T, h, w) int32 (`tok.encode` of frames / 127.5 - 1)."""
    frames = video.astype(np.float32)[None] / 127.5 - 1.0
    return tok.encode(frames)[1][0]


def _prefetched(items: Sequence[str], read) -> Iterable[tuple[str, Any]]:
    """(item, read(item)) in order, reading the next item in a background thread while the caller works."""
    if not items:
        return
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(read, items[0])
        for i, item in enumerate(items):
            result = pending.result()
            if i + 1 < len(items):
                pending = pool.submit(read, items[i + 1])
            yield item, result


def _read_record(version_dir: Path) -> dict[str, Any] | None:
    return read_encoding(version_dir)


def _write_record(version_dir: Path, record: dict[str, Any]) -> None:
    version_dir.mkdir(parents=True, exist_ok=True)
    tmp = version_dir / (ENCODING_FILE + '.tmp')
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True))
    os.replace(tmp, version_dir / ENCODING_FILE)


def _stored_counts(version_dir: Path, splits: Sequence[str]) -> dict[str, int]:
    """Trajectories listed per split in `version_dir/dataset_info.json` (0 for a split not yet present)."""
    if not (version_dir / 'dataset_info.json').exists():
        return {s: 0 for s in splits}
    stored = open_builder(version_dir).info.splits
    return {s: stored[s].num_examples if s in stored else 0 for s in splits}


def _compatible(record: dict[str, Any] | None, wanted: dict[str, Any]) -> bool:
    return record is not None and all(record.get(k) == wanted[k] for k in ('tokenizer_sha256', 'data_path'))


def _encode_split(tok: Tokenizer, root: Path, name: str, split: str, files: list[str], fmt: str,
                  action_dim: int | None, poses: tuple[int, ...] | None, examples_per_shard: int,
                  progress: bool) -> int:
    with TfdsWriter(root, name, split, tok.latent_shape, action_dim=action_dim, codebook_size=tok.n_codes,
                    examples_per_shard=examples_per_shard, version=VERSION,
                    description=f'{split} videos encoded to codes',
                    extra_features=None if poses is None else {'poses': poses}) as writer:
        done = writer.num_examples
        if done > len(files):
            raise DataError(f'{writer.folder}: split {split!r} holds {done} trajectories, the input has only '
                            f'{len(files)}; use overwrite=True (--overwrite)')
        bar = tqdm(total=len(files), initial=done, desc=f'encode {split}', unit='video', disable=not progress)
        try:
            def read(path: str) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
                video, actions = read_video(path, fmt, tok.frame_shape, action_dim)
                extra = {} if poses is None else {'poses': read_poses(path, len(video), poses)}
                return video, actions, extra

            for _, (video, actions, extra) in _prefetched(files[done:], read):
                writer.write(encode_video(tok, video), actions, **extra)
                bar.update(1)
        finally:
            bar.close()
    return len(files)


def encode_dataset(tokenizer: str | os.PathLike | Tokenizer, data_path: str | os.PathLike,
                   out_root: str | os.PathLike, name: str, splits: Sequence[str] = ('train', 'test'),
                   overwrite: bool = False, *, examples_per_shard: int = 64, chunk_size: int = 64,
                   progress: bool = True) -> dict[str, Any]:
    """Encodes every video of `splits` of `data_path` whole into the TFDS folder `<out_root>/<name>`.

    Args:
      tokenizer: a `Tokenizer`, or a checkpoint folder for `vqgan.load` (TECO layout or a VQGAN workdir).
      data_path: a raw video dataset root (`<root>/<split>/<shard>/*.npz` or `*.mp4`, optional metadata.json);
        npz files holding `poses` (T, 3) (MazeLab) keep them as a feature `poses` of the output.
      out_root, name: the output is `<out_root>/<name>/1.0.0/`; name in lowercase letters, digits, underscores.
      splits: the splits to encode; each must exist in `data_path`.
      overwrite: replace an existing output (complete, or made by another tokenizer or from another input).
      examples_per_shard: trajectories per tfrecord shard (also the unit of crash safety).
      chunk_size: frames per jitted tokenizer call when `tokenizer` is a path.
      progress: show a tqdm bar per split.

    Returns:
      {'path': the dataset folder, 'splits': {split: number of videos}, 'code_shape': (h, w), 'n_codes': K}.

    Raises:
      FileExistsError naming the folder when the output was produced by another tokenizer or from another input
      and `overwrite` is False (a complete output of the same tokenizer and input is kept and its figures
      returned); DataError naming the file for a bad input video; lock.Busy when another
      process writes into `out_root`.
    """
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load(tokenizer, chunk_size=chunk_size)
    out_root, data_path = Path(out_root).absolute(), Path(data_path).absolute()
    if not splits:
        raise ValueError('splits: at least one split to encode')
    listed = {split: list_split(data_path, split, tok) for split in splits}
    dims = {s: a for s, (_, _, a) in listed.items()}
    action_dim = next((a for a in dims.values() if a is not None), None)
    poses = {s: pose_shape(files, fmt) for s, (files, fmt, _) in listed.items()}
    if len(set(poses.values())) > 1:
        found = {listed[s][0][0]: 'no poses' if p is None else f'poses (T, {", ".join(map(str, p))})'
                 for s, p in poses.items()}
        raise DataError(f'{data_path}: splits {list(splits)} disagree on the per-frame poses, first files hold '
                        f'{found}; every split needs the same fields')
    record = {'tokenizer_sha256': tok.fingerprint, 'tokenizer_source': tok.source,
              'data_path': str(data_path), 'code_shape': list(tok.latent_shape), 'n_codes': tok.n_codes,
              'frame_shape': list(tok.frame_shape)}
    counts = {s: len(files) for s, (files, _, _) in listed.items()}

    for what, value in (("dataset name", name), *(("split name", s) for s in splits)):
        check_name(what, value)  # before anything is written (the writer checks each again)
    with lock.hold(out_root):
        final = out_root / name
        existing = find_version_dir(final) if final.exists() else None
        staging_root = out_root / f'.{name}.overwrite'
        if existing is not None:
            old = _read_record(existing)
            stored = _stored_counts(existing, splits)
            complete = all(stored[s] >= counts[s] for s in splits)
            if not overwrite:
                if not _compatible(old, record):
                    raise FileExistsError(
                        f'{final}: holds a dataset not produced by this tokenizer from {data_path} (see '
                        f'{existing / ENCODING_FILE}); pass overwrite=True (--overwrite) to replace it')
                if complete:  # kept: the same tokenizer already encoded these splits of this input
                    print(f'encode: {final} already holds the encoded splits {list(splits)} ({stored}) of this '
                          'tokenizer and input: kept (pass overwrite=True, --overwrite, to encode again)',
                          file=sys.stderr, flush=True)
                    return {'path': str(final), 'splits': counts, 'code_shape': tok.latent_shape,
                            'n_codes': tok.n_codes}
        elif final.exists() and any(final.iterdir()) and not overwrite:
            raise FileExistsError(f'{final}: exists and is not an encoded dataset; pass overwrite=True to replace it')

        replace = overwrite and final.exists()
        root = staging_root if replace else out_root
        version_dir = root / name / VERSION
        if replace and staging_root.exists() and not _compatible(_read_record(version_dir), record):
            shutil.rmtree(staging_root)
        old = _read_record(version_dir)
        _write_record(version_dir, {**record, 'splits': {**(old or {}).get('splits', {}), **counts}})
        for split, (files, fmt, split_dim) in listed.items():
            _encode_split(tok, root, name, split, files, fmt, action_dim if split_dim is None else split_dim,
                          poses[split], examples_per_shard, progress)
        if replace:
            trash = out_root / f'.{name}.replaced'
            if trash.exists():
                shutil.rmtree(trash)
            os.replace(final, trash)
            os.replace(staging_root / name, final)
            shutil.rmtree(trash)
            shutil.rmtree(staging_root)
    final = out_root / name
    return {'path': str(final), 'splits': counts, 'code_shape': tok.latent_shape, 'n_codes': tok.n_codes}
