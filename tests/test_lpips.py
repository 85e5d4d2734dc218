"""LPIPS from local stand-in weight files of the real layout, against a float64 NumPy reference."""
import os

import h5py
import jax.numpy as jnp
import numpy as np
import pytest

from teco_ssm import lpips as L

WIDTHS = (4, 6, 8, 8, 8)   # narrow stand-ins of VGG16's 64, 128, 256, 512, 512


def write_weights(folder, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    with h5py.File(os.path.join(folder, L.VGG_FILE), 'w') as f:
        cin = 3
        for (block, count), width in zip(L.VGG_LAYERS, WIDTHS):
            for layer in range(1, count + 1):
                g = f.create_group(f'conv{block}_{layer}')
                g['weight'] = rng.normal(0, np.sqrt(2 / (9 * cin)), (3, 3, cin, width)).astype(np.float32)
                g['bias'] = rng.normal(0, 0.1, (width,)).astype(np.float32)
                cin = width
    with h5py.File(os.path.join(folder, L.LIN_FILE), 'w') as f:
        for i, width in enumerate(WIDTHS):
            f[f'lin{i}'] = rng.uniform(0, 1, (1, 1, width, 1)).astype(np.float32)
    return folder


def np_lpips(params, x, y):
    def feats(img):
        h = ((img + 1) / 2 - np.array(L.IMAGENET_MEAN)) / np.array(L.IMAGENET_STD)
        out = []
        for block, count in L.VGG_LAYERS:
            if block > 1:
                n, hh, ww, c = h.shape
                h = h.reshape(n, hh // 2, 2, ww // 2, 2, c).max(axis=(2, 4))
            for layer in range(1, count + 1):
                p = params['vgg'][f'conv{block}_{layer}']
                k = np.asarray(p['kernel'], np.float64)
                hp = np.pad(h, ((0, 0), (1, 1), (1, 1), (0, 0)))
                acc = sum(hp[:, i:i + h.shape[1], j:j + h.shape[2]] @ k[i, j] for i in range(3) for j in range(3))
                h = np.maximum(acc + p['bias'], 0)
            out.append(h)
        return out
    total = 0
    for a, b, w in zip(feats(x), feats(y), params['lin']):
        a = a / (np.sqrt((a ** 2).sum(-1, keepdims=True)) + 1e-10)
        b = b / (np.sqrt((b ** 2).sum(-1, keepdims=True)) + 1e-10)
        total = total + (((a - b) ** 2) * w).sum(-1).mean(axis=(1, 2))
    return total


def test_lpips_matches_float64_reference_and_is_zero_on_identical(tmp_path):
    params = L.load_params(L.resolve_weights(write_weights(str(tmp_path / 'w'))))
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, (3, 16, 16, 3)).astype(np.float32)
    y = np.clip(x + rng.normal(0, 0.3, x.shape), -1, 1).astype(np.float32)
    fn = L.load_lpips(str(tmp_path / 'w'))
    got = np.asarray(fn(jnp.asarray(x), jnp.asarray(y)))
    np.testing.assert_allclose(got, np_lpips(params, x.astype(np.float64), y.astype(np.float64)), rtol=2e-4)
    assert np.all(got > 0)
    np.testing.assert_allclose(np.asarray(fn(jnp.asarray(x), jnp.asarray(x))), 0, atol=1e-6)


def test_resolution_order_and_missing_files(tmp_path, monkeypatch):
    explicit = write_weights(str(tmp_path / 'explicit'))
    env = write_weights(str(tmp_path / 'env'))
    monkeypatch.setenv(L.ENV_VAR, env)
    assert L.resolve_weights(explicit)[0] == os.path.join(explicit, L.VGG_FILE)
    assert L.resolve_weights(None)[0] == os.path.join(env, L.VGG_FILE)
    monkeypatch.delenv(L.ENV_VAR)
    # the Hugging Face hub cache layout, read offline
    cache = tmp_path / 'hub'
    snap = cache / 'models--pcuenq--lpips-jax' / 'snapshots' / 'abc123'
    write_weights(str(snap))
    (cache / 'models--pcuenq--lpips-jax' / 'refs').mkdir(parents=True)
    (cache / 'models--pcuenq--lpips-jax' / 'refs' / 'main').write_text('abc123')
    assert L.resolve_weights(None, hub_cache_dir=str(cache))[1] == str(snap / L.LIN_FILE)
    assert L.resolve_weights(None, hub_cache_dir=str(tmp_path / 'nohub'), required=False) is None
    with pytest.raises(FileNotFoundError, match='huggingface-cli download pcuenq/lpips-jax'):
        L.resolve_weights(None, hub_cache_dir=str(tmp_path / 'nohub'))
    with pytest.raises(FileNotFoundError, match='from lpips_dir'):
        L.resolve_weights(str(tmp_path / 'nohub'))


def test_bad_weight_file_names_the_dataset(tmp_path):
    folder = write_weights(str(tmp_path / 'w'))
    with h5py.File(os.path.join(folder, L.LIN_FILE), 'a') as f:
        del f['lin2']
        f['lin2'] = np.ones(3, np.float32)
    with pytest.raises(ValueError, match='lpips_lin.h5: lin2 has 3 weights, expected 8'):
        L.load_params(L.resolve_weights(folder))
