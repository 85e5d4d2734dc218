"""The taming-transformers VQGAN in Flax linen, with the parameter tree of TECO's published checkpoints.

Variables of `VQGAN`:
  params/encoder, params/decoder       `Encoder` / `Decoder` below; children auto-named by class and creation index
  params/quant_conv                    1x1 conv z_channels -> embed_dim
  params/post_quant_conv               1x1 conv embed_dim -> z_channels
  stats/quantize/embeddings            the codebook, (n_embed, embed_dim) float32

Frames are NHWC float in [-1, 1]. Latent size = resolution / 2**(len(ch_mult) - 1).
Architecture after Esser et al., "Taming Transformers for High-Resolution Image Synthesis" (CompVis
taming-transformers, MIT licence), in the layout of the Flax conversion published with TECO (Yan et al. 2022).
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

_PAD1 = ((1, 1), (1, 1))


def swish(x: Array) -> Array:
    return x * jax.nn.sigmoid(x)


def _norm(num_groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=num_groups, epsilon=1e-6)


class ResnetBlock(nn.Module):
    """GroupNorm, swish, conv3x3, GroupNorm, swish, dropout, conv3x3; 1x1 conv shortcut when channels change."""

    out_channels: int
    dropout: float = 0.0
    num_groups: int = 32

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        h = swish(_norm(self.num_groups)(x))
        h = nn.Conv(self.out_channels, (3, 3), padding=_PAD1)(h)
        h = swish(_norm(self.num_groups)(h))
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        h = nn.Conv(self.out_channels, (3, 3), padding=_PAD1)(h)
        if x.shape[-1] != self.out_channels:
            x = nn.Conv(self.out_channels, (1, 1))(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions with a residual connection."""

    num_groups: int = 32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        n, hh, ww, c = x.shape
        h = _norm(self.num_groups)(x)
        q = nn.Conv(c, (1, 1))(h).reshape(n, hh * ww, c)
        k = nn.Conv(c, (1, 1))(h).reshape(n, hh * ww, c)
        v = nn.Conv(c, (1, 1))(h).reshape(n, hh * ww, c)
        w = jnp.einsum('bqc,bkc->bqk', q, k) * (c ** -0.5)
        w = jax.nn.softmax(w, axis=-1)
        h = jnp.einsum('bqk,bkc->bqc', w, v).reshape(n, hh, ww, c)
        return x + nn.Conv(c, (1, 1))(h)


class Downsample(nn.Module):
    """Zero-pad bottom and right by one pixel, then conv3x3 stride 2 without padding: (N,H,W,C) -> (N,H/2,W/2,C)."""

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return nn.Conv(x.shape[-1], (3, 3), strides=(2, 2), padding='VALID')(x)


class Upsample(nn.Module):
    """Nearest-neighbour resize by 2, then conv3x3: (N,H,W,C) -> (N,2H,2W,C)."""

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return nn.Conv(x.shape[-1], (3, 3), padding=_PAD1)(x)


class Encoder(nn.Module):
    """Frames (N, H, W, 3) -> latents (N, H/2**(L-1), W/2**(L-1), z_channels)."""

    ch: int
    ch_mult: Sequence[int]
    num_res_blocks: int
    attn_resolutions: Sequence[int]
    z_channels: int
    resolution: int
    dropout: float = 0.0
    num_groups: int = 32

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        res = self.resolution
        h = nn.Conv(self.ch, (3, 3), padding=_PAD1)(x)
        for level, mult in enumerate(self.ch_mult):
            for _ in range(self.num_res_blocks):
                h = ResnetBlock(self.ch * mult, self.dropout, self.num_groups)(h, deterministic)
                if res in self.attn_resolutions:
                    h = AttnBlock(self.num_groups)(h)
            if level != len(self.ch_mult) - 1:
                h = Downsample()(h)
                res //= 2
        channels = self.ch * self.ch_mult[-1]
        h = ResnetBlock(channels, self.dropout, self.num_groups)(h, deterministic)
        h = AttnBlock(self.num_groups)(h)
        h = ResnetBlock(channels, self.dropout, self.num_groups)(h, deterministic)
        h = swish(_norm(self.num_groups)(h))
        return nn.Conv(self.z_channels, (3, 3), padding=_PAD1)(h)


