"""Devices for training: one mesh ('data', 'model') over every device of every host, and the shardings on it.

    maybe_initialize_distributed()                 # jax.distributed.initialize(...) when launched as several processes
    mesh = make_mesh(model_parallelism=1)          # (num_devices // 1, 1) devices, axes ('data', 'model')
    rows = process_rows(global_batch_size, mesh)   # the rows of the global batch this process loads
    batch = global_batch(local_numpy_batch, mesh)  # rows split over every device of every host
    shardings = param_shardings(abstract_params, mesh, shard_params=False)   # replicated by default

The batch's leading axis is split over both mesh axes, so every device holds distinct rows; with
`shard_params` the large weight matrices are additionally split over 'model' along their largest divisible
dimension (XLA inserts the gathers), otherwise parameters and optimiser state are replicated. Model shapes never
depend on the device count: only the placement does.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import time
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

_FILE = "teco_ssm/sharding.py"
AXES = ("data", "model")
BATCH_AXES = ("data", "model")
# Parameters with fewer values than this stay replicated even with shard_params (gathers would cost more).
MIN_SHARDED_SIZE = 2 ** 18


LAUNCH_VARIABLES = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
# The variables JAX's own cluster detection reads (jax/_src/clusters/{slurm,ompi}_cluster.py).
SLURM_VARIABLES = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
OMPI_VARIABLES = ("OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK",
                  "OMPI_COMM_WORLD_LOCAL_RANK")


class LaunchError(ValueError):
    """The environment describes a launch of several processes inconsistently (a variable missing, not a number,
    or a process id outside [0, count))."""


def _count_and_id(env: Mapping[str, str], count_name: str, id_name: str) -> tuple[int, int]:
    values = []
    for name in (count_name, id_name):
        text = env[name].strip()
        if not text.isdigit():
            raise LaunchError(f"{_FILE}: {name}={env[name]!r} is not a non-negative integer")
        values.append(int(text))
    count, index = values
    if count < 1 or index >= count:
        raise LaunchError(f"{_FILE}: {id_name}={index} must lie in [0, {count_name}={count}); number the processes "
                          f"0 .. {max(count, 1) - 1}")
    return count, index


def _cluster(env: Mapping[str, str], names: Sequence[str], count_name: str, id_name: str,
             launcher: str) -> dict[str, Any] | None:
    """{} (JAX detects the rest) when `env` holds a launch of several processes by `launcher`, else None."""
    if count_name not in env or not env[count_name].strip().isdigit() or int(env[count_name]) <= 1:
        return None  # an allocation of one task: one process
    missing = [name for name in names if name not in env]
    if missing:
        raise LaunchError(f"{_FILE}: {count_name}={env[count_name]} asks for several processes but "
                          f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set; start each process "
                          f"with {launcher}")
    _count_and_id(env, count_name, id_name)
    return {}


CLUSTERS = ((SLURM_VARIABLES, "SLURM_NTASKS", "SLURM_PROCID", "srun"),
            (OMPI_VARIABLES, "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "mpirun"))


def distributed_arguments(env: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """The keyword arguments of `jax.distributed.initialize` for the launch `env` (default `os.environ`) describes,
    or None for a single process.

    - Explicit: JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID, all three
      or none -> {'coordinator_address', 'num_processes', 'process_id'}.
    - SLURM (`srun`, SLURM_NTASKS > 1), Open MPI (`mpirun`, OMPI_COMM_WORLD_SIZE > 1), a multi-host TPU slice -> {}:
      JAX detects the address, count and id itself.
    Raises LaunchError naming the variable when one is missing, not a number, or the id is outside [0, count).
    """
    env = os.environ if env is None else env
    given = [name for name in LAUNCH_VARIABLES if env.get(name)]
    if given:
        missing = [name for name in LAUNCH_VARIABLES if not env.get(name)]
        if missing:
            raise LaunchError(f"{_FILE}: {', '.join(given)} set but {', '.join(missing)} not: a launch of several "
                              f"processes sets all of {', '.join(LAUNCH_VARIABLES)} on every process")
        address = env["JAX_COORDINATOR_ADDRESS"]
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise LaunchError(f"{_FILE}: JAX_COORDINATOR_ADDRESS={address!r} is not HOST:PORT with a port in "
                              f"1 .. 65535 (process 0's host and a free port, e.g. 10.0.0.1:12355)")
        count, index = _count_and_id(env, "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
        return dict(coordinator_address=address, num_processes=count, process_id=index)
    for cluster in CLUSTERS:
        arguments = _cluster(env, *cluster)
        if arguments is not None:
            return arguments
    if "," in env.get("TPU_WORKER_HOSTNAMES", "") or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return {}
    return None


TIMEOUT_VARIABLE = "TECO_SSM_LAUNCH_TIMEOUT"
DEFAULT_LAUNCH_TIMEOUT = 300.0  # seconds, JAX's own initialization_timeout


def launch_timeout(env: Mapping[str, str] | None = None) -> float:
    """Seconds the processes of a launch wait for each other: TECO_SSM_LAUNCH_TIMEOUT (default 300); LaunchError
    naming the variable when it is not a positive number."""
    env = os.environ if env is None else env
    text = env.get(TIMEOUT_VARIABLE, "").strip()
    if not text:
        return DEFAULT_LAUNCH_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise LaunchError(f"{TIMEOUT_VARIABLE}={text!r} must be a positive number of seconds")
    return value


def _say(line: str) -> None:
    print(f"teco-ssm: {line}", file=sys.stderr, flush=True)


def _reply(connection: socket.socket, text: str) -> None:
    with contextlib.suppress(OSError):
        connection.sendall(text.encode() + b"\n")
        connection.close()


def _read_line(connection: socket.socket, deadline: float) -> str | None:
    """One line from `connection` before `deadline` (time.monotonic), or None (closed, timed out)."""
    data = b""
    while not data.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        connection.settimeout(remaining)
        try:
            chunk = connection.recv(256)
        except OSError:
            return None
        if not chunk:
            return None
        data += chunk
    return data.decode(errors="replace").strip()


def rendezvous(address: str, count: int, index: int, timeout: float) -> None:
    """Checks, before JAX's coordination service starts, that the `count` processes of a launch can meet: process
    0 listens on the coordinator's port (all interfaces, as the service will), the others connect and send their
    id, and process 0 answers each once every id has joined exactly once. The port is then free for the service.

    Raises LaunchError naming the cause and the variable to fix: the port in use on process 0's host, a process id
    claimed twice, processes that did not join within `timeout` seconds (process 0), process 0 not reachable
    within it, or process 0 reporting one of these (the others).
    """
    host, _, port_text = address.rpartition(":")
    port = int(port_text)
    deadline = time.monotonic() + timeout
    _say(f"process {index} of {count}: waiting up to {timeout:g} s for "
         f"{'the other processes to join' if index == 0 else f'process 0 at {address}'} "
         f"(JAX_COORDINATOR_ADDRESS; {TIMEOUT_VARIABLE} sets the wait)")
    if index == 0:
        try:
            server = socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True) \
                if socket.has_dualstack_ipv6() else socket.create_server(("", port))
        except OSError as error:
            raise LaunchError(f"JAX_COORDINATOR_ADDRESS={address}: port {port} cannot be opened on this host, "
                              f"process 0's ({error.strerror or error}; another program, or another process 0 of "
                              "this launch, holds it): set JAX_COORDINATOR_ADDRESS to a free port on every process"
                              ) from None
        joined: dict[int, socket.socket] = {}
        problem = None
        with server:
            while len(joined) < count - 1 and problem is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    missing = [i for i in range(1, count) if i not in joined]
                    problem = (f"process{'es' if len(missing) > 1 else ''} {', '.join(map(str, missing))} of "
                               f"JAX_NUM_PROCESSES={count} did not join within {timeout:g} s: start every process, "
                               f"each with its own JAX_PROCESS_ID, or raise {TIMEOUT_VARIABLE}")
                    break
                server.settimeout(remaining)
                try:
                    connection, _ = server.accept()
                except socket.timeout:
                    continue
                line = _read_line(connection, min(deadline, time.monotonic() + 10))
                claimed = int(line) if line and line.isdigit() else None
                if claimed is None or not 0 < claimed < count:
                    _reply(connection, f"refused: JAX_PROCESS_ID={line!r} is not one of 1 .. {count - 1}")
                elif claimed in joined:
                    problem = (f"JAX_PROCESS_ID={claimed} is set on two processes: give each process its own id "
                               f"0 .. {count - 1}")
                    _reply(connection, problem)
                else:
                    joined[claimed] = connection
        for connection in joined.values():
            _reply(connection, "ok" if problem is None else problem)
        if problem is not None:
            raise LaunchError(problem)
        return
    while True:
        try:
            connection = socket.create_connection((host, port), timeout=max(deadline - time.monotonic(), 0.1))
            break
        except OSError:
            if time.monotonic() >= deadline:
                raise LaunchError(f"process 0 at JAX_COORDINATOR_ADDRESS={address} could not be reached within "
                                  f"{timeout:g} s: start it (JAX_PROCESS_ID=0) on that host with the same address, "
                                  f"or raise {TIMEOUT_VARIABLE}") from None
            time.sleep(0.2)
    with connection:
        connection.sendall(f"{index}\n".encode())
        answer = _read_line(connection, deadline + 5)
    if answer != "ok":
        raise LaunchError(f"process 0 at {address} reports: {answer}" if answer else
                          f"process 0 at JAX_COORDINATOR_ADDRESS={address} did not take this process in "
                          f"(JAX_PROCESS_ID={index}): its launch may already hold all JAX_NUM_PROCESSES={count} "
                          f"processes (is JAX_PROCESS_ID={index} set on two?), it stopped, or another program holds "
                          "that port; check process 0's output")


def maybe_initialize_distributed() -> bool:
    """Calls `jax.distributed.initialize` with `distributed_arguments()` when launched as several processes and not
    yet initialised; call it before anything touches the devices. An explicit launch (JAX_COORDINATOR_ADDRESS)
    first meets its processes (`rendezvous`), each saying once what it waits for, for at most
    TECO_SSM_LAUNCH_TIMEOUT seconds (`launch_timeout`), which also bounds JAX's own wait. CPU collectives across
    processes use gloo (unless JAX_CPU_COLLECTIVES_IMPLEMENTATION chooses otherwise). Returns whether it
    initialised; raises LaunchError (before any work) for inconsistent launch variables or processes that cannot
    meet, naming the cause and the variable to fix."""
    arguments = distributed_arguments()
    if arguments is None or jax.distributed.is_initialized():
        return False
    timeout = launch_timeout()
    if arguments:
        rendezvous(arguments["coordinator_address"], arguments["num_processes"], arguments["process_id"], timeout)
    if not os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**arguments, initialization_timeout=int(max(timeout, 1)))
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


def process_rows(global_batch_size: int, mesh: Mesh) -> range:
    """The rows of a global batch of `global_batch_size` that `batch_sharding(mesh)` places on this process's
    devices: one contiguous range of global_batch_size / process_count rows (process p: rows [p B, (p + 1) B) when
    the mesh lists the devices process by process, as `jax.devices()` does). The data pipeline loads exactly these
    rows (`open_dataset(process_index=rows.start // len(rows))`), so the global batch is the same examples in the
    same order whatever the number of processes and devices. ValueError when the rows are not contiguous."""
    size = local_batch_size(global_batch_size, mesh)
    held = set()
    for index in batch_sharding(mesh).addressable_devices_indices_map((global_batch_size,)).values():
        held.update(range(*index[0].indices(global_batch_size)))
    rows = range(min(held), min(held) + size)
    if sorted(held) != list(rows):
        raise ValueError(f"{_FILE}: this process's devices hold rows {sorted(held)} of the global batch, not one "
                         f"contiguous range of {size}: list each process's devices together in the mesh")
    return rows


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
