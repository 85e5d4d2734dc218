"""TECO's temporal transformer as a backbone (Yan et al. 2022; ConvS5 paper Appendix D.5, Table 20).

What it computes follows the TECO release (teco/models/teco.py `temporal_transformer`, teco/models/transformer.py
`Transformer` with pos_embed_type='sinusoidal'; the ConvS5 release's teco_transformer.py uses the same modules):

1. `tokenize`: a bias-free strided convolution cuts each latent frame (H, W, C) into N = (H/downsample) x
   (W/downsample) tokens of `embed_dim` channels (TECO's z_proj).
2. With `start_token` (TECO's sos), a learned frame of N tokens is put before the first frame of a sequence, at
   time 0; the frames of the sequence then sit at times 1, 2, ...
3. `project`: a Dense layer with bias on every token (the Transformer's input projection, `use_fc_in`).
4. The tokens of all frames are flattened frame-major and token p = N * time + n (n the token's place in its
   frame) gets the sinusoidal embedding of p: positions run over all tokens, not over frames only.
5. `n_layers` pre-LayerNorm blocks: x + Dropout(Attn(LN(x))), then x + Dropout(MLP(LN(x))); attention with
   biased query, key, value and output maps, logits scaled by head_dim ** -0.5, dropout (`attention_dropout`) on
   the attention weights; MLP Dense(mlp_dim), x * sigmoid(1.702 x), dropout shared over the tokens of a sequence,
   Dense(embed_dim). LayerNorm epsilon 1e-6 everywhere.
6. A head: Dense(embed_dim), GELU (tanh form), LayerNorm, dropout; the start frame's outputs are dropped.
7. `untokenize`: a bias-free transposed convolution back to (H, W, d_model) (TECO's z_unproj), in the compute
   dtype; the output is then cast to float32, as every backbone returns float32 frames.

TECO attends block-causally over its whole training sequence (the start frame and 299 inputs). Here attention is
block-causal over frames with a sliding window of `max_len` frames, the start frame counting as one: every token of
frame t attends to every token of frames t - max_len + 1 .. t, in both modes. With max_len = 300 a 299-frame
training sequence is TECO's computation exactly. Keys and values of earlier frames are kept in a ring buffer of
`max_len` frames per layer, so

* the parallel call over T frames without a state equals `init_state` (which already holds the start frame)
  followed by T calls of `step`, for any T, also T > max_len; the parallel call with a state adds no start frame;
* splitting a sequence into two parallel calls, the second given the first one's final state, equals one call;
* `step` attends to one frame's queries against `max_len + 1` frames of keys: the cost of a generated frame and
  the memory of the state do not grow with the rollout length (1,000+ frame rollouts run at constant memory).

With `n_layers` layers, an output depends on the last `n_layers * (max_len - 1) + 1` frames. Positions are
absolute, so frames beyond the training length use sinusoid phases the model has not seen in training.

Differences from the release: logits and softmax are computed in float32 for any compute dtype, and keys outside
the window get a logit of -1e30 instead of a bias of -1e10 (both give exactly zero weight in float32).

The state is a list with one dict per layer:
    key, value: (B, max_len, N, num_heads, embed_dim // num_heads) in the compute dtype; ring slot j holds the
        most recent frame s < time with s = j (mod max_len);
    time: () int32, the absolute index of the next frame (the frames seen so far, the start frame included).
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

_FILE = "teco_ssm/backbones/transformer.py"
_MASKED = -1e30  # logit of a key outside the window; exp underflows to exactly 0 in float32
_LAYER_NORM_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class TransformerSettings:
    """Defaults: TECO-Transformer on DMLab (ConvS5 paper Table 20, TECO release `configs/dmlab.yaml`).

      d_model      width of the output frames: TECO's embedding_dim (the latent width, 64 on DMLab)
      n_layers     transformer blocks
      dropout      rate after the embedding, the attention, the MLP and the head (training only)
      attention_dropout  rate on the attention weights (training only)
      downsample   kernel and stride of the frame-to-token convolution; must divide the latent height and width
      embed_dim, mlp_dim, num_heads  token width, MLP width and heads (embed_dim even and divisible by num_heads)
      max_len      attention window in frames, the start frame included (the training length: 300 frames)
      start_token  TECO's learned start frame (on in every config, as the release)
      remat        recompute each block in the backward pass
      dtype        compute dtype name ('float32', 'bfloat16'); parameters are always float32

    Raises ValueError naming the field for a value outside these ranges.
    """

    d_model: int = 64
    n_layers: int = 8
    dropout: float = 0.0
    attention_dropout: float = 0.0
    downsample: int = 8
    embed_dim: int = 1024
    mlp_dim: int = 4096
    num_heads: int = 16
    max_len: int = 300
    start_token: bool = True
    remat: bool = False
    dtype: str = "float32"

    def __post_init__(self):
        for field in ("d_model", "n_layers", "downsample", "embed_dim", "mlp_dim", "num_heads", "max_len"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{_FILE}: field {field} must be a positive int, got {value!r}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"{_FILE}: field embed_dim={self.embed_dim} must be divisible by "
                             f"num_heads={self.num_heads}")
        if self.embed_dim % 2:
            raise ValueError(f"{_FILE}: field embed_dim={self.embed_dim} must be even (sinusoidal positions)")
        for field in ("dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, field) < 1.0:
                raise ValueError(f"{_FILE}: field {field} must lie in [0, 1), got {getattr(self, field)!r}")
        if not isinstance(self.start_token, bool):
            raise ValueError(f"{_FILE}: field start_token must be a bool, got {self.start_token!r}")
        self.compute_dtype  # raises for a name that is not a floating dtype

    @property
    def compute_dtype(self) -> jnp.dtype:
        """`dtype` as a jnp dtype; ValueError unless it names a floating dtype."""
        try:
            dtype = jnp.dtype(self.dtype)
        except TypeError as error:
            raise ValueError(f"{_FILE}: field dtype={self.dtype!r} is not a dtype name") from error
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"{_FILE}: field dtype={self.dtype!r} must be a floating dtype")
        return dtype


Settings = TransformerSettings


def sinusoidal_embedding(positions: jax.Array, dim: int) -> jax.Array:
    """Sinusoidal embedding of token positions, TECO's `SinusoidalPositionBiases` layout.

    positions: (...) integer  ->  (..., dim) float32, [sin(p w_0..w_{dim/2-1}), cos(p w_0..w_{dim/2-1})] with
    w_i = 10000 ** (-2 i / dim). Valid for any p >= 0.
    """
    inv_freq = 1.0 / (10000.0 ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def cache_slot_times(next_time: jax.Array, max_len: int) -> jax.Array:
    """Absolute frame index held by each ring-buffer slot once frames 0 .. next_time - 1 were written.

    next_time: () int  ->  (max_len,) int32; slot j holds frame next_time - 1 - ((next_time - 1 - j) mod max_len),
    negative for a slot never written.
    """
    last = jnp.asarray(next_time, jnp.int32) - 1
    return last - jnp.mod(last - jnp.arange(max_len, dtype=jnp.int32), max_len)


def window_mask(first_time: jax.Array, num_frames: int, max_len: int, tokens_per_frame: int,
                with_cache: bool) -> jax.Array:
    """Block-causal sliding-window mask: a token of frame t sees every token of frames s, t - max_len < s <= t.

    first_time: () int, absolute index of the first of `num_frames` new frames. Keys are the ring-buffer cache
    (when `with_cache`, max_len frames, slot order) followed by the new frames.
    Returns (num_frames * N, (max_len * N if with_cache else 0) + num_frames * N) bool, N = tokens_per_frame,
    frame-major token order.
    """
    query_times = jnp.asarray(first_time, jnp.int32) + jnp.arange(num_frames, dtype=jnp.int32)
    key_times = query_times
    if with_cache:
        key_times = jnp.concatenate([cache_slot_times(first_time, max_len), query_times])
    q, k = query_times[:, None], key_times[None, :]
    frame_mask = (k >= 0) & (k <= q) & (k > q - max_len)
    return jnp.repeat(jnp.repeat(frame_mask, tokens_per_frame, axis=0), tokens_per_frame, axis=1)


def attention_weights(query: jax.Array, key: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax attention weights with a boolean mask; logits and softmax in float32.

    query: (B, Lq, heads, D); key: (B, Lk, heads, D); mask: (Lq, Lk) bool, at least one True per row.
    Returns (B, heads, Lq, Lk) float32, softmax over Lk of q.k / sqrt(D) where the mask holds, exactly 0 elsewhere.
    """
    logits = jnp.einsum("bqhd,bkhd->bhqk", query, key, preferred_element_type=jnp.float32)
    logits = jnp.where(mask, logits * query.shape[-1] ** -0.5, _MASKED)
    return jax.nn.softmax(logits, axis=-1)


