"""VQGAN training losses (the taming-transformers recipe) and the PatchGAN discriminator.

total generator loss = L1 + perceptual_weight * LPIPS + codebook + beta * commitment
                       + adversarial_factor * adaptive_weight * disc_weight * (-mean D(recon))
with adaptive_weight = |grad_W nll| / (|grad_W adv| + 1e-4) at the decoder's last conv W (Esser et al. 2021, eq. 7).
"""
from __future__ import annotations


import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix NLayerDiscriminator): frames (N, H, W, 3) -> patch logits (N, H/2**L, W/2**L, 1).

    GroupNorm replaces BatchNorm so the discriminator has no mutable statistics.
    """

    ch: int = 64
    num_layers: int = 3
    num_groups: int = 8

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = nn.leaky_relu(nn.Conv(self.ch, (4, 4), strides=(2, 2), padding=((1, 1), (1, 1)))(x), 0.2)
        mult = 1
        for layer in range(1, self.num_layers + 1):
            mult = min(2 ** layer, 8)
            stride = 2 if layer < self.num_layers else 1
            x = nn.Conv(self.ch * mult, (4, 4), strides=(stride, stride), padding=((1, 1), (1, 1)),
                        use_bias=False)(x)
            x = nn.leaky_relu(nn.GroupNorm(num_groups=self.num_groups)(x), 0.2)
        return nn.Conv(1, (4, 4), padding=((1, 1), (1, 1)))(x)


def l1(x: Array, y: Array) -> Array:
    """Mean absolute difference of two (N, H, W, 3) arrays -> scalar."""
    return jnp.mean(jnp.abs(x - y))


def vq_losses(latents: Array, quantized: Array) -> tuple[Array, Array]:
    """(codebook loss |sg(z) - q|^2, commitment loss |z - sg(q)|^2), means over (N, h, w, D) -> scalars."""
    codebook = jnp.mean((jax.lax.stop_gradient(latents) - quantized) ** 2)
    commitment = jnp.mean((latents - jax.lax.stop_gradient(quantized)) ** 2)
    return codebook, commitment


def hinge_d_loss(logits_real: Array, logits_fake: Array) -> Array:
    """Discriminator hinge loss 0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(G(z)))) -> scalar."""
    return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def generator_adv_loss(logits_fake: Array) -> Array:
    """Generator hinge loss -mean D(G(z)) -> scalar."""
    return -jnp.mean(logits_fake)


def adaptive_weight(nll_grad: Array, adv_grad: Array, max_weight: float = 1e4) -> Array:
    """|nll_grad| / (|adv_grad| + 1e-4), clipped to [0, max_weight], without gradient -> scalar."""
    w = jnp.linalg.norm(nll_grad) / (jnp.linalg.norm(adv_grad) + 1e-4)
    return jax.lax.stop_gradient(jnp.clip(w, 0.0, max_weight))


def code_statistics(codes: Array, n_codes: int) -> tuple[Array, Array]:
    """(counts (n_codes,) float32, perplexity scalar = exp(entropy of the code histogram)) of int codes (...)."""
    counts = jnp.zeros(n_codes, jnp.float32).at[codes.reshape(-1)].add(1.0)
    p = counts / jnp.maximum(counts.sum(), 1.0)
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
    return counts, jnp.exp(entropy)


def reinit_dead_codes(codebook: Array, usage: Array, latents: Array, rng: Array, threshold: float = 1.0,
                      noise: float = 0.01) -> tuple[Array, Array]:
    """Replaces codebook rows used fewer than `threshold` times by random encoder outputs.

    codebook (K, D); usage (K,) counts since the last reinit; latents (..., D) encoder outputs of a batch.
    Returns (new codebook (K, D), dead mask (K,) bool).
    """
    flat = latents.reshape(-1, latents.shape[-1])
    k_pick, k_noise = jax.random.split(rng)
    picks = jax.random.randint(k_pick, (codebook.shape[0],), 0, flat.shape[0])
    scale = jnp.std(flat) * noise
    fresh = flat[picks] + scale * jax.random.normal(k_noise, codebook.shape, codebook.dtype)
    dead = usage < threshold
    return jnp.where(dead[:, None], jax.lax.stop_gradient(fresh), codebook), dead


def psnr(x: Array, y: Array) -> Array:
    """PSNR per frame of frames in [-1, 1] (data range of [0, 1] frames): (N, H, W, 3) x2 -> (N,)."""
    mse = jnp.mean(((x - y) / 2.0) ** 2, axis=(-3, -2, -1))
    return -10.0 * jnp.log10(jnp.maximum(mse, 1e-10))


def lpips_term(lpips_params: dict | None, x: Array, y: Array) -> Array:
    """Mean LPIPS of (N, H, W, 3) frame batches in [-1, 1]; 0 when `lpips_params` is None -> scalar."""
    if lpips_params is None:
        return jnp.zeros((), jnp.float32)
    from teco_ssm.lpips import lpips
    return jnp.mean(lpips(lpips_params, x, y))
