"""Long-horizon sampling from a TECO model: one compiled rollout, the benchmark protocols, and sample files.

A rollout reads the context in one parallel backbone call (`Teco.condition`) and then generates every frame inside
one `lax.scan` over time (`Teco.generate_step`: a backbone step, MaskGit draft-and-revise, decoding), so a rollout
of any length is one device call with no per-frame host round trip. The carry has fixed shapes: the SSM backbones
continue from their state without limit and the Transformer slides its key/value window, so horizons far beyond the
training length (1,000+ frames) run at constant memory and constant cost per frame.

Randomness: frame t draws from `jax.random.fold_in(rng, t)` (t the absolute frame index), so a rollout is a pure
function of its rng, and generating in several chunks, or frame by frame from Python, gives the same frames as one
call.

The protocols of the ConvS5 paper (Appendix D.5), selectable by name or by explicit numbers (`resolve_protocol`):
  action_conditioned   144 context frames, then 156 generated given past and future actions (PSNR, SSIM, LPIPS)
  unconditioned         36 context frames, then 264 generated without actions (FVD; Minecraft keeps its actions,
                        which its config states in `sampling.unconditioned.use_actions`)

`sample_dataset` (or `sample_workdir`, from a training workdir alone) writes batches of samples as `.npz` files that
`teco_ssm.evaluate` reads:
  real     (B, T, H, W, 3) uint8   ground truth, T = context + horizon
  fake     (B, T, H, W, 3) uint8   the sample; its first `context` frames are the context's codes decoded by the
                                   tokenizer (its reconstruction), the rest generated
  actions  (B, T) int32            the dataset's actions (given to the model only when the protocol uses them)
  context, horizon  int; use_actions bool; seed int (the run's seed; batch k samples with fold_in(key(seed), k));
  batch    int, this file's batch index; index (B,) int32, the dataset's video indices
  seen     (B, T) bool, when the dataset holds MazeLab `poses` (its npz files, or the `poses` feature that
           `vqgan/encode.py` keeps when encoding them): True where the frame's pose was first visited
           during the context (first-visit index < context), i.e. a generated frame at a place the context showed.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from teco_ssm import checkpoint, mazelab, sharding, teco
from teco_ssm.data import batch_codes, formats, open_dataset
from teco_ssm.teco import Teco

_FILE = "teco_ssm/sample.py"
PathLike = Union[str, os.PathLike]
Carry = dict[str, Any]


# ---------------------------------------------------------------------------------------------------- protocols
@dataclasses.dataclass(frozen=True)
class Protocol:
    """Frame arithmetic of one evaluation protocol: `context` given frames, then `horizon` generated ones."""
    context: int
    horizon: int
    use_actions: bool

    @property
    def num_frames(self) -> int:
        """Frames per video, context and generated: the sequence length read from the dataset."""
        return self.context + self.horizon

    @property
    def generated(self) -> slice:
        """The generated frames within a video of `num_frames` frames."""
        return slice(self.context, self.num_frames)


PROTOCOLS: dict[str, Protocol] = {
    "action_conditioned": Protocol(context=144, horizon=156, use_actions=True),
    "unconditioned": Protocol(context=36, horizon=264, use_actions=False),
}


def resolve_protocol(protocol: str | Protocol | Sequence[Any],
                     sampling_config: Mapping[str, Any] | None = None) -> Protocol:
    """The protocol named or given by numbers.

    protocol: a name of `PROTOCOLS` (taken from `sampling_config[name]` when that config defines it, so a dataset's
      config can shorten it or keep actions, e.g. Minecraft's unconditioned protocol), a `Protocol`, or explicit
      numbers `(context, horizon)` (actions used) or `(context, horizon, use_actions)`.
    Raises ValueError for an unknown name or numbers out of range (context >= 1, horizon >= 0).
    """
    if isinstance(protocol, str):
        if protocol not in PROTOCOLS:
            raise ValueError(f"{_FILE}: unknown protocol {protocol!r}; valid names: {', '.join(PROTOCOLS)}, or "
                             f"explicit numbers (context, horizon[, use_actions])")
        if sampling_config is not None and protocol in sampling_config:
            fields = sampling_config[protocol]
            resolved = Protocol(int(fields["context"]), int(fields["horizon"]), bool(fields["use_actions"]))
        else:
            resolved = PROTOCOLS[protocol]
    elif isinstance(protocol, Protocol):
        resolved = protocol
    else:
        numbers = tuple(protocol)
        if len(numbers) not in (2, 3):
            raise ValueError(f"{_FILE}: explicit protocol must be (context, horizon) or (context, horizon, "
                             f"use_actions), got {protocol!r}")
        resolved = Protocol(int(numbers[0]), int(numbers[1]), bool(numbers[2]) if len(numbers) == 3 else True)
    if resolved.context < 1 or resolved.horizon < 0:
        raise ValueError(f"{_FILE}: protocol needs context >= 1 and horizon >= 0, got {resolved}")
    return resolved


def sampler_settings(sampling_config: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments of `rollout` from a config's `sampling` group (draft/revise steps, temperature, ...)."""
    keys = ("draft_steps", "revise_steps", "revise_rounds", "temperature", "top_p", "draft_schedule")
    return {k: sampling_config[k] for k in keys}


# ------------------------------------------------------------------------------------------------------ rollout
def sample_frame(model: Teco, variables: Mapping[str, Any], carry: Carry, action: jax.Array | None,
                 rng: jax.Array, *, draft_steps: int = 8, revise_steps: int = 8, revise_rounds: int = 2,
                 temperature: float = 1.0, top_p: float = 1.0,
                 draft_schedule: str = "linear") -> tuple[Carry, jax.Array]:
    """Generates frame carry['time'] with key `fold_in(rng, carry['time'])`.

    carry: from `Teco.condition` or a previous frame; action: (B,) int32 leading into this frame, or None.
    Returns (carry, codes (B, H, W) int32). Pure: the scan body of `generate` and the per-frame step of a loop.
    """
    key = jax.random.fold_in(rng, carry["time"])
    return model.apply(variables, carry, action, key, method=Teco.generate_step, draft_steps=draft_steps,
                       revise_steps=revise_steps, revise_rounds=revise_rounds, temperature=temperature,
                       top_p=top_p, draft_schedule=draft_schedule)


def generate(model: Teco, variables: Mapping[str, Any], carry: Carry, actions: jax.Array | None,
             rng: jax.Array, *, horizon: int, **sampler: Any) -> tuple[Carry, jax.Array]:
    """`horizon` frames after `carry` in one `lax.scan` (pure; jit it, or call `rollout`).

    actions: (B, horizon) int32, action t leading into the t-th generated frame, or None (no actions).
    sampler: the keyword arguments of `sample_frame`.
    Returns (the carry after the last frame, codes (B, horizon, H, W) int32). Calling it twice, the second time
    with the first call's carry and the following actions, equals one call over both.
    """
    if actions is not None and (actions.ndim != 2 or actions.shape[1] != horizon):
        raise ValueError(f"{_FILE}: expected actions (B, horizon={horizon}), got shape {actions.shape}")

    def body(carry: Carry, action: jax.Array | None) -> tuple[Carry, jax.Array]:
        return sample_frame(model, variables, carry, action, rng, **sampler)

    xs = None if actions is None else jnp.moveaxis(actions.astype(jnp.int32), 1, 0)
    carry, frames = jax.lax.scan(body, carry, xs, length=horizon)
    return carry, jnp.moveaxis(frames, 0, 1)


@functools.partial(jax.jit, static_argnames=("model", "horizon", "use_actions", "draft_steps", "revise_steps",
                                             "revise_rounds", "temperature", "top_p", "draft_schedule"))
def _compiled_rollout(model: Teco, variables: Mapping[str, Any], codes_ctx: jax.Array, actions: jax.Array | None,
                      rng: jax.Array, *, horizon: int, use_actions: bool, **sampler: Any) -> tuple[jax.Array, Carry]:
    context = codes_ctx.shape[1]
    actions_ctx = None if actions is None else actions[:, :context]
    carry = model.apply(variables, codes_ctx, actions_ctx, method=Teco.condition, use_actions=use_actions)
    future = None if actions is None or not use_actions else actions[:, context:]
    carry, frames = generate(model, variables, carry, future, rng, horizon=horizon, **sampler)
    return jnp.concatenate([codes_ctx.astype(jnp.int32), frames], axis=1), carry


def rollout(model: Teco, variables: Mapping[str, Any], codes_ctx: jax.Array, actions: jax.Array | None,
            rng: jax.Array, *, horizon: int, use_actions: bool = True, draft_steps: int = 8, revise_steps: int = 8,
            revise_rounds: int = 2, temperature: float = 1.0, top_p: float = 1.0, draft_schedule: str = "linear",
            return_carry: bool = False) -> jax.Array | tuple[jax.Array, Carry]:
    """Conditions on a context and generates `horizon` frames: one compiled call (cached per shape and setting).

    Args:
      model, variables: the TECO model and its variables.
      codes_ctx: (B, Tc, H, W) int32 context codes, Tc >= model.condition_frames.
      actions: (B, Tc + horizon) int32, action t leading into frame t (context and future), or None.
      rng: key; frame t draws from fold_in(rng, t), so the same rng gives the same rollout.
      horizon: frames to generate (0 returns the context); any length, also beyond the training length.
      use_actions: False conditions and generates without actions (the unconditioned protocol).
      draft_steps, revise_steps, revise_rounds, temperature, top_p, draft_schedule: MaskGit draft-and-revise.
      return_carry: also return the final carry (backbone state, last latent, time).
    Returns:
      codes (B, Tc + horizon, H, W) int32, the context followed by the generated frames (and the carry).
    Raises ValueError naming the argument on shapes that do not fit.
    """
    codes_ctx = jnp.asarray(codes_ctx)
    if codes_ctx.ndim != 4 or tuple(codes_ctx.shape[2:]) != tuple(model.code_shape):
        raise ValueError(f"{_FILE}: codes_ctx must be (B, Tc, {model.code_shape[0]}, {model.code_shape[1]}) "
                         f"(model field code_shape), got shape {codes_ctx.shape}")
    if codes_ctx.shape[1] < model.condition_frames:
        raise ValueError(f"{_FILE}: codes_ctx has {codes_ctx.shape[1]} frames, the model conditions on "
                         f"condition_frames={model.condition_frames}")
    if horizon < 0:
        raise ValueError(f"{_FILE}: horizon must be >= 0, got {horizon}")
    batch, context = codes_ctx.shape[:2]
    if actions is not None:
        actions = jnp.asarray(actions)
        if tuple(actions.shape) != (batch, context + horizon):
            raise ValueError(f"{_FILE}: actions must be (B, Tc + horizon) = {(batch, context + horizon)}, got "
                             f"shape {actions.shape}")
        actions = actions.astype(jnp.int32)
    if horizon == 0 and not return_carry:
        return codes_ctx.astype(jnp.int32)
    codes, carry = _compiled_rollout(
        model, variables, codes_ctx, actions, rng, horizon=horizon, use_actions=bool(use_actions),
        draft_steps=draft_steps, revise_steps=revise_steps, revise_rounds=revise_rounds,
        temperature=float(temperature), top_p=float(top_p), draft_schedule=draft_schedule)
    return (codes, carry) if return_carry else codes


def teacher_forced(model: Teco, variables: Mapping[str, Any], codes: jax.Array, actions: jax.Array | None, *,
                   context: int, use_actions: bool = True) -> jax.Array:
    """Decoder logits of frames context.. given the true latent codes of every earlier frame, one `lax.scan` of
    `Teco.teacher_forced_step` after conditioning on the context (pure; jit it).

    codes (B, T, H, W) int32, actions (B, T) int32 or None -> logits (B, T - context, H, W, vqgan_codes) float32:
    the step path of generation with the sampled latents replaced by the posterior's, i.e. what `Teco.predict`
    computes in parallel for those frames.
    """
    latent_codes = model.apply(variables, codes, actions, method=Teco.predict, use_actions=use_actions)["latent_codes"]
    actions_ctx = None if actions is None else actions[:, :context]
    carry = model.apply(variables, codes[:, :context], actions_ctx, method=Teco.condition, use_actions=use_actions)

    def body(carry: Carry, inputs: tuple[jax.Array | None, jax.Array]) -> tuple[Carry, jax.Array]:
        action, latent = inputs
        return model.apply(variables, carry, action, latent, method=Teco.teacher_forced_step)

    future = None if actions is None or not use_actions else jnp.moveaxis(actions[:, context:], 1, 0)
    _, logits = jax.lax.scan(body, carry, (future, jnp.moveaxis(latent_codes[:, context:], 1, 0)))
    return jnp.moveaxis(logits, 0, 1)


# -------------------------------------------------------------------------------------------- model and mesh
def load_variables(config: ml_collections.ConfigDict, workdir: PathLike, step: int | None = None) -> dict[str, Any]:
    """The model variables saved by training in `workdir` (orbax item 'model', as `teco.init_variables` makes
    them), at `step` (None: the latest). Raises FileNotFoundError naming the folder when there is no checkpoint."""
    model = teco.build(config)
    abstract = jax.eval_shape(lambda key: teco.init_variables(model, key), jax.random.key(0))
    if not checkpoint.has_checkpoints(os.fspath(workdir)):
        raise FileNotFoundError(f"{workdir}: not a training workdir (expected config.json and checkpoints/)")
    mngr = checkpoint.manager(os.fspath(workdir), read_only=True)
    try:
        return dict(checkpoint.restore(mngr, {"model": abstract}, step)["model"])
    finally:
        mngr.close()


def _local_rows(mesh: Mesh, array: jax.Array) -> np.ndarray:
    """The rows of a global batch array that belong to this process, in order (B_local, ...)."""
    if array.is_fully_addressable:
        return np.asarray(array)
    array = jax.device_put(array, sharding.batch_sharding(mesh))
    shards = sorted(array.addressable_shards, key=lambda s: s.index[0].start or 0)
    starts = [s.index[0].start or 0 for s in shards]
    unique = [s for i, s in enumerate(shards) if i == 0 or starts[i] != starts[i - 1]]
    return np.concatenate([np.asarray(s.data) for s in unique])


# --------------------------------------------------------------------------------------------- sample files
def to_uint8(frames: np.ndarray) -> np.ndarray:
    """Frames float in [-1, 1] (..., H, W, 3) -> uint8 [0, 255], round((x + 1) * 127.5), clipped."""
    return np.clip(np.round((np.asarray(frames, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def seen_in_context(poses: np.ndarray, context: int) -> np.ndarray:
    """MazeLab poses (T, 3) int -> (T,) bool: the frame's exact pose was first visited before frame `context`."""
    return mazelab.first_visit_index(poses, exact=True) < context


def _dataset_poses(dataset: Any, index: int, start: int, num_frames: int) -> np.ndarray | None:
    """Poses (num_frames, 3) of video `index` from `start`, when the dataset stores `poses` (a MazeLab npz file, or
    a TFDS record encoded from one by `vqgan/encode.py`); else None."""
    poses = dataset.read_field(int(index), "poses")
    if poses is None:
        return None
    poses = poses[start:start + num_frames]
    if poses.shape != (num_frames, 3):
        raise formats.DataError(f"{dataset.locate(int(index))}: field 'poses' expected ({num_frames}, 3) from frame "
                                f"{start}, got {poses.shape}")
    return poses


def _write_npz_atomic(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def _check_finished(path: Path, expected: Mapping[str, Any]) -> None:
    """A finished batch file must come from the same request; ValueError naming the file and field otherwise."""
    with np.load(path) as data:
        for field, value in expected.items():
            if field not in data or data[field].item() != value:
                found = data[field].item() if field in data else "absent"
                raise ValueError(f"{path}: field '{field}' is {found}, this run asks for {value}; use another "
                                 f"out_dir or the same settings to resume")


def sample_dataset(config: ml_collections.ConfigDict, workdir_or_variables: PathLike | Mapping[str, Any],
                   tokenizer: Any, data_path: PathLike, out_dir: PathLike, *,
                   protocol: str | Protocol | Sequence[Any] = "action_conditioned", num_videos: int | None = None,
                   batch_size: int | None = None, seed: int | None = None, step: int | None = None,
                   split: str | None = None) -> dict[str, Any]:
    """Samples the evaluation split of a dataset under a protocol and writes `out_dir/batch_<k>.npz` files.

    Args:
      config: the experiment config (model, backbone and `sampling` settings).
      workdir_or_variables: a training workdir (its latest checkpoint, or `step`) or the variables themselves.
      tokenizer: `vqgan.load(...)`'s Tokenizer (encode, decode, codebook), the one the model was trained with.
      data_path: the dataset (raw frames or encoded codes; the data layer says which).
      out_dir: folder of the sample files (created).
      protocol: see `resolve_protocol`; a name is read from `config.sampling` first.
      num_videos, batch_size, seed: default config.sampling.num_videos, config.sampling.batch_size, config.seed.
        batch_size rows per process, a multiple of this process's device count (the batch is split over every
        device). Batch k samples with key fold_in(key(seed), k): a resumed run writes what one run would have.
      split: the dataset split (default config.dataset.eval_split).
    Resumable: a batch whose file exists is skipped (files are written to a temporary name and renamed, so a
    file that exists is complete); a finished file from different settings is an error.
    Returns {'files': all batch files, 'written': count, 'skipped': count, 'num_videos': videos in the files,
    'protocol': Protocol}.
    """
    sampling = config.sampling
    chosen = resolve_protocol(protocol, sampling)
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
    split = split or config.dataset.eval_split
    dataset = open_dataset(data_path, split, seq_len=chosen.num_frames, batch_size=batch_size, shuffle=False)
    num_videos = min(num_videos, dataset.info.num_videos)
    per_process = math.ceil(num_videos / jax.process_count())
    num_batches = min(len(dataset), math.ceil(per_process / batch_size))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = f"_p{jax.process_index()}" if jax.process_count() > 1 else ""
    paths = [out_dir / f"batch_{k:05d}{suffix}.npz" for k in range(num_batches)]
    expected = dict(context=chosen.context, horizon=chosen.horizon, use_actions=chosen.use_actions, seed=seed)
    finished = [p.exists() for p in paths]
    for path, done in zip(paths, finished):
        if done:
            _check_finished(path, expected)
    first = next((k for k, done in enumerate(finished) if not done), num_batches)
    written = 0
    if first < num_batches:
        if isinstance(workdir_or_variables, Mapping):
            variables = dict(workdir_or_variables)
        else:
            variables = load_variables(config, workdir_or_variables, step)
        if "tokenizer" in variables:  # frozen code embeddings: the tokenizer's codebook, checked for shape
            variables = teco.set_code_embeddings(variables, tokenizer.codebook)
        written = _sample_batches(model, variables, tokenizer, dataset, paths, finished, first, chosen,
                                  per_process=per_process, seed=seed, expected=expected,
                                  settings=sampler_settings(sampling),
                                  batches=open_dataset(data_path, split, seq_len=chosen.num_frames,
                                                       batch_size=batch_size, shuffle=False, start_step=first))
    total = sum(formats.npz_header(str(path))["real"][0][0] for path in paths)
    return dict(files=[str(p) for p in paths], written=written, skipped=num_batches - written,
                num_videos=int(total), protocol=chosen)


def _sample_batches(model: Teco, variables: dict[str, Any], tokenizer: Any, dataset: Any, paths: list[Path],
                    finished: list[bool], first: int, protocol: Protocol, *, per_process: int, seed: int,
                    expected: dict[str, Any], settings: dict[str, Any], batches: Any) -> int:
    """Samples and writes the unfinished batch files from `first` on; returns how many it wrote."""
    mesh = sharding.make_mesh()
    variables = jax.device_put(variables, sharding.replicated(mesh))
    batches = iter(batches)
    written = 0
    for k in tqdm(range(first, len(paths)), desc="sampling", unit="batch", initial=first, total=len(paths)):
        batch = next(batches)
        if finished[k]:
            continue
        keep = np.flatnonzero(batch["valid"])[:per_process - k * dataset.batch_size]
        codes = batch_codes(batch, tokenizer)
        real = to_uint8(batch["frames"] if "frames" in batch else tokenizer.decode(codes))
        actions = np.asarray(batch["actions"], np.int32)
        rng = jax.random.fold_in(jax.random.key(seed), k)
        inputs = sharding.global_batch(dict(codes=codes[:, :protocol.context], actions=actions), mesh)
        sampled = rollout(model, variables, inputs["codes"], inputs["actions"] if protocol.use_actions else None, rng,
                          horizon=protocol.horizon, use_actions=protocol.use_actions, **settings)
        sampled = _local_rows(mesh, sampled)[keep]
        fake = to_uint8(tokenizer.decode(sampled))
        arrays = dict(real=real[keep], fake=fake, actions=actions[keep], index=batch["index"][keep],
                      batch=np.asarray(k), **{name: np.asarray(value) for name, value in expected.items()})
        poses = [_dataset_poses(dataset, batch["index"][i], int(batch["start"][i]), protocol.num_frames)
                 for i in keep]
        if poses and all(p is not None for p in poses):
            arrays["seen"] = np.stack([seen_in_context(p, protocol.context) for p in poses])
        _write_npz_atomic(paths[k], arrays)
        written += 1
    return written


def sample_workdir(workdir: PathLike, out_dir: PathLike, *,
                   protocol: str | Protocol | Sequence[Any] = "action_conditioned", data_path: PathLike | None = None,
                   tokenizer_path: PathLike | None = None, num_videos: int | None = None,
                   batch_size: int | None = None, seed: int | None = None, step: int | None = None) -> dict[str, Any]:
    """`sample_dataset` from a training workdir alone: its config.json gives the model, the sampler settings and,
    unless given here, the dataset and tokenizer paths. Raises ValueError naming the missing field."""
    import vqgan

    config = ml_collections.ConfigDict(checkpoint.read_config(os.fspath(workdir)))
    source = os.path.join(os.fspath(workdir), checkpoint.CONFIG_FILE)
    data_path = data_path if data_path is not None else config.dataset.path
    tokenizer_path = tokenizer_path if tokenizer_path is not None else config.tokenizer.path
    for field, value in (("dataset.path", data_path), ("tokenizer.path", tokenizer_path)):
        if value is None:
            raise ValueError(f"{source}: field {field} is not set; pass it explicitly")
    return sample_dataset(config, workdir, vqgan.load(tokenizer_path), data_path, out_dir, protocol=protocol,
                          num_videos=num_videos, batch_size=batch_size, seed=seed, step=step)
