"""The project's checkpoint layer: orbax CheckpointManager over named pytree items, plus `config.json`.

A checkpoint is a dict of named items (e.g. {'model': variables, 'train': optimiser state and step}); each item is
saved with `StandardSave` so one item can be restored without the others (a tokenizer needs only 'model').
Saves are asynchronous; orbax writes each step into a temporary folder, writes its commit marker
(`commit_success.txt`) and renames it when complete, so an interrupted write is never listed or restored. A step folder
without the marker (an interrupted copy or sync of a workdir) is not complete either: `complete_steps` and
`latest_step` skip it, and a writing manager moves it aside to `<workdir>/incomplete_checkpoints/` so the step is
written again.

  mngr = manager(workdir, config=config, keep=3, save_every=1000)
  state = restore_or_none(mngr, {'model': abstract_vars, 'train': abstract_train}) or fresh
  save(mngr, step, {'model': vars, 'train': train})      # skipped unless step % save_every == 0 (force=True saves)
  close(mngr)
  variables = load_variables(config, workdir, step=None)   # a training workdir's TECO model, latest step
  check_resume(workdir, config, ('model', ...))            # before writing: the fields a resumed run keeps

A checkpoint whose item has other leaves or shapes than the target (one written by another model structure) is
refused before anything is read: CheckpointMismatchError names the missing, unexpected and reshaped leaf paths.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import sys
import time
from typing import Any, Mapping, Sequence

import jax
import orbax.checkpoint as ocp
from etils import epath

CONFIG_FILE = 'config.json'
CHECKPOINT_DIR = 'checkpoints'
INCOMPLETE_DIR = 'incomplete_checkpoints'
# What orbax logs (as warnings, through absl) for every manager that only reads: `manager(read_only=True)` is how
# this project reads a checkpoint, so they say nothing to a user, except the word "read only" about their folder.
_READ_ONLY_NOTICES = ('Given directory is read only', 'CheckpointManagerOptions.read_only=True')


class _QuietReadOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(notice in record.getMessage() for notice in _READ_ONLY_NOTICES)


logging.getLogger('absl').addFilter(_QuietReadOnly())


def _full_disk(error: BaseException | None) -> bool:
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if (isinstance(error, OSError) and error.errno == errno.ENOSPC) or 'No space left on device' in str(error):
            return True  # tensorstore reports it as a ValueError with the system's message
        error = error.__cause__ or error.__context__
    return False


class _OneLineFullDisk(logging.Filter):
    """orbax's background save threads log a traceback each (half a dozen per save) when the disk is full, and the
    save's caller raises the same error, which the command reports as its last line: those records keep their one
    line (TECO_SSM_TRACEBACK=1 keeps the tracebacks)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and _full_disk(record.exc_info[1]) and os.environ.get('TECO_SSM_TRACEBACK') != '1':
            record.exc_info, record.exc_text = None, None
        return True


logging.getLogger('absl').addFilter(_OneLineFullDisk())


def _quiet_closed_loops(hook):
    """`sys.unraisablehook` without orbax's 'Event loop is closed' reports: a background save thread that fails (a
    full disk) cancels its task on an event loop already closed, which Python can only print as unraisable."""
    def unraisable(args):
        error = args.exc_value
        if (isinstance(error, RuntimeError) and str(error) == 'Event loop is closed'
                and os.environ.get('TECO_SSM_TRACEBACK') != '1'):
            return
        hook(args)
    return unraisable


sys.unraisablehook = _quiet_closed_loops(sys.unraisablehook)


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


GLOB_CHARACTERS = '[]'


def check_path(path: str | os.PathLike, what: str = 'workdir') -> None:
    """Refuses a checkpoint folder whose absolute path holds '[' or ']'.

    orbax (0.11) finds the files tensorstore's OCDBT driver writes for each process with a glob over the
    checkpoint's path, so in a folder named like `runs/exp[1]` a save reports success and leaves an item no restore
    can read (tensorstore: NOT_FOUND ... array metadata). Every stage that writes or reads checkpoints calls this
    before any work. Raises ValueError naming `what`, the path and the characters.
    """
    path = os.path.abspath(os.fspath(path))
    found = sorted({c for c in path if c in GLOB_CHARACTERS})
    if found:
        raise ValueError(f'{what} {path}: contains {" and ".join(repr(c) for c in found)}, which the checkpoint '
                         'library (orbax over tensorstore) reads as a glob pattern, so its checkpoints could not be '
                         'read back; choose a path without square brackets')


