"""The orbax checkpoint layer: round trip, keep/save_every, partial restore, config.json, interrupted writes."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np

from teco_ssm import checkpoint as ckpt


def state(v):
    return {'model': {'w': jnp.full((3, 4), v, jnp.float32)},
            'train': {'step': jnp.int32(v), 'mu': np.full(5, v, np.float32)}}


def test_round_trip_keep_and_partial_restore(tmp_path):
    workdir = str(tmp_path / 'run')
    mngr = ckpt.manager(workdir, {'model': {'ch': 4, 'mult': (1, 2)}}, keep=2, save_every=2)
    assert ckpt.restore_or_none(mngr, state(0)) is None
    saved = [ckpt.save(mngr, s, state(s)) for s in range(5)]
    ckpt.close(mngr)
    assert saved == [True, False, True, False, True]
    assert json.load(open(os.path.join(workdir, 'config.json'))) == {'model': {'ch': 4, 'mult': [1, 2]}}
    mngr = ckpt.manager(workdir)
    assert mngr.all_steps() == [2, 4]
    back = ckpt.restore_or_none(mngr, state(0))
    np.testing.assert_array_equal(back['model']['w'], np.full((3, 4), 4))
    assert int(back['train']['step']) == 4
    only = ckpt.restore(mngr, {'model': {'w': jax.ShapeDtypeStruct((3, 4), jnp.float32)}}, step=2)
    assert list(only) == ['model'] and float(only['model']['w'][0, 0]) == 2
    ckpt.close(mngr)


def test_interrupted_write_is_never_restored(tmp_path):
    workdir = str(tmp_path / 'run')
    mngr = ckpt.manager(workdir, keep=5)
    ckpt.save(mngr, 1, state(1))
    ckpt.close(mngr)
    # what an interrupted save leaves behind: orbax's temporary folder for a newer step, half written
    folder = os.path.join(workdir, 'checkpoints')
    shutil.copytree(os.path.join(folder, '1'), os.path.join(folder, '7.orbax-checkpoint-tmp-1234'))
    mngr = ckpt.manager(workdir)
    assert ckpt.latest_step(mngr) == 1
    assert int(ckpt.restore_or_none(mngr, state(0))['train']['step']) == 1
    ckpt.close(mngr)


def test_abstract_leaves_without_sharding_restore_on_this_machine(tmp_path):
    """A checkpoint records the saving machine's devices; a target without shardings must not depend on them
    (otherwise one written on a CPU cannot be read on a GPU): such leaves land on the first local device."""
    devices = jax.devices()
    assert len(devices) >= 2  # conftest: several host devices
    mesh = jax.sharding.Mesh(np.array(devices), ('data',))
    spread = jax.device_put(jnp.arange(8.0 * len(devices)),
                            jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
    mngr = ckpt.manager(str(tmp_path / 'run'))
    ckpt.save(mngr, 1, {'model': {'w': spread}}, force=True)
    ckpt.close(mngr)
    mngr = ckpt.manager(str(tmp_path / 'run'))
    back = ckpt.restore(mngr, {'model': {'w': jax.ShapeDtypeStruct(spread.shape, spread.dtype)}})['model']['w']
    ckpt.close(mngr)
    assert back.sharding == jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    np.testing.assert_array_equal(np.asarray(back), np.arange(8.0 * len(devices)))