def write_cache(cache: jax.Array, new: jax.Array, first_time: jax.Array) -> jax.Array:
    """Writes the last min(T, max_len) of T new frames into the ring buffer, frame s into slot s mod max_len.

    cache: (B, max_len, N, heads, D); new: (B, T, N, heads, D) of frames first_time .. first_time + T - 1.
    Returns the updated cache, same shape and dtype.
    """
    max_len, num_new = cache.shape[1], new.shape[1]
    kept = min(num_new, max_len)
    slots = jnp.mod(jnp.asarray(first_time, jnp.int32) + num_new - kept + jnp.arange(kept, dtype=jnp.int32),
                    max_len)
    return cache.at[:, slots].set(new[:, num_new - kept:].astype(cache.dtype))


def quick_gelu(x: jax.Array) -> jax.Array:
    """x * sigmoid(1.702 x), the GELU approximation of TECO's MLP blocks (`gelu2`)."""
    return x * nn.sigmoid(1.702 * x)


class TransformerLayer(nn.Module):
    """One pre-LayerNorm block: x + Attn(LN(x)), then x + MLP(LN(x)) (TECO's TransformerLayer, MultiHeadAttention
    and MlpBlock in teco/models/transformer.py)."""
    embed_dim: int
    num_heads: int
    mlp_dim: int
    dropout: float
    attention_dropout: float
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array, past_key: jax.Array | None, past_value: jax.Array | None,
                 mask: jax.Array, train: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x: (B, L, E) tokens; past_key, past_value: (B, P, heads, D) cached keys/values or None;
        mask: (L, P + L) bool over [past, new] keys. Returns (y (B, L, E), key, value (B, L, heads, D))."""
        head_dim = self.embed_dim // self.num_heads
        attention_init = nn.initializers.variance_scaling(1.0, "fan_in", "normal")
        projection = partial(nn.DenseGeneral, features=(self.num_heads, head_dim), dtype=self.dtype,
                             kernel_init=attention_init)
        dropout = partial(nn.Dropout, rate=self.dropout, deterministic=not train)

        h = nn.LayerNorm(epsilon=_LAYER_NORM_EPS, dtype=self.dtype, name="attention_norm")(x)
        query = projection(name="query")(h)
        key = projection(name="key")(h)
        value = projection(name="value")(h)
        keys, values = key, value
        if past_key is not None:
            keys = jnp.concatenate([past_key.astype(key.dtype), key], axis=1)
            values = jnp.concatenate([past_value.astype(value.dtype), value], axis=1)
        weights = attention_weights(query, keys, mask)
        # One dropout mask for all examples and heads, as flax's dot_product_attention draws it in TECO.
        weights = nn.Dropout(rate=self.attention_dropout, broadcast_dims=(0, 1),
                             deterministic=not train)(weights)
        h = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(values.dtype), values)
        h = nn.DenseGeneral(self.embed_dim, axis=(-2, -1), dtype=self.dtype, name="attention_out",
                            kernel_init=attention_init)(h)
        x = x + dropout()(h)

        h = nn.LayerNorm(epsilon=_LAYER_NORM_EPS, dtype=self.dtype, name="mlp_norm")(x)
        mlp_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
        h = nn.Dense(self.mlp_dim, dtype=self.dtype, kernel_init=mlp_init, name="mlp_in")(h)
        # The hidden units dropped are the same for every token of a sequence (TECO's broadcast_dims=(-2,)).
        h = dropout(broadcast_dims=(-2,))(quick_gelu(h))
        h = nn.Dense(self.embed_dim, dtype=self.dtype, kernel_init=mlp_init, name="mlp_out")(h)
        return x + dropout()(h), key, value


class _StartToken(nn.Module):
    """TECO's learned start frame (sos): a (rows, cols, E) float32 parameter, N(0, 0.02^2) at initialisation.
    As in the release, it fixes the token grid: another grid raises flax's ScopeParamShapeError."""

    @nn.compact
    def __call__(self, batch: int, rows: int, cols: int, width: int, dtype: Any) -> jax.Array:
        """-> (batch, 1, rows * cols, width) in `dtype`: the start frame's tokens, before the input projection."""
        table = self.param("embedding", nn.initializers.normal(stddev=0.02), (rows, cols, width), jnp.float32)
        return jnp.broadcast_to(table.reshape(1, 1, rows * cols, width), (batch, 1, rows * cols, width)).astype(dtype)


