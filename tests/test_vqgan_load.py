"""vqgan.load on TECO's checkpoint layout and the project's own, the safe readers, and clear errors."""
import argparse
import os
import pickle
import struct

import flax.serialization
import jax
import jax.numpy as jnp
import msgpack
import numpy as np
import pytest

import vqgan
from teco_ssm import checkpoint as ckpt
from vqgan.model import VQGAN, init_variables
from vqgan.safe_io import UnsafeFileError, load_args, read_msgpack

FIELDS = dict(ch=4, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), z_channels=6, resolution=8,
              n_embed=12, embed_dim=3)
MODEL = VQGAN(**FIELDS, num_groups=2)


def teco_args(**overrides):
    args = argparse.Namespace(**{k: list(v) if isinstance(v, tuple) else v for k, v in FIELDS.items()},
                              double_z=False, dropout=0.0, num_groups=2, seed=3, lr=4.5e-6,
                              data_path='/raid/dmlab', extra={'nested': [1, 2.5, None, (3, 'x')]}, flags={1, 2})
    for k, v in overrides.items():
        if v is None:
            delattr(args, k)
        else:
            setattr(args, k, v)
    return args


def write_teco(folder, variables, args=None, steps=(200, 1000), codebook=None):
    os.makedirs(os.path.join(folder, 'checkpoints'), exist_ok=True)
    with open(os.path.join(folder, 'args'), 'wb') as f:
        pickle.dump(args if args is not None else teco_args(), f)
    for step in steps:
        scale = 1.0 if step == max(steps) else 0.5   # older checkpoints hold different weights
        tree = {'step': step,
                'params': jax.tree_util.tree_map(lambda x: np.asarray(x) * scale, variables['params']),
                'opt_state': None,
                'model_state': {'stats': {'quantize': {'embeddings': np.asarray(
                    codebook if codebook is not None else variables['stats']['quantize']['embeddings'])}}}}
        with open(os.path.join(folder, 'checkpoints', f'checkpoint_{step}'), 'wb') as f:
            f.write(flax.serialization.msgpack_serialize(tree))
    return folder


@pytest.fixture(scope='module')
def variables():
    return init_variables(MODEL, 7)


@pytest.fixture(scope='module')
def video():
    return np.random.default_rng(0).uniform(-1, 1, (2, 5, 8, 8, 3)).astype(np.float32)


def test_teco_folder_round_trip_matches_direct_application(tmp_path, variables, video):
    tok = vqgan.load(write_teco(str(tmp_path / 'teco'), variables), chunk_size=4)
    assert (tok.n_codes, tok.embedding_dim, tok.latent_shape, tok.frame_shape) == (12, 3, (4, 4), (8, 8, 3))
    emb, codes = tok.encode(video)
    assert emb.shape == (2, 5, 4, 4, 3) and emb.dtype == np.float32 and codes.dtype == np.int32
    direct = jax.jit(lambda v, x: MODEL.apply(v, x, method=VQGAN.encode))
    ref_emb, ref_codes = direct(variables, jnp.asarray(video.reshape(10, 8, 8, 3)))
    np.testing.assert_array_equal(codes, np.asarray(ref_codes).reshape(2, 5, 4, 4))
    np.testing.assert_allclose(emb, np.asarray(ref_emb).reshape(emb.shape), rtol=1e-6)
    np.testing.assert_allclose(tok.lookup(codes), emb, rtol=1e-6)
    frames = tok.decode(codes)
    ref = jax.jit(lambda v, c: MODEL.apply(v, c, method=VQGAN.decode_codes))(variables, ref_codes)
    np.testing.assert_allclose(frames, np.clip(np.asarray(ref), -1, 1).reshape(frames.shape), rtol=1e-5,
                               atol=1e-5)
    assert frames.min() >= -1 and frames.max() <= 1


def test_chunking_does_not_change_results(tmp_path, variables, video):
    folder = write_teco(str(tmp_path / 'teco'), variables)
    big = vqgan.load(folder, chunk_size=64)
    small = vqgan.load(folder, chunk_size=3)   # 10 frames: chunks of 3, 3, 3, 1 (padded)
    np.testing.assert_array_equal(big.encode(video)[1], small.encode(video)[1])
    codes = big.encode(video)[1]
    np.testing.assert_allclose(big.decode(codes), small.decode(codes), atol=1e-5)


def test_project_workdir_loads_through_orbax(tmp_path, variables, video):
    workdir = str(tmp_path / 'run')
    config = {'model': dict(FIELDS, dropout=0.0, num_groups=2)}
    mngr = ckpt.manager(workdir, config)
    ckpt.save(mngr, 5, {'model': variables, 'train': {'step': jnp.int32(5)}})
    ckpt.close(mngr)
    tok = vqgan.load(workdir)
    ref = jax.jit(lambda v, x: MODEL.apply(v, x, method=VQGAN.encode))(variables, video.reshape(10, 8, 8, 3))
    np.testing.assert_array_equal(tok.encode(video)[1].reshape(-1), np.asarray(ref[1]).reshape(-1))


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}',))


