"""TECO: a temporally consistent world model over VQGAN codes (Yan et al. 2022), with any temporal backbone.

The model sees a video as VQGAN codes (B, T, H, W) int32 (16x16 for the TECO datasets) and actions (B, T) int32,
where action t is the one taken between frames t-1 and t.

    e_t  = code_embeddings[codes_t]                                   (B, T, H, W, D_code)
    z_t  = Codebook(PosteriorEncoder([e_{t-1}, e_t]))                 (B, T, h, w, latent_dim), h = H / 2 by default
    x_t  = [z_{t-1}, embed(a_t)]  for t = 1 .. T-1 (T - 1 backbone positions); the first `condition_frames`
                                  frames enter unquantised (TECO's conditioning frames)
    y_t  = backbone(x)_t                      causal: y_t depends on z_{<t} and a_{<=t}
    L_recon  = CE_smoothed(Decoder(y_t, z_t), codes_t)    summed over H x W, mean over batch and scored frames
    L_prior  = MaskGit(y_t) cross-entropy on the masked latent codes of z_t (x h*w, TECO's scale)
    L_VQ     = codebook + commitment losses of the posterior codebook
    loss     = L_VQ + L_recon + L_prior        (ConvS5 paper eq. 32)

Frame 0 is conditioning only and action 0 is never read (TECO release, `teco/models/teco.py`
`temporal_transformer`; ConvSSM `teco_convS5.py` `condition`). The field `start_position` instead adds a learned
start latent z_{-1} and a first position [z_{-1}, embed(a_0)] (T positions); every paper config leaves it off.

Frames t >= condition_frames are scored. DropLoss keeps a random (1 - drop_loss_rate) fraction of them (sorted, no
repeats) and gathers those before the decoder and the prior, so their cost falls by that fraction. Action dropout
replaces a whole sequence's actions by the extra "no action" id with probability `action_dropout`, so one model
serves action-conditioned and unconditioned generation. With `mask_future_frames` (the ConvS5 paper's DMLab option,
after Gu et al.), a sequence that keeps its actions sees a learned mask latent instead of z_{t-1} for every frame
t - 1 >= mask_future_after: past the context the model predicts from the context and the actions alone.

The VQGAN code embeddings live in the variable collection 'tokenizer' (frozen; outside the optimiser) unless
`learn_code_embeddings`, in which case they are a parameter. Initialise with `init_variables` and copy the
tokenizer's codebook in with `set_code_embeddings`.

Generation (pure, fixed shapes, for one `lax.scan` over time):
    carry = model.apply(variables, codes_ctx, actions_ctx, method=Teco.condition)
    carry, codes_t = model.apply(variables, carry, action_t, rng, method=Teco.generate_step,
                                 settings=SamplerSettings())   # maskgit.SamplerSettings: TECO's 8, 8, 2
"""
from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from teco_ssm import backbones, modules
from teco_ssm.maskgit import MaskGitPrior, SamplerSettings, draft_and_revise, masked_cross_entropy, training_mask
from teco_ssm.modules import Codebook, Decoder, PosteriorEncoder

_FILE = "teco_ssm/teco.py"
Carry = dict[str, Any]


def _log_normaliser(logits: jax.Array) -> jax.Array:
    """log sum_k exp(logits[..., k]), stabilised by the maximum: (..., K) float32 -> (..., 1) float32.
    `jax.nn.logsumexp` in its place ran the ConvS5 MazeLab train step at 3.86 steps/s against 4.20 (one sitting)."""
    top = jnp.max(logits, axis=-1, keepdims=True)
    return jnp.log(jnp.sum(jnp.exp(logits - top), axis=-1, keepdims=True)) + top


