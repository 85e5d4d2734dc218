"""S5 (Smith et al. 2023), the vector SSM baseline of the ConvS5 paper (TECO-S5).

Each latent frame (H, W, C) is cut into (H/downsample, W/downsample) patches by a strided conv to `embed_dim`
channels, flattened and projected to one d_model token; S5 layers run over time on that token sequence; a dense
layer and a transposed conv bring the token back to (H, W, d_model). Each layer, for tokens u_k (B, d_model):

    x_k = lam_bar (.) x_{k-1} + B_bar u_k           state (B, P) complex, P = ssm_size / 2
    y_k = 2 Re(C_tilde x_k) + D (.) u_k
    out_k = LayerNorm(u_k + Dropout(HalfGLU(y_k)))  post-norm with residual (Appendix D.1)
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from teco_ssm import scan
from teco_ssm.backbones.common import DiagonalSSM, HalfGLU, SSMStack, config_from_fields, dtype_of


class S5Layer(nn.Module):
    """One S5 layer. `__call__(u (B, T, d_model), x0 (B, P) | None, train) -> (out, x_last)`."""

    d_model: int
    ssm_size: int
    blocks: int = 1
    dt_min: float = 0.001
    dt_max: float = 0.1
    clip_eigs: bool = False
    dropout: float = 0.0
    scan_mode: str = "associative"
    dtype: Any = "float32"

    @staticmethod
    def state_shape(cfg: Any, batch_size: int, spatial_shape: tuple[int, int]) -> tuple[int, ...]:
        return (batch_size, cfg.ssm_size // 2)

    @nn.compact
    def __call__(self, u: jax.Array, x0: jax.Array | None, train: bool = False):
        dtype = dtype_of(self.dtype)
        lam_bar, B_bar, C_tilde = DiagonalSSM(self.ssm_size, self.blocks, u.shape[-1], u.shape[-1],
                                              self.dt_min, self.dt_max, self.clip_eigs, name="diagonal")()
        u32 = u.astype(jnp.float32)
        xs = scan.scan(lam_bar, u32 @ B_bar.T, x0, mode=self.scan_mode)
        D = self.param("D", nn.initializers.normal(1.0), (u.shape[-1],))
        y = (2.0 * (xs @ C_tilde.T).real + D * u32).astype(dtype)
        y = HalfGLU(dtype, name="activation")(y)
        y = nn.Dropout(self.dropout, deterministic=not train)(y)
        return nn.LayerNorm(dtype=dtype, name="norm")(u + y), xs[:, -1]


class Backbone(SSMStack):
    """Latent frames (B, T, H, W, C) -> tokens -> S5 layers -> (B, T, H, W, d_model)."""

    layer = S5Layer
    d_model: int = 2048
    ssm_size: int = 2048
    downsample: int = 8
    embed_dim: int = 256

    @nn.nowrap
    def embed(self, x: jax.Array) -> jax.Array:
        b, t, H, W, _ = x.shape
        if H % self.downsample or W % self.downsample:
            raise ValueError(f"latent size {(H, W)} is not divisible by downsample={self.downsample}")
        dtype, k = dtype_of(self.dtype), (self.downsample, self.downsample)
        patches = nn.Conv(self.embed_dim, k, strides=k, padding="VALID", dtype=dtype, name="downsample")(
            x.reshape((b * t,) + x.shape[2:]))
        return nn.Dense(self.d_model, dtype=dtype, name="to_token")(patches.reshape(b, t, -1))

    @nn.nowrap
    def unembed(self, y: jax.Array, x: jax.Array) -> jax.Array:
        b, t = y.shape[:2]
        h, w = x.shape[2] // self.downsample, x.shape[3] // self.downsample
        dtype, k = dtype_of(self.dtype), (self.downsample, self.downsample)
        patches = nn.Dense(h * w * self.embed_dim, dtype=dtype, name="from_token")(y)
        patches = nn.gelu(patches.reshape(b * t, h, w, self.embed_dim))
        out = nn.ConvTranspose(self.d_model, k, strides=k, padding="VALID", dtype=dtype, name="upsample")(patches)
        return out.reshape((b, t) + out.shape[1:])


def default_config() -> ml_collections.ConfigDict:
    """TECO-S5 on DMLab (ConvS5 paper, Table 19): the `Backbone` field defaults."""
    return config_from_fields(Backbone)
