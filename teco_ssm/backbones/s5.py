"""S5 (Smith et al. 2023), the vector SSM baseline of the ConvS5 paper (TECO-S5).

As TECO-S5 (ConvS5 release, Table 19): each latent frame (H, W, C) becomes one d_model token by a convolution with
kernel and stride `downsample` = H = W and no bias (TECO's z_proj); S5 layers run over time on the tokens; a
transposed convolution, also without bias, brings each token back to an (H, W, out_dim) frame (TECO's z_unproj,
out_dim = TECO's embedding_dim, the latent width). Each layer, for tokens u_k (B, d_model):

    x_k = lam_bar (.) x_{k-1} + B_bar u_k           state (B, P) complex, P = ssm_size / 2
    y_k = 2 Re(C_tilde x_k) + D (.) u_k
    out_k = LayerNorm(u_k + Dropout(HalfGLU(y_k)))  post-norm with residual (Appendix D.1)
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from teco_ssm import scan
from teco_ssm.backbones.common import DiagonalSSM, HalfGLU, SSMSettings, SSMStack, dtype_of

_FILE = "teco_ssm/backbones/s5.py"


@dataclasses.dataclass(frozen=True)
class S5Settings(SSMSettings):
    """TECO-S5 on DMLab (ConvS5 paper, Table 19) are the defaults: the `SSMSettings` fields (d_model: the width of
    the tokens) and

      downsample  kernel and stride of the frame-to-token convolution: must equal the latent height and width
      out_dim     channels of the output frames (TECO's embedding_dim, the latent width)
    """

    d_model: int = 2048
    ssm_size: int = 2048
    downsample: int = 8
    out_dim: int = 64


class S5Layer(nn.Module):
    """One S5 layer. `__call__(u (B, T, d_model), x0 (B, P) | None, train) -> (out, x_last)`."""

    settings: S5Settings

    @staticmethod
    def state_shape(settings: S5Settings, batch_size: int, spatial_shape: tuple[int, int]) -> tuple[int, ...]:
        return (batch_size, settings.ssm_size // 2)

    @nn.compact
    def __call__(self, u: jax.Array, x0: jax.Array | None, train: bool = False):
        s = self.settings
        dtype = dtype_of(s.dtype)
        lam_bar, B_bar, C_tilde = DiagonalSSM(s.ssm_size, s.blocks, u.shape[-1], u.shape[-1], s.dt_min, s.dt_max,
                                              s.clip_eigs, name="diagonal")()
        u32 = u.astype(jnp.float32)
        xs = scan.scan(lam_bar, u32 @ B_bar.T, x0, mode=s.scan_mode)
        D = self.param("D", nn.initializers.normal(1.0), (u.shape[-1],))
        y = (2.0 * (xs @ C_tilde.T).real + D * u32).astype(dtype)
        y = HalfGLU(dtype, name="activation")(y)
        y = nn.Dropout(s.dropout, deterministic=not train)(y)
        return nn.LayerNorm(dtype=dtype, name="norm")(u + y), xs[:, -1]


class Backbone(SSMStack):
    """Latent frames (B, T, H, W, C) -> one token per frame -> S5 layers -> (B, T, H, W, out_dim)."""

    layer = S5Layer
    settings: S5Settings = S5Settings()

    @property
    def output_width(self) -> int:
        return self.settings.out_dim

    def _check_frame(self, height: int, width: int) -> None:
        k = self.settings.downsample
        if (height, width) != (k, k):
            raise ValueError(f"{_FILE}: S5 runs on one token per frame, so field downsample={k} must "
                             f"equal the latent height and width, got (H, W) = ({height}, {width})")

    @nn.nowrap
    def embed(self, x: jax.Array) -> jax.Array:
        s = self.settings
        b, t, H, W, _ = x.shape
        self._check_frame(H, W)
        k = (s.downsample, s.downsample)
        token = nn.Conv(s.d_model, k, strides=k, padding="VALID", use_bias=False, dtype=dtype_of(s.dtype),
                        name="downsample")(x.reshape((b * t,) + x.shape[2:]))
        return token.reshape(b, t, s.d_model)

    @nn.nowrap
    def unembed(self, y: jax.Array, x: jax.Array) -> jax.Array:
        s = self.settings
        b, t = y.shape[:2]
        k = (s.downsample, s.downsample)
        out = nn.ConvTranspose(s.out_dim, k, strides=k, padding="VALID", use_bias=False,
                               dtype=dtype_of(s.dtype), name="upsample")(y.reshape(b * t, 1, 1, s.d_model))
        return out.reshape((b, t) + out.shape[1:])


Settings = S5Settings
