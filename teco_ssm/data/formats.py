"""Raw video folders (npz, mp4): listing, header checks, validated reads.

Layout shared by TECO's published raw datasets and MazeLab::

    <root>/metadata.json                  optional: {"action_dim": 4, ...}
    <root>/{train,test}/<shard>/*.npz     video (T, H, W, 3) uint8, actions (T,) int
    <root>/{train,test}/<shard>/*.mp4     frames; actions in an optional sibling <stem>.npz

Every reader returns the full video and actions after checking them against an `ExampleSpec`; a bad
file raises `DataError` naming the file and what was expected.
"""
from __future__ import annotations

import dataclasses
import json
import os
import zipfile
from pathlib import Path
from typing import Optional

import numpy as np

FORMATS = ('npz', 'mp4', 'tfds')
KINDS = ('frames', 'codes')
METADATA_FILE = 'metadata.json'


class DataError(ValueError):
    """A dataset file or folder does not hold what the configuration expects."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What one split of a dataset holds, from a quick up-front check.

    Attributes:
      path: the dataset root as given.
      split: 'train', 'test', ...
      format: 'npz' | 'mp4' | 'tfds'.
      kind: 'frames' (uint8 RGB videos) or 'codes' (integer tokenizer codes).
      num_videos: videos in the split, over all processes.
      video_length: the shortest length among the videos whose headers were read (one by default;
        every read checks its own video against `seq_len` again).
      frame_shape: (H, W, 3) for frames, else None.
      code_shape: (h, w) for codes, else None.
      action_dim: number of action ids when the dataset states it (metadata.json) or the caller gave it.
      tokenizer_sha256, tokenizer_source: for codes, the fingerprint and source of the tokenizer that made them, as
        the dataset's encoding.json records them (None when it has none).
    """

    path: str
    split: str
    format: str
    kind: str
    num_videos: int
    video_length: int
    frame_shape: Optional[tuple[int, int, int]] = None
    code_shape: Optional[tuple[int, int]] = None
    action_dim: Optional[int] = None
    tokenizer_sha256: Optional[str] = None
    tokenizer_source: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class ExampleSpec:
    """What every example must satisfy; `None` fields are not checked."""

    kind: str
    seq_len: Optional[int] = None
    frame_shape: Optional[tuple[int, ...]] = None  # (H, W, 3) for frames, (h, w) for codes
    action_dim: Optional[int] = None


def read_metadata(root: Path) -> dict:
    """The optional `<root>/metadata.json` (empty dict when absent)."""
    path = Path(root) / METADATA_FILE
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f'{path}: expected a JSON object with dataset metadata ({e})') from e


def split_dir(root: Path, split: str) -> Path:
    """`<root>/<split>`, or a DataError naming the missing folder and the splits that exist."""
    folder = Path(root) / split
    if not folder.is_dir():
        existing = sorted(p.name for p in Path(root).iterdir() if p.is_dir()) if Path(root).is_dir() else []
        raise DataError(f'{folder}: split folder not found (expected <root>/{split}/<shard>/*.npz or *.mp4; '
                        f'folders present: {existing or "none"})')
    return folder


PARTIAL_SUFFIX = '.partial'  # a file being written by `teco-ssm data`; renamed when complete