class Decoder(nn.Module):
    """Latents (N, h, w, z_channels) -> frames (N, h*2**(L-1), w*2**(L-1), 3), unclipped."""

    ch: int
    ch_mult: Sequence[int]
    num_res_blocks: int
    attn_resolutions: Sequence[int]
    resolution: int
    dropout: float = 0.0
    num_groups: int = 32
    out_channels: int = 3

    @nn.compact
    def __call__(self, z: Array, deterministic: bool = True) -> Array:
        res = self.resolution // 2 ** (len(self.ch_mult) - 1)
        channels = self.ch * self.ch_mult[-1]
        h = nn.Conv(channels, (3, 3), padding=_PAD1)(z)
        h = ResnetBlock(channels, self.dropout, self.num_groups)(h, deterministic)
        h = AttnBlock(self.num_groups)(h)
        h = ResnetBlock(channels, self.dropout, self.num_groups)(h, deterministic)
        for level in reversed(range(len(self.ch_mult))):
            for _ in range(self.num_res_blocks + 1):
                h = ResnetBlock(self.ch * self.ch_mult[level], self.dropout, self.num_groups)(h, deterministic)
                if res in self.attn_resolutions:
                    h = AttnBlock(self.num_groups)(h)
            if level != 0:
                h = Upsample()(h)
                res *= 2
        h = swish(_norm(self.num_groups)(h))
        return nn.Conv(self.out_channels, (3, 3), padding=_PAD1)(h)


def nearest_codes(latents: Array, codebook: Array) -> Array:
    """Index of the nearest codebook row by squared L2 distance.

    latents: (..., D) float; codebook: (K, D) float -> (...) int32.
    """
    flat = latents.reshape(-1, latents.shape[-1])
    dist = (jnp.sum(flat ** 2, axis=1, keepdims=True)
            - 2.0 * flat @ codebook.T
            + jnp.sum(codebook ** 2, axis=1)[None, :])
    return jnp.argmin(dist, axis=1).astype(jnp.int32).reshape(latents.shape[:-1])


class VectorQuantizer(nn.Module):
    """Holds the codebook in the `stats` collection (as TECO's checkpoints do), shape (n_embed, embed_dim)."""

    n_embed: int
    embed_dim: int

    def setup(self):
        init_scale = 1.0 / self.n_embed
        self.embeddings = self.variable(
            'stats', 'embeddings',
            lambda: jax.random.uniform(self.make_rng('params'), (self.n_embed, self.embed_dim),
                                       jnp.float32, -init_scale, init_scale))

    def codebook(self) -> Array:
        return self.embeddings.value

    def __call__(self, latents: Array) -> tuple[Array, Array]:
        """latents (..., D) -> (code vectors (..., D), codes (...) int32)."""
        codebook = self.embeddings.value
        codes = nearest_codes(latents, codebook)
        return jnp.take(codebook, codes, axis=0), codes