def test_crafted_args_pickle_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / 'ran'
    path = tmp_path / 'args'
    path.write_bytes(pickle.dumps(argparse.Namespace(resolution=8, payload=_RunsCode(marker))))
    with pytest.raises(UnsafeFileError, match=r'(posix|os)\.system'):
        load_args(path)
    assert not marker.exists()
    # and via vqgan.load on a whole folder
    folder = tmp_path / 'teco'
    (folder / 'checkpoints').mkdir(parents=True)
    (folder / 'args').write_bytes(path.read_bytes())
    with pytest.raises(UnsafeFileError, match='args'):
        vqgan.load(folder)
    assert not marker.exists()
    # sanity: the same pickle does run code when loaded without restriction
    pickle.loads(path.read_bytes())
    assert marker.exists()


def test_args_with_extra_attributes_load_and_missing_field_is_named(tmp_path, variables):
    args = load_args(write_teco(str(tmp_path / 'a'), variables) + '/args')
    assert args.extra['nested'][3] == (3, 'x') and args.flags == {1, 2}
    with pytest.raises(ValueError, match=r"args: missing field 'n_embed'"):
        vqgan.load(write_teco(str(tmp_path / 'b'), variables, args=teco_args(n_embed=None)))
    with pytest.raises(ValueError, match='not a readable args pickle'):
        (tmp_path / 'c').mkdir()
        (tmp_path / 'c' / 'args').write_bytes(pickle.dumps(teco_args())[:-5])
        load_args(tmp_path / 'c' / 'args')


def test_folder_errors_name_file_and_field(tmp_path, variables, video):
    empty = tmp_path / 'empty'
    (empty / 'checkpoints').mkdir(parents=True)
    (empty / 'args').write_bytes(pickle.dumps(teco_args()))
    with pytest.raises(FileNotFoundError, match='no checkpoint_<step>'):
        vqgan.load(empty)
    with pytest.raises(FileNotFoundError, match='neither a TECO'):
        vqgan.load(tmp_path)

    folder = write_teco(str(tmp_path / 'trunc'), variables, steps=(3,))
    file = os.path.join(folder, 'checkpoints', 'checkpoint_3')
    data = open(file, 'rb').read()
    open(file, 'wb').write(data[: len(data) // 2])
    with pytest.raises(ValueError, match='checkpoint_3: truncated or corrupt'):
        vqgan.load(folder)

    bad_book = np.zeros((FIELDS['n_embed'] + 1, FIELDS['embed_dim']), np.float32)
    with pytest.raises(ValueError, match=r'checkpoint_1000: codebook model_state/stats/quantize/embeddings'):
        vqgan.load(write_teco(str(tmp_path / 'book'), variables, codebook=bad_book))

    wrong = teco_args(z_channels=8)   # params were built with z_channels=6
    with pytest.raises(ValueError, match=r'checkpoint_1000: parameter params/decoder/Conv_0/kernel'):
        vqgan.load(write_teco(str(tmp_path / 'arch'), variables, args=wrong))

    tok = vqgan.load(write_teco(str(tmp_path / 'ok'), variables))
    with pytest.raises(ValueError, match=r'video: values must lie in \[-1, 1\]'):
        tok.encode(video * 2.0)
    with pytest.raises(ValueError, match='video: expected shape'):
        tok.encode(video[:, :, :4])
    with pytest.raises(ValueError, match=r'codes: codes must lie in \[0, 12\)'):
        tok.decode(np.full((1, 1, 4, 4), 12))


def _ext_array(shape, dtype, payload):
    return msgpack.ExtType(1, msgpack.packb((shape, dtype, payload), use_bin_type=True))


def test_msgpack_declared_sizes_are_checked_before_allocation(tmp_path):
    path = tmp_path / 'm'
    # an array that claims 2**40 floats but carries 16 bytes
    path.write_bytes(msgpack.packb({'params': _ext_array((2 ** 20, 2 ** 20), 'float32', b'\0' * 16)}))
    with pytest.raises(UnsafeFileError, match=r'declares shape \(1048576, 1048576\)'):
        read_msgpack(path)
    # a map header that claims 2**31 entries in a 10-byte file
    path.write_bytes(b'\xdf' + struct.pack('>I', 2 ** 31) + b'\xa1a\x01\xa1b')
    with pytest.raises(ValueError, match='truncated or corrupt'):
        read_msgpack(path)
    # object dtype is refused
    path.write_bytes(msgpack.packb({'x': _ext_array((1,), 'object', b'\0' * 8)}))
    with pytest.raises(UnsafeFileError, match='not a plain numeric dtype'):
        read_msgpack(path)
    with pytest.raises(UnsafeFileError, match='more than the 4 allowed'):
        read_msgpack(path, max_bytes=4)
    # a genuine flax file reads back exactly, including chunked arrays
    tree = {'a': np.arange(6, dtype=np.int32).reshape(2, 3), 'b': {'c': np.float32(2.5)}, 'n': None}
    path.write_bytes(flax.serialization.msgpack_serialize(tree))
    back = read_msgpack(path)
    np.testing.assert_array_equal(back['a'], tree['a'])
    assert back['b']['c'] == 2.5 and back['n'] is None
