"""ConvT3: ConvS5 with a structured 3x3 state kernel, diagonalised by the DST-I (see docs/backbones.md).

Each state channel p owns symmetric tridiagonal Toeplitz factors T_H[p] = tridiag(b_H, a_H, b_H) (H x H) and T_W[p]
(W x W); the discrete state kernel is A_bar[p, i, j] = lam_bar[p] t_H[p][i] t_W[p][j] with the 3-tap stencils
t = (b, a, b), applied with zero 'SAME' padding, i.e. X -> lam_bar T_H X T_W per channel. The orthonormal DST-I
matrix S_n diagonalises every such factor, so in spectral coordinates xh = S_H x S_W the recurrence is diagonal:

    xh_k = decay (.) xh_{k-1} + S_H (B_bar (*) u_k) S_W,   decay[m, n, p] = lam_bar[p] mu_H[m, p] mu_W[n, p]
    mu[m, p] = a[p] + 2 b[p] cos(pi (m + 1) / (n + 1))

and runs on the shared scan kernel with an (H, W, P) decay. The stencil is b = stencil_bound / 2 * tanh(raw_b),
a = 1 - 2 |b|, so |mu| <= |a| + 2 |b| = 1 and |decay| <= |lam_bar| < 1 for every parameter value. Any stencil with
a > 0 and a + 2|b| <= 1 is a positive multiple of one of these, and that scale is already lam_bar's magnitude, so
nothing is lost by fixing a + 2|b| = 1. raw_b = 0 (stencil_init 0) makes the layer exactly ConvS5.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import scipy.fft

from teco_ssm.backbones import convs5


def dst1_matrix(n: int) -> np.ndarray:
    """Orthonormal DST-I matrix S[i, m] = sqrt(2 / (n + 1)) sin(pi (i + 1)(m + 1) / (n + 1)): (n, n) float64.

    Symmetric and its own inverse.
    """
    return scipy.fft.dst(np.eye(n), type=1, norm="ortho")


def tridiagonal_eigenvalues(a: jax.Array, b: jax.Array, n: int) -> jax.Array:
    """Eigenvalues of tridiag(b, a, b) (n x n) in DST-I order: a[p] + 2 b[p] cos(pi (m + 1) / (n + 1)): (n, P)."""
    cos = jnp.cos(jnp.pi * jnp.arange(1, n + 1) / (n + 1))
    return a[None, :] + 2.0 * b[None, :] * cos[:, None]


def stencil(raw_b: jax.Array, bound: float) -> tuple[jax.Array, jax.Array]:
    """(a, b) of the 3-tap stencil (b, a, b) from the raw parameter, with |a| + 2|b| = 1: each (P,)."""
    b = 0.5 * bound * jnp.tanh(raw_b)
    return 1.0 - 2.0 * jnp.abs(b), b


@dataclasses.dataclass(frozen=True)
class ConvT3Settings(convs5.ConvS5Settings):
    """TECO-ConvS5's DMLab settings (ConvS5 paper, Table 18) with the structured state kernel:

      stencil_bound  |b| <= stencil_bound / 2 (b = stencil_bound / 2 * tanh(raw_b))
      stencil_init   raw_b starts uniform in [-stencil_init, stencil_init]; 0 starts as ConvS5 exactly
    """

    stencil_bound: float = 0.9
    stencil_init: float = 0.5


class ConvT3SSM(convs5.ConvS5SSM):
    """ConvS5's linear ConvSSM with the structured 3x3 state kernel above."""

    settings: ConvT3Settings

    def stencils(self, P: int) -> tuple[tuple[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
        bound, half_width = self.settings.stencil_bound, self.settings.stencil_init
        init = nn.initializers.uniform(2 * half_width)
        shifted = lambda key, shape: init(key, shape) - half_width  # uniform in [-init, init]
        raw_h = self.param("raw_b_H", shifted, (P,))
        raw_w = self.param("raw_b_W", shifted, (P,))
        return stencil(raw_h, bound), stencil(raw_w, bound)

    def state_basis(self, lam_bar, spatial_shape):
        H, W = spatial_shape
        (a_h, b_h), (a_w, b_w) = self.stencils(lam_bar.shape[0])
        decay = (lam_bar[None, None, :] * tridiagonal_eigenvalues(a_h, b_h, H)[:, None, :]
                 * tridiagonal_eigenvalues(a_w, b_w, W)[None, :, :])
        s_h = jnp.asarray(dst1_matrix(H), jnp.float32)
        s_w = jnp.asarray(dst1_matrix(W), jnp.float32)

        def spectral(x: jax.Array) -> jax.Array:  # (..., H, W, P) -> S_H x S_W per channel; its own inverse
            x = jnp.einsum("mh,...hwp->...mwp", s_h.astype(x.dtype), x)
            return jnp.einsum("...mwp,wn->...mnp", x, s_w.astype(x.dtype))

        return decay, spectral, spectral


class ConvT3Layer(convs5.ConvS5Layer):
    """A ConvS5 layer whose ConvSSM is ConvT3's."""

    ssm = ConvT3SSM
    settings: ConvT3Settings


class Backbone(convs5.Backbone):
    """A stack of ConvT3 layers on latent frames (B, T, H, W, C) -> (B, T, H, W, d_model)."""

    layer = ConvT3Layer
    settings: ConvT3Settings = ConvT3Settings()


Settings = ConvT3Settings