@jax.custom_vjp
def smoothed_cross_entropy(logits: jax.Array, targets: jax.Array, smoothing: float) -> jax.Array:
    """Cross-entropy against one-hot targets mixed with the uniform distribution.

    logits: (..., K) float; targets: (...) int in [0, K); smoothing: float in [0, 1), a Python float or a traced
    scalar (no gradient flows to it). Labels are (1 - smoothing) * onehot + smoothing / K.
    Returns (...) float32: -(1 - smoothing) log p[target] - smoothing * mean_k log p[k]
    = logZ - (1 - smoothing) logits[target] - smoothing * mean_k logits[k].

    The gradient is written out, softmax - labels, as one pass over the logits (`_smoothed_cross_entropy_bwd`):
    automatic differentiation of the log-softmax makes several passes over the (B, T, 16, 16, codes) logits, the
    largest array of the MazeLab step (docs/training.md). Tested against automatic differentiation. Reverse mode
    only: `jax.jvp` and `jax.jacfwd` of it raise TypeError.
    """
    return _smoothed_cross_entropy_fwd(logits, targets, smoothing)[0]


def _smoothed_cross_entropy_fwd(logits, targets, smoothing):
    z = logits.astype(jnp.float32)
    log_normaliser = _log_normaliser(z)
    loss = (log_normaliser[..., 0] - (1.0 - smoothing) * modules.at_targets(z, targets)
            - smoothing * jnp.mean(z, axis=-1))
    return loss, (logits, targets, smoothing, log_normaliser)


def _smoothed_cross_entropy_bwd(residuals, g):
    logits, targets, smoothing, log_normaliser = residuals
    z = logits.astype(jnp.float32)
    grad = g[..., None] * (jnp.exp(z - log_normaliser) - smoothing / z.shape[-1])
    rows = grad.reshape(-1, z.shape[-1])
    rows = rows.at[jnp.arange(rows.shape[0]), targets.reshape(-1)].add(-(1.0 - smoothing) * g.reshape(-1))
    return rows.reshape(z.shape).astype(logits.dtype), None, None


smoothed_cross_entropy.defvjp(_smoothed_cross_entropy_fwd, _smoothed_cross_entropy_bwd)


