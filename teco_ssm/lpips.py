"""LPIPS (Zhang et al. 2018, VGG16 variant) from weight files on local disk; nothing is downloaded.

The weights are the two HDF5 files that lpips-j fetches from the Hugging Face repo `pcuenq/lpips-jax`:
  vgg16_weights.h5   groups conv{b}_{l} (b = 1..5, l = 1..2 or 1..3) with datasets `weight` (3, 3, in, out) HWIO
                     and `bias` (out,): torchvision's ImageNet VGG16 in flaxmodels' layout
  lpips_lin.h5       datasets lin0..lin4, each holding C non-negative channel weights (stored as (1, 1, C, 1))
They are found, in order, in an explicit folder (a config field), the folder named by $TECO_SSM_LPIPS_DIR, and the
Hugging Face hub cache when it already holds them (read offline).

  params = load_params(resolve_weights(config.lpips_dir))
  d = lpips(params, x, y)        # x, y (N, H, W, 3) in [-1, 1] -> (N,) float32
  lpips_fn = load_lpips(folder)  # the same, jitted over the loaded weights
"""
from __future__ import annotations

import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Params = dict[str, Any]

ENV_VAR = 'TECO_SSM_LPIPS_DIR'
HUB_REPO = 'pcuenq/lpips-jax'
VGG_FILE = 'vgg16_weights.h5'
LIN_FILE = 'lpips_lin.h5'
HOW_TO_OBTAIN = (f'download {VGG_FILE} and {LIN_FILE} from the Hugging Face repo {HUB_REPO} (e.g. '
                 f'`huggingface-cli download {HUB_REPO} {VGG_FILE} {LIN_FILE} --local-dir DIR`) and pass DIR as '
                 f'the config field lpips_dir or set ${ENV_VAR}=DIR.')

VGG_LAYERS = ((1, 2), (2, 2), (3, 3), (4, 3), (5, 3))  # (block, convs per block) of VGG16
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _pair_in(folder: str) -> tuple[str, str] | None:
    vgg, lin = os.path.join(folder, VGG_FILE), os.path.join(folder, LIN_FILE)
    return (vgg, lin) if os.path.isfile(vgg) and os.path.isfile(lin) else None


def resolve_weights(folder: str | None = None, *, hub_cache_dir: str | None = None,
                    required: bool = True) -> tuple[str, str] | None:
    """Paths (vgg16_weights.h5, lpips_lin.h5) from `folder`, else $TECO_SSM_LPIPS_DIR, else the hub cache (offline).

    An explicit `folder` or environment folder lacking the files is an error; with nothing found, raises
    FileNotFoundError when `required`, else returns None.
    """
    for source, candidate in (('lpips_dir', folder), (ENV_VAR, os.environ.get(ENV_VAR))):
        if candidate:
            found = _pair_in(candidate)
            if found is None:
                raise FileNotFoundError(f'{candidate} (from {source}): missing {VGG_FILE} or {LIN_FILE}; '
                                        + HOW_TO_OBTAIN)
            return found
    from huggingface_hub import try_to_load_from_cache
    cached = [try_to_load_from_cache(HUB_REPO, name, cache_dir=hub_cache_dir) for name in (VGG_FILE, LIN_FILE)]
    if all(isinstance(p, str) and os.path.isfile(p) for p in cached):
        return cached[0], cached[1]
    if required:
        raise FileNotFoundError('LPIPS weights not found locally: ' + HOW_TO_OBTAIN)
    return None


