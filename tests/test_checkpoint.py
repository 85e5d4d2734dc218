"""The orbax checkpoint layer: round trip, keep/save_every, partial restore, config.json, interrupted writes."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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


# ------------------------------------------------------------------------ checkpoints of another model structure
def _teco_variables(backbone_fields, **model_fields):
    """Abstract variables of a toy TECO-ConvS5 with these backbone and model fields."""
    from teco_ssm import backbones, teco
    from tests.toy import TOY_BACKBONES, TOY_MODEL

    model = teco.Teco(backbone=backbones.build('convs5', {**TOY_BACKBONES['convs5'], **backbone_fields}),
                      **{**TOY_MODEL, **model_fields})
    return jax.eval_shape(lambda key: teco.init_variables(model, key), jax.random.key(0))


def _paths(tree):
    from flax import traverse_util

    return {'model/' + '/'.join(path) for path in traverse_util.flatten_dict(tree)}


def _save_model(workdir, variables):
    concrete = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), variables)
    mngr = ckpt.manager(workdir)
    ckpt.save(mngr, 3, {'model': concrete, 'train': {'step': jnp.int32(3)}}, force=True)
    ckpt.close(mngr)


def test_a_checkpoint_of_another_model_structure_is_refused_naming_the_parameters(tmp_path):
    """An old model (a per-channel D in each ConvS5 layer, a learned start latent, one layer) saved, then restored
    into the current one (neither, two layers): one error naming a few paths of each kind and their counts, not
    orbax's tree dump, and nothing restored."""
    workdir = str(tmp_path / 'run')
    old = _teco_variables(dict(D_term=True, n_layers=1), start_position=True)
    new = _teco_variables(dict(D_term=False, n_layers=2), start_position=False)
    _save_model(workdir, old)
    missing = sorted(_paths(new) - _paths(old))
    unexpected = sorted(_paths(old) - _paths(new))
    assert len(missing) > 5 and all('/backbone/layer_1/' in p for p in missing)
    assert unexpected == ['model/params/backbone/layer_0/D', 'model/params/start_latent']

    mngr = ckpt.manager(workdir, read_only=True)
    with pytest.raises(ckpt.CheckpointMismatchError) as error:
        ckpt.restore(mngr, {'model': new})
    ckpt.close(mngr)
    message = str(error.value)
    assert message.startswith(os.path.join(workdir, 'checkpoints', '3') + ": item 'model' does not match")
    assert f'{len(missing)} missing from the checkpoint: {", ".join(missing[:5])} and {len(missing) - 5} more' \
        in message
    assert f'2 in the checkpoint but not expected: {", ".join(unexpected)}' in message
    assert 'of another shape' not in message and 'Source' not in message and len(message) < 1200


def test_a_checkpoint_with_other_shapes_is_refused_naming_them(tmp_path):
    workdir = str(tmp_path / 'run')
    _save_model(workdir, _teco_variables(dict(ssm_size=8)))
    mngr = ckpt.manager(workdir, read_only=True)
    with pytest.raises(ckpt.CheckpointMismatchError) as error:
        ckpt.restore(mngr, {'model': _teco_variables(dict(ssm_size=16))})
    message = str(error.value)
    # P = ssm_size / 2 complex states, stored as (..., 2) reals: B (P, U kB kB, 2), Lambda (P,)
    assert ('5 of another shape: model/params/backbone/layer_0/ssm/diagonal/B (saved (4, 144, 2), expected '
            '(8, 144, 2))') in message and 'diagonal/Lambda_re (saved (4,), expected (8,))' in message
    assert 'missing' not in message and 'not expected' not in message
    # the same structure restores, item by item
    back = ckpt.restore(mngr, {'model': _teco_variables(dict(ssm_size=8))})['model']
    ckpt.close(mngr)
    assert _paths(back) == _paths(_teco_variables(dict(ssm_size=8)))


# ------------------------------------------------------------------------------------ square brackets in paths
def test_bracketed_paths_are_what_orbax_cannot_read_back(tmp_path):
    """The library fault the check guards against: a save into `w[ab]x` restores nothing (orbax's glob)."""
    import orbax.checkpoint as ocp

    folder = tmp_path / "w[ab]x"
    with ocp.CheckpointManager(str(folder / "checkpoints")) as mngr:
        mngr.save(1, args=ocp.args.Composite(model=ocp.args.StandardSave({"a": np.ones(3, np.float32)})))
        mngr.wait_until_finished()
    with ocp.CheckpointManager(str(folder / "checkpoints")) as mngr, pytest.raises(ValueError, match="NOT_FOUND"):
        mngr.restore(1, args=ocp.args.Composite(model=ocp.args.StandardRestore({"a": np.ones(3, np.float32)})))


@pytest.mark.parametrize("name", ["exp[1]", "a]b", "c[d"])
def test_every_stage_with_checkpoints_refuses_a_bracketed_path_before_any_work(tmp_path, name):
    from teco_ssm import released, run, stages

    bad = tmp_path / name
    match = r"contains .*'\['|contains .*'\]'"
    calls = {
        "run": lambda: run.run(quick=True, workdir=str(bad)),
        "tokenizer": lambda: stages.train_tokenizer(str(tmp_path / "data"), str(bad)),
        "train": lambda: stages.train(str(bad), config="configs/mazelab.py:convt3", data=str(tmp_path / "data"),
                                      tokenizer=str(tmp_path / "vqgan")),
        "sample": lambda: stages.sample(str(bad), str(tmp_path / "samples")),
        "convert-teco": lambda: released.convert(str(tmp_path / "release"), str(tmp_path / "vqgan"), str(bad)),
        "manager": lambda: ckpt.manager(str(bad)),
    }
    for stage, call in calls.items():
        with pytest.raises(ValueError, match=match):
            call()
        assert not bad.exists(), stage
        assert sorted(p.name for p in tmp_path.iterdir()) == [], stage


def test_a_workdir_without_a_complete_checkpoint_takes_other_settings(tmp_path):
    """A config refused after config.json was written (a value only the model's construction rejects) left no
    checkpoint: the corrected request is not held to the refused values."""
    ckpt.write_config(str(tmp_path), {"model": {"width": 3}})
    (tmp_path / ckpt.CHECKPOINT_DIR).mkdir()
    ckpt.check_resume(str(tmp_path), {"model": {"width": 4}}, ("model",))
    mngr = ckpt.manager(str(tmp_path), keep=1, async_save=False)
    ckpt.save(mngr, 1, {"model": {"a": np.ones(2, np.float32)}}, force=True)
    ckpt.close(mngr)
    with pytest.raises(ValueError, match="field model.width is 3 there, 4 in this request"):
        ckpt.check_resume(str(tmp_path), {"model": {"width": 4}}, ("model",))
