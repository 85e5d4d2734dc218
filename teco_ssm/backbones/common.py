"""Pieces the SSM backbones share: HiPPO-N initialisation, ZOH discretisation, the diagonal SSM parameters,
convolutions on complex tensors, the layer stack and the activations between layers.

Paper symbols (Lambda, B_tilde, Delta) are those of the ConvS5 paper, Appendix B (eqs. 26-29).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

# ----------------------------------------------------------------------------------------------- pure functions
def hippo_n(n: int) -> np.ndarray:
    """The HiPPO-N matrix (ConvS5 paper eq. 29, the normal part of HiPPO-LegS): (n, n) float64.

    A[i, k] = -sqrt(i + 1/2) sqrt(k + 1/2) for i > k, +sqrt(i + 1/2) sqrt(k + 1/2) for i < k, -1/2 on the diagonal.
    """
    q = np.sqrt(np.arange(n) + 0.5)
    outer = q[:, None] * q[None, :]
    return -np.tril(outer, -1) + np.triu(outer, 1) - 0.5 * np.eye(n)


@functools.lru_cache(maxsize=16)
def hippo_n_eigendecomposition(ssm_size: int, blocks: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Block-diagonal HiPPO-N initialisation with conjugate-pair halving, as S5 and ConvS5.

    `ssm_size` states are split into `blocks` HiPPO-N blocks; each block's eigenvalues come in conjugate pairs,
    so one of each pair is kept. Cached, and the arrays are read-only: every layer of a stack, and every trace of
    a model, shares one decomposition (a 2048-state one takes seconds).

    Returns:
      Lambda: (P,) complex128 eigenvalues, P = ssm_size // 2.
      V: (ssm_size, P) complex128 eigenvectors (columns), block diagonal.
      V_inv: (P, ssm_size) complex128, the matching rows of V^-1 (V is unitary per block, so V^H).
    """
    if ssm_size % blocks or (ssm_size // blocks) % 2:
        raise ValueError(f"ssm_size {ssm_size} must split into {blocks} blocks of even size")
    size = ssm_size // blocks
    skew = hippo_n(size) + 0.5 * np.eye(size)  # skew-symmetric, so -i * skew is Hermitian
    w, v = scipy.linalg.eigh(-1j * skew)  # skew = v diag(i w) v^H, w ascending: pairs (w, -w)
    keep = slice(0, size // 2)  # negative frequencies; their conjugates are the other half
    lam = -0.5 + 1j * w[keep]
    v = v[:, keep]
    Lambda = np.tile(lam, blocks)
    V = scipy.linalg.block_diag(*([v] * blocks))
    V_inv = scipy.linalg.block_diag(*([v.conj().T] * blocks))
    for array in (Lambda, V, V_inv):
        array.flags.writeable = False
    return Lambda, V, V_inv


def discretize_zoh(Lambda: jax.Array, B_tilde: jax.Array, Delta: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Zero-order hold (ConvS5 paper eqs. 27-28).

    Args:
      Lambda: (P,) complex eigenvalues; B_tilde: (P, N) complex; Delta: (P,) positive timescales.
    Returns:
      lam_bar = exp(Lambda Delta): (P,); B_bar = ((lam_bar - 1) / Lambda)[:, None] * B_tilde: (P, N).
    """
    lam_bar = jnp.exp(Lambda * Delta)
    return lam_bar, ((lam_bar - 1.0) / Lambda)[:, None] * B_tilde


CONV_ALGORITHMS = ("auto", "xla", "winograd")
WINOGRAD_MIN_CHANNELS = 256  # on CPU, narrower 3x3 convolutions run as fast in XLA's own (docs/backbones.md)


def conv2d(x: jax.Array, kernel: jax.Array, algorithm: str = "auto") -> jax.Array:
    """'SAME' 2-D convolution with zero padding, real or complex. x: (N, H, W, Cin); kernel: (k, k, Cin, Cout).

    algorithm: 'xla' (`lax.conv_general_dilated`), 'winograd' (`winograd_conv3x3`; 3x3 real float32 only) or
    'auto' (`conv_algorithm`). The two agree to float32 rounding. Raises ValueError for an unknown algorithm or a
    convolution Winograd's does not cover.
    """
    if algorithm == "auto":
        algorithm = conv_algorithm(x, kernel)
    if algorithm == "winograd":
        if not _winograd_covers(x, kernel):
            raise ValueError(f"the Winograd convolution takes 3x3 float32 kernels; got {kernel.shape[:2]} "
                             f"{jnp.result_type(x, kernel)}")
        return winograd_conv3x3(x.astype(jnp.float32), kernel.astype(jnp.float32))
    if algorithm != "xla":
        raise ValueError(f"unknown convolution algorithm {algorithm!r}; valid: {', '.join(CONV_ALGORITHMS)}")
    dtype = jnp.result_type(x, kernel)
    return jax.lax.conv_general_dilated(x.astype(dtype), kernel.astype(dtype), (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def conv_algorithm(x: jax.Array, kernel: jax.Array) -> str:
    """What `conv2d(..., 'auto')` runs: 'winograd' on the CPU backend for a 3x3 float32 convolution with at least
    `WINOGRAD_MIN_CHANNELS` input and output channels (the ConvSSM core at DMLab width, P = 512: 1.7-1.8x faster
    forward and backward there), 'xla' otherwise (every accelerator, whose convolution libraries choose their own
    algorithms)."""
    wide = min(kernel.shape[2], kernel.shape[3]) >= WINOGRAD_MIN_CHANNELS
    return "winograd" if jax.default_backend() == "cpu" and wide and _winograd_covers(x, kernel) else "xla"


def _winograd_covers(x: jax.Array, kernel: jax.Array) -> bool:
    """Whether `winograd_conv3x3` computes this convolution: a 3x3 kernel, real float32 arithmetic."""
    return kernel.shape[:2] == (3, 3) and jnp.result_type(x, kernel) == jnp.float32


# Winograd F(2x2, 3x3) (Lavin & Gray 2016, "Fast Algorithms for Convolutional Neural Networks", Section 4.1): a 2x2
# output tile from a 4x4 input tile with 16 multiplications instead of 36. Y = A^T [(G g G^T) (.) (B^T d B)] A.
_WINOGRAD_G = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]], np.float32)


def _winograd_input(v: Sequence[jax.Array]) -> list[jax.Array]:
    """B^T applied along a list of 4 tile rows (or columns): B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0],
    [0, 1, 0, -1]]."""
    return [v[0] - v[2], v[1] + v[2], v[2] - v[1], v[1] - v[3]]


def _winograd_output(m: Sequence[jax.Array]) -> list[jax.Array]:
    """A^T applied along a list of 4 transformed rows (or columns): A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]."""
    return [m[0] + m[1] + m[2], m[1] - m[2] - m[3]]


def winograd_conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """'SAME' 3x3 convolution with zero padding by Winograd's minimal filtering F(2x2, 3x3) (Lavin & Gray 2016).

    x: (N, H, W, Cin); kernel: (3, 3, Cin, Cout) -> (N, H, W, Cout), x's dtype. Equals `lax.conv_general_dilated`
    (cross-correlation, as every convolution here) up to float rounding. The input is cut into 4x4 tiles with
    stride 2, transformed (additions only), multiplied with the transformed kernel as 16 matrix products over the
    channels, and transformed back; odd H or W get one more zero row or column, cropped from the output. The
    gradients are those of this expression, so the backward pass also takes 16 products per tile. Non-finite inputs
    reach the same outputs as in XLA's convolution, but an infinite input can give NaN where XLA's gives +-inf (the
    transforms subtract it from itself).
    """
    n, h, w, cin = x.shape
    cout = kernel.shape[-1]
    h2, w2 = (h + 1) // 2, (w + 1) // 2
    padded = jnp.pad(x, ((0, 0), (1, 1 + 2 * h2 - h), (1, 1 + 2 * w2 - w), (0, 0)))
    # tile[a][b]: the input pixel at offset (a, b) of every 4x4 tile, (N, h2, w2, Cin)
    tile = [[padded[:, a:a + 2 * h2:2, b:b + 2 * w2:2, :] for b in range(4)] for a in range(4)]
    rows = [_winograd_input([tile[a][b] for a in range(4)]) for b in range(4)]  # rows[b][i]
    v = [_winograd_input([rows[b][i] for b in range(4)]) for i in range(4)]  # v[i][j] = (B^T d B)[i, j]
    v = jnp.stack([v[i][j] for i in range(4) for j in range(4)]).reshape(16, n * h2 * w2, cin)
    g = jnp.asarray(_WINOGRAD_G, kernel.dtype)
    u = jnp.einsum("ia,abco,jb->ijco", g, kernel, g).reshape(16, cin, cout)  # G g G^T per channel pair
    m = jnp.einsum("ktc,kco->kto", v, u).reshape(4, 4, n, h2, w2, cout)
    cols = [_winograd_output([m[i, j] for i in range(4)]) for j in range(4)]  # cols[j][r]
    y = [_winograd_output([cols[j][r] for j in range(4)]) for r in range(2)]  # y[r][c]
    y = jnp.stack([jnp.stack(y[r], axis=3) for r in range(2)], axis=2)  # (N, h2, 2, w2, 2, Cout)
    return y.reshape(n, 2 * h2, 2 * w2, cout)[:, :h, :w].astype(x.dtype)


def over_frames(fn: Callable[[jax.Array], jax.Array], x: jax.Array) -> jax.Array:
    """Applies a per-frame function to (B, T, H, W, C) by folding time into the batch."""
    b, t = x.shape[:2]
    y = fn(x.reshape((b * t,) + x.shape[2:]))
    return y.reshape((b, t) + y.shape[1:])


# ----------------------------------------------------------------------------------------------- parameters
INITS = ("s5", "he_normal", "lecun_real")


class DiagonalSSM(nn.Module):
    """The diagonalised S5 system shared by S5, ConvS5 and ConvT3: eigenvalues, timescales, B and C.

    B acts on `in_features` input values per state (U for S5, U kB kB for ConvS5), C produces `out_features`
    values from the `ssm_size` states of the original basis (U, or U kC kC). B and C are drawn in the original basis
    and moved to the eigenbasis: B_tilde = V^-1 B, C_tilde = C V. How they are drawn (`init_scheme`):

      's5'          S5 (lindermanlab/S5 `ssm_init.py`, TECO-S5's `S5/diagonal_ssm.py`): B lecun-normal over the
                    `ssm_size` rows; C complex, real and imaginary parts each lecun-normal (variance 1 / ssm_size).
      'he_normal'   ConvS5 (NVlabs/ConvSSM `convS5/diagonal_ssm.py`, `initialize_B_kernel`, `initialize_C_kernel`):
                    real B and C, he-normal with fan-in the kernel's inputs, variance 2 / (U kB^2) for B and
                    2 / (ssm_size kC^2) for C (kC^2 = `c_kernel_area`).
      'lecun_real'  this project's earlier ConvS5 initialisation: S5's B, real C truncated normal / sqrt(ssm_size).

    Log timescales are uniform in [log dt_min, log dt_max].

    Returns (lam_bar (P,) complex64, B_bar (P, in_features) complex64, C_tilde (out_features, P) complex64).
    Raises ValueError for an unknown `init_scheme`.
    """

    ssm_size: int
    blocks: int
    in_features: int
    out_features: int
    dt_min: float = 0.001
    dt_max: float = 0.1
    clip_eigs: bool = False
    init_scheme: str = "s5"
    c_kernel_area: int = 1

    @nn.compact
    def __call__(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        if self.init_scheme not in INITS:
            raise ValueError(f"unknown SSM initialisation {self.init_scheme!r}; valid: {', '.join(INITS)}")
        Lambda0, V, V_inv = hippo_n_eigendecomposition(self.ssm_size, self.blocks)
        P = Lambda0.shape[0]
        Lambda_re = self.param("Lambda_re", lambda _: jnp.asarray(Lambda0.real, jnp.float32))
        Lambda_im = self.param("Lambda_im", lambda _: jnp.asarray(Lambda0.imag, jnp.float32))
        if self.clip_eigs:
            Lambda_re = jnp.minimum(Lambda_re, -1e-4)
        Lambda = jax.lax.complex(Lambda_re, Lambda_im)
        block_v = V[:self.ssm_size // self.blocks, :P // self.blocks]  # V is `blocks` copies of it
        b = self.param("B", lambda key: _as_real_pair(to_eigenbasis_b(self._draw_b(key), block_v)))
        c = self.param("C", lambda key: _as_real_pair(to_eigenbasis_c(self._draw_c(key), block_v)))
        log_step = self.param(
            "log_step", lambda key: jax.random.uniform(key, (P,), minval=np.log(self.dt_min), maxval=np.log(self.dt_max)))
        lam_bar, B_bar = discretize_zoh(Lambda, jax.lax.complex(b[..., 0], b[..., 1]), jnp.exp(log_step))
        return lam_bar, B_bar, jax.lax.complex(c[..., 0], c[..., 1])

    def _draw_b(self, key: jax.Array) -> jax.Array:
        """B in the original basis: (ssm_size, in_features) float32."""
        if self.init_scheme == "he_normal":
            return jax.nn.initializers.he_normal()(key, (self.in_features, self.ssm_size)).T
        return jax.nn.initializers.lecun_normal()(key, (self.ssm_size, self.in_features))

    def _draw_c(self, key: jax.Array) -> jax.Array:
        """C in the original basis: (out_features, ssm_size), complex64 for 's5', float32 otherwise."""
        shape = (self.out_features, self.ssm_size)
        if self.init_scheme == "s5":
            parts = jax.nn.initializers.lecun_normal()(key, (self.ssm_size, 2 * self.out_features)).T
            return jax.lax.complex(parts[:self.out_features], parts[self.out_features:])
        if self.init_scheme == "he_normal":
            area = self.c_kernel_area
            fan_in = self.ssm_size * area
            return jax.nn.initializers.he_normal()(key, (fan_in, self.out_features // area)).reshape(shape)
        return jax.random.truncated_normal(key, -2.0, 2.0, shape) / np.sqrt(self.ssm_size)


def _block_product(a: jax.Array, b: np.ndarray, spec: str) -> jax.Array:
    """einsum(spec, a, b) for a real or complex `a` and a complex NumPy `b`, in complex64 (a real `a` takes two
    real products, not four)."""
    b = np.asarray(b)
    if jnp.iscomplexobj(a):
        return jnp.einsum(spec, a.astype(jnp.complex64), jnp.asarray(b, jnp.complex64))
    a = a.astype(jnp.float32)
    return jax.lax.complex(jnp.einsum(spec, a, jnp.asarray(b.real, jnp.float32)),
                           jnp.einsum(spec, a, jnp.asarray(b.imag, jnp.float32)))


def to_eigenbasis_b(B: jax.Array, block_v: np.ndarray) -> jax.Array:
    """B_tilde = V^-1 B for the block-diagonal V of `hippo_n_eigendecomposition`, one block at a time.

    B: (ssm_size, N) real or complex; block_v: (ssm_size / blocks, P / blocks) complex, the block V repeats
    (unitary columns, so its block of V^-1 is block_v^H). Returns (P, N) complex64, equal to the dense V_inv @ B
    to float32 rounding at `blocks` times fewer multiply-adds (a DMLab-size ConvS5 layer: 2.4e9 complex ones
    dense).
    """
    size, half = block_v.shape
    blocks = B.shape[0] // size
    out = _block_product(B.reshape((blocks, size) + B.shape[1:]), block_v.conj().T, "bkn,pk->bpn")
    return out.reshape((blocks * half,) + B.shape[1:])


def to_eigenbasis_c(C: jax.Array, block_v: np.ndarray) -> jax.Array:
    """C_tilde = C V, one block at a time. C: (M, ssm_size) real or complex -> (M, P) complex64 (see
    `to_eigenbasis_b`)."""
    size, half = block_v.shape
    blocks = C.shape[1] // size
    out = _block_product(C.reshape(C.shape[0], blocks, size), block_v, "mbk,kp->mbp")
    return out.reshape(C.shape[0], blocks * half)


def _as_real_pair(z: jax.Array) -> jax.Array:
    """A complex array stored as a real (..., 2) parameter."""
    return jnp.stack([z.real, z.imag], -1)


# ----------------------------------------------------------------------------------------------- activations
class ResNetActivation(nn.Module):
    """ConvS5's activation between layers, the release's `resnet` C_D_config (NVlabs/ConvSSM `conv_ops.ResnetBlock`):

        h = conv(act(GroupNorm(conv(act(GroupNorm(y))))));  out = act(y + h)

    both convolutions k x k with bias, 'SAME', per frame; act is gelu (tanh approximation, flax's `nn.gelu`).
    y: (N, H, W, d) -> (N, H, W, d). Raises ValueError when d is not a multiple of `num_groups`.
    """

    kernel_size: int
    num_groups: int = 32
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, y: jax.Array) -> jax.Array:
        d, k = y.shape[-1], (self.kernel_size, self.kernel_size)
        if d % self.num_groups:
            raise ValueError(f"ConvS5 activation: d_model={d} must be a multiple of num_groups={self.num_groups} "
                             f"(GroupNorm groups)")
        h = nn.gelu(nn.GroupNorm(num_groups=self.num_groups, dtype=self.dtype)(y))
        h = nn.Conv(d, k, padding="SAME", dtype=self.dtype)(h)
        h = nn.gelu(nn.GroupNorm(num_groups=self.num_groups, dtype=self.dtype)(h))
        h = nn.Conv(d, k, padding="SAME", dtype=self.dtype)(h)
        return nn.gelu(y + h)


class HalfGLU(nn.Module):
    """S5's 'GLU (half)' activation: g = gelu(y); g * sigmoid(Dense(g)). y: (..., d) -> (..., d)."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, y: jax.Array) -> jax.Array:
        g = nn.gelu(y)
        return g * jax.nn.sigmoid(nn.Dense(y.shape[-1], dtype=self.dtype)(g))


# ----------------------------------------------------------------------------------------------- the stack
def dtype_of(name: str | Any) -> Any:
    """'float32' / 'bfloat16' (config strings) or a dtype -> a jnp dtype."""
    return jnp.dtype(name) if isinstance(name, str) else name


@dataclasses.dataclass(frozen=True)
class SSMSettings:
    """The settings every SSM backbone has (`S5Settings`, `ConvS5Settings` add theirs and may change defaults).

    One frozen value, built once from the config (`teco_ssm.backbones.settings`) and handed from the stack to each
    layer and from the layer to its SSM. Hashable, so a model holding it can be a static argument of `jax.jit`.

      d_model      width of the layers' inputs and outputs (channels per pixel, or per token for S5)
      n_layers     number of layers
      dropout      dropout rate after each layer's activation (training only)
      ssm_size     states per pixel (per token for S5) before conjugate halving: P = ssm_size / 2 complex states
      blocks       HiPPO-N blocks the initial state matrix is split into
      clip_eigs    keep the real parts of the eigenvalues <= -1e-4
      dt_min, dt_max  range of the initial timescales (log-uniform)
      scan_mode    `teco_ssm.scan` kernel: 'auto' (sequential on CPU, associative elsewhere), 'associative',
                   'sequential' or 'fft'
      remat        recompute each layer in the backward pass
      dtype        compute dtype name ('float32', 'bfloat16'); parameters and the scan stay float32 / complex64
    """

    d_model: int = 512
    n_layers: int = 8
    dropout: float = 0.0
    ssm_size: int = 1024
    blocks: int = 1
    clip_eigs: bool = False
    dt_min: float = 0.001
    dt_max: float = 0.1
    scan_mode: str = "auto"
    remat: bool = False
    dtype: str = "float32"

    def __post_init__(self):
        """The value ranges of every SSM backbone's settings, checked when they are made: each integer field (the
        widths, sizes and counts of this class and its subclasses) >= 1, 0 <= dropout < 1, 0 < dt_min <= dt_max.
        Raises ValueError naming the field, its value and the range."""
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type in ("int", int) and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"field {field.name}={value!r} must be an integer >= 1")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"field dropout={self.dropout!r} must lie in [0, 1)")
        for field in ("dt_min", "dt_max"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"field {field}={value!r} must be a number > 0 (a timescale)")
        if self.dt_min > self.dt_max:
            raise ValueError(f"fields dt_min={self.dt_min} and dt_max={self.dt_max}: need dt_min <= dt_max")
        if self.ssm_size % self.blocks or (self.ssm_size // self.blocks) % 2:
            raise ValueError(f"fields ssm_size={self.ssm_size} and blocks={self.blocks}: ssm_size must split into "
                             "blocks of even size (HiPPO-N blocks, halved by conjugate symmetry)")
        groups = getattr(self, "num_groups", None)
        if groups is not None and self.d_model % groups:
            raise ValueError(f"fields d_model={self.d_model} and num_groups={groups}: d_model must be a multiple "
                             "of num_groups (the GroupNorms of the activation)")


class SSMStack(nn.Module):
    """A stack of recurrent layers behind the backbone protocol (see `teco_ssm.backbones`).

    Subclasses set `layer` (a module class built as `layer(settings)`, with `__call__(u, x0, train) -> (out,
    x_last)` over (B, T, ...) and a static `state_shape(settings, batch_size, spatial_shape)`) and may override how
    frames enter and leave the stack (`embed`, `unembed`). `settings` is the backbone's settings value, passed
    unchanged to every layer. `step` is the parallel call on one frame: the scan kernel then takes its single-step
    path, so generation costs one frame.
    """

    layer: ClassVar[type]
    settings: SSMSettings = SSMSettings()

    @property
    def output_width(self) -> int:
        """Channels of the output frames (d_model unless `unembed` changes them)."""
        return self.settings.d_model

    @nn.nowrap
    def embed(self, x: jax.Array) -> jax.Array:
        """(B, T, H, W, C) -> the first layer's input. Called inside `__call__`, so it may create submodules."""
        return nn.Dense(self.settings.d_model, dtype=dtype_of(self.settings.dtype), name="input_proj")(x)

    @nn.nowrap
    def unembed(self, y: jax.Array, x: jax.Array) -> jax.Array:
        """The last layer's output -> (B, T, H, W, output_width); `x` is the backbone input."""
        return y

    @nn.compact
    def __call__(self, x: jax.Array, state: Sequence[Any] | None = None, train: bool = False):
        """x: (B, T, H, W, C) -> (y (B, T, H, W, output_width) float32, final state: list per layer)."""
        cls = nn.remat(self.layer, static_argnums=(3,)) if self.settings.remat else self.layer
        h = self.embed(x)
        if state is None:
            state = [None] * self.settings.n_layers
        final = []
        for i, x0 in enumerate(state):
            h, x_last = cls(self.settings, name=f"layer_{i}")(h, x0, train)
            final.append(x_last)
        return self.unembed(h, x).astype(jnp.float32), final

    def init_state(self, batch_size: int, spatial_shape: tuple[int, int]) -> list:
        """Zero states, one per layer (see the layer's `state_shape`)."""
        shape = self.layer.state_shape(self.settings, batch_size, spatial_shape)
        return [jnp.zeros(shape, jnp.complex64) for _ in range(self.settings.n_layers)]

    def step(self, x_t: jax.Array, state: Sequence[Any]):
        """x_t: (B, H, W, C) -> (y_t (B, H, W, output_width) float32, new state)."""
        y, new_state = self(x_t[:, None], state, train=False)
        return y[:, 0], new_state