def list_videos(root: Path, split: str) -> tuple[str, list[str]]:
    """Format ('npz' or 'mp4') and sorted video files of `<root>/<split>/<shard>/`.

    A split of mp4 files may hold `<stem>.npz` action sidecars beside them; npz files that are no mp4's sidecar
    make it a mixed split. Raises DataError naming the files for a mixed split, for files of any other kind
    (a half-written `*.partial` of an interrupted `teco-ssm data` included), for an empty split, and, when
    `<root>/metadata.json` gives `num_<split>`, for a split holding fewer videos than that (an interrupted write).
    """
    folder = split_dir(root, split)
    files = sorted(p for p in folder.glob('*/*') if p.is_file())
    mp4 = [str(p) for p in files if p.suffix == '.mp4']
    npz = [str(p) for p in files if p.suffix == '.npz']
    other = [str(p) for p in files if p.suffix not in ('.mp4', '.npz')]
    if other:
        partial = [p for p in other if p.endswith(PARTIAL_SUFFIX)]
        why = (f'{len(partial)} half-written {PARTIAL_SUFFIX} file(s) of an interrupted `teco-ssm data` (run it '
               f'again with the same --out to finish)' if partial else 'expected only *.npz or *.mp4 videos')
        raise DataError(f'{folder}: {len(other)} file(s) of another kind: {_some(other)}; {why}')
    sidecars = {mp4_actions_path(p) for p in mp4}
    trajectories = [p for p in npz if p not in sidecars]
    if mp4 and trajectories:
        raise DataError(f'{folder}: mixed split of {len(mp4)} mp4 video(s) ({_some(mp4)}) and {len(trajectories)} '
                        f'npz trajectories that are no mp4 action sidecar ({_some(trajectories)}); a split holds '
                        'one format: move one kind to its own dataset')
    fmt, videos = ('mp4', mp4) if mp4 else ('npz', npz)
    if not videos:
        loose = sorted(p.name for p in folder.glob('*.*'))[:3]
        hint = f' (files directly under the split folder: {loose}; expected one level of shard folders)' if loose else ''
        raise DataError(f'{folder}: empty dataset, no <shard>/*.npz or <shard>/*.mp4 files{hint}')
    expected = read_metadata(root).get(f'num_{split}')
    if isinstance(expected, int) and len(videos) < expected:
        raise DataError(f'{folder}: holds {len(videos)} of the {expected} videos {Path(root) / METADATA_FILE} '
                        f'lists (num_{split}); an interrupted `teco-ssm data` leaves this: run it again with the '
                        'same --out to finish')
    return fmt, videos


def _some(paths: list[str], limit: int = 3) -> str:
    shown = ', '.join(os.path.basename(p) for p in paths[:limit])
    return shown if len(paths) <= limit else f'{shown} and {len(paths) - limit} more'


def _npy_header(member) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(member)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(member)
    else:
        shape, _, dtype = np.lib.format.read_array_header_2_0(member)
    return tuple(shape), np.dtype(dtype)


def npz_header(path: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shapes and dtypes of the arrays of an npz file, reading only the array headers."""
    try:
        with zipfile.ZipFile(path) as archive:
            out = {}
            for name in archive.namelist():
                if name.endswith('.npy'):
                    with archive.open(name) as member:
                        out[name[:-4]] = _npy_header(member)
            return out
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise DataError(f'{path}: corrupt or truncated npz, expected a zip of .npy arrays ({e})') from e


def check_example(video: np.ndarray, actions: np.ndarray, where: str, spec: ExampleSpec) -> None:
    """Raises DataError naming `where` unless video/actions satisfy `spec`.

    Args:
      video: (T, H, W, 3) uint8 for frames, (T, h, w) integer for codes.
      actions: (T,) integer.
    """
    if spec.kind == 'frames':
        if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8:
            raise DataError(f"{where}: field 'video' expected (T, H, W, 3) uint8, got {video.shape} {video.dtype}")
    else:
        if video.ndim != 3 or not np.issubdtype(video.dtype, np.integer):
            raise DataError(f"{where}: field 'video' expected integer codes (T, h, w), got {video.shape} {video.dtype}")
    if spec.frame_shape is not None and tuple(video.shape[1:]) != tuple(spec.frame_shape):
        what = 'frames' if spec.kind == 'frames' else 'codes'
        raise DataError(f"{where}: {what} of shape {tuple(video.shape[1:])}, expected {tuple(spec.frame_shape)} "
                        'from the configuration')
    length = video.shape[0]
    if spec.seq_len is not None and length < spec.seq_len:
        raise DataError(f'{where}: video has {length} frames, shorter than seq_len={spec.seq_len}')
    numeric = np.issubdtype(actions.dtype, np.integer) or np.issubdtype(actions.dtype, np.floating)
    if actions.ndim != 1 or not numeric:
        raise DataError(f"{where}: field 'actions' expected (T,) integers, got {actions.shape} {actions.dtype}")
    if np.issubdtype(actions.dtype, np.floating) and not np.all(actions == np.round(actions)):
        raise DataError(f"{where}: field 'actions' expected integer action ids, got non-integral values")
    if actions.shape[0] != length:
        raise DataError(f"{where}: field 'actions' has length {actions.shape[0]}, expected {length} "
                        '(one action per video frame)')
    if spec.action_dim is not None:
        check_action_ids(actions, where, spec.action_dim)


def check_action_ids(actions: np.ndarray, where: str, action_dim: int) -> None:
    """Raises DataError naming `where` and the first frame whose action id is outside [0, action_dim)."""
    bad = np.flatnonzero((actions < 0) | (actions >= action_dim))
    if bad.size:
        raise DataError(f"{where}: action id {actions[bad[0]]} at frame {int(bad[0])} outside "
                        f'[0, {action_dim}) (action_dim={action_dim})')


def load_npz_arrays(path: str, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Reads `keys` from an npz file; DataError naming the file when it is corrupt or a key is missing."""
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in keys if k not in data.files]
            if missing:
                raise DataError(f'{path}: missing field(s) {missing}; the file holds {sorted(data.files)}')
            return {k: np.asarray(data[k]) for k in keys}
    except DataError:
        raise
    except Exception as e:  # zip, npy header and decompression errors all mean a corrupt file
        raise DataError(f'{path}: corrupt or truncated npz, expected a zip of .npy arrays '
                        f'({type(e).__name__}: {e})') from e


