"""Building blocks of the TECO model: ResNet blocks, the posterior encoder, the latent codebook and the decoder.

Shapes are channels-last. The encoder and decoder work on single frames; the TECO model folds time into the
batch before calling them. With the default two depths the encoder halves the resolution once (16x16 VQGAN codes
to an 8x8 latent) and the decoder doubles it back.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def group_count(channels: int, max_groups: int = 32) -> int:
    """Number of GroupNorm groups for `channels`: the largest divisor of `channels` that is at most `max_groups`."""
    return math.gcd(channels, max_groups)


class ResNetBlock(nn.Module):
    """Pre-activation residual block (TECO's): skip + 0.1 * conv(elu(norm(conv(elu(norm(x)))))).

    x: (N, H, W, C) -> (N, H, W, depth); a 1x1 convolution maps the skip path when C != depth.
    """
    depth: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        skip = x
        if x.shape[-1] != self.depth:
            skip = nn.Conv(self.depth, (1, 1), use_bias=False, dtype=self.dtype, name="skip")(x)
        h = nn.elu(nn.GroupNorm(num_groups=group_count(x.shape[-1]), dtype=self.dtype)(x))
        h = nn.Conv(self.depth, (3, 3), dtype=self.dtype)(h)
        h = nn.elu(nn.GroupNorm(num_groups=group_count(self.depth), dtype=self.dtype)(h))
        h = nn.Conv(self.depth, (3, 3), dtype=self.dtype)(h)
        return skip + 0.1 * h


class PosteriorEncoder(nn.Module):
    """Encodes a pair of consecutive code-embedding frames into one latent frame.

    x: (N, H, W, 2 * D_code), the embeddings of frames t-1 and t concatenated on channels
    -> (N, H / 2**(len(depths)-1), W / 2**(len(depths)-1), latent_dim) float (before quantisation).
    A 3x3 convolution and one block at depths[0]; then for every later depth an average pool by 2 and `blocks`
    blocks; a linear map to `latent_dim`.
    """
    depths: Sequence[int]
    blocks: int
    latent_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Conv(self.depths[0], (3, 3), dtype=self.dtype)(x.astype(self.dtype))
        x = ResNetBlock(self.depths[0], dtype=self.dtype)(x)
        for depth in self.depths[1:]:
            x = nn.avg_pool(x, (2, 2), strides=(2, 2))
            for _ in range(self.blocks):
                x = ResNetBlock(depth, dtype=self.dtype)(x)
        return nn.Dense(self.latent_dim, dtype=self.dtype)(x)


class Decoder(nn.Module):
    """Maps the backbone output and a latent frame to logits over the VQGAN codes (TECO's ResNetDecoder,
    `teco/models/base.py`).

    hidden: (N, h, w, D_hidden), latent: (N, h, w, latent_dim)
    -> (N, h * 2**(len(depths)-1), w * 2**(len(depths)-1), out_dim) float32 logits.
    [hidden, latent] on channels, a 3x3 convolution to depths[0] (the encoder's order, as the release: on DMLab 256
    channels, which the first block of the deepest depth, 512, widens through its 1x1 skip); then the encoder's
    mirror: `blocks` blocks per depth from the deepest, nearest-neighbour upsampling by 2 between depths,
    LayerNorm and a linear map to `out_dim`.
    """
    depths: Sequence[int]
    blocks: int
    out_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden: jax.Array, latent: jax.Array) -> jax.Array:
        depths = list(reversed(self.depths))
        x = jnp.concatenate([hidden.astype(self.dtype), latent.astype(self.dtype)], axis=-1)
        x = nn.Conv(self.depths[0], (3, 3), dtype=self.dtype)(x)
        for i, depth in enumerate(depths):
            for _ in range(self.blocks):
                x = ResNetBlock(depth, dtype=self.dtype)(x)
            if i < len(depths) - 1:
                n, h, w, c = x.shape
                x = jax.image.resize(x, (n, 2 * h, 2 * w, c), jax.image.ResizeMethod.NEAREST)
        x = nn.LayerNorm(dtype=self.dtype)(x)
        return nn.Dense(self.out_dim, dtype=jnp.float32)(x)


def argmax(x: jax.Array) -> jax.Array:
    """`jnp.argmax(x, axis=-1)` as int32, computed as two plain reductions: the maximum, then the first index holding
    it, or the first NaN in a row holding one, as `jnp.argmax` takes. Same result, ties and NaN included.

    x: (..., K) float -> (...) int32. XLA's CPU backend runs `jnp.argmax`'s paired (value, index) reduction far
    below memory speed: on the MazeLab decoder's logits, 4 x 31 x 16 x 16 x 512 with a log-softmax beside it, 38 ms
    against 18 ms for this (docs/training.md, "The decoder's logits").
    """
    # NaN is tested on its own: the CPU backend's fused maximum of a large array can skip NaN.
    nan = jnp.isnan(x)
    top = jnp.max(x, axis=-1, keepdims=True)
    holds = jnp.where(jnp.any(nan, axis=-1, keepdims=True), nan, x == top)
    return jnp.min(jnp.where(holds, jnp.arange(x.shape[-1], dtype=jnp.int32), x.shape[-1]), axis=-1)


def at_targets(values: jax.Array, targets: jax.Array) -> jax.Array:
    """values[..., targets]: (..., K), (...) int in [0, K) -> (...), e.g. each target code's logit."""
    return jnp.take_along_axis(values, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-6) -> jax.Array:
    """x / max(||x||, eps) along `axis`."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), eps)


def code_perplexity(indices: jax.Array, num_codes: int) -> jax.Array:
    """exp(entropy) of the empirical code distribution. indices: any shape int -> () float32 in [1, num_codes]."""
    counts = jnp.zeros((num_codes,), jnp.float32).at[indices.reshape(-1)].add(1.0)
    probs = counts / indices.size
    return jnp.exp(-jnp.sum(probs * jnp.log(probs + 1e-10)))


class Codebook(nn.Module):
    """The learned latent codebook (TECO's): cosine-similarity vector quantisation in a small projected space.

    The input is projected to `proj_dim`, L2-normalised and matched to the nearest of `num_codes` normalised code
    vectors; the chosen code is projected back to `latent_dim`. Gradients pass straight through the quantisation.
    Losses (VQ-VAE, van den Oord et al. 2017), means over every element:
        codebook   = ||sg(z) - q||^2 / 2            (moves the codes)
        commitment = commitment_cost * ||z - sg(q)||^2 / 2   (keeps the encoder near its codes)
    """
    num_codes: int
    proj_dim: int
    latent_dim: int
    commitment_cost: float = 0.25

    def setup(self):
        self.codes = self.param("codes", nn.initializers.normal(stddev=0.02), (self.num_codes, self.proj_dim),
                                jnp.float32)
        self.proj_in = nn.Dense(self.proj_dim, use_bias=False)
        self.proj_out = nn.Dense(self.latent_dim, use_bias=False)

    def __call__(self, z: jax.Array) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
        """z: (..., latent_dim) -> (quantised (..., latent_dim) float32 straight-through, indices (...) int32,
        dict(codebook_loss, commitment_loss, code_perplexity) of () float32)."""
        codes = l2_normalize(self.codes)
        z_proj = l2_normalize(self.proj_in(z.astype(jnp.float32)))
        similarity = jnp.einsum("...d,kd->...k", z_proj, codes)
        indices = argmax(similarity)  # nearest: ||a-b||^2 = 2 - 2 a.b on the sphere
        quantised = codes[indices]
        codebook_loss = 0.5 * jnp.mean(jnp.square(jax.lax.stop_gradient(z_proj) - quantised))
        commitment_loss = self.commitment_cost * 0.5 * jnp.mean(
            jnp.square(z_proj - jax.lax.stop_gradient(quantised)))
        straight_through = z_proj + jax.lax.stop_gradient(quantised - z_proj)
        terms = dict(codebook_loss=codebook_loss, commitment_loss=commitment_loss,
                     code_perplexity=code_perplexity(indices, self.num_codes))
        return self.proj_out(straight_through), indices, terms

    def lookup(self, indices: jax.Array) -> jax.Array:
        """indices: (...) int -> latent vectors (..., latent_dim) float32, as `__call__` outputs them."""
        return self.proj_out(l2_normalize(self.codes)[indices])
