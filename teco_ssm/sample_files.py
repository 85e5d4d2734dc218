"""Sampling a dataset's test split (or another) under a protocol into `.npz` files that `teco_ssm.evaluate` reads.

`sample_dataset` (or `sample_workdir`, from a training workdir alone) restores the model (`checkpoint.load_variables`),
splits each batch over every device (`teco_ssm.sharding`), rolls it out (`sample.rollout`) and writes one file per
batch, `out_dir/batch_<k>.npz`, or one per batch and process, `batch_<k>_p<i>.npz`, when launched as several
processes (`jax.distributed`, initialised here as for training). Batch k is the global batch of the dataset's
evaluation order (`teco_ssm.data.pipeline`): videos `[k G, (k + 1) G)` with G = batch_size * process_count, process
i holding rows `[i batch_size, (i + 1) batch_size)`, sampled with one key. So the folder holds each of the first
num_videos videos once, and N processes of batch_size rows write the same samples as one process of
N * batch_size rows on as many devices. Each file holds:
  real     (B, T, H, W, 3) uint8   ground truth, T = context + horizon
  fake     (B, T, H, W, 3) uint8   the sample; its first `context` frames are the context's codes decoded by the
                                   tokenizer (its reconstruction), the rest generated
  actions  (B, T) int32            the dataset's actions (given to the model only when the protocol uses them)
  context, horizon  int; use_actions bool; seed int (the run's seed; batch k samples with fold_in(key(seed), k));
  draft_steps, revise_steps, revise_rounds int; temperature, top_p float; draft_schedule, feedback str: the sampler's
           settings
  batch    int, this file's batch index; index (B,) int32, the dataset's video indices (each requested video is in
           exactly one file of a folder); batch_size, process_count int: the layout that wrote the file
A folder's `sampling_times.jsonl` records how long each file took to sample (`sampling_speed`), beside the files
so that the same samples are the same bytes.
  checkpoint_step int (-1 when variables were given); model_sha256 str (`model_fingerprint` of the parameters),
           model_source str (the workdir, or 'variables'); tokenizer_sha256, tokenizer_source str (the tokenizer's
           fingerprint, `vqgan.Tokenizer.fingerprint`, and where it was loaded from); data_path, split str: what
           produced the file (`evaluate.ORIGIN_FIELDS` are compared, the sources are recorded for the reader). A
           resumed run refuses finished files of another origin, naming the field; `teco_ssm.evaluate` refuses a
           folder mixing origins or holding a video twice.

Resuming with another batch size or number of processes keeps what the folder holds: the videos of its files are
done, a batch is sampled only for videos no file holds, and only those rows are written (under a name no file
has), so each requested video is in the folder exactly once.
  seen     (B, T) bool, when the dataset holds MazeLab `poses` (its npz files, or the `poses` feature that
           `vqgan/encode.py` keeps when encoding them): `evaluate.revisit_masks`, True where the frame's pose was
           first visited during the context, i.e. a generated frame at a place the context showed
  at_last_context_pose (B, T) bool, beside `seen`: True where the frame's pose is the last context frame's
           (repeating that frame is exact there); files written before it existed lack it
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from teco_ssm import checkpoint, config_io, evaluate, lock, sharding, teco
from teco_ssm.data import batch_codes, check_tokenizer, formats, open_dataset
from teco_ssm.maskgit import ADDED_LATER
from teco_ssm.sample import Protocol, SamplerSettings, resolve_protocol, rollout
from teco_ssm.teco import Teco

_FILE = "teco_ssm/sample_files.py"
PathLike = Union[str, os.PathLike]


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """Frames float in [-1, 1] (..., H, W, 3) -> uint8 [0, 255], round((x + 1) * 127.5), clipped."""
    return np.clip(np.round((np.asarray(frames, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def _decode(tokenizer: Any, codes: np.ndarray) -> np.ndarray:
    """uint8 frames (N, T, H, W, 3) of codes (N, T, h, w); N may be 0 (a process's share of the last batch), T may
    be 0 (no generated frames)."""
    if 0 in codes.shape[:2]:
        return np.zeros((*codes.shape[:2], *tokenizer.frame_shape), np.uint8)
    return to_uint8(tokenizer.decode(codes))


def _decode_videos(tokenizer: Any, batch: Mapping[str, np.ndarray], codes: np.ndarray, sampled: np.ndarray,
                   context: int, keep: np.ndarray,
                   real_cache: dict[Any, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The `real` and `fake` uint8 videos (N, T, H, W, 3) of the kept rows `keep` of a batch: real from the batch's
    frames, or decoded from its codes (N, T, h, w) for an encoded dataset (through `real_cache`, see
    `sample_dataset`); fake decoded from `sampled` (N, T, h, w), whose first `context` frames are the real codes.
    Each frame is decoded once: an encoded dataset's real context frames are also the sample's (the tokenizer
    decodes every frame on its own, so a frame's pixels do not depend on the frames decoded with it)."""
    if "frames" in batch:
        return to_uint8(batch["frames"][keep]), _decode(tokenizer, sampled)
    fingerprint = getattr(tokenizer, "fingerprint", None)  # without one, nothing tells two tokenizers apart
    key = (fingerprint, codes.shape, hashlib.sha256(codes.tobytes()).hexdigest())
    real = real_cache.get(key) if fingerprint else None
    if real is None:
        real = _decode(tokenizer, codes)
        if fingerprint:
            real_cache[key] = real
    return real, np.concatenate([real[:, :context], _decode(tokenizer, sampled[:, context:])], axis=1)


def _write_npz_atomic(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """An uncompressed npz, written under a temporary name and renamed: the same arrays give the same bytes."""
    from teco_ssm import mazelab

    tmp = path.with_name(path.name + ".tmp")
    try:
        mazelab.save_npz(tmp, dict(arrays), compress=False)
        os.replace(tmp, path)
    except BaseException:  # a full disk, an interrupt: no half-written file stays behind
        tmp.unlink(missing_ok=True)
        raise


NOT_COMPARED = ("tokenizer_source", "model_source")  # recorded for the reader; the same files may sit elsewhere


def model_fingerprint(variables: Mapping[str, Any]) -> str:
    """sha256 (hex) over the 'params' collection (key paths, shapes, float32 bytes): which model made a sample."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(variables["params"]))[0]:
        value = np.ascontiguousarray(np.asarray(leaf, np.float32))
        digest.update(jax.tree_util.keystr(path).encode())
        digest.update(str(value.shape).encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


TIMES_FILE = "sampling_times.jsonl"  # one line per file written: {file, seconds, frames}


def sampling_speed(samples_dir: PathLike) -> dict[str, float] | None:
    """Generated frames per second of a samples folder, from its `sampling_times.jsonl` (the time from each file's
    predecessor, or from the first batch's start, to its write, and the frames it generated), over the files still
    there: {'frames_per_second', 'seconds', 'frames'}; None when no file has a record."""
    path = Path(samples_dir) / TIMES_FILE
    if not path.is_file():
        return None
    present = {p.name for p in evaluate.sample_files(samples_dir, allow_empty=True)}
    records = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut off by a crash
            continue
        if record.get("file") in present:
            records[record["file"]] = record  # the last write of a file counts
    seconds = sum(r["seconds"] for r in records.values())
    frames = sum(r["frames"] for r in records.values())
    return dict(frames_per_second=frames / seconds, seconds=seconds, frames=frames) if seconds > 0 else None


def _check_finished(path: Path, expected: Mapping[str, Any]) -> None:
    """A finished batch file must come from the same request; ValueError naming the file and field otherwise."""
    with evaluate.open_sample_file(path) as data:
        for field, value in expected.items():
            if field in NOT_COMPARED:
                continue
            if field not in data and field in ADDED_LATER and ADDED_LATER[field] == value:
                continue  # a file written before the field existed was sampled with that value
            if field not in data or data[field].item() != value:
                found = data[field].item() if field in data else "absent"
                raise ValueError(f"{path}: field '{field}' is {found}, this run asks for {value}; use another "
                                 f"out_dir or the same settings to resume")


def sample_dataset(config: ml_collections.ConfigDict, workdir_or_variables: PathLike | Mapping[str, Any],
                   tokenizer: Any, data_path: PathLike, out_dir: PathLike, *,
                   protocol: str | Protocol | Sequence[Any] = "action_conditioned", num_videos: int | None = None,
                   batch_size: int | None = None, seed: int | None = None, step: int | None = None,
                   split: str | None = None, settings: SamplerSettings | None = None,
                   real_cache: dict[Any, np.ndarray] | None = None) -> dict[str, Any]:
    """Samples a split of a dataset (default test) under a protocol and writes `out_dir/batch_<k>.npz` files.

    Args:
      config: the experiment config (model, backbone and `sampling` settings).
      workdir_or_variables: a training workdir (its latest checkpoint, or `step`) or the variables themselves.
      tokenizer: `vqgan.load(...)`'s Tokenizer (encode, decode, codebook), the one the model was trained with.
      data_path: the dataset (raw frames or encoded codes; the data layer says which).
      out_dir: folder of the sample files (created).
      protocol: see `sample.resolve_protocol`; a name is read from `config.sampling` first.
      num_videos, batch_size, seed: default config.sampling.num_videos, config.sampling.batch_size, config.seed.
        batch_size rows per process, a multiple of this process's device count (the batch is split over every
        device). Batch k samples with key fold_in(key(seed), k): a resumed run writes what one run would have.
      step: the checkpoint step to restore (None: the latest); unused when variables are given.
      split: the dataset split (default 'test', the split the protocols score; a config's dataset.eval_split is
        the held-out loss's, which `teco-ssm run` sets to its validation split).
      settings: the MaskGit sampler's settings (default `SamplerSettings.from_config(config.sampling)`), e.g.
        `dataclasses.replace(SamplerSettings.from_config(config.sampling), temperature=0.5)`.
      real_cache: a dict shared between calls: the `real` videos an encoded dataset's codes decode to are kept
        there, keyed by the tokenizer's fingerprint and the codes' bytes, so calls that sample the same videos (a
        model under both protocols, its untrained baseline: `teco_ssm.run`) decode them once. It holds every
        batch's real videos (uint8) until the caller drops it.
    Resumable: a batch whose file exists is skipped (files are written to a temporary name and renamed, so a
    file that exists is complete); a finished file from another protocol, seed, sampler settings, checkpoint step,
    tokenizer or dataset is a ValueError naming the file and field. One process writes `out_dir` at a time
    (`teco_ssm.lock`, held by process 0; lock.Busy names the other); codes made by another tokenizer are a
    DataError.
    Returns {'files': this process's batch files, 'written': count, 'skipped': count, 'num_videos': videos in the
    files, 'protocol': Protocol, 'settings': SamplerSettings}.
    """
    sharding.maybe_initialize_distributed()
    sampling = config.sampling
    chosen = resolve_protocol(protocol, sampling)
    settings = SamplerSettings.from_config(sampling) if settings is None else settings
    num_videos = int(sampling.num_videos if num_videos is None else num_videos)
    batch_size = int(sampling.batch_size if batch_size is None else batch_size)
    seed = int(config.seed if seed is None else seed)
    model = teco.build(config)
    if chosen.context < model.condition_frames:
        raise ValueError(f"{_FILE}: protocol context {chosen.context} < model.condition_frames "
                         f"{model.condition_frames}")
    if batch_size % jax.local_device_count():
        raise ValueError(f"{_FILE}: batch_size={batch_size} must be a multiple of the {jax.local_device_count()} "
                         f"local devices (the batch is split over every device, `teco_ssm.sharding`)")
    split = split or "test"
    mesh = sharding.make_mesh()
    count = jax.process_count()
    rows = sharding.process_rows(batch_size * count, mesh)  # this process's rows of each batch
    data_kwargs = dict(seq_len=chosen.num_frames, batch_size=batch_size, shuffle=False,
                       process_index=rows.start // batch_size, process_count=count)
    dataset = open_dataset(data_path, split, **data_kwargs)
    check_tokenizer(dataset.info, tokenizer)
    from_workdir = not isinstance(workdir_or_variables, Mapping)
    step = checkpoint.resolve_step(workdir_or_variables, step) if from_workdir else -1
    out_dir = Path(out_dir)
    with lock.hold(out_dir) if jax.process_index() == 0 else contextlib.nullcontext():
        return _sample_dataset(config, model, workdir_or_variables, tokenizer, data_path, dataset, out_dir,
                               chosen=chosen, num_videos=num_videos, batch_size=batch_size, seed=seed, step=step,
                               split=split, settings=settings, mesh=mesh, data_kwargs=data_kwargs,
                               real_cache=real_cache)


def _sample_dataset(config: ml_collections.ConfigDict, model: Teco,
                    workdir_or_variables: PathLike | Mapping[str, Any], tokenizer: Any, data_path: PathLike,
                    dataset: Any, out_dir: Path, *, chosen: Protocol, num_videos: int, batch_size: int, seed: int,
                    step: int, split: str, settings: SamplerSettings, mesh: Any,
                    data_kwargs: dict[str, Any], real_cache: dict[Any, np.ndarray] | None) -> dict[str, Any]:
    count = jax.process_count()
    process = data_kwargs["process_index"]
    num_videos = min(num_videos, dataset.info.num_videos)
    group = batch_size * count  # videos per batch: batch k holds [k group, (k + 1) group), process i its share
    num_batches = min(len(dataset), math.ceil(num_videos / group))
    out_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(workdir_or_variables, Mapping):
        variables, source = dict(workdir_or_variables), "variables"
    else:
        variables = checkpoint.load_variables(config, workdir_or_variables, step)
        source = os.path.abspath(os.fspath(workdir_or_variables))
    expected = dict(context=chosen.context, horizon=chosen.horizon, use_actions=chosen.use_actions, seed=seed,
                    **dataclasses.asdict(settings), checkpoint_step=step, model_sha256=model_fingerprint(variables),
                    model_source=source, tokenizer_sha256=getattr(tokenizer, "fingerprint", ""),
                    tokenizer_source=str(getattr(tokenizer, "source", "")),
                    data_path=os.path.abspath(os.fspath(data_path)), split=split)
    existing = evaluate.sample_files(out_dir, allow_empty=True)
    for path in existing:
        _check_finished(path, expected)
    # The same answer on every process (one folder), so they all sample the same batches.
    done = evaluate.held_videos(existing, require_index=True)

    def share(k: int, i: int) -> range:
        return range(min((k * count + i) * batch_size, num_videos), min((k * count + i + 1) * batch_size, num_videos))

    def name(k: int) -> Path | None:
        """This process's file of batch k, None when its share holds no video still to sample; a name no file has
        (a folder written with another batch size or process count may hold this layout's plain name)."""
        if all(video in done for video in share(k, process)):
            return None
        suffix = f"_p{process}" if count > 1 else ""
        candidates = [f"batch_{k:05d}{suffix}.npz", f"batch_{k:05d}_{batch_size}x{count}{suffix}.npz"]
        candidates += [f"batch_{k:05d}_{batch_size}x{count}_{j}{suffix}.npz" for j in range(1, len(existing) + 2)]
        return next(out_dir / c for c in candidates if not (out_dir / c).exists())

    finished = [all(v in done for i in range(count) for v in share(k, i)) for k in range(num_batches)]
    paths = [name(k) for k in range(num_batches)]
    first = next((k for k, is_done in enumerate(finished) if not is_done), num_batches)
    written: list[Path] = []
    if first < num_batches:
        if "tokenizer" in variables:  # frozen code embeddings: the tokenizer's codebook, checked for shape
            variables = teco.set_code_embeddings(variables, tokenizer.codebook)
        written = _sample_batches(model, variables, tokenizer, dataset, paths, finished, first, chosen,
                                  num_videos=num_videos, seed=seed, expected=expected, settings=settings,
                                  mesh=mesh, done=done, layout=dict(batch_size=batch_size, process_count=count),
                                  batches=open_dataset(data_path, split, start_step=first, **data_kwargs),
                                  real_cache={} if real_cache is None else real_cache)
    held = evaluate.held_videos(evaluate.sample_files(out_dir, allow_empty=True))
    files = sorted({held[v] for v in range(num_videos) if v in held}, key=evaluate.natural_key)
    return dict(files=[str(p) for p in files], written=len(written),
                skipped=sum(finished), num_videos=sum(v in held for v in range(num_videos)), protocol=chosen,
                settings=settings)


def _sample_batches(model: Teco, variables: dict[str, Any], tokenizer: Any, dataset: Any, paths: list[Path | None],
                    finished: list[bool], first: int, protocol: Protocol, *, num_videos: int, seed: int,
                    expected: dict[str, Any], settings: SamplerSettings, mesh: Any, done: Mapping[int, Path],
                    layout: Mapping[str, int], batches: Any, real_cache: dict[Any, np.ndarray]) -> list[Path]:
    """Samples the unfinished batches from `first` on (every process takes part) and writes this process's rows of
    each that no file of the folder holds (`done`) to `paths[k]` (None when there are none); returns the files
    written."""
    # Through host memory: every process places its copy (JAX moves no arrays between hosts).
    variables = jax.device_put(jax.device_get(variables), sharding.replicated(mesh))
    batches = iter(batches)
    written = []
    since = time.perf_counter()
    for k in tqdm(range(first, len(paths)), desc="sampling", unit="batch", initial=first, total=len(paths)):
        batch = next(batches)
        if finished[k]:
            continue
        index = np.asarray(batch["index"])
        todo = batch["valid"] & (index < num_videos) & ~np.isin(index, list(done))  # the first num_videos videos
        keep = np.flatnonzero(todo)
        codes = batch_codes(batch, tokenizer)
        actions = np.asarray(batch["actions"], np.int32)
        rng = jax.random.fold_in(jax.random.key(seed), k)
        inputs = sharding.global_batch(dict(codes=codes[:, :protocol.context], actions=actions), mesh)
        sampled = rollout(model, variables, inputs["codes"], inputs["actions"] if protocol.use_actions else None, rng,
                          horizon=protocol.horizon, use_actions=protocol.use_actions, settings=settings)
        sampled = sharding.local_rows(mesh, sampled)[keep]
        if paths[k] is None or not len(keep):  # nothing of this process's still to sample
            continue
        real, fake = _decode_videos(tokenizer, batch, codes[keep], sampled, protocol.context, keep, real_cache)
        arrays = dict(real=real, fake=fake, actions=actions[keep], index=index[keep], batch=np.asarray(k),
                      **{name: np.asarray(value) for name, value in {**expected, **layout}.items()})
        masks = evaluate.revisit_masks(dataset, index[keep], np.asarray(batch["start"])[keep],
                                       protocol.context, protocol.num_frames)
        arrays.update(masks or {})
        _write_npz_atomic(paths[k], arrays)
        now = time.perf_counter()
        with open(paths[k].parent / TIMES_FILE, "a") as times:  # beside the files: their bytes stay the samples'
            times.write(json.dumps(dict(file=paths[k].name, seconds=now - since,
                                        frames=int(len(keep)) * protocol.horizon)) + "\n")
        since = now
        written.append(paths[k])
    return written


def sample_workdir(workdir: PathLike, out_dir: PathLike, *,
                   protocol: str | Protocol | Sequence[Any] = "action_conditioned", data_path: PathLike | None = None,
                   tokenizer_path: PathLike | None = None, num_videos: int | None = None,
                   batch_size: int | None = None, seed: int | None = None, step: int | None = None,
                   settings: SamplerSettings | None = None, overrides: Sequence[str] = (),
                   split: str | None = None) -> dict[str, Any]:
    """`sample_dataset` from a training workdir alone: its config.json gives the model, the sampler settings
    (unless `settings` is given; `overrides`, `field=value` as `--set` spells them, change the config's before they
    are read) and, unless given here, the dataset and tokenizer paths; `step` the checkpoint (None: the latest);
    `split` the dataset split (default 'test'). Raises FileNotFoundError when `workdir` is not a TECO training
    workdir, ValueError naming the missing field."""
    import vqgan

    checkpoint.check_path(workdir)
    sharding.maybe_initialize_distributed()  # before the tokenizer touches a device
    source = os.path.join(os.fspath(workdir), checkpoint.CONFIG_FILE)
    held = checkpoint.read_config(os.fspath(workdir)) if checkpoint.has_checkpoints(os.fspath(workdir)) else {}
    missing = [k for k in ("backbone", "model", "dataset", "tokenizer", "sampling") if k not in held]
    if missing:
        raise FileNotFoundError(f"{workdir}: not a TECO training workdir (expected config.json with fields "
                                f"{', '.join(missing)} and checkpoints/, as `teco-ssm train` writes them)")
    config = ml_collections.ConfigDict(held)
    SamplerSettings.fill_added_later(config.sampling)
    for item in overrides:
        config_io.apply_override(config, item)
    data_path = data_path if data_path is not None else config.dataset.path
    tokenizer_path = tokenizer_path if tokenizer_path is not None else config.tokenizer.path
    for field, value, option in (("dataset.path", data_path, "--data"),
                                 ("tokenizer.path", tokenizer_path, "--tokenizer")):
        if value is None:
            raise ValueError(f"{source}: field {field} is not set; pass {option}")
    return sample_dataset(config, workdir, vqgan.load(tokenizer_path), data_path, out_dir, protocol=protocol,
                          num_videos=num_videos, batch_size=batch_size, seed=seed, step=step, settings=settings,
                          split=split)
