"""Devices for training: one mesh ('data', 'model') over every device of every host, and the shardings on it.

    maybe_initialize_distributed()                 # jax.distributed.initialize() on a multi-host launch
    mesh = make_mesh(model_parallelism=1)          # (num_devices // 1, 1) devices, axes ('data', 'model')
    batch = global_batch(local_numpy_batch, mesh)  # rows split over every device of every host
    shardings = param_shardings(abstract_params, mesh, shard_params=False)   # replicated by default

The batch's leading axis is split over both mesh axes, so every device holds distinct rows; with
`shard_params` the large weight matrices are additionally split over 'model' along their largest divisible
dimension (XLA inserts the gathers), otherwise parameters and optimiser state are replicated. Model shapes never
depend on the device count: only the placement does.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

_FILE = "teco_ssm/sharding.py"
AXES = ("data", "model")
BATCH_AXES = ("data", "model")
# Parameters with fewer values than this stay replicated even with shard_params (gathers would cost more).
MIN_SHARDED_SIZE = 2 ** 18


def _multi_host_launch() -> bool:
    """True when the environment describes a launch of several processes (explicit JAX variables, SLURM,
    Open MPI, or a multi-host TPU slice)."""
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return True
    for name in ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        if env.get(name, "1").isdigit() and int(env.get(name, "1")) > 1:
            return True
    return "," in env.get("TPU_WORKER_HOSTNAMES", "") or bool(env.get("MEGASCALE_COORDINATOR_ADDRESS"))


def maybe_initialize_distributed() -> bool:
    """Calls `jax.distributed.initialize()` (which reads the cluster's variables) when launched on several hosts
    and not yet initialised; call it before anything touches the devices. Returns whether it initialised."""
    if not _multi_host_launch() or jax.distributed.is_initialized():
        return False
    jax.distributed.initialize()
    logging.info("jax.distributed: process %d of %d, %d local of %d devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


def make_mesh(model_parallelism: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (len(devices) // model_parallelism, model_parallelism) mesh with axes ('data', 'model').

    devices: default every device of every process (`jax.devices()`).
    """
    devices = list(jax.devices() if devices is None else devices)
    if model_parallelism < 1 or len(devices) % model_parallelism:
        raise ValueError(f"{_FILE}: model_parallelism={model_parallelism} must be >= 1 and divide the device count "
                         f"{len(devices)}")
    grid = np.asarray(devices, dtype=object).reshape(len(devices) // model_parallelism, model_parallelism)
    return Mesh(grid, AXES)


def replicated(mesh: Mesh) -> NamedSharding:
    """The same value on every device."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over every device of the mesh; other axes whole."""
    return NamedSharding(mesh, P(BATCH_AXES))


def local_batch_size(global_batch_size: int, mesh: Mesh) -> int:
    """Rows this process loads: global_batch_size / process count; ValueError unless every device gets the same
    whole number of rows."""
    if global_batch_size % mesh.size:
        raise ValueError(f"{_FILE}: config.batch_size={global_batch_size} must be divisible by the number of devices "
                         f"{mesh.size} (the batch is split over every device)")
    return global_batch_size // jax.process_count()


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Per-process numpy arrays (B_local, ...) -> global jax arrays (B_local * process_count, ...) sharded by
    `batch_sharding(mesh)`; each process contributes its own rows."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


def local_rows(mesh: Mesh, array: jax.Array) -> np.ndarray:
    """The rows of a global batch array (B, ...) that belong to this process, in order: (B_local, ...) numpy, the
    inverse of `global_batch` (rows held by several devices, e.g. a replicated array, are taken once)."""
    if array.is_fully_addressable:
        return np.asarray(array)
    array = jax.device_put(array, batch_sharding(mesh))
    shards = sorted(array.addressable_shards, key=lambda s: s.index[0].start or 0)
    starts = [s.index[0].start or 0 for s in shards]
    unique = [s for i, s in enumerate(shards) if i == 0 or starts[i] != starts[i - 1]]
    return np.concatenate([np.asarray(s.data) for s in unique])


def param_spec(shape: Sequence[int], model_size: int, shard: bool) -> P:
    """The PartitionSpec of one parameter: P() (replicated) unless `shard`, it has >= 2 dimensions and at least
    MIN_SHARDED_SIZE values; then 'model' on its largest dimension divisible by `model_size`."""
    if not shard or model_size == 1 or len(shape) < 2 or int(np.prod(shape)) < MIN_SHARDED_SIZE:
        return P()
    candidates = [(size, axis) for axis, size in enumerate(shape) if size % model_size == 0]
    if not candidates:
        return P()
    _, axis = max(candidates)
    return P(*([None] * axis + ["model"]))


def param_shardings(abstract_params: Any, mesh: Mesh, shard_params: bool = False) -> Any:
    """NamedShardings for a pytree of arrays / ShapeDtypeStructs (see `param_spec`)."""
    model_size = mesh.shape["model"]
    return jax.tree_util.tree_map(
        lambda leaf: NamedSharding(mesh, param_spec(leaf.shape, model_size, shard_params)), abstract_params)


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `abstract` carrying `shardings` (e.g. for sharded restores)."""
    return jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                                  shardings)
