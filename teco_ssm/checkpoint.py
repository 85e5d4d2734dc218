"""The project's checkpoint layer: orbax CheckpointManager over named pytree items, plus `config.json`.

A checkpoint is a dict of named items (e.g. {'model': variables, 'train': optimiser state and step}); each item is
saved with `StandardSave` so one item can be restored without the others (a tokenizer needs only 'model').
Saves are asynchronous; orbax writes each step into a temporary folder and renames it when complete, so an
interrupted write is never listed or restored.

  mngr = manager(workdir, config=config, keep=3, save_every=1000)
  state = restore_or_none(mngr, {'model': abstract_vars, 'train': abstract_train}) or fresh
  save(mngr, step, {'model': vars, 'train': train})      # skipped unless step % save_every == 0 (force=True saves)
  close(mngr)
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp

CONFIG_FILE = 'config.json'
CHECKPOINT_DIR = 'checkpoints'


def config_to_dict(config: Any) -> dict[str, Any]:
    """An ml_collections ConfigDict (or mapping) as plain JSON-compatible dicts and lists."""
    if hasattr(config, 'to_dict'):
        config = config.to_dict()

    def plain(x: Any) -> Any:
        if isinstance(x, Mapping):
            return {str(k): plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        if isinstance(x, (str, int, float, bool)) or x is None:
            return x
        return str(x)

    return plain(config)


def write_config(workdir: str, config: Any) -> str:
    """Writes `<workdir>/config.json` atomically (temporary file then rename); returns its path."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, CONFIG_FILE)
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(config_to_dict(config), f, indent=2, sort_keys=True)
    os.replace(tmp, path)
    return path


def read_config(workdir: str) -> dict[str, Any]:
    """Reads `<workdir>/config.json`; raises FileNotFoundError / ValueError naming the file."""
    path = os.path.join(workdir, CONFIG_FILE)
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f'{path}: not valid JSON ({e})') from None


def has_checkpoints(workdir: str) -> bool:
    """True when `workdir` holds a config.json and a checkpoints folder of this layout."""
    return (os.path.isfile(os.path.join(workdir, CONFIG_FILE))
            and os.path.isdir(os.path.join(workdir, CHECKPOINT_DIR)))


def manager(workdir: str, config: Any = None, *, keep: int = 3, save_every: int = 1,
            async_save: bool = True, read_only: bool = False) -> ocp.CheckpointManager:
    """A CheckpointManager over `<workdir>/checkpoints`, writing `<workdir>/config.json` when `config` is given.

    keep: how many most recent checkpoints to keep; save_every: steps between saves (`save` with force=True
    always saves); async_save: write in a background thread (call `wait` or `close` before reading).
    """
    workdir = os.path.abspath(workdir)
    if config is not None and not read_only:
        write_config(workdir, config)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=save_every, enable_async_checkpointing=async_save,
        create=not read_only, read_only=read_only)
    return ocp.CheckpointManager(os.path.join(workdir, CHECKPOINT_DIR), options=options)


def latest_step(mngr: ocp.CheckpointManager) -> int | None:
    """The newest fully written step, or None."""
    return mngr.latest_step()


def save(mngr: ocp.CheckpointManager, step: int, state: Mapping[str, Any], *, force: bool = False) -> bool:
    """Saves the named items of `state` at `step` (asynchronously); returns whether a save was started."""
    args = ocp.args.Composite(**{name: ocp.args.StandardSave(item) for name, item in state.items()})
    return mngr.save(int(step), args=args, force=force)


def _restore_target(leaf: Any) -> jax.ShapeDtypeStruct:
    """The leaf's shape, dtype and sharding; a leaf without a sharding goes to the first local device.

    Without a target sharding orbax would reuse the one recorded at save time, which names the saving machine's
    devices: a checkpoint written on a CPU could then not be read on a GPU (orbax: 'Topology mismatch').
    """
    target = ocp.utils.to_shape_dtype_struct(leaf)
    if getattr(target, 'sharding', None) is None:
        target = jax.ShapeDtypeStruct(target.shape, target.dtype,
                                      sharding=jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
    return target


def restore(mngr: ocp.CheckpointManager, abstract_state: Mapping[str, Any], step: int | None = None
            ) -> dict[str, Any]:
    """Restores the items named in `abstract_state` (pytrees of arrays or jax.ShapeDtypeStruct) at `step`.

    step None means the latest. Items of the checkpoint not named are not read.
    Raises FileNotFoundError when there is no checkpoint.
    """
    mngr.wait_until_finished()
    if step is None:
        step = mngr.latest_step()
    if step is None:
        raise FileNotFoundError(f'{mngr.directory}: no finished checkpoint to restore')
    abstract = {name: jax.tree_util.tree_map(_restore_target, item) for name, item in abstract_state.items()}
    args = ocp.args.Composite(**{name: ocp.args.StandardRestore(item) for name, item in abstract.items()})
    restored = mngr.restore(step, args=args)
    return {name: restored[name] for name in abstract_state}


def restore_or_none(mngr: ocp.CheckpointManager, abstract_state: Mapping[str, Any]) -> dict[str, Any] | None:
    """The latest checkpoint's items named in `abstract_state`, or None when nothing has been saved yet."""
    mngr.wait_until_finished()
    if mngr.latest_step() is None:
        return None
    return restore(mngr, abstract_state)


def wait(mngr: ocp.CheckpointManager) -> None:
    """Blocks until pending asynchronous saves are written."""
    mngr.wait_until_finished()


def close(mngr: ocp.CheckpointManager) -> None:
    """Waits for pending saves and releases the manager."""
    mngr.wait_until_finished()
    mngr.close()