def load_params(paths: tuple[str, str]) -> Params:
    """Reads the two HDF5 files into {'vgg': {'conv1_1': {'kernel','bias'}, ...}, 'lin': [5 x (C,)]} float32.

    Channel widths are taken from the files and checked for consistency; errors name the file and dataset.
    """
    import h5py
    vgg_path, lin_path = paths
    vgg: dict[str, dict[str, np.ndarray]] = {}
    widths = []
    with h5py.File(vgg_path, 'r') as f:
        in_ch = 3
        for block, count in VGG_LAYERS:
            for layer in range(1, count + 1):
                name = f'conv{block}_{layer}'
                if name not in f or 'weight' not in f[name] or 'bias' not in f[name]:
                    raise ValueError(f'{vgg_path}: missing dataset {name}/weight or {name}/bias')
                kernel = np.asarray(f[name]['weight'], np.float32)
                bias = np.asarray(f[name]['bias'], np.float32)
                if kernel.ndim != 4 or kernel.shape[:3] != (3, 3, in_ch) or bias.shape != (kernel.shape[3],):
                    raise ValueError(f'{vgg_path}: {name} has kernel {kernel.shape} and bias {bias.shape}, '
                                     f'expected (3, 3, {in_ch}, C) and (C,)')
                vgg[name] = {'kernel': kernel, 'bias': bias}
                in_ch = kernel.shape[3]
            widths.append(in_ch)
    lin = []
    with h5py.File(lin_path, 'r') as f:
        for i, width in enumerate(widths):
            if f'lin{i}' not in f:
                raise ValueError(f'{lin_path}: missing dataset lin{i}')
            w = np.asarray(f[f'lin{i}'], np.float32)
            if w.size != width:
                raise ValueError(f'{lin_path}: lin{i} has {w.size} weights, expected {width} (VGG block {i + 1})')
            lin.append(w.reshape(width))
    return {'vgg': vgg, 'lin': lin}


def vgg_features(vgg: dict[str, Any], x: Array) -> list[Array]:
    """VGG16 activations relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 of images x (N, H, W, 3) in [0, 1]."""
    mean = jnp.asarray(IMAGENET_MEAN, x.dtype)
    std = jnp.asarray(IMAGENET_STD, x.dtype)
    h = (x - mean) / std
    feats = []
    for block, count in VGG_LAYERS:
        if block > 1:
            h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), 'VALID')
        for layer in range(1, count + 1):
            p = vgg[f'conv{block}_{layer}']
            h = jax.lax.conv_general_dilated(h, p['kernel'].astype(h.dtype), (1, 1), ((1, 1), (1, 1)),
                                             dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
            h = jax.nn.relu(h + p['bias'].astype(h.dtype))
        feats.append(h)
    return feats


def lpips(params: Params, x: Array, y: Array) -> Array:
    """LPIPS distance of images x, y (N, H, W, 3) in [-1, 1] -> (N,) float32 (0 for identical images).

    Per layer: unit-normalise features over channels, squared difference, weight channels by lin_i, average
    over space; sum over the five layers. H and W must be at least 16.
    """
    fx = vgg_features(params['vgg'], (x + 1.0) / 2.0)
    fy = vgg_features(params['vgg'], (y + 1.0) / 2.0)
    total = jnp.zeros(x.shape[0], jnp.float32)
    for a, b, w in zip(fx, fy, params['lin']):
        a = a / (jnp.sqrt(jnp.sum(a ** 2, axis=-1, keepdims=True)) + 1e-10)
        b = b / (jnp.sqrt(jnp.sum(b ** 2, axis=-1, keepdims=True)) + 1e-10)
        total = total + jnp.mean(jnp.sum((a - b) ** 2 * w, axis=-1), axis=(1, 2))
    return total


def load_lpips(folder: str | None = None, *, required: bool = True
               ) -> Callable[[Array, Array], Array] | None:
    """A jitted `lpips(params, x, y)` closed over the local weights: (N,H,W,3), (N,H,W,3) in [-1, 1] -> (N,).

    Returns None when the files are absent and not `required` (else FileNotFoundError with how to obtain them).
    """
    paths = resolve_weights(folder, required=required)
    if paths is None:
        return None
    params = jax.tree_util.tree_map(jnp.asarray, load_params(paths))
    return jax.jit(lambda x, y: lpips(params, x, y))
