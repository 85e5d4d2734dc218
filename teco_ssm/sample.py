"""Long-horizon sampling from a TECO model: one compiled rollout, and the benchmark protocols.

A rollout reads the context in one parallel backbone call (`Teco.condition`) and then generates every frame inside
one `lax.scan` over time (`Teco.generate_step`: a backbone step, MaskGit draft-and-revise, decoding), so a rollout
of any length is one device call with no per-frame host round trip. The carry has fixed shapes: the SSM backbones
continue from their state without limit and the Transformer slides its key/value window, so horizons far beyond the
training length (1,000+ frames) run at constant memory and constant cost per frame. The MaskGit sampler's settings
travel as one `SamplerSettings` value (`maskgit.SamplerSettings`; `SamplerSettings.from_config(config.sampling)`).

Randomness: frame t draws from `jax.random.fold_in(rng, t)` (t the absolute frame index), so a rollout is a pure
function of its rng, and generating in several chunks, or frame by frame from Python, gives the same frames as one
call.

The protocols of the ConvS5 paper (Appendix D.5), `PROTOCOLS`, selectable by name or by explicit numbers
(`resolve_protocol`); a config's `sampling.action_conditioned` and `sampling.unconditioned` blocks are made from them
(`configs/common.py`), and a dataset's config may change their numbers:
  action_conditioned   144 context frames, then 156 generated given past and future actions (PSNR, SSIM, LPIPS)
  unconditioned         36 context frames, then 264 generated without actions (FVD; Minecraft keeps its actions,
                        which its config states in `sampling.unconditioned.use_actions`)

Sampling a dataset into files: `teco_ssm.sample_files` (`sample_dataset`, `sample_workdir`).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

from teco_ssm.maskgit import SamplerSettings
from teco_ssm.teco import Teco

__all__ = ["PROTOCOLS", "Protocol", "SamplerSettings", "generate", "resolve_protocol", "rollout", "sample_frame",
           "teacher_forced"]
_FILE = "teco_ssm/sample.py"
Carry = dict[str, Any]


# ---------------------------------------------------------------------------------------------------- protocols
@dataclasses.dataclass(frozen=True)
class Protocol:
    """Frame arithmetic of one evaluation protocol: `context` given frames, then `horizon` generated ones, with
    the dataset's actions given to the model or not (`use_actions`). Raises ValueError unless context >= 1 and
    horizon >= 0."""
    context: int
    horizon: int
    use_actions: bool

    def __post_init__(self):
        for name, kind in (("context", int), ("horizon", int), ("use_actions", bool)):
            object.__setattr__(self, name, kind(getattr(self, name)))
        if self.context < 1 or self.horizon < 0:
            raise ValueError(f"{_FILE}: protocol needs context >= 1 and horizon >= 0, got context={self.context}, "
                             f"horizon={self.horizon}")

    @classmethod
    def from_config(cls, fields: Mapping[str, Any]) -> "Protocol":
        """The protocol of a config block {context, horizon, use_actions} (e.g. `config.sampling.unconditioned`).
        Raises KeyError naming a missing field, ValueError as above."""
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in fields]
        if missing:
            raise KeyError(f"{_FILE}: the protocol config lacks field(s) {', '.join(missing)}")
        return cls(**{f.name: fields[f.name] for f in dataclasses.fields(cls)})

    @property
    def num_frames(self) -> int:
        """Frames per video, context and generated: the sequence length read from the dataset."""
        return self.context + self.horizon

    @property
    def generated(self) -> slice:
        """The generated frames within a video of `num_frames` frames."""
        return slice(self.context, self.num_frames)


# The ConvS5 paper's protocols (Appendix D.5), the only place their numbers are written.
PROTOCOLS: dict[str, Protocol] = {
    "action_conditioned": Protocol(context=144, horizon=156, use_actions=True),
    "unconditioned": Protocol(context=36, horizon=264, use_actions=False),
}


def resolve_protocol(protocol: str | Protocol | Sequence[Any],
                     sampling_config: Mapping[str, Any] | None = None) -> Protocol:
    """The protocol named or given by numbers.

    protocol: a name of `PROTOCOLS` (taken from `sampling_config[name]` when that config defines it, so a dataset's
      config can shorten it or keep actions, e.g. Minecraft's unconditioned protocol), a `Protocol`, or explicit
      numbers `(context, horizon)` (actions used) or `(context, horizon, use_actions)`.
    Raises ValueError for an unknown name or numbers out of range (context >= 1, horizon >= 0).
    """
    if isinstance(protocol, str):
        if protocol not in PROTOCOLS:
            raise ValueError(f"{_FILE}: unknown protocol {protocol!r}; valid names: {', '.join(PROTOCOLS)}, or "
                             f"explicit numbers (context, horizon[, use_actions])")
        if sampling_config is not None and protocol in sampling_config:
            return Protocol.from_config(sampling_config[protocol])
        return PROTOCOLS[protocol]
    if isinstance(protocol, Protocol):
        return protocol
    numbers = tuple(protocol)
    if len(numbers) not in (2, 3):
        raise ValueError(f"{_FILE}: explicit protocol must be (context, horizon) or (context, horizon, "
                         f"use_actions), got {protocol!r}")
    return Protocol(numbers[0], numbers[1], numbers[2] if len(numbers) == 3 else True)


# ------------------------------------------------------------------------------------------------------ rollout
def sample_frame(model: Teco, variables: Mapping[str, Any], carry: Carry, action: jax.Array | None,
                 rng: jax.Array, settings: SamplerSettings = SamplerSettings()) -> tuple[Carry, jax.Array]:
    """Generates frame carry['time'] with key `fold_in(rng, carry['time'])`.

    carry: from `Teco.condition` or a previous frame; action: (B,) int32 leading into this frame, or None;
    settings: the MaskGit sampler's. Returns (carry, codes (B, H, W) int32). Pure: the scan body of `generate` and
    the per-frame step of a loop.
    """
    key = jax.random.fold_in(rng, carry["time"])
    return model.apply(variables, carry, action, key, method=Teco.generate_step, settings=settings)


def generate(model: Teco, variables: Mapping[str, Any], carry: Carry, actions: jax.Array | None,
             rng: jax.Array, *, horizon: int,
             settings: SamplerSettings = SamplerSettings()) -> tuple[Carry, jax.Array]:
    """`horizon` frames after `carry` in one `lax.scan` (pure; jit it, or call `rollout`).

    actions: (B, horizon) int32, action t leading into the t-th generated frame, or None (no actions).
    settings: the MaskGit sampler's.
    Returns (the carry after the last frame, codes (B, horizon, H, W) int32). Calling it twice, the second time
    with the first call's carry and the following actions, equals one call over both.
    """
    if actions is not None and (actions.ndim != 2 or actions.shape[1] != horizon):
        raise ValueError(f"{_FILE}: expected actions (B, horizon={horizon}), got shape {actions.shape}")

    def body(carry: Carry, action: jax.Array | None) -> tuple[Carry, jax.Array]:
        return sample_frame(model, variables, carry, action, rng, settings)

    xs = None if actions is None else jnp.moveaxis(actions.astype(jnp.int32), 1, 0)
    carry, frames = jax.lax.scan(body, carry, xs, length=horizon)
    return carry, jnp.moveaxis(frames, 0, 1)


@functools.partial(jax.jit, static_argnames=("model", "horizon", "use_actions", "settings"))
def _compiled_rollout(model: Teco, variables: Mapping[str, Any], codes_ctx: jax.Array, actions: jax.Array | None,
                      rng: jax.Array, *, horizon: int, use_actions: bool,
                      settings: SamplerSettings) -> tuple[jax.Array, Carry]:
    context = codes_ctx.shape[1]
    actions_ctx = None if actions is None else actions[:, :context]
    carry = model.apply(variables, codes_ctx, actions_ctx, method=Teco.condition, use_actions=use_actions)
    future = None if actions is None or not use_actions else actions[:, context:]
    carry, frames = generate(model, variables, carry, future, rng, horizon=horizon, settings=settings)
    return jnp.concatenate([codes_ctx.astype(jnp.int32), frames], axis=1), carry


def rollout(model: Teco, variables: Mapping[str, Any], codes_ctx: jax.Array, actions: jax.Array | None,
            rng: jax.Array, *, horizon: int, use_actions: bool = True,
            settings: SamplerSettings = SamplerSettings(),
            return_carry: bool = False) -> jax.Array | tuple[jax.Array, Carry]:
    """Conditions on a context and generates `horizon` frames: one compiled call (cached per shape and setting).

    Args:
      model, variables: the TECO model and its variables.
      codes_ctx: (B, Tc, H, W) int32 context codes, Tc >= model.condition_frames.
      actions: (B, Tc + horizon) int32, action t leading into frame t (context and future), or None.
      rng: key; frame t draws from fold_in(rng, t), so the same rng gives the same rollout.
      horizon: frames to generate (0 returns the context); any length, also beyond the training length.
      use_actions: False conditions and generates without actions (the unconditioned protocol).
      settings: the MaskGit sampler's (`SamplerSettings`; default TECO's), e.g.
        `SamplerSettings.from_config(config.sampling)`.
      return_carry: also return the final carry (backbone state, last latent, time).
    Returns:
      codes (B, Tc + horizon, H, W) int32, the context followed by the generated frames (and the carry).
    Raises ValueError naming the argument on shapes that do not fit.
    """
    codes_ctx = jnp.asarray(codes_ctx)
    if codes_ctx.ndim != 4 or tuple(codes_ctx.shape[2:]) != tuple(model.code_shape):
        raise ValueError(f"{_FILE}: codes_ctx must be (B, Tc, {model.code_shape[0]}, {model.code_shape[1]}) "
                         f"(model field code_shape), got shape {codes_ctx.shape}")
    if codes_ctx.shape[1] < model.condition_frames:
        raise ValueError(f"{_FILE}: codes_ctx has {codes_ctx.shape[1]} frames, the model conditions on "
                         f"condition_frames={model.condition_frames}")
    if horizon < 0:
        raise ValueError(f"{_FILE}: horizon must be >= 0, got {horizon}")
    batch, context = codes_ctx.shape[:2]
    if actions is not None:
        actions = jnp.asarray(actions)
        if tuple(actions.shape) != (batch, context + horizon):
            raise ValueError(f"{_FILE}: actions must be (B, Tc + horizon) = {(batch, context + horizon)}, got "
                             f"shape {actions.shape}")
        actions = actions.astype(jnp.int32)
    if horizon == 0 and not return_carry:
        return codes_ctx.astype(jnp.int32)
    codes, carry = _compiled_rollout(
        model, variables, codes_ctx, actions, rng, horizon=horizon, use_actions=bool(use_actions), settings=settings)
    return (codes, carry) if return_carry else codes


def teacher_forced(model: Teco, variables: Mapping[str, Any], codes: jax.Array, actions: jax.Array | None, *,
                   context: int, use_actions: bool = True) -> jax.Array:
    """Decoder logits of frames context.. given the true latent codes of every earlier frame, one `lax.scan` of
    `Teco.teacher_forced_step` after conditioning on the context (pure; jit it).

    codes (B, T, H, W) int32, actions (B, T) int32 or None -> logits (B, T - context, H, W, vqgan_codes) float32:
    the step path of generation with the sampled latents replaced by the posterior's, i.e. what `Teco.predict`
    computes in parallel for those frames.
    """
    latent_codes = model.apply(variables, codes, actions, method=Teco.predict, use_actions=use_actions)["latent_codes"]
    actions_ctx = None if actions is None else actions[:, :context]
    carry = model.apply(variables, codes[:, :context], actions_ctx, method=Teco.condition, use_actions=use_actions)

    def body(carry: Carry, inputs: tuple[jax.Array | None, jax.Array]) -> tuple[Carry, jax.Array]:
        action, latent = inputs
        return model.apply(variables, carry, action, latent, method=Teco.teacher_forced_step)

    future = None if actions is None or not use_actions else jnp.moveaxis(actions[:, context:], 1, 0)
    _, logits = jax.lax.scan(body, carry, (future, jnp.moveaxis(latent_codes[:, context:], 1, 0)))
    return jnp.moveaxis(logits, 0, 1)
