"""ConvS5 (Smith et al. 2023): convolutional state space layers with a diagonalised pointwise state kernel.

Each layer (paper Section 3.4, Appendix B, Listing 1), for inputs u_k (B, H, W, U):

    x_k = lam_bar (.) x_{k-1} + B_bar (*) u_k        state (B, H, W, P) complex, P = ssm_size / 2
    y_k = 2 Re(C_tilde (*) x_k)                      (*) a 'SAME' convolution
    out_k = LayerNorm(u_k + Dropout(ResNet(y_k)))    post-norm with residual (Appendix D.1)

as the release runs TECO-ConvS5 on the 3D benchmarks (NVlabs/ConvSSM, `C_D_config: resnet`: no D term;
`conv_ops.ResnetBlock`: ResNet(y) = gelu(y + conv(gelu(GN(conv(gelu(GN(y))))))) with `num_groups` GroupNorm groups;
`layers.SequenceLayer`: post-norm). B and C start he-normal in the original basis (`ssm_init='he_normal'`).
Two named variants, off in every config: `D_term` adds a per-channel D (.) u_k to y_k, and `ssm_init='lecun_real'`
draws B and C as S5 does with a real C (both were this project's earlier layer; docs/model.md).

The recurrence runs on the shared scan kernel (`teco_ssm.scan`) with a (P,) decay.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from teco_ssm import scan
from teco_ssm.backbones.common import (DiagonalSSM, ResNetActivation, SSMSettings, SSMStack, conv2d, dtype_of,
                                       over_frames)

Basis = Callable[[jax.Array], jax.Array]


def _identity(x: jax.Array) -> jax.Array:
    return x


def input_conv(u: jax.Array, kernel: jax.Array) -> jax.Array:
    """B_bar (*) u for a real input as ONE real convolution with 2P outputs: [Re B_bar, Im B_bar] (*) u.

    u: (N, H, W, U) real; kernel: (k, k, U, P) complex64 -> (N, H, W, P) complex64. Equals the complex convolution
    `conv2d(u, kernel)` to float32 rounding, without complex arrays around the convolution (docs/backbones.md); on
    CPU a wide one runs as Winograd's (`common.conv_algorithm`).
    """
    P = kernel.shape[-1]
    y = conv2d(u.astype(jnp.float32), jnp.concatenate([kernel.real, kernel.imag], axis=-1))
    return jax.lax.complex(y[..., :P], y[..., P:])


def output_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """2 Re(C_tilde (*) x) as ONE real convolution over [Re x, Im x] with kernel [Re C_tilde; -Im C_tilde].

    x: (N, H, W, P) complex64; kernel: (k, k, P, U) complex64 -> (N, H, W, U) float32. Equals
    `2 * conv2d(x, kernel).real` to float32 rounding without computing the imaginary part.
    """
    y = conv2d(jnp.concatenate([x.real, x.imag], axis=-1), jnp.concatenate([kernel.real, -kernel.imag], axis=2))
    return 2.0 * y


@dataclasses.dataclass(frozen=True)
class ConvS5Settings(SSMSettings):
    """TECO-ConvS5 on DMLab (ConvS5 paper, Table 18; release `dmlab_teco_convS5.yaml`) are the defaults: the
    `SSMSettings` fields and

      B_kernel_size, C_kernel_size  sizes of the input and output convolutions (kB, kC)
      D_kernel_size  size of the two convolutions of the ResNet activation
      ssm_init       how B and C are drawn: 'he_normal' (the release), 's5' or 'lecun_real' (`DiagonalSSM`)
      num_groups     GroupNorm groups of the activation (d_model must be a multiple)
      D_term         add a per-channel D (.) u_k to y_k (off in the release)
    """

    B_kernel_size: int = 3
    C_kernel_size: int = 3
    D_kernel_size: int = 3
    ssm_init: str = "he_normal"
    num_groups: int = 32
    D_term: bool = False


class ConvS5SSM(nn.Module):
    """The linear ConvSSM of one layer: u (B, T, H, W, U), x0 (B, H, W, P) | None ->
    (y = 2 Re(C_tilde (*) x_k): (B, T, H, W, U) float32, all states x_k: (B, T, H, W, P) complex64)."""

    settings: ConvS5Settings

    def state_basis(self, lam_bar: jax.Array, spatial_shape: tuple[int, int]) -> tuple[jax.Array, Basis, Basis]:
        """The diagonal decay and the maps into and out of the basis where the state kernel is diagonal.

        ConvS5's state kernel is pointwise, so the pixel basis already diagonalises it: decay (P,).
        """
        return lam_bar, _identity, _identity

    @nn.compact
    def __call__(self, u: jax.Array, x0: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        s = self.settings
        U, kB, kC = u.shape[-1], s.B_kernel_size, s.C_kernel_size
        lam_bar, B_bar, C_tilde = DiagonalSSM(s.ssm_size, s.blocks, U * kB * kB, U * kC * kC, s.dt_min, s.dt_max,
                                              s.clip_eigs, s.ssm_init, kC * kC, name="diagonal")()
        P = lam_bar.shape[0]
        B_kernel = B_bar.reshape(P, kB, kB, U).transpose(1, 2, 3, 0)  # (kB, kB, U, P)
        C_kernel = C_tilde.reshape(kC, kC, U, P).transpose(0, 1, 3, 2)  # (kC, kC, P, U)
        bu = over_frames(lambda f: input_conv(f, B_kernel), u)
        decay, to_basis, from_basis = self.state_basis(lam_bar, u.shape[2:4])
        x0 = None if x0 is None else to_basis(x0)
        xs = from_basis(scan.scan(decay, to_basis(bu), x0, mode=s.scan_mode))
        return over_frames(lambda f: output_conv(f, C_kernel), xs), xs


class ConvS5Layer(nn.Module):
    """One ConvS5 layer. `__call__(u (B, T, H, W, d_model), x0 (B, H, W, P) | None, train) -> (out, x_last)`."""

    ssm: ClassVar[type] = ConvS5SSM
    settings: ConvS5Settings

    @staticmethod
    def state_shape(settings: ConvS5Settings, batch_size: int, spatial_shape: tuple[int, int]) -> tuple[int, ...]:
        return (batch_size, *spatial_shape, settings.ssm_size // 2)

    @nn.compact
    def __call__(self, u: jax.Array, x0: jax.Array | None, train: bool = False):
        s = self.settings
        dtype = dtype_of(s.dtype)
        y, xs = self.ssm(s, name="ssm")(u, x0)
        if s.D_term:
            y = y + self.param("D", nn.initializers.normal(1.0), (u.shape[-1],)) * u.astype(jnp.float32)
        y = over_frames(ResNetActivation(s.D_kernel_size, s.num_groups, dtype, name="activation"), y.astype(dtype))
        y = nn.Dropout(s.dropout, deterministic=not train)(y)
        return nn.LayerNorm(dtype=dtype, name="norm")(u + y), xs[:, -1]


class Backbone(SSMStack):
    """A stack of ConvS5 layers on latent frames (B, T, H, W, C) -> (B, T, H, W, d_model)."""

    layer = ConvS5Layer
    settings: ConvS5Settings = ConvS5Settings()


Settings = ConvS5Settings
