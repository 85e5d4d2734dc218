"""The one diagonal linear scan shared by the S5, ConvS5 and ConvT3 backbones.

Computes every state of the elementwise recurrence

    x_k = decay * x_{k-1} + b_k,        k = 0 .. L-1,   x_{-1} = x0 (zeros when absent)

where `decay` broadcasts against one step of `b`: shape (P,) for S5 and ConvS5, (H, W, P) for ConvT3.
Three interchangeable implementations compute the same states:

- ``associative``: `lax.associative_scan` with the binary operator of ConvS5's Listing 1, O(log L) depth;
- ``sequential``: `lax.scan`, one step after another (also the memory-lean choice);
- ``fft``: each state channel as a causal convolution over time with kernel decay**m, by FFT (as eSSM computes LTI
  SSMs), O(L log L);

and `step` advances one state for generation. Mode ``auto`` (the backbones' default) picks by backend: sequential on
CPU, where it is 4-20% faster than the associative scan at the ConvSSM core's shapes up to 128 frames (slower at
512; docs/backbones.md), associative elsewhere, the parallel mode of the ConvS5 and S5 releases.
"""
from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

Mode = Literal["auto", "associative", "sequential", "fft"]
MODES = ("associative", "sequential", "fft")  # the implementations; "auto" names one of them


def resolve(mode: str) -> str:
    """The implementation `mode` names: itself, or for 'auto' 'sequential' on the CPU backend and 'associative'
    on any other. Raises ValueError for an unknown mode."""
    if mode == "auto":
        return "sequential" if jax.default_backend() == "cpu" else "associative"
    if mode not in MODES:
        raise ValueError(f"unknown scan mode {mode!r}; valid modes: auto, {', '.join(MODES)}")
    return mode


def step(decay: jax.Array, x: jax.Array, b: jax.Array) -> jax.Array:
    """One update `decay * x + b`. x, b: (B, *S); decay broadcasts against S."""
    return decay * x + b


def scan(decay: jax.Array, b: jax.Array, x0: jax.Array | None = None, *, mode: Mode = "auto") -> jax.Array:
    """All states of `x_k = decay * x_{k-1} + b_k`.

    Args:
      decay: (*D,) complex or real, broadcastable against S (e.g. (P,) or (H, W, P)).
      b: (B, L, *S) inputs, time on axis 1.
      x0: optional (B, *S) state before the first step.
      mode: 'auto', 'associative', 'sequential' or 'fft' (`resolve`).

    Returns:
      (B, L, *S) states x_0 .. x_{L-1}, dtype of `decay * b`.
    """
    mode = resolve(mode)
    dtype = jnp.result_type(decay, b)
    b = jnp.asarray(b, dtype)
    decay = jnp.asarray(decay, dtype)
    if b.shape[1] == 1:  # generation: one frame at a time
        x = jnp.zeros_like(b[:, 0]) if x0 is None else jnp.asarray(x0, dtype)
        return step(decay, x, b[:, 0])[:, None]
    if x0 is not None:
        b = b.at[:, 0].add(decay * x0.astype(dtype))
    if mode == "associative":
        return _associative(decay, b)
    if mode == "sequential":
        return _sequential(decay, b)
    return _fft(decay, b)


def _binary_operator(q_i, q_j):
    """Combines scan elements (A_i, Bu_i) then (A_j, Bu_j) into (A_j A_i, A_j Bu_i + Bu_j) (ConvS5 Listing 1)."""
    a_i, bu_i = q_i
    a_j, bu_j = q_j
    return a_j * a_i, a_j * bu_i + bu_j


def _associative(decay: jax.Array, b: jax.Array) -> jax.Array:
    length, state_rank = b.shape[1], b.ndim - 2
    # decay repeated over time, shaped to broadcast against b: (1, L, 1.., *D)
    a = jnp.broadcast_to(decay, (length,) + decay.shape)
    a = a.reshape((1, length) + (1,) * (state_rank - decay.ndim) + decay.shape)
    _, xs = jax.lax.associative_scan(_binary_operator, (a, b), axis=1)
    return xs


def _sequential(decay: jax.Array, b: jax.Array) -> jax.Array:
    def body(x, b_k):
        x = step(decay, x, b_k)
        return x, x

    _, xs = jax.lax.scan(body, jnp.zeros_like(b[:, 0]), jnp.moveaxis(b, 1, 0))
    return jnp.moveaxis(xs, 0, 1)


def _fft(decay: jax.Array, b: jax.Array) -> jax.Array:
    length, state_rank = b.shape[1], b.ndim - 2
    n = 2 * length  # zero padding makes the circular convolution causal
    powers = jnp.arange(length).reshape((length,) + (1,) * decay.ndim).astype(decay.dtype)
    kernel = jnp.power(decay[None], powers)  # decay**m, m = 0 .. L-1
    kernel = kernel.reshape((1, length) + (1,) * (state_rank - decay.ndim) + decay.shape)
    complex_dtype = jnp.result_type(decay.dtype, jnp.complex64)
    spectrum = jnp.fft.fft(b.astype(complex_dtype), n=n, axis=1) * jnp.fft.fft(kernel.astype(complex_dtype), n=n, axis=1)
    xs = jnp.fft.ifft(spectrum, axis=1)[:, :length]
    return xs if jnp.iscomplexobj(b) else xs.real.astype(b.dtype)