def top_hits(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Whether each target's logit is the largest: (..., K) float, (...) int -> (...) bool.

    `argmax(logits) == targets` except at an exact tie for the maximum, which counts as a hit here, and on rows
    holding NaN, where it is unspecified (the loss is then NaN too, which stops training). It reads the logits
    once, sharing the maximum with the cross-entropy's, where XLA's CPU backend runs an argmax over the MazeLab
    decoder's logits in 15-40 ms (docs/training.md).
    """
    z = logits.astype(jnp.float32)
    return modules.at_targets(z, targets) >= jnp.max(z, axis=-1)


def drop_loss_count(num_steps: int, drop_loss_rate: float) -> int:
    """How many of `num_steps` scored frames (T - condition_frames) DropLoss keeps, e.g. 29 of 299 at rate 0.9.

    max(1, int((1 - rate) * num_steps)) in Python (float64) arithmetic, truncating the float product as the TECO
    release does (`teco/models/teco.py` `__call__`): rate 0.8 of 10 frames keeps 1, as (1 - 0.8) * 10 is
    1.9999999999999996.
    """
    return max(1, int((1.0 - float(drop_loss_rate)) * int(num_steps)))


def drop_loss_steps(rng: jax.Array, num_steps: int, drop_loss_rate: float) -> jax.Array:
    """The frames DropLoss scores: (drop_loss_count(...),) int32, distinct, ascending, uniformly random."""
    count = drop_loss_count(num_steps, drop_loss_rate)
    if count >= num_steps:
        return jnp.arange(num_steps, dtype=jnp.int32)
    return jnp.sort(jax.random.permutation(rng, num_steps)[:count]).astype(jnp.int32)


def field_errors(fields: Any) -> list[str]:
    """What is wrong with TECO's fields, read as attributes of `fields` (a `Teco`, or a config's `model` block):
    one message per problem, each starting with the field's name; [] when they are valid."""
    errors = []
    count = lambda v: isinstance(v, int) and not isinstance(v, bool)
    for name in ("vqgan_codes", "vqgan_embedding_dim", "encoder_blocks", "decoder_blocks", "latent_codes",
                 "latent_proj_dim", "latent_dim", "prior_width", "prior_mlp_dim", "prior_heads", "prior_layers",
                 "prior_token_dim", "num_actions", "action_embed_dim"):
        value = getattr(fields, name)
        if not count(value) or value < 1:
            errors.append(f"{name}={value!r} must be an integer >= 1")
    for name in ("code_shape", "encoder_depths", "decoder_depths"):
        value = tuple(getattr(fields, name))
        if not value or not all(count(v) and v >= 1 for v in value):
            errors.append(f"{name}={value!r} must be a non-empty tuple of integers >= 1")
    if errors:  # the checks below read these values
        return errors
    if not count(fields.mask_future_after) or fields.mask_future_after < 0:
        errors.append(f"mask_future_after={fields.mask_future_after!r} must be an integer >= 0")
    if fields.prior_width % fields.prior_heads:
        errors.append(f"prior_width={fields.prior_width} must be divisible by prior_heads={fields.prior_heads}")
    factor = 2 ** (len(fields.encoder_depths) - 1)
    if len(fields.code_shape) != 2 or any(int(s) % factor for s in fields.code_shape):
        errors.append(f"code_shape={tuple(fields.code_shape)} must be (H, W) divisible by "
                      f"2**(len(encoder_depths) - 1) = {factor}")
    if len(fields.decoder_depths) != len(fields.encoder_depths):
        errors.append(f"encoder_depths={tuple(fields.encoder_depths)} and decoder_depths="
                      f"{tuple(fields.decoder_depths)} must have the same length (same resolution change)")
    if not 0.0 <= fields.drop_loss_rate < 1.0:
        errors.append(f"drop_loss_rate must lie in [0, 1), got {fields.drop_loss_rate}")
    if not 0.0 <= fields.action_dropout <= 1.0:
        errors.append(f"action_dropout must lie in [0, 1], got {fields.action_dropout}")
    if not 0.0 <= fields.label_smoothing < 1.0:
        errors.append(f"label_smoothing must lie in [0, 1), got {fields.label_smoothing}")
    if fields.condition_frames < 1:
        errors.append(f"condition_frames must be >= 1, got {fields.condition_frames}")
    return errors


