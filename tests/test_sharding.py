"""teco_ssm.sharding and the sharded train step on 4 fake CPU devices: one device and four compute the same loss,
gradients and updated parameters, with replicated and with model-sharded parameters."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from teco_ssm import optim, sharding, teco, train
from test_train import BATCH, SEQ_LEN, synthetic_videos, toy_config


def test_mesh_and_batch_placement():
    assert jax.device_count() == 4
    mesh = sharding.make_mesh(2)
    assert mesh.axis_names == ("data", "model") and dict(mesh.shape) == {"data": 2, "model": 2}
    local = {"codes": np.arange(8 * 3).reshape(8, 3).astype(np.int32)}
    batch = sharding.global_batch(local, mesh)["codes"]
    np.testing.assert_array_equal(np.asarray(batch), local["codes"])
    rows = sorted((s.index[0].start, s.device.id) for s in batch.addressable_shards)
    assert [r[0] for r in rows] == [0, 2, 4, 6] and len({r[1] for r in rows}) == 4  # distinct rows per device
    assert sharding.local_batch_size(8, mesh) == 8
    with pytest.raises(ValueError, match=r"config.batch_size=6 must be divisible by the number of devices 4"):
        sharding.local_batch_size(6, mesh)
    with pytest.raises(ValueError, match=r"model_parallelism=3 must be >= 1 and divide the device count 4"):
        sharding.make_mesh(3)


def test_param_specs():
    big = sharding.MIN_SHARDED_SIZE
    assert sharding.param_spec((1024, 512), 2, shard=False) == P()
    assert sharding.param_spec((512, 1024), 2, shard=True) == P(None, "model")
    assert sharding.param_spec((1024, 512), 2, shard=True) == P("model")
    assert sharding.param_spec((3, 3, 64, big // 576 * 2), 2, shard=True) == P(None, None, None, "model")
    assert sharding.param_spec((big,), 2, shard=True) == P()            # vectors stay whole
    assert sharding.param_spec((16, 16), 2, shard=True) == P()          # small matrices too
    assert sharding.param_spec((1023, 1025), 2, shard=True) == P()      # nothing divisible
    assert sharding.param_spec((1024, 512), 1, shard=True) == P()       # no model axis


SLURM = dict(SLURM_JOB_ID="7", SLURM_STEP_NODELIST="node[01-02]", SLURM_NTASKS="2", SLURM_PROCID="1",
             SLURM_LOCALID="0")
OMPI = dict(OMPI_MCA_orte_hnp_uri="1234.0;tcp://10.0.0.1:5000", OMPI_COMM_WORLD_SIZE="2", OMPI_COMM_WORLD_RANK="0",
            OMPI_COMM_WORLD_LOCAL_RANK="0")
EXPLICIT = dict(JAX_COORDINATOR_ADDRESS="10.0.0.1:12355", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="1")


def test_launch_variables_become_the_arguments_of_jax_distributed():
    """The explicit variables are passed on; SLURM and Open MPI are left to JAX's detection; one process (no
    variables, an allocation of one task) initialises nothing."""
    assert sharding.distributed_arguments(EXPLICIT) == dict(coordinator_address="10.0.0.1:12355", num_processes=2,
                                                            process_id=1)
    assert sharding.distributed_arguments(SLURM) == {} and sharding.distributed_arguments(OMPI) == {}
    assert sharding.distributed_arguments({"TPU_WORKER_HOSTNAMES": "a,b"}) == {}
    for single in ({}, dict(SLURM, SLURM_NTASKS="1"), dict(SLURM_JOB_ID="7", SLURM_NTASKS="1"),
                   dict(OMPI, OMPI_COMM_WORLD_SIZE="1", OMPI_COMM_WORLD_RANK="0")):
        assert sharding.distributed_arguments(single) is None


@pytest.mark.parametrize("env, message", [
    (dict(EXPLICIT, JAX_PROCESS_ID="2"), r"JAX_PROCESS_ID=2 must lie in \[0, JAX_NUM_PROCESSES=2\)"),
    ({k: v for k, v in EXPLICIT.items() if k != "JAX_NUM_PROCESSES"},
     "JAX_NUM_PROCESSES not: a launch of several processes sets all of"),
    (dict(JAX_COORDINATOR_ADDRESS="10.0.0.1:12355"), "JAX_NUM_PROCESSES, JAX_PROCESS_ID not"),
    (dict(EXPLICIT, JAX_COORDINATOR_ADDRESS="10.0.0.1"), "JAX_COORDINATOR_ADDRESS='10.0.0.1' is not HOST:PORT"),
    (dict(EXPLICIT, JAX_NUM_PROCESSES="two"), "JAX_NUM_PROCESSES='two' is not a non-negative integer"),
    (dict(EXPLICIT, JAX_PROCESS_ID="-1"), "JAX_PROCESS_ID='-1' is not a non-negative integer"),
    (dict(SLURM, SLURM_PROCID="2"), r"SLURM_PROCID=2 must lie in \[0, SLURM_NTASKS=2\)"),
    ({k: v for k, v in SLURM.items() if k != "SLURM_PROCID"}, "SLURM_PROCID is not set; start each process with srun"),
    (dict(OMPI, OMPI_COMM_WORLD_RANK="3"), r"OMPI_COMM_WORLD_RANK=3 must lie in \[0, OMPI_COMM_WORLD_SIZE=2\)"),
])
def test_inconsistent_launch_variables_are_named(env, message):
    with pytest.raises(sharding.LaunchError, match=message):
        sharding.distributed_arguments(env)


def test_each_process_loads_one_contiguous_block_of_the_global_batch():
    mesh = sharding.make_mesh(1)
    assert sharding.process_rows(8, mesh) == range(0, 8)  # one process holds every row
    with pytest.raises(ValueError, match="divisible by the number of devices 4"):
        sharding.process_rows(6, mesh)


def _batch():
    videos = synthetic_videos(seed=5)[:BATCH]
    return {"codes": np.stack([c[:SEQ_LEN] for c, _ in videos]), "actions": np.stack([a[:SEQ_LEN] for _, a in videos])}


def _run(state, constants, mesh, model, settings, shard_params, steps=2):
    shardings = train.state_shardings(state, mesh, settings, shard_params)
    state = jax.device_put(state, shardings)
    constants = jax.device_put(constants, sharding.replicated(mesh))
    rng = jax.random.key(11)
    history = []
    for _ in range(steps):
        state, metrics = train.train_step(state, constants, sharding.global_batch(_batch(), mesh), rng, model=model,
                                          settings=settings, mesh=mesh, shard_params=shard_params)
        history.append({k: float(v) for k, v in metrics.items()})
    jax.tree_util.tree_map(lambda x, s: x.sharding.is_equivalent_to(s, x.ndim) or pytest.fail("layout changed"),
                           state, shardings)
    return history, jax.device_get(state)


def test_one_and_four_devices_compute_the_same_step(monkeypatch):
    """Two steps from one state on one device, on four (batch split, parameters replicated) and on a 2x2 mesh with
    the matrices split over 'model': the same loss terms and gradient norms, and the same parameters."""
    config = toy_config("convs5", None, None)
    model = teco.build(config)
    settings = optim.OptimizerSettings.of_experiment(config)
    one = sharding.make_mesh(1, jax.devices()[:1])
    state, constants = train.init_state(train.init_key(0), None, model=model, settings=settings,
                                        mesh=sharding.make_mesh(1))  # the compiled init of tests/test_train.py
    state, constants = jax.device_get((state, constants))

    reference, ref_state = _run(state, constants, one, model, settings, False)
    four, four_state = _run(state, constants, sharding.make_mesh(1), model, settings, False)
    monkeypatch.setattr(sharding, "MIN_SHARDED_SIZE", 64)  # shard the toy's matrices over 'model'
    mesh = sharding.make_mesh(2)
    specs = jax.tree_util.tree_leaves(train.state_shardings(state, mesh, settings, True)["params"])
    assert sum("model" in s.spec for s in specs) >= 10
    split, split_state = _run(state, constants, mesh, model, settings, True)

    for other in (four, split):
        for ref, got in zip(reference, other):
            assert ref.keys() == got.keys()
            for k in ref:
                np.testing.assert_allclose(got[k], ref[k], rtol=2e-5, atol=1e-6, err_msg=k)
    for other in (four_state, split_state):
        assert int(other["step"]) == 2
        for path, a in jax.tree_util.tree_leaves_with_path(ref_state["params"]):
            b = dict(jax.tree_util.tree_leaves_with_path(other["params"]))[path]
            # Adam divides by the gradient's magnitude, so a bias followed by a norm (true gradient 0) moves by
            # rounding noise blown up to the rate's size: up to 2 x the summed rates (6e-4) apart. Matrices and
            # convolution kernels have real gradients and must agree closely.
            atol = 1e-5 if a.ndim >= 2 else 2 * 6e-4
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=atol, err_msg=jax.tree_util.keystr(path))
    # The update moved the parameters (the comparison is not between two initial states).
    moved = [np.abs(a - b).max() for a, b in zip(jax.tree_util.tree_leaves(ref_state["params"]),
                                                   jax.tree_util.tree_leaves(state["params"]))]
    assert max(moved) > 1e-4