def read_npz(path: str) -> tuple[np.ndarray, np.ndarray]:
    """video (T, H, W, 3) uint8 and actions (T,) of one npz trajectory (unchecked)."""
    data = load_npz_arrays(path, ('video', 'actions'))
    return data['video'], data['actions']


def mp4_actions_path(path: str) -> str:
    return os.path.splitext(path)[0] + '.npz'


def read_mp4(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Frames (T, H, W, 3) uint8 of an mp4 file and actions from its sibling npz (zeros when absent)."""
    import imageio_ffmpeg

    try:
        reader = imageio_ffmpeg.read_frames(path)
        meta = next(reader)
        width, height = meta['size']
        frames = [np.frombuffer(buf, np.uint8).reshape(height, width, 3) for buf in reader]
    except Exception as e:
        raise DataError(f'{path}: unreadable mp4 ({type(e).__name__}: {e})') from e
    if not frames:
        raise DataError(f'{path}: mp4 holds no frames')
    video = np.stack(frames)
    sidecar = mp4_actions_path(path)
    if os.path.exists(sidecar):
        actions = load_npz_arrays(sidecar, ('actions',))['actions']
    else:
        actions = np.zeros((video.shape[0],), np.int32)
    return video, actions


def header_spec(fmt: str, path: str) -> tuple[tuple[int, ...], int]:
    """(frame shape (H, W, 3), length T) of one file, read cheaply; checks field presence and actions length."""
    if fmt == 'npz':
        header = npz_header(path)
        for key in ('video', 'actions'):
            if key not in header:
                raise DataError(f"{path}: missing field '{key}'; the file holds {sorted(header)}")
        (vshape, vdtype), (ashape, adtype) = header['video'], header['actions']
        empty_video = np.empty((0,) + tuple(vshape[1:]), vdtype) if vshape else np.empty((), vdtype)
        check_example(empty_video, np.empty((0,), adtype), path, ExampleSpec('frames'))
        if len(ashape) != 1 or ashape[0] != vshape[0]:
            raise DataError(f"{path}: field 'actions' has shape {ashape}, expected ({vshape[0]},) "
                            '(one action per video frame)')
        return tuple(vshape[1:]), int(vshape[0])
    video, actions = read_mp4(path)
    check_example(video, actions, path, ExampleSpec('frames'))
    return tuple(video.shape[1:]), int(video.shape[0])