class Backbone(nn.Module):
    """TECO's temporal transformer; see the module docstring for what it computes, the window, the cache and the
    protocol, and `TransformerSettings` for its settings."""
    settings: TransformerSettings = TransformerSettings()

    def setup(self):
        s = self.settings
        compute_dtype = s.compute_dtype
        kernel = (s.downsample, s.downsample)
        self.tokenize = nn.Conv(s.embed_dim, kernel, strides=kernel, padding="VALID", use_bias=False,
                                dtype=compute_dtype)
        self.sos = _StartToken()
        self.project = nn.Dense(s.embed_dim, dtype=compute_dtype)
        self.embed_dropout = nn.Dropout(rate=s.dropout)
        layer = nn.remat(TransformerLayer, static_argnums=(5,)) if s.remat else TransformerLayer
        self.layers = [layer(embed_dim=s.embed_dim, num_heads=s.num_heads, mlp_dim=s.mlp_dim,
                             dropout=s.dropout, attention_dropout=s.attention_dropout, dtype=compute_dtype)
                       for _ in range(s.n_layers)]
        self.head_dense = nn.Dense(s.embed_dim, dtype=compute_dtype)
        self.head_norm = nn.LayerNorm(epsilon=_LAYER_NORM_EPS, dtype=compute_dtype)
        self.head_dropout = nn.Dropout(rate=s.dropout)
        self.untokenize = nn.ConvTranspose(s.d_model, kernel, strides=kernel, padding="VALID", use_bias=False,
                                           dtype=compute_dtype)

    @property
    def output_width(self) -> int:
        """Channels of the output frames: d_model."""
        return self.settings.d_model

    def _token_grid(self, spatial_shape: Sequence[int]) -> tuple[int, int]:
        height, width = (int(s) for s in spatial_shape)
        k = self.settings.downsample
        if height % k or width % k:
            raise ValueError(f"{_FILE}: field downsample={k} must divide the latent height and "
                             f"width, got (H, W) = ({height}, {width})")
        return height // k, width // k

    def _empty_state(self, batch_size: int, tokens_per_frame: int) -> list[dict[str, jax.Array]]:
        s = self.settings
        shape = (batch_size, s.max_len, tokens_per_frame, s.num_heads, s.embed_dim // s.num_heads)
        dtype = self.settings.compute_dtype
        return [dict(key=jnp.zeros(shape, dtype), value=jnp.zeros(shape, dtype), time=jnp.zeros((), jnp.int32))
                for _ in range(self.settings.n_layers)]

    def init_state(self, batch_size: int, spatial_shape: Sequence[int]) -> list[dict[str, jax.Array]]:
        """The state before the first frame of a sequence, for frames of spatial shape (H, W): a list of n_layers
        dicts, see the module docstring. With `start_token` the start frame has been processed (time 1, its keys
        and values in slot 0), which needs the parameters; otherwise the caches are empty (time 0)."""
        rows, cols = self._token_grid(spatial_shape)
        state = self._empty_state(batch_size, rows * cols)
        if not self.settings.start_token:
            return state
        start = self.sos(batch_size, rows, cols, self.settings.embed_dim, self.settings.compute_dtype)
        _, state = self._transform(start, state, with_cache=False, train=False)
        return state

    def _check_state(self, state: list[dict[str, jax.Array]], batch: int, tokens_per_frame: int) -> None:
        if len(state) != self.settings.n_layers:
            raise ValueError(f"{_FILE}: state has {len(state)} entries, field n_layers={self.settings.n_layers}")
        s = self.settings
        expected = (batch, s.max_len, tokens_per_frame, s.num_heads, s.embed_dim // s.num_heads)
        for i, entry in enumerate(state):
            for name in ("key", "value"):
                if tuple(entry[name].shape) != expected:
                    raise ValueError(f"{_FILE}: state[{i}][{name!r}] has shape {tuple(entry[name].shape)}, expected "
                                     f"{expected} (batch, max_len, tokens per frame, num_heads, head dim)")

    def _transform(self, tokens: jax.Array, state: list[dict[str, jax.Array]], with_cache: bool,
                   train: bool) -> tuple[jax.Array, list[dict[str, jax.Array]]]:
        """The transformer proper (steps 3-5 of the module docstring) on frames state['time'] .. + T - 1.

        tokens: (B, T, N, E) in the compute dtype, before the input projection; state: the caches (read only when
        `with_cache`; always written). Returns the last block's output (B, T, N, E) and the state advanced by T.
        """
        batch, num_frames, tokens_per_frame, _ = tokens.shape
        first_time = jnp.asarray(state[0]["time"], jnp.int32)
        h = self.project(tokens)
        times = first_time + jnp.arange(num_frames, dtype=jnp.int32)
        positions = times[:, None] * tokens_per_frame + jnp.arange(tokens_per_frame, dtype=jnp.int32)
        h = h + sinusoidal_embedding(positions, self.settings.embed_dim)[None].astype(h.dtype)
        h = self.embed_dropout(h, deterministic=not train)
        h = h.reshape(batch, num_frames * tokens_per_frame, self.settings.embed_dim)

        mask = window_mask(first_time, num_frames, self.settings.max_len, tokens_per_frame, with_cache=with_cache)
        final_state = []
        for layer, cache in zip(self.layers, state):
            past_key = past_value = None
            if with_cache:
                head_shape = (batch, self.settings.max_len * tokens_per_frame) + cache["key"].shape[3:]
                past_key, past_value = cache["key"].reshape(head_shape), cache["value"].reshape(head_shape)
            h, key, value = layer(h, past_key, past_value, mask, train)
            frame_shape = (batch, num_frames, tokens_per_frame) + key.shape[2:]
            final_state.append(dict(key=write_cache(cache["key"], key.reshape(frame_shape), first_time),
                                    value=write_cache(cache["value"], value.reshape(frame_shape), first_time),
                                    time=first_time + num_frames))
        return h.reshape(batch, num_frames, tokens_per_frame, self.settings.embed_dim), final_state

    def __call__(self, x: jax.Array, state: list[dict[str, jax.Array]] | None = None,
                 train: bool = False) -> tuple[jax.Array, list[dict[str, jax.Array]]]:
        """x: (B, T, H, W, C) float, the frames after those the state has seen (the first frames of a sequence
        without a state: then the start frame goes first when `start_token`).

        Returns y: (B, T, H, W, d_model) float32, and the final state (caches holding the last max_len frames,
        time advanced by T, and by 1 more for the start frame). Dropout, when train and dropout or
        attention_dropout > 0, draws from the 'dropout' rng. Raises ValueError for a non-5D x, a downsample that
        does not divide H and W, or a state of the wrong shape.
        """
        if x.ndim != 5:
            raise ValueError(f"{_FILE}: expected frames (B, T, H, W, C), got shape {x.shape}")
        batch, num_frames, height, width, _ = x.shape
        rows, cols = self._token_grid((height, width))
        tokens_per_frame = rows * cols
        compute_dtype = self.settings.compute_dtype

        tokens = self.tokenize(x.astype(compute_dtype).reshape(batch * num_frames, height, width, -1))
        tokens = tokens.reshape(batch, num_frames, tokens_per_frame, self.settings.embed_dim)
        given_state = state is not None
        if given_state:
            self._check_state(state, batch, tokens_per_frame)
        else:
            state = self._empty_state(batch, tokens_per_frame)
            if self.settings.start_token:
                start = self.sos(batch, rows, cols, self.settings.embed_dim, compute_dtype)
                tokens = jnp.concatenate([start, tokens], axis=1)
        h, final_state = self._transform(tokens, state, with_cache=given_state, train=train)
        h = h[:, h.shape[1] - num_frames:]  # the start frame's outputs are not returned

        h = self.head_norm(nn.gelu(self.head_dense(h)))
        h = self.head_dropout(h, deterministic=not train)
        y = self.untokenize(h.reshape(batch * num_frames, rows, cols, self.settings.embed_dim))
        return y.reshape(batch, num_frames, height, width, self.settings.d_model).astype(jnp.float32), final_state

    def step(self, x_t: jax.Array, state: list[dict[str, jax.Array]]) -> tuple[jax.Array, list[dict[str, jax.Array]]]:
        """One frame x_t: (B, H, W, C) -> (y_t (B, H, W, d_model) float32, state); attends to the cache and the
        frame."""
        if x_t.ndim != 4:
            raise ValueError(f"{_FILE}: step expects one frame (B, H, W, C), got shape {x_t.shape}")
        y, state = self(x_t[:, None], state, train=False)
        return y[:, 0], state