class Teco(nn.Module):
    """The TECO world model; see the module docstring. Its fields are its configuration: their defaults are TECO's
    DMLab model (ConvS5 paper Table 18 and the TECO release), and an experiment config's `model` block is built
    from them (`teco_ssm.schema.model_block`). vqgan_codes and vqgan_embedding_dim must equal the tokenizer's
    codebook shape (checked when its codebook is copied in with `set_code_embeddings`). Raises ValueError at setup
    for fields `field_errors` rejects."""
    backbone: nn.Module
    code_shape: Sequence[int] = (16, 16)
    vqgan_codes: int = 1024
    vqgan_embedding_dim: int = 256
    learn_code_embeddings: bool = False
    encoder_depths: Sequence[int] = (256, 512)
    encoder_blocks: int = 2
    decoder_depths: Sequence[int] = (256, 512)
    decoder_blocks: int = 4
    latent_codes: int = 1024
    latent_proj_dim: int = 32
    latent_dim: int = 64
    commitment_cost: float = 0.25
    prior_width: int = 512
    prior_mlp_dim: int = 2048
    prior_heads: int = 8
    prior_layers: int = 8
    prior_token_dim: int = 256
    prior_dropout: float = 0.0
    mask_schedule: str = "cosine"
    num_actions: int = 6
    action_embed_dim: int = 16
    use_actions: bool = True
    action_dropout: float = 0.5
    condition_frames: int = 1
    start_position: bool = False
    mask_future_frames: bool = False
    mask_future_after: int = 144
    drop_loss_rate: float = 0.9
    label_smoothing: float = 0.01
    remat: bool = False
    dtype: str = "float32"

    # ----------------------------------------------------------------------------------------------- structure
    @property
    def latent_shape(self) -> tuple[int, int]:
        """(h, w) of the latent grid: code_shape / 2**(len(encoder_depths) - 1)."""
        factor = 2 ** (len(self.encoder_depths) - 1)
        return tuple(int(s) // factor for s in self.code_shape)

    @property
    def first_input_frame(self) -> int:
        """The frame of backbone position 0: 1 (TECO), or 0 with `start_position`; frame t is position
        t - first_input_frame."""
        return 0 if self.start_position else 1

    @property
    def no_action(self) -> int:
        """The action id meaning "no action" (one past the last real action)."""
        return self.num_actions

    def setup(self):
        errors = field_errors(self)
        if errors:
            raise ValueError(f"{_FILE}: field {errors[0]}")
        dtype = jnp.dtype(self.dtype)
        h, w = self.latent_shape
        table_shape = (self.vqgan_codes, self.vqgan_embedding_dim)
        if self.learn_code_embeddings:
            self.code_embeddings = self.param("code_embeddings", nn.initializers.normal(1.0), table_shape)
        else:
            self.code_embeddings = self.variable(
                "tokenizer", "code_embeddings",
                lambda: jax.random.normal(self.make_rng("params"), table_shape, jnp.float32)).value
        self.start_code_embedding = self.param("start_code_embedding", nn.initializers.normal(0.02),
                                               (*self.code_shape, self.vqgan_embedding_dim))
        encoder = nn.remat(PosteriorEncoder) if self.remat else PosteriorEncoder
        decoder = nn.remat(Decoder) if self.remat else Decoder
        self.encoder = encoder(tuple(self.encoder_depths), self.encoder_blocks, self.latent_dim, dtype=dtype)
        self.codebook = Codebook(self.latent_codes, self.latent_proj_dim, self.latent_dim, self.commitment_cost)
        self.action_embedding = nn.Embed(self.num_actions + 1, self.action_embed_dim)
        if self.start_position:
            self.start_latent = self.param("start_latent", nn.initializers.normal(0.02), (h, w, self.latent_dim))
        if self.mask_future_frames:
            self.future_mask_latent = self.param("future_mask_latent", nn.initializers.normal(0.02),
                                                 (h, w, self.latent_dim))
        self.prior = MaskGitPrior(self.latent_codes, self.prior_width, self.prior_mlp_dim, self.prior_heads,
                                  self.prior_layers, self.prior_token_dim, self.prior_dropout, dtype=dtype)
        self.decoder = decoder(tuple(self.decoder_depths), self.decoder_blocks, self.vqgan_codes, dtype=dtype)

    def _check_codes(self, codes: jax.Array, actions: jax.Array | None, min_frames: int) -> None:
        if codes.ndim != 4 or tuple(codes.shape[2:]) != tuple(self.code_shape):
            raise ValueError(f"{_FILE}: expected codes (B, T, {self.code_shape[0]}, {self.code_shape[1]}) (field "
                             f"code_shape), got shape {codes.shape}")
        if codes.shape[1] < min_frames:
            raise ValueError(f"{_FILE}: need at least {min_frames} frames, got {codes.shape[1]}")
        if actions is not None and tuple(actions.shape) != tuple(codes.shape[:2]):
            raise ValueError(f"{_FILE}: expected actions (B, T) = {codes.shape[:2]}, got shape {actions.shape}")

    # ------------------------------------------------------------------------------------------ shared pieces
    def _posterior(self, codes: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, dict[str, jax.Array]]:
        """codes (B, T, H, W) -> (backbone latents (B, T, h, w, E) with the conditioning frames unquantised,
        quantised latents (B, T, h, w, E), latent codes (B, T, h, w) int32, VQ terms)."""
        batch, num_frames = codes.shape[:2]
        embedded = self.code_embeddings[codes]
        if not self.learn_code_embeddings:
            embedded = jax.lax.stop_gradient(embedded)
        start = jnp.broadcast_to(self.start_code_embedding, (batch, 1) + self.start_code_embedding.shape)
        previous = jnp.concatenate([start.astype(embedded.dtype), embedded[:, :-1]], axis=1)
        flat = lambda x: x.reshape((batch * num_frames,) + x.shape[2:])
        z = self._encode_pairs(flat(previous), flat(embedded))
        z = z.reshape((batch, num_frames) + z.shape[1:])
        quantised, latent_codes, terms = self.codebook(z)
        n = self.condition_frames
        inputs = jnp.concatenate([z[:, :n], quantised[:, n:]], axis=1)
        return inputs, quantised, latent_codes, terms

    def _encode_pairs(self, previous: jax.Array, current: jax.Array) -> jax.Array:
        """The posterior encoder on frame pairs: code embeddings (N, H, W, D_code) of frames t-1 and t -> z_t
        (N, h, w, latent_dim) float32, before quantisation."""
        return self.encoder(jnp.concatenate([previous, current], axis=-1)).astype(jnp.float32)

    def _action_ids(self, actions: jax.Array | None, given: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        """actions `shape` = (B,) or (B, T), or None; given (B,) bool -> ids, "no action" where not given."""
        if actions is None or not self.use_actions:
            return jnp.full(shape, self.no_action, jnp.int32)
        given = given.reshape(given.shape + (1,) * (actions.ndim - 1))
        return jnp.where(given, actions.astype(jnp.int32), self.no_action)

    def _input(self, previous_latent: jax.Array, action_ids: jax.Array, masked: jax.Array) -> jax.Array:
        """previous_latent (..., h, w, E), action_ids (...), masked (...) bool -> backbone input
        (..., h, w, E + action_embed_dim); every backbone maps its input channels to its own width."""
        if self.mask_future_frames:
            previous_latent = jnp.where(masked[..., None, None, None], self.future_mask_latent, previous_latent)
        actions = self.action_embedding(action_ids)[..., None, None, :]
        actions = jnp.broadcast_to(actions, previous_latent.shape[:-1] + actions.shape[-1:])
        return jnp.concatenate([previous_latent, actions.astype(previous_latent.dtype)], axis=-1)

    def _sequence_inputs(self, latents: jax.Array, action_ids: jax.Array, given: jax.Array) -> jax.Array:
        """Backbone inputs of frames first_input_frame .. T-1: frame t sees latent t-1 and action t.

        latents (B, T, h, w, E), action_ids (B, T), given (B,) bool -> (B, T - first_input_frame, h, w,
        E + action_embed_dim). With `start_position` frame 0 sees the learned start latent and action 0."""
        if self.start_position:
            start = jnp.broadcast_to(self.start_latent, (latents.shape[0], 1) + self.start_latent.shape)
            previous = jnp.concatenate([start, latents[:, :-1]], axis=1)
        else:
            previous, action_ids = latents[:, :-1], action_ids[:, 1:]
        previous_index = jnp.arange(previous.shape[1]) + self.first_input_frame - 1
        masked = given[:, None] & (previous_index >= self.mask_future_after)[None, :]
        return self._input(previous, action_ids, masked)

    def _decode(self, hidden: jax.Array, latent: jax.Array) -> jax.Array:
        """hidden (N, h, w, D), latent (N, h, w, E) -> logits (N, H, W, vqgan_codes) float32."""
        return self.decoder(hidden, latent)

    def _forward(self, codes, actions, given, train: bool):
        """-> (hidden (B, T - condition_frames, h, w, D) of the scored frames, quantised latents, latent codes,
        VQ terms)."""
        inputs, quantised, latent_codes, terms = self._posterior(codes)
        x = self._sequence_inputs(inputs, self._action_ids(actions, given, codes.shape[:2]), given)
        hidden, _ = self.backbone(x, None, train=train)
        return hidden[:, self.condition_frames - self.first_input_frame:], quantised, latent_codes, terms

    # ------------------------------------------------------------------------------------------------ training
    def __call__(self, codes: jax.Array, actions: jax.Array | None, *, train: bool,
                 rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The training loss.

        Args:
          codes: (B, T, H, W) int32 VQGAN codes, T > condition_frames.
          actions: (B, T) int32 in [0, num_actions), or None (no actions).
          train: True draws action dropout and DropLoss; False scores every frame with the given actions.
          rng: key for action dropout, DropLoss and the prior's masks (dropout layers, rate 0 in the paper's
            configs, draw from the 'dropout' rng of `apply`).
        Returns:
          loss () float32 = L_VQ + L_recon + L_prior, and metrics: loss, recon_loss, prior_loss, codebook_loss,
          commitment_loss, code_perplexity, recon_accuracy, prior_accuracy, actions_given (fraction), all ().
        """
        self._check_codes(codes, actions, self.condition_frames + 1)
        batch, num_frames = codes.shape[:2]
        action_rng, drop_rng, prior_rng = jax.random.split(rng, 3)
        if train and self.action_dropout > 0:
            given = ~jax.random.bernoulli(action_rng, self.action_dropout, (batch,))
        else:
            given = jnp.ones((batch,), bool)
        if actions is None or not self.use_actions:
            given = jnp.zeros((batch,), bool)

        hidden, quantised, latent_codes, terms = self._forward(codes, actions, given, train)
        n = self.condition_frames
        hidden = self.perturb("hidden", hidden)
        steps = drop_loss_steps(drop_rng, num_frames - n, self.drop_loss_rate if train else 0.0)
        hidden = jnp.take(hidden, steps, axis=1)
        latent = jnp.take(quantised[:, n:], steps, axis=1)
        latent_targets = jnp.take(latent_codes[:, n:], steps, axis=1)
        targets = jnp.take(codes[:, n:], steps, axis=1)
        flat = lambda x: x.reshape((-1,) + x.shape[2:])

        logits = self._decode(flat(hidden), flat(latent)).reshape(targets.shape + (self.vqgan_codes,))
        recon = smoothed_cross_entropy(logits, targets, self.label_smoothing)
        recon_loss = jnp.mean(jnp.sum(recon, axis=(-2, -1)))

        num_latent = latent_targets.shape[-1] * latent_targets.shape[-2]
        prior_targets = flat(latent_targets).reshape(-1, num_latent)
        mask = training_mask(prior_rng, prior_targets.shape[0], num_latent, self.mask_schedule)
        tokens = jnp.where(mask, self.prior.mask_id, prior_targets)
        prior_logits = self.prior(tokens.reshape(flat(latent_targets).shape), flat(hidden), train=train)
        prior_logits = prior_logits.reshape(prior_targets.shape + (self.latent_codes,))
        prior_loss = masked_cross_entropy(prior_logits, prior_targets, mask)

        loss = recon_loss + prior_loss + terms["codebook_loss"] + terms["commitment_loss"]
        prior_hits = (modules.argmax(prior_logits) == prior_targets) & mask
        metrics = dict(
            loss=loss, recon_loss=recon_loss, prior_loss=prior_loss,
            codebook_loss=terms["codebook_loss"], commitment_loss=terms["commitment_loss"],
            code_perplexity=terms["code_perplexity"],
            recon_accuracy=jnp.mean(top_hits(logits, targets)),
            prior_accuracy=jnp.sum(prior_hits) / jnp.maximum(jnp.sum(mask), 1),
            actions_given=jnp.mean(given.astype(jnp.float32)))
        return loss, metrics

    def predict(self, codes: jax.Array, actions: jax.Array | None, *, use_actions: bool = True) -> dict[str, jax.Array]:
        """Teacher-forced predictions of every frame after the conditioning frames, in parallel (no dropout).

        codes (B, T, H, W), actions (B, T) or None -> dict(
          logits (B, T - condition_frames, H, W, vqgan_codes) float32: decoder logits of frames condition_frames..,
          hidden (B, T - condition_frames, h, w, D): backbone outputs (D = backbone.output_width),
          latent_codes (B, T, h, w) int32: the posterior latent codes of every frame).
        """
        self._check_codes(codes, actions, self.condition_frames + 1)
        given = jnp.full((codes.shape[0],), use_actions and actions is not None and self.use_actions)
        hidden, quantised, latent_codes, _ = self._forward(codes, actions, given, train=False)
        n = self.condition_frames
        flat = lambda x: x.reshape((-1,) + x.shape[2:])
        logits = self._decode(flat(hidden), flat(quantised[:, n:]))
        return dict(logits=logits.reshape(hidden.shape[:2] + logits.shape[1:]), hidden=hidden,
                    latent_codes=latent_codes)

    # ---------------------------------------------------------------------------------------------- generation
    def condition(self, codes: jax.Array, actions: jax.Array | None, *, use_actions: bool = True) -> Carry:
        """Reads a context in one parallel backbone call and returns the generation carry.

        codes (B, Tc, H, W) int32, Tc >= condition_frames; actions (B, Tc) int32 or None (action t leads into frame
        t; action 0 is not read unless `start_position`). use_actions=False (or actions None) conditions without
        actions, as the unconditioned protocol does.
        Returns the carry, a pytree with fixed shapes:
          state: the backbone state after the context's positions (frames first_input_frame .. Tc - 1), from
            `backbone.init_state`; with one context frame and no start position, that initial state itself;
          latent: (B, h, w, E) input latent of the last context frame;
          codes: (B, H, W) int32, the last frame's VQGAN codes (for `SamplerSettings.feedback` 'posterior');
          time: () int32 = Tc, the index of the next frame; actions_given: (B,) bool.
        """
        self._check_codes(codes, actions, self.condition_frames)
        batch = codes.shape[0]
        given = jnp.full((batch,), use_actions and actions is not None and self.use_actions)
        inputs, _, _, _ = self._posterior(codes)
        x = self._sequence_inputs(inputs, self._action_ids(actions, given, codes.shape[:2]), given)
        state = self.backbone.init_state(batch, self.latent_shape)
        if x.shape[1] > 0:
            _, state = self.backbone(x, state, train=False)
        return dict(state=state, latent=inputs[:, -1], codes=codes[:, -1].astype(jnp.int32),
                    time=jnp.asarray(codes.shape[1], jnp.int32), actions_given=given)

    def _advance(self, carry: Carry, action: jax.Array | None) -> tuple[jax.Array, Carry]:
        """One backbone step: the hidden state (B, h, w, D) of frame carry['time'], and the advanced carry."""
        given = carry["actions_given"]
        masked = given & (carry["time"] - 1 >= self.mask_future_after)
        x = self._input(carry["latent"], self._action_ids(action, given, given.shape), masked)
        hidden, state = self.backbone.step(x, carry["state"])
        return hidden, dict(carry, state=state, time=carry["time"] + 1)

    def teacher_forced_step(self, carry: Carry, action: jax.Array | None,
                            latent_codes: jax.Array) -> tuple[Carry, jax.Array]:
        """One frame given its true latent codes (B, h, w) int32 (from `predict`'s latent_codes).

        action: (B,) int32 or None. Returns (carry, logits (B, H, W, vqgan_codes) float32), the same logits the
        parallel `predict` gives for that frame; the carry's `codes` are the argmax of those logits.
        """
        hidden, carry = self._advance(carry, action)
        latent = self.codebook.lookup(latent_codes)
        logits = self._decode(hidden, latent)
        return dict(carry, latent=latent, codes=modules.argmax(logits)), logits

    def generate_step(self, carry: Carry, action: jax.Array | None, rng: jax.Array, *,
                      settings: SamplerSettings = SamplerSettings()) -> tuple[Carry, jax.Array]:
        """Generates one frame: a backbone step, the prior's draft-and-revise sample of its latent codes, decoding.

        carry from `condition` or a previous step; action (B,) int32 (ignored where the carry has no actions) or
        None; rng a key; settings the MaskGit sampler's (`maskgit.SamplerSettings`). Returns (carry, codes
        (B, H, W) int32, the argmax of the decoder). Pure and jittable; the same rng gives the same frame.
        The next backbone input is the sampled latent (TECO release, `sample_timestep`), or with
        `settings.feedback == 'posterior'` the posterior latent of the decoded frame and the one before it.
        """
        hidden, carry = self._advance(carry, action)
        batch, h, w = hidden.shape[:3]
        prior_module = self.prior.clone(parent=None)
        prior_variables = {"params": self.prior.variables["params"]}

        def predict(tokens: jax.Array) -> jax.Array:
            logits = prior_module.apply(prior_variables, tokens.reshape(batch, h, w), hidden, train=False)
            return logits.reshape(batch, h * w, -1)

        latent_codes = draft_and_revise(predict, rng, batch, h * w, self.prior.mask_id, settings)
        latent = self.codebook.lookup(latent_codes.reshape(batch, h, w))
        codes = modules.argmax(self._decode(hidden, latent))
        if settings.feedback == "posterior":
            table = self.code_embeddings
            latent, _, _ = self.codebook(self._encode_pairs(table[carry["codes"]], table[codes]))
        return dict(carry, latent=latent, codes=codes), codes


# ---------------------------------------------------------------------------------------------------- helpers
def build(config: ml_collections.ConfigDict | Mapping[str, Any]) -> Teco:
    """The model of a full experiment config: `Teco(**config.model, backbone=backbones.build(config.backbone,
    config[config.backbone]))`."""
    name = config["backbone"]
    backbone = backbones.build(name, config[name])
    fields = config["model"]
    fields = fields.to_dict() if isinstance(fields, ml_collections.ConfigDict) else dict(fields)
    fields = {k: (tuple(v) if isinstance(v, list) else v) for k, v in fields.items()}
    return Teco(backbone=backbone, **fields)


def init_variables(model: Teco, rng: jax.Array, batch_size: int = 1, num_frames: int = 2) -> dict[str, Any]:
    """Initial variables: {'params': ..., 'tokenizer': {'code_embeddings': ...}} ('tokenizer' absent when the
    code embeddings are learned). Shapes do not depend on batch_size or num_frames (> condition_frames).

    `model` must be hashable (as `teco.build` makes it: tuples, not lists): the initialiser is compiled once per
    model, key type and shapes in a process. With `train.init_key(seed)` these are the parameters training starts
    from (`train.init_state`), which `teco-ssm run` scores as its untrained baseline."""
    return dict(_init_variables(model, rng, batch_size, max(num_frames, model.condition_frames + 1)))


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def _init_variables(model: Teco, rng: jax.Array, batch_size: int, num_frames: int) -> dict[str, Any]:
    codes = jnp.zeros((batch_size, num_frames) + tuple(model.code_shape), jnp.int32)
    actions = jnp.zeros((batch_size, num_frames), jnp.int32)
    param_rng, call_rng = jax.random.split(rng)
    return model.init({"params": param_rng}, codes, actions, train=False, rng=call_rng,
                      mutable=("params", "tokenizer"))


def set_code_embeddings(variables: Mapping[str, Any], table: jax.Array) -> dict[str, Any]:
    """Returns `variables` with the code-embedding table replaced by the tokenizer's codebook `table`
    (vqgan_codes, vqgan_embedding_dim); raises ValueError on a shape mismatch."""
    variables = {k: dict(v) for k, v in variables.items()}
    collection = "tokenizer" if "tokenizer" in variables else "params"
    current = variables[collection].get("code_embeddings")
    if current is None:
        raise ValueError(f"{_FILE}: variables hold no code_embeddings (expected in 'tokenizer' or 'params')")
    table = jnp.asarray(table, jnp.float32)
    if table.shape != current.shape:
        raise ValueError(f"{_FILE}: tokenizer codebook has shape {table.shape}, the model expects {current.shape} "
                         f"(model fields vqgan_codes, vqgan_embedding_dim)")
    variables[collection]["code_embeddings"] = table
    return variables