def has_checkpoints(workdir: str) -> bool:
    """True when `workdir` holds a config.json and a checkpoints folder of this layout."""
    return (os.path.isfile(os.path.join(workdir, CONFIG_FILE))
            and os.path.isdir(os.path.join(workdir, CHECKPOINT_DIR)))


def _lookup(tree: Any, dotted: str) -> Any:
    for key in dotted.split('.'):
        if not isinstance(tree, Mapping) or key not in tree:
            return '<absent>'
        tree = tree[key]
    return tree


def _first_difference(saved: Any, wanted: Any, prefix: str,
                      ignore: Sequence[str] = ()) -> tuple[str, Any, Any] | None:
    """(dotted field, saved value, wanted value) of the first leaf where two plain trees differ, or None; dotted
    fields in `ignore` are not compared."""
    if prefix in ignore:
        return None
    if isinstance(saved, Mapping) and isinstance(wanted, Mapping):
        for key in sorted(set(saved) | set(wanted)):
            found = _first_difference(saved.get(key, '<absent>'), wanted.get(key, '<absent>'), f'{prefix}.{key}',
                                      ignore)
            if found:
                return found
        return None
    return None if saved == wanted else (prefix, saved, wanted)


def check_resume(workdir: str, config: Any, fields: Sequence[str], ignore: Sequence[str] = ()) -> None:
    """Refuses, before anything is written, to resume a workdir whose config.json differs from `config` in one of
    `fields` (dotted names: the settings its checkpoints were trained with, e.g. 'model', 'convt3', 'seq_len'),
    leaving out the dotted fields in `ignore` (how a computation runs, not what it computes).

    Does nothing for a workdir without a complete checkpoint. Raises ValueError naming config.json, the first
    differing field and both values.
    """
    folder = os.path.join(workdir, CHECKPOINT_DIR)
    if not has_checkpoints(workdir) or not any(
            name.isdigit() and _committed(os.path.join(folder, name)) for name in os.listdir(folder)):
        return  # nothing trained with the stored settings (a config refused after config.json was written)
    saved, wanted = read_config(workdir), config_to_dict(config)
    for field in fields:
        found = _first_difference(_lookup(saved, field), _lookup(wanted, field), field, ignore)
        if found:
            name, there, asked = found
            raise ValueError(f'{os.path.join(workdir, CONFIG_FILE)}: field {name} is {there!r} there, {asked!r} in '
                             'this request; the checkpoints were trained with the stored value and nothing was '
                             'changed; use the stored value or a new workdir')


def _committed(step_dir: str) -> bool:
    """Whether a step folder holds orbax's commit marker (`commit_success.txt`, written last by every save)."""
    return ocp.path.step.is_path_finalized(step_dir, temporary_path_cls=ocp.path.atomicity.CommitFileTemporaryPath)


def _step_dir(mngr: ocp.CheckpointManager, step: int) -> str:
    return os.path.join(os.fspath(mngr.directory), str(step))


def _move_incomplete(workdir: str) -> None:
    """Moves step folders without the commit marker out of `<workdir>/checkpoints` (to `incomplete_checkpoints/`),
    so that the step is written again rather than refused as existing; nothing is deleted."""
    folder = os.path.join(workdir, CHECKPOINT_DIR)
    if not os.path.isdir(folder):
        return
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if name.isdigit() and os.path.isdir(path) and not _committed(path):
            aside = os.path.join(workdir, INCOMPLETE_DIR, f'{name}.{time.strftime("%Y%m%d-%H%M%S")}')
            os.makedirs(os.path.dirname(aside), exist_ok=True)
            os.replace(path, aside)
            logging.warning('%s: no commit marker (an interrupted write or copy); moved to %s', path, aside)