class VQGAN(nn.Module):
    """Encoder -> quant_conv -> nearest code -> post_quant_conv -> decoder; fields mirror TECO's `args`."""

    ch: int = 128
    ch_mult: Sequence[int] = (1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: Sequence[int] = (16,)
    z_channels: int = 256
    resolution: int = 64
    n_embed: int = 1024
    embed_dim: int = 256
    dropout: float = 0.0
    num_groups: int = 32

    def setup(self):
        self.encoder = Encoder(self.ch, tuple(self.ch_mult), self.num_res_blocks, tuple(self.attn_resolutions),
                               self.z_channels, self.resolution, self.dropout, self.num_groups)
        self.decoder = Decoder(self.ch, tuple(self.ch_mult), self.num_res_blocks, tuple(self.attn_resolutions),
                               self.resolution, self.dropout, self.num_groups)
        self.quant_conv = nn.Conv(self.embed_dim, (1, 1))
        self.post_quant_conv = nn.Conv(self.z_channels, (1, 1))
        self.quantize = VectorQuantizer(self.n_embed, self.embed_dim)

    @property
    def latent_size(self) -> int:
        return self.resolution // 2 ** (len(self.ch_mult) - 1)

    def initialize(self, frames: Array) -> Array:
        """Creates every variable in TECO's order (encoder, decoder, quant_conv, post_quant_conv, codebook).

        Use as `model.init(rng, frames, method=VQGAN.initialize)`; frames (N, H, W, 3).
        """
        s = self.latent_size
        h = self.encoder(frames)
        out = self.decoder(jnp.zeros((frames.shape[0], s, s, self.z_channels), frames.dtype))
        self.quant_conv(h)
        self.post_quant_conv(jnp.zeros((frames.shape[0], s, s, self.embed_dim), frames.dtype))
        self.quantize.codebook()
        return out

    def encode_latents(self, frames: Array, deterministic: bool = True) -> Array:
        """frames (N, H, W, 3) in [-1, 1] -> continuous pre-quantisation latents (N, h, w, embed_dim)."""
        return self.quant_conv(self.encoder(frames, deterministic))

    def encode(self, frames: Array, deterministic: bool = True) -> tuple[Array, Array]:
        """frames (N, H, W, 3) -> (code vectors (N, h, w, embed_dim) float32, codes (N, h, w) int32)."""
        return self.quantize(self.encode_latents(frames, deterministic))

    def lookup(self, codes: Array) -> Array:
        """codes (...) int -> codebook rows (..., embed_dim)."""
        return jnp.take(self.quantize.codebook(), codes, axis=0)

    def decode(self, quantized: Array, deterministic: bool = True) -> Array:
        """code vectors (N, h, w, embed_dim) -> frames (N, H, W, 3), unclipped."""
        return self.decoder(self.post_quant_conv(quantized), deterministic)

    def decode_codes(self, codes: Array) -> Array:
        """codes (N, h, w) int -> frames (N, H, W, 3), unclipped."""
        return self.decode(self.lookup(codes))

    def __call__(self, frames: Array, deterministic: bool = True) -> tuple[Array, dict[str, Any]]:
        """Training forward pass with the straight-through estimator.

        frames (N, H, W, 3) -> (reconstruction (N, H, W, 3) unclipped,
        {'latents': (N,h,w,D) encoder output, 'quantized': (N,h,w,D) code vectors, 'codes': (N,h,w) int32}).
        """
        latents = self.encode_latents(frames, deterministic)
        quantized, codes = self.quantize(latents)
        straight = latents + jax.lax.stop_gradient(quantized - latents)
        recon = self.decode(straight, deterministic)
        return recon, {'latents': latents, 'quantized': quantized, 'codes': codes}


def model_fields(args: Any, source: str) -> dict[str, Any]:
    """The VQGAN fields from a TECO `args` Namespace or a mapping; `source` names it in errors.

    Raises ValueError naming `source` and the field when a needed field is missing or malformed.
    """
    get = (lambda k: args[k]) if isinstance(args, dict) else (lambda k: getattr(args, k))
    has = (lambda k: k in args) if isinstance(args, dict) else (lambda k: hasattr(args, k))
    fields: dict[str, Any] = {}
    for key, kind in (('resolution', int), ('ch', int), ('ch_mult', tuple), ('num_res_blocks', int),
                      ('attn_resolutions', tuple), ('z_channels', int), ('n_embed', int), ('embed_dim', int),
                      ('dropout', float)):
        if not has(key):
            if key == 'dropout':
                fields[key] = 0.0
                continue
            raise ValueError(f'{source}: missing field {key!r} needed to build the VQGAN')
        value = get(key)
        try:
            if kind is tuple:
                value = tuple(int(v) for v in value)
            elif kind is int:
                if isinstance(value, bool) or int(value) != value:
                    raise TypeError
                value = int(value)
            else:
                value = float(value)
        except (TypeError, ValueError):
            raise ValueError(f'{source}: field {key!r} has an invalid value {value!r}') from None
        fields[key] = value
    if has('double_z') and get('double_z'):
        raise ValueError(f'{source}: field double_z=True is not supported (TECO VQGANs use double_z=False)')
    if has('num_groups'):
        fields['num_groups'] = int(get('num_groups'))
    if not fields['ch_mult'] or min(fields['ch_mult']) < 1 or fields['ch'] < 1:
        raise ValueError(f'{source}: fields ch/ch_mult must be positive, got {fields["ch"]}, {fields["ch_mult"]}')
    if fields['resolution'] % 2 ** (len(fields['ch_mult']) - 1):
        raise ValueError(f'{source}: field resolution={fields["resolution"]} is not divisible by '
                         f'2**(len(ch_mult)-1)={2 ** (len(fields["ch_mult"]) - 1)}')
    return fields


@functools.lru_cache(maxsize=16)
def _traced_variables(model: VQGAN) -> dict[str, Any]:
    frames = jax.ShapeDtypeStruct((1, model.resolution, model.resolution, 3), jnp.float32)
    return jax.eval_shape(lambda r, x: model.init(r, x, method=VQGAN.initialize), jax.random.key(0), frames)


def abstract_variables(model: VQGAN) -> dict[str, Any]:
    """Shapes and dtypes of `model`'s variables ({'params', 'stats'}), without allocating them.

    Tracing the model takes seconds on a CPU, so the result is remembered per model (modules are frozen and
    compare by their fields); each call returns a fresh copy of the nested dicts.
    """
    return jax.tree_util.tree_map(lambda leaf: leaf, _traced_variables(model))


def host_init(abstract: Any, seed: int, codebook_scale: float | None = None) -> Any:
    """Draws values for an abstract variable tree on the host with Flax's default initialisers.

    Conv/Dense `kernel` (..., in, out): LeCun normal (normal truncated at 2 std, variance 1 / fan_in);
    `bias`: zeros; GroupNorm `scale`: ones; `embeddings` (K, D): uniform(-1/K, 1/K) (or +-codebook_scale).
    The same distributions as `module.init`, without compiling a random-number kernel per parameter (which
    takes minutes on a CPU).
    """
    rng = np.random.default_rng(seed)

    def draw(path: tuple[Any, ...], leaf: Any) -> jax.Array:
        name = str(getattr(path[-1], 'key', path[-1]))
        shape = tuple(leaf.shape)
        if name == 'kernel':
            fan_in = int(np.prod(shape[:-1]))
            values = rng.standard_normal(shape)
            bad = np.abs(values) > 2.0
            while bad.any():
                values[bad] = rng.standard_normal(int(bad.sum()))
                bad = np.abs(values) > 2.0
            values *= np.sqrt(1.0 / fan_in) / 0.87962566103423978
        elif name == 'bias':
            values = np.zeros(shape)
        elif name == 'scale':
            values = np.ones(shape)
        elif name == 'embeddings':
            limit = codebook_scale if codebook_scale is not None else 1.0 / shape[0]
            values = rng.uniform(-limit, limit, shape)
        else:
            raise ValueError(f'host_init: no initialiser for variable {"/".join(map(str, path))}')
        return jnp.asarray(values, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, abstract)


def init_variables(model: VQGAN, seed: int = 0) -> dict[str, Any]:
    """Random variables {'params', 'stats'} of `model` (see `host_init`)."""
    return host_init(abstract_variables(model), seed)
