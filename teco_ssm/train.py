"""Training of the TECO world model: `train_and_evaluate(config, workdir, tokenizer=None)`.

Read top to bottom, a run:
  1. validates the config (`teco_ssm.config_check.validate`) before anything is compiled, loads the tokenizer
     (`vqgan.load(config.tokenizer.path)` unless one is passed) and checks it fits the model;
  2. builds the mesh ('data', 'model') over every device (`teco_ssm.sharding`): the batch is split over all of them,
     parameters and optimiser state replicated unless `config.shard_params`;
  3. restores the latest complete checkpoint of `<workdir>/checkpoints`, or initialises the state (sharded init of
     `jax.eval_shape`'s layout) with the model's code embeddings copied from the tokenizer's codebook;
  4. streams the training split from the checkpoint's step on (`open_dataset(..., start_step=step)`: the same
     batches as an uninterrupted run). Step s trains on the same global batch of `config.batch_size` examples
     whatever the number of processes and devices: each process loads its rows of it (`sharding.process_rows`).
     A dataset of frames goes through `tokenizer.encode`; a dataset of codes is used as it is; which one is
     decided by what the dataset holds (`ds.info.kind`);
  5. runs one jitted, state-donating train step per batch. Step s (counting from 1) draws its randomness from
     `fold_in(key(seed), s - 1)`, so a resumed run draws the same numbers;
  6. checks every step's loss terms, gradient norm and new parameters' norm for NaN/Inf (one step behind, so the
     device is never idle) and stops with `FloatingPointError: step s: non-finite training terms: ...`; a checkpoint
     is written only after the step that produced it was checked, so the ones on disk are good;
  7. every `log_every` steps writes interval means to TensorBoard and `metrics.jsonl` (`ScalarWriter`), shows them
     on the progress bar; every `checkpoint_every` steps saves asynchronously (orbax, last `keep_checkpoints`
     kept, `config.json` beside); every `visualise_every` steps writes `rollouts/step_<s>.gif`: ground truth on the
     left, an open-loop rollout on the right (context frames, then generated frames given the true actions);
     every `eval_every` steps (and at the last) the held-out loss: the model's terms with `train=False` on
     `eval_batches` batches of `dataset.eval_split`, written as `eval/<term>` (and `eval_<term>` in the result).

Checkpoint items: 'model' = the model variables ({'params', 'tokenizer'}, as `teco.init_variables` makes them;
`teco_ssm.checkpoint.load_variables` reads this item alone) and 'train' = {'step', 'opt_state'}.

The jitted functions take the model, the optimiser settings and the mesh as static arguments, so runs of the same
configuration in one process share their compiled code.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
import os
import sys
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from teco_ssm import checkpoint as ckpt
from teco_ssm import config_check, lock, optim, released, sample, sample_files, sharding, teco
from teco_ssm.data import DataError, batch_codes, check_tokenizer, inspect_dataset, open_dataset
from teco_ssm.progress import ProgressBar, ScalarWriter, check_finite

_FILE = "teco_ssm/train.py"
State = dict[str, Any]       # {'step': () int32, 'params': pytree, 'opt_state': pytree}
Constants = dict[str, Any]   # the model's frozen collections, e.g. {'tokenizer': {'code_embeddings': ...}}
VISUALISED_VIDEOS = 4
ROLLOUT_DIR = "rollouts"


# ------------------------------------------------------------------------------------------------ state layout
def state_shardings(abstract_state: State, mesh: Mesh, settings: optim.OptimizerSettings,
                    shard_params: bool) -> State:
    """NamedShardings of a train state: parameters per `sharding.param_shardings`, the optimiser's copies of them
    alike, everything else (step, counters) replicated."""
    params = sharding.param_shardings(abstract_state["params"], mesh, shard_params)
    opt_state = optax.tree_map_params(optim.build(settings), lambda _, s: s, abstract_state["opt_state"], params,
                                      transform_non_params=lambda _: sharding.replicated(mesh))
    return dict(step=sharding.replicated(mesh), params=params, opt_state=opt_state)


def _constrain(state: State, constants: Constants, mesh: Mesh, settings: optim.OptimizerSettings,
               shard_params: bool) -> tuple[State, Constants]:
    shardings = state_shardings(state, mesh, settings, shard_params)
    state = jax.lax.with_sharding_constraint(state, shardings)
    constants = jax.lax.with_sharding_constraint(
        constants, jax.tree_util.tree_map(lambda _: sharding.replicated(mesh), constants))
    return state, constants


def _split_variables(variables: Mapping[str, Any]) -> tuple[Any, Constants]:
    return variables["params"], {k: v for k, v in variables.items() if k != "params"}


@functools.partial(jax.jit, static_argnames=("model", "settings", "mesh", "shard_params"))
def init_state(rng: jax.Array, code_embeddings: jax.Array | None, *, model: teco.Teco,
               settings: optim.OptimizerSettings, mesh: Mesh, shard_params: bool = False) -> tuple[State, Constants]:
    """A fresh train state and the model's frozen collections, laid out on `mesh`.

    rng: key; an 'rbg' key (`init_key`) compiles several times faster than threefry for the many initialisers.
    code_embeddings: (vqgan_codes, vqgan_embedding_dim) float32, the tokenizer's codebook, or None to keep
    the random table. Returns (state {'step': 0, 'params', 'opt_state'}, constants {'tokenizer': ...}).
    """
    variables = teco.init_variables(model, rng)
    if code_embeddings is not None:
        variables = teco.set_code_embeddings(variables, code_embeddings)
    params, constants = _split_variables(variables)
    state = dict(step=jnp.zeros((), jnp.int32), params=params, opt_state=optim.build(settings).init(params))
    return _constrain(state, constants, mesh, settings, shard_params)


def init_key(seed: int) -> jax.Array:
    """The key of the parameter initialisers: an 'rbg' key of `seed`."""
    return jax.random.key(seed, impl="rbg")


@functools.partial(jax.jit, static_argnames=("model", "settings", "mesh", "shard_params"), donate_argnames=("state",))
def train_step(state: State, constants: Constants, batch: Mapping[str, jax.Array], rng: jax.Array, *,
               model: teco.Teco, settings: optim.OptimizerSettings, mesh: Mesh,
               shard_params: bool = False) -> tuple[State, dict[str, jax.Array]]:
    """One AdamW step on one batch (the state's buffers are donated).

    batch: codes (B, T, H, W) int32 and actions (B, T) int32, split over the mesh; rng: the run's key, folded with
    the state's step. Returns the new state and scalar metrics: the model's terms (loss, recon_loss, prior_loss,
    codebook_loss, commitment_loss, code_perplexity, recon_accuracy, prior_accuracy, actions_given), grad_norm
    (before clipping), param_norm (after the update), lr and ssm_lr (the rates this step used).
    """
    step_rng = jax.random.fold_in(rng, state["step"])
    model_rng, dropout_rng = jax.random.split(step_rng)

    def loss_fn(params):
        return model.apply({"params": params, **constants}, batch["codes"], batch["actions"], train=True,
                           rng=model_rng, rngs={"dropout": dropout_rng})

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = optim.build(settings).update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new_state, _ = _constrain(dict(step=state["step"] + 1, params=params, opt_state=opt_state), constants, mesh,
                              settings, shard_params)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads), param_norm=optax.tree.norm(params),
                   **optim.learning_rates(settings)(state["step"] - settings.schedule_start))
    return new_state, metrics


def abstract_train_state(model: teco.Teco, settings: optim.OptimizerSettings, mesh: Mesh,
                         shard_params: bool = False) -> tuple[State, Constants]:
    """ShapeDtypeStructs (with shardings) of `init_state`'s outputs, computed without allocating anything."""
    state, constants = jax.eval_shape(functools.partial(init_state, model=model, settings=settings, mesh=mesh,
                                                        shard_params=shard_params), jax.random.key(0), None)
    state = sharding.with_shardings(state, state_shardings(state, mesh, settings, shard_params))
    constants = sharding.with_shardings(constants, jax.tree_util.tree_map(lambda _: sharding.replicated(mesh),
                                                                          constants))
    return state, constants


# ----------------------------------------------------------------------------------------- checkpoint items
def checkpoint_items(state: State, constants: Constants) -> dict[str, Any]:
    """The saved items: 'model' (the variables) and 'train' (step and optimiser state)."""
    return {"model": {"params": state["params"], **constants},
            "train": {"step": state["step"], "opt_state": state["opt_state"]}}


def from_checkpoint_items(items: Mapping[str, Any]) -> tuple[State, Constants]:
    params, constants = _split_variables(items["model"])
    return dict(step=items["train"]["step"], params=params, opt_state=items["train"]["opt_state"]), constants


# ----------------------------------------------------------------------------------------------- the data
def _check_tokenizer(model: teco.Teco, tokenizer: Any) -> None:
    """Raises ValueError unless the tokenizer's codebook and code grid are the model's."""
    expected = (model.vqgan_codes, model.vqgan_embedding_dim, tuple(model.code_shape))
    got = (int(tokenizer.n_codes), int(tokenizer.embedding_dim), tuple(tokenizer.latent_shape))
    if got != expected:
        raise ValueError(
            f"{_FILE}: the tokenizer ({getattr(tokenizer, 'source', 'given object')}) has {got[0]} codes of {got[1]} "
            f"channels on a {got[2]} grid, but config.model gives vqgan_codes={expected[0]}, vqgan_embedding_dim="
            f"{expected[1]}, code_shape={expected[2]}")


def code_batches(ds: Any, tokenizer: Any, vqgan_codes: int) -> Iterator[dict[str, np.ndarray]]:
    """The dataset's batches as {'codes' (B, T, H, W) int32, 'actions' (B, T) int32} numpy arrays: `frames` are
    encoded with the tokenizer, `codes` taken as they are (`teco_ssm.data.batch_codes`). Raises DataError naming the
    file of a video whose codes fall outside [0, vqgan_codes)."""
    for batch in ds:
        codes = batch_codes(batch, tokenizer)
        bad = (codes < 0) | (codes >= vqgan_codes)
        if bad.any():
            row = int(np.flatnonzero(bad.reshape(bad.shape[0], -1).any(axis=1))[0])
            raise DataError(f"{ds.locate(int(batch['index'][row]))}: codes outside [0, {vqgan_codes}) "
                            f"(config.model.vqgan_codes); found [{codes[row].min()}, {codes[row].max()}]")
        yield {"codes": codes.astype(np.int32), "actions": np.asarray(batch["actions"], np.int32)}


# ---------------------------------------------------------------------------------------------- held-out loss
@functools.partial(jax.jit, static_argnames=("model",))
def eval_step(variables: Mapping[str, Any], batch: Mapping[str, jax.Array], rng: jax.Array, *,
              model: teco.Teco) -> dict[str, jax.Array]:
    """The model's loss terms on one batch with `train=False`: every frame scored, the true actions given, no
    dropout (`Teco.__call__`). batch: codes (B, T, H, W) int32, actions (B, T) int32; rng fixes the prior's masks.
    Returns the scalar metrics of `train_step`'s model terms."""
    _, metrics = model.apply(variables, batch["codes"], batch["actions"], train=False, rng=rng,
                             rngs={"dropout": rng})
    return metrics


def held_out_batches(config: ml_collections.ConfigDict, tokenizer: Any, vqgan_codes: int, rows: range,
                     action_dim: int | None) -> list[dict[str, np.ndarray]]:
    """Up to `config.eval_batches` global batches of `config.dataset.eval_split` (clips of seq_len from frame 0, in
    file order; batch k holds videos [k G, (k + 1) G), G = config.batch_size) as codes, read once: this process's
    `rows` of each. Only full batches are kept, so the held-out loss is the same for any number of processes. Empty
    when eval_every is 0 or the split holds fewer than G videos."""
    if not config.eval_every:
        return []
    ds = open_dataset(config.dataset.path, config.dataset.eval_split, seq_len=config.seq_len,
                      batch_size=len(rows), shuffle=False, action_dim=action_dim,
                      process_index=rows.start // len(rows), process_count=config.batch_size // len(rows))
    full = min(config.eval_batches, ds.info.num_videos // config.batch_size)
    return list(itertools.islice(code_batches(ds, tokenizer, vqgan_codes), full))


def held_out_metrics(model: teco.Teco, variables: Mapping[str, Any], batches: Sequence[Mapping[str, np.ndarray]],
                     rng: jax.Array, mesh: Mesh) -> dict[str, float]:
    """Means of `eval_step`'s terms over `batches` (the same key for every call, so evaluations of one run differ
    only by the parameters)."""
    totals: dict[str, float] = {}
    for batch in batches:
        metrics = jax.device_get(eval_step(variables, sharding.global_batch(batch, mesh), rng, model=model))
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + float(v) / len(batches)
    return totals


# ---------------------------------------------------------------------------------------------- visualising
def rollout_video(model: teco.Teco, variables: Mapping[str, Any], codes: jax.Array, actions: jax.Array,
                  rng: jax.Array, tokenizer: Any, settings: sample.SamplerSettings, context: int) -> np.ndarray:
    """Ground truth next to an open-loop rollout, as uint8 frames (T, rows * H, 2 W + 4, 3).

    codes (B, T, H, W), actions (B, T): global arrays; the first VISUALISED_VIDEOS rows are shown. The rollout
    reads `context` frames and generates the rest with the true actions and the sampler `settings`
    (`teco_ssm.sample.rollout`).
    """
    from teco_ssm import report

    rows = min(VISUALISED_VIDEOS, codes.shape[0])
    take = jax.jit(lambda x: x[:rows], out_shardings=sharding.replicated(codes.sharding.mesh))
    codes, actions = take(codes), take(actions)
    generated = sample.rollout(model, variables, codes[:, :context], actions, rng, horizon=codes.shape[1] - context,
                               use_actions=True, settings=settings)
    real = sample_files.to_uint8(tokenizer.decode(np.asarray(codes.addressable_data(0))))
    fake = sample_files.to_uint8(tokenizer.decode(np.asarray(generated.addressable_data(0))))
    pairs = [report.side_by_side(r, f) for r, f in zip(real, fake)]
    return np.concatenate(pairs, axis=1)


def _write_rollout(workdir: str, step: int, frames: np.ndarray) -> str:
    from teco_ssm import report

    return str(report.write_gif(frames, os.path.join(workdir, ROLLOUT_DIR, f"step_{step:08d}.gif"), fps=8))


# --------------------------------------------------------------------------------------------------- the run
def _mean(records: Sequence[Mapping[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([r[k] for r in records])) for k in records[0]}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, tokenizer: Any = None, *,
                       hooks: Sequence[Callable[[int], None]] = ()) -> dict[str, float]:
    """Trains (or resumes training of) the model of `config` in `workdir` up to `config.steps`.

    Args:
      config: an experiment config (`configs/<dataset>.py`), validated before anything is compiled.
      workdir: checkpoints, config.json, metrics.jsonl, TensorBoard events and rollout GIFs go here; a workdir that
        holds checkpoints is resumed from its latest complete one.
      tokenizer: a `vqgan.Tokenizer` (or an object with its n_codes, embedding_dim, latent_shape, codebook, encode
        and decode); default `vqgan.load(config.tokenizer.path)`.
      hooks: called with the step count after every step (e.g. to stop a run from outside by raising).
    Returns:
      the last logged interval means of the metrics (see `train_step`) with 'step' and 'steps_per_second', and
      'num_params' and 'num_processes' (the processes that trained together) once a step has run.
    Raises:
      ValueError for a bad config (before compilation) or a request to resume `workdir` with other settings than
      its checkpoints' (`resume_fields`; before anything is written, naming the field), DataError for bad data or
      codes another tokenizer made, FloatingPointError for a non-finite training term, naming the step and the
      term, lock.Busy when another process trains in `workdir`.
    """
    ckpt.check_path(workdir)
    sharding.maybe_initialize_distributed()
    config_check.validate(config)
    ignored = resume_ignored(config)
    if _at_released_step(workdir):  # its optimiser state is made afresh: its settings may still change
        ignored += (f"optim.{config.backbone}",)
    ckpt.check_resume(workdir, config, resume_fields(config), ignore=ignored)
    if tokenizer is None:
        import vqgan

        tokenizer = vqgan.load(config.tokenizer.path)
    model = teco.build(config)
    _check_tokenizer(model, tokenizer)
    check_tokenizer(inspect_dataset(config.dataset.path, config.dataset.train_split), tokenizer)
    with lock.hold(workdir) if jax.process_index() == 0 else contextlib.nullcontext():
        return _train(config, workdir, tokenizer, model, hooks)


def _at_released_step(workdir: str) -> bool:
    """Whether `workdir` is a converted release (`teco_ssm.released`) not yet fine-tuned: its latest complete step
    is the release's."""
    origin = released.provenance(workdir)
    if origin is None or not ckpt.has_checkpoints(workdir):
        return False
    mngr = ckpt.manager(workdir, read_only=True)
    try:
        return ckpt.latest_step(mngr) == origin.get("step")
    finally:
        mngr.close()


@functools.partial(jax.jit, static_argnames=("settings", "mesh", "shard_params"))
def fresh_optimizer_state(params: Any, constants: Constants, step: jax.Array, *, settings: optim.OptimizerSettings,
                          mesh: Mesh, shard_params: bool = False) -> tuple[State, Constants]:
    """A train state at `step` holding `params` and a fresh optimiser state (its count 0), laid out on `mesh`."""
    state = dict(step=step, params=params, opt_state=optim.build(settings).init(params))
    return _constrain(state, constants, mesh, settings, shard_params)


def resume_fields(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The config fields a resumed run must share with its checkpoints (`ckpt.check_resume`): the model, the
    active backbone (but `resume_ignored`) and its optimiser block, and what decides the batches (clip length,
    batch size, seed, split)."""
    return ("backbone", "model", config.backbone, f"optim.{config.backbone}", "seq_len", "batch_size", "seed",
            "dataset.train_split")


def resume_ignored(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """Fields inside `resume_fields` a resumed run may change: the backbone's scan_mode, which only picks how the
    same recurrence is computed."""
    return (f"{config.backbone}.scan_mode",)


def _train(config: ml_collections.ConfigDict, workdir: str, tokenizer: Any, model: teco.Teco,
           hooks: Sequence[Callable[[int], None]]) -> dict[str, float]:
    settings = optim.OptimizerSettings.of_experiment(config)
    shard_params = bool(config.shard_params)
    mesh = sharding.make_mesh(int(config.model_parallelism))
    rows = sharding.process_rows(config.batch_size, mesh)  # this process's rows of every global batch
    static = dict(model=model, settings=settings, mesh=mesh, shard_params=shard_params)
    lead = jax.process_index() == 0

    ds_kwargs = dict(seq_len=config.seq_len, batch_size=len(rows), shuffle=True, seed=config.seed,
                     process_index=rows.start // len(rows), process_count=config.batch_size // len(rows),
                     image_size=tuple(tokenizer.frame_shape[:2]),
                     action_dim=model.num_actions if model.use_actions else None)
    mngr = ckpt.manager(workdir, config=config if lead else None, keep=config.keep_checkpoints,
                        save_every=config.checkpoint_every)
    writer = ScalarWriter(workdir) if lead else None
    bar = None
    try:
        start = ckpt.latest_step(mngr) or 0
        if start >= config.steps:  # finished before (perhaps stopped before its caller recorded it)
            if lead:
                print(f"train: {workdir} holds step {start}, config.steps is {config.steps}: nothing to train (set "
                      f"steps above {start} to train further)", file=sys.stderr, flush=True)
            summary = summary_from_workdir(workdir, start, model)
            if start == config.steps and config.eval_every and not any(k.startswith("eval_") for k in summary):
                # stopped after the last checkpoint, before its held-out loss was written: compute it now, as the
                # uninterrupted run would have (the same parameters, batches and key)
                abstract = checkpoint_items(*abstract_train_state(model, settings, mesh, shard_params))
                params, constants = _split_variables(ckpt.restore(mngr, {"model": abstract["model"]}, start)["model"])
                eval_rng = jax.random.split(jax.random.key(config.seed), 3)[2]
                batches = held_out_batches(config, tokenizer, model.vqgan_codes, rows, ds_kwargs["action_dim"])
                held_out = held_out_metrics(model, {"params": params, **constants}, batches, eval_rng, mesh)
                if writer is not None:
                    writer.write(start, held_out, prefix="eval/")
                summary.update({f"eval_{k}": v for k, v in held_out.items()})
            return summary
        # The data is opened (and checked) before anything is compiled.
        ds = open_dataset(config.dataset.path, config.dataset.train_split, start_step=start, **ds_kwargs)
        batches = code_batches(ds, tokenizer, model.vqgan_codes)
        eval_batches = held_out_batches(config, tokenizer, model.vqgan_codes, rows, ds_kwargs["action_dim"])
        train_rng, vis_rng, eval_rng = jax.random.split(jax.random.key(config.seed), 3)
        if start == 0:
            state, constants = init_state(init_key(config.seed), np.asarray(tokenizer.codebook, np.float32), **static)
            logging.info("parameter values per optimiser group: %s",
                         optim.group_sizes(state["params"], settings.ssm_params))
        else:
            abstract = checkpoint_items(*abstract_train_state(model, settings, mesh, shard_params))
            origin = released.provenance(workdir)
            if origin is not None and origin.get("step") == start:  # a converted release: a fresh optimiser
                if settings.schedule_start != start:
                    raise ValueError(f"config.optim.{config.backbone}.schedule_start={settings.schedule_start}: a "
                                     f"fresh optimiser state starts its schedule at the release's step {start} "
                                     f"({released.PROVENANCE_FILE}); set schedule_start={start}")
                items = ckpt.restore(mngr, {"model": abstract["model"]}, start)
                params, constants = _split_variables(items["model"])
                state, constants = fresh_optimizer_state(params, constants, jnp.asarray(start, jnp.int32),
                                                         settings=settings, mesh=mesh, shard_params=shard_params)
                if lead:
                    print(f"train: fine-tuning the released weights of {origin['release']} ({origin['checkpoint']}, "
                          f"step {start}) with a fresh optimiser state; its learning-rate schedule runs from "
                          f"schedule_start={settings.schedule_start} to steps={config.steps}", file=sys.stderr,
                          flush=True)
            else:
                state, constants = from_checkpoint_items(ckpt.restore(mngr, abstract, start))
        bar = ProgressBar(total=config.steps, initial=start, desc=f"train {config.backbone}", disable=not lead,
                          keys=("loss", "recon_loss", "prior_loss"))
        context = max(model.condition_frames, min(config.sampling.action_conditioned.context, config.seq_len // 2))
        sampler = sample.SamplerSettings.from_config(config.sampling)
        records: list[dict[str, float]] = []
        summary: dict[str, float] = {"step": start}
        pending: tuple[int, Any] | None = None
        interval_start, interval_step = time.time(), start

        def check(pending_step: int, metrics: Any) -> None:
            values = {k: float(v) for k, v in jax.device_get(metrics).items()}
            check_finite(pending_step, values)
            records.append(values)

        for step in range(start + 1, config.steps + 1):
            batch = sharding.global_batch(next(batches), mesh)
            state, metrics = train_step(state, constants, batch, train_rng, **static)
            if pending is not None:
                check(*pending)
            pending = (step, metrics)

            if step % config.checkpoint_every == 0 or step == config.steps:
                check(*pending)  # never save a state that came from a non-finite step
                pending = None
                ckpt.save(mngr, step, checkpoint_items(state, constants), force=step == config.steps)
            if step % config.log_every == 0 or step == config.steps:
                if pending is not None:
                    check(*pending)
                    pending = None
                now = time.time()
                summary = dict(_mean(records), step=step,
                               steps_per_second=(step - interval_step) / max(now - interval_start, 1e-9),
                               num_processes=jax.process_count())
                interval_start, interval_step, records = now, step, []
                if writer is not None:
                    writer.write(step, {k: v for k, v in summary.items() if k != "step"})
                bar.update(step, summary)
            if eval_batches and (step % config.eval_every == 0 or step == config.steps):
                held_out = held_out_metrics(model, {"params": state["params"], **constants}, eval_batches, eval_rng,
                                            mesh)
                named = {f"eval_{k}": v for k, v in held_out.items()}
                check_finite(step, named)
                summary.update(named)
                if writer is not None:
                    writer.write(step, held_out, prefix="eval/")
            if step % config.visualise_every == 0:
                frames = rollout_video(model, {"params": state["params"], **constants}, batch["codes"],
                                       batch["actions"], jax.random.fold_in(vis_rng, step), tokenizer,
                                       sampler, context)
                if lead:
                    _write_rollout(workdir, step, frames)
            bar.update(step)
            for hook in hooks:
                hook(step)
        summary["num_params"] = count_params(model)
        summary["num_processes"] = jax.process_count()
    finally:
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
        ckpt.close(mngr)
    return summary_from_workdir(workdir, config.steps, model) if lead else summary


def count_params(model: teco.Teco) -> int:
    """The number of trained parameter values (the 'params' collection), from shapes alone."""
    abstract = jax.eval_shape(lambda key: teco.init_variables(model, key), jax.random.key(0))
    return int(sum(np.prod(x.shape, dtype=np.int64) for x in jax.tree_util.tree_leaves(abstract["params"])))


def summary_from_workdir(workdir: str, step: int, model: teco.Teco) -> dict[str, Any]:
    """What a finished training run reports, read back from `<workdir>/metrics.jsonl` (not from the process that
    trained, which a restart may not be): the last interval's means logged at `step` (loss, ..., steps_per_second,
    num_processes), the held-out figures of that step as eval_<name>, 'step' and 'num_params'. A record cut off
    by a crash is skipped; figures never logged are absent."""
    summary: dict[str, Any] = {"step": int(step), "num_params": count_params(model)}
    path = os.path.join(workdir, "metrics.jsonl")
    records = []
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    for record in records:  # later records of a step (a resumed run logs it again) replace earlier ones
        if record.get("step") != step:
            continue
        for key, value in record.items():
            if key.startswith("eval/"):
                summary[f"eval_{key[len('eval/'):]}"] = value
            elif key not in ("step", "time"):
                summary[key] = value
    return summary