def manager(workdir: str, config: Any = None, *, keep: int = 3, save_every: int = 1,
            async_save: bool = True, read_only: bool = False) -> ocp.CheckpointManager:
    """A CheckpointManager over `<workdir>/checkpoints`, writing `<workdir>/config.json` when `config` is given
    (call `check_resume` first).

    keep: how many most recent checkpoints to keep; save_every: steps between saves (`save` with force=True
    always saves); async_save: write in a background thread (call `wait` or `close` before reading). A writing
    manager first moves incomplete step folders aside (`_move_incomplete`).
    """
    workdir = os.path.abspath(workdir)
    check_path(workdir)
    if not read_only and jax.process_index() == 0:
        _move_incomplete(workdir)
    if config is not None and not read_only:
        write_config(workdir, config)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=save_every, enable_async_checkpointing=async_save,
        create=not read_only, read_only=read_only)
    return ocp.CheckpointManager(os.path.join(workdir, CHECKPOINT_DIR), options=options)


def complete_steps(mngr: ocp.CheckpointManager) -> list[int]:
    """The steps whose folders hold orbax's commit marker, ascending."""
    return [s for s in mngr.all_steps() if _committed(_step_dir(mngr, s))]


def latest_step(mngr: ocp.CheckpointManager) -> int | None:
    """The newest complete step (`complete_steps`), or None."""
    steps = complete_steps(mngr)
    return steps[-1] if steps else None


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


class CheckpointMismatchError(ValueError):
    """A saved item's tree differs from the one asked for: leaves missing from the checkpoint, leaves the target
    does not have, or leaves of another shape (a checkpoint written by another model or an older version)."""


def _key_name(key: Any) -> str:
    for attr in ('key', 'name', 'idx'):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _leaf_shapes(tree: Any, prefix: str) -> dict[str, tuple[int, ...]]:
    """'prefix/a/b/c' (the leaf's key path joined by '/') -> the leaf's shape, for every leaf of `tree`."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {'/'.join([prefix, *map(_key_name, path)]): tuple(getattr(leaf, 'shape', ()))
            for path, leaf in leaves}


def _some(items: list[str], limit: int = 5) -> str:
    shown = ', '.join(items[:limit])
    return shown if len(items) <= limit else f'{shown} and {len(items) - limit} more'


def check_item(step_dir: str, name: str, abstract_item: Any) -> None:
    """Raises CheckpointMismatchError when item `name` saved in `step_dir` has other leaves or shapes than
    `abstract_item` (a pytree of arrays or jax.ShapeDtypeStruct), naming a few of each kind and their count.

    Leaves are compared by their '/'-joined key paths ('model/params/decoder/Conv_0/kernel'). Does nothing when the
    item's metadata cannot be read (orbax then reports the problem itself).
    """
    try:
        saved_tree = ocp.StandardCheckpointHandler().metadata(epath.Path(step_dir) / name)
    except Exception:  # no readable metadata (e.g. no such item): orbax's restore reports it
        return
    saved, wanted = _leaf_shapes(saved_tree, name), _leaf_shapes(abstract_item, name)
    missing = sorted(set(wanted) - set(saved))
    unexpected = sorted(set(saved) - set(wanted))
    reshaped = sorted(f'{path} (saved {saved[path]}, expected {wanted[path]})'
                      for path in set(saved) & set(wanted) if saved[path] != wanted[path])
    if not (missing or unexpected or reshaped):
        return
    problems = []
    if missing:
        problems.append(f'{len(missing)} missing from the checkpoint: {_some(missing)}')
    if unexpected:
        problems.append(f'{len(unexpected)} in the checkpoint but not expected: {_some(unexpected)}')
    if reshaped:
        problems.append(f'{len(reshaped)} of another shape: {_some(reshaped)}')
    raise CheckpointMismatchError(
        f'{step_dir}: item {name!r} does not match the tree it is restored into (it was written for a model of '
        f'another structure: another config or an earlier version of this code); nothing was restored. '
        + '; '.join(problems))


def restore(mngr: ocp.CheckpointManager, abstract_state: Mapping[str, Any], step: int | None = None
            ) -> dict[str, Any]:
    """Restores the items named in `abstract_state` (pytrees of arrays or jax.ShapeDtypeStruct) at `step`.

    step None means the latest complete one. Items of the checkpoint not named are not read; a named item is restored whole or
    not at all.
    Raises FileNotFoundError when there is no complete checkpoint (of `step`), CheckpointMismatchError (a ValueError) when a saved item's
    leaves or shapes differ from `abstract_state`'s (`check_item`).
    """
    mngr.wait_until_finished()
    if step is None:
        step = latest_step(mngr)
    if step is None:
        raise FileNotFoundError(f'{mngr.directory}: no complete checkpoint to restore')
    step_dir = _step_dir(mngr, step)
    if step not in complete_steps(mngr):
        raise FileNotFoundError(f'{step_dir}: no complete checkpoint of step {step} (missing, or without the commit '
                                f'marker of a finished write); complete steps: {complete_steps(mngr)}')
    for name, item in abstract_state.items():
        check_item(step_dir, name, item)
    abstract = {name: jax.tree_util.tree_map(_restore_target, item) for name, item in abstract_state.items()}
    args = ocp.args.Composite(**{name: ocp.args.StandardRestore(item) for name, item in abstract.items()})
    restored = mngr.restore(step, args=args)
    return {name: restored[name] for name in abstract_state}


def restore_or_none(mngr: ocp.CheckpointManager, abstract_state: Mapping[str, Any]) -> dict[str, Any] | None:
    """The latest checkpoint's items named in `abstract_state`, or None when nothing has been saved yet."""
    mngr.wait_until_finished()
    if latest_step(mngr) is None:
        return None
    return restore(mngr, abstract_state)


def resolve_step(workdir: str | os.PathLike, step: int | None = None) -> int:
    """`step`, or the latest complete step of a training workdir when None; FileNotFoundError naming the folder
    when it holds no complete checkpoint (of that step)."""
    if not has_checkpoints(os.fspath(workdir)):
        raise FileNotFoundError(f"{workdir}: not a training workdir (expected config.json and checkpoints/)")
    mngr = manager(os.fspath(workdir), read_only=True)
    try:
        steps = complete_steps(mngr)
    finally:
        mngr.close()
    chosen = steps[-1] if step is None and steps else step
    if chosen is None or chosen not in steps:
        raise FileNotFoundError(f"{os.path.join(os.fspath(workdir), CHECKPOINT_DIR)}: no complete checkpoint"
                                f"{'' if step is None else f' of step {step}'}; complete steps: {steps} (an "
                                "interrupted `teco-ssm train` leaves none: run it again to finish)")
    return int(chosen)


def load_variables(config: Any, workdir: str | os.PathLike, step: int | None = None) -> dict[str, Any]:
    """The TECO model variables saved by training in `workdir` (item 'model', as `teco.init_variables` makes them
    for `teco.build(config)`), at `step` (None: the latest). Raises FileNotFoundError naming the folder when it
    holds no checkpoint, CheckpointMismatchError when the saved model has another structure than the config's."""
    from teco_ssm import teco  # here, not above: the tokenizer restores its checkpoints without the TECO model

    model = teco.build(config)
    abstract = jax.eval_shape(lambda key: teco.init_variables(model, key), jax.random.key(0))
    if not has_checkpoints(os.fspath(workdir)):
        raise FileNotFoundError(f"{workdir}: not a training workdir (expected config.json and checkpoints/)")
    mngr = manager(os.fspath(workdir), read_only=True)
    try:
        return dict(restore(mngr, {"model": abstract}, step)["model"])
    finally:
        mngr.close()


def wait(mngr: ocp.CheckpointManager) -> None:
    """Blocks until pending asynchronous saves are written."""
    mngr.wait_until_finished()


def close(mngr: ocp.CheckpointManager) -> None:
    """Waits for pending saves and releases the manager."""
    mngr.wait_until_finished()
    mngr.close()
