"""The MaskGit dynamics prior over latent codes (Chang et al. 2022), as TECO uses it.

A small bidirectional transformer predicts every latent code of one frame from a partly masked frame and the
backbone output at that frame. Training masks a random number of codes drawn from a schedule (cosine by default:
mask ratio cos(pi r / 2), r ~ U[0, 1)) and scores the masked codes. Generation is TECO's draft-and-revise procedure
(Lee et al. 2022): a draft fills the frame in `draft_steps` rounds of random positions, then `revise_rounds` times
the frame is split into `revise_steps` random groups and each group is masked and sampled again given the rest.

The sampler is a pure function of (network, inputs, rng): it runs under `jit`, inside `lax.scan`, with fixed
shapes, and gives the same codes for the same rng. Its settings travel as one `SamplerSettings` value (hashable, so
a jit static argument).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, MutableMapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from teco_ssm import modules

_FILE = "teco_ssm/maskgit.py"
SCHEDULES = ("cosine", "linear", "square", "sqrt")
FEEDBACKS = ("sample", "posterior")
# Sampler fields added after configs and sample files were first written, with the value those were sampled with.
ADDED_LATER = {"feedback": "sample"}


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
    """The settings of TECO's draft-and-revise sampler (`draft_and_revise`); the defaults are the TECO release's
    MaskGit sampler (`teco/models/maskgit.py`: 8 draft steps, 8 revision steps, 2 revision rounds, plain sampling
    from the softmax), which the ConvS5 paper keeps.

    draft_steps: rounds of the draft; each reveals one share of the codes, in a random order per row (>= 1).
    revise_steps: groups one revision pass splits the codes into; each group is masked and drawn again (>= 1).
    revise_rounds: revision passes after the draft (>= 0; 0 keeps the draft).
    temperature: logits are divided by it before sampling (>= 0; 0 takes the argmax).
    top_p: nucleus sampling, the smallest set of most likely codes whose probability reaches top_p
      (in (0, 1]; 1.0 keeps every code, as the release).
    draft_schedule: how many codes each draft round reveals, one of `SCHEDULES` ('linear': equal rounds, as the
      release; 'cosine': MaskGit's schedule; see `step_boundaries`).
    feedback: what the next frame's backbone input holds, one of `FEEDBACKS`: 'sample', the latent the prior
      sampled (the release's `sample_timestep`), or 'posterior', the posterior encoder's quantised latent of the
      frame just decoded and the one before it, as in training, where the backbone only ever reads posterior
      latents (`Teco.generate_step`; measured in docs/training.md, "Where rollouts break").
    Raises ValueError naming the field on a value out of range.
    """
    draft_steps: int = 8
    revise_steps: int = 8
    revise_rounds: int = 2
    temperature: float = 1.0
    top_p: float = 1.0
    draft_schedule: str = "linear"
    feedback: str = "sample"

    def __post_init__(self):
        for field in dataclasses.fields(self):  # one hash and one jit cache entry for 1 and 1.0
            object.__setattr__(self, field.name, {"int": int, "float": float, "str": str}[field.type](
                getattr(self, field.name)))
        problems = [f"{name} must be >= {low}, got {getattr(self, name)}" for name, low in (
            ("draft_steps", 1), ("revise_steps", 1), ("revise_rounds", 0), ("temperature", 0.0))
            if not getattr(self, name) >= low]
        if not 0.0 < self.top_p <= 1.0:
            problems.append(f"top_p must lie in (0, 1], got {self.top_p}")
        if self.draft_schedule not in SCHEDULES:
            problems.append(f"draft_schedule must be one of {', '.join(SCHEDULES)}, got {self.draft_schedule!r}")
        if self.feedback not in FEEDBACKS:
            problems.append(f"feedback must be one of {', '.join(FEEDBACKS)}, got {self.feedback!r}")
        if problems:
            raise ValueError(f"{_FILE}: SamplerSettings: " + "; ".join(problems))

    @classmethod
    def from_config(cls, sampling: Mapping[str, Any]) -> "SamplerSettings":
        """The settings of a config's `sampling` group (its fields of these names; the group's other fields,
        protocols and counts, are not read). A config written before a field of `ADDED_LATER` existed reads as
        what those runs sampled with. Raises KeyError naming a missing field, ValueError as above."""
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in sampling and f.name not in ADDED_LATER]
        if missing:
            raise KeyError(f"{_FILE}: the sampling config lacks field(s) {', '.join(missing)}")
        return cls(**{f.name: sampling[f.name] if f.name in sampling else ADDED_LATER[f.name]
                      for f in dataclasses.fields(cls)})

    @staticmethod
    def fill_added_later(sampling: MutableMapping[str, Any]) -> None:
        """Adds to a stored config's `sampling` group (a dict or an unlocked ConfigDict) the `ADDED_LATER` fields
        it lacks, with the values it was sampled with, so that `--set sampling.<field>=...` reaches them."""
        for name, value in ADDED_LATER.items():
            if name not in sampling:
                sampling[name] = value


def mask_ratio(r: jax.Array | np.ndarray | float, schedule: str = "cosine") -> Any:
    """Fraction of codes still masked at progress r in [0, 1]: 1 at r = 0, 0 at r = 1, decreasing.

    cosine: cos(pi r / 2); linear: 1 - r; square: 1 - r**2; sqrt: 1 - sqrt(r). Works on NumPy and JAX arrays.
    """
    xp = jnp if isinstance(r, jax.Array) else np
    if schedule == "cosine":
        return xp.cos(0.5 * math.pi * r)
    if schedule == "linear":
        return 1.0 - r
    if schedule == "square":
        return 1.0 - r ** 2
    if schedule == "sqrt":
        return 1.0 - xp.sqrt(r)
    raise ValueError(f"{_FILE}: unknown mask schedule {schedule!r}; valid schedules: {', '.join(SCHEDULES)}")


def training_mask(rng: jax.Array, batch: int, num_tokens: int, schedule: str = "cosine") -> jax.Array:
    """Random training masks, one per row: (batch, num_tokens) bool.

    Row b masks n_b = max(1, floor(mask_ratio(r_b) * num_tokens)) positions, r_b ~ U[0, 1), chosen uniformly at
    random without replacement.
    """
    ratio_rng, order_rng = jax.random.split(rng)
    r = jax.random.uniform(ratio_rng, (batch,))
    counts = jnp.maximum(1, jnp.floor(mask_ratio(r, schedule) * num_tokens)).astype(jnp.int32)
    ranks = _random_ranks(order_rng, batch, num_tokens)
    return ranks < counts[:, None]


def _random_ranks(rng: jax.Array, batch: int, num_tokens: int) -> jax.Array:
    """(batch, num_tokens) int32: each row a uniformly random permutation of 0 .. num_tokens - 1."""
    keys = jax.random.uniform(rng, (batch, num_tokens))
    return jnp.argsort(jnp.argsort(keys, axis=-1), axis=-1).astype(jnp.int32)


def step_boundaries(num_tokens: int, steps: int, schedule: str) -> np.ndarray:
    """How many codes are revealed after each of `steps` rounds: (steps + 1,) int, 0 first, num_tokens last,
    non-decreasing; round i reveals positions ranked in [b[i], b[i+1]).

    linear (TECO's draft and revision, `sample_mask` in `teco/models/maskgit.py`): equal rounds as
    `jnp.array_split` makes them, the first num_tokens % steps rounds one code larger (10 codes in 4 rounds:
    3, 3, 2, 2). Other schedules: num_tokens - floor(mask_ratio((i + 1) / steps) * num_tokens) codes revealed after
    round i. Raises ValueError for steps < 1 or an unknown schedule.
    """
    if steps < 1:
        raise ValueError(f"{_FILE}: the number of sampling steps must be >= 1, got {steps}")
    if schedule == "linear":
        size, larger = divmod(num_tokens, steps)
        sizes = np.full(steps, size, np.int64)
        sizes[:larger] += 1
        return np.concatenate([[0], np.cumsum(sizes)])
    progress = np.arange(steps + 1, dtype=np.float64) / steps
    remaining = np.floor(np.asarray(mask_ratio(progress, schedule), np.float64) * num_tokens + 1e-9)
    remaining[0], remaining[-1] = num_tokens, 0
    return (num_tokens - remaining).astype(np.int64)


def sampling_masks(rng: jax.Array, batch: int, num_tokens: int, settings: SamplerSettings) -> jax.Array:
    """Which codes each round of draft-and-revise (re)samples: (draft_steps + revise_rounds * revise_steps,
    batch, num_tokens) bool, the step counts those of `settings`.

    The draft rounds partition the positions (a fresh random order per row, round sizes from `draft_schedule`);
    each revision pass partitions them again in `revise_steps` near-equal random groups, the larger ones first.
    """
    keys = jax.random.split(rng, settings.revise_rounds + 1)
    masks = []
    passes = ([(keys[0], settings.draft_steps, settings.draft_schedule)]
              + [(k, settings.revise_steps, "linear") for k in keys[1:]])
    for key, steps, schedule in passes:
        ranks = _random_ranks(key, batch, num_tokens)
        bounds = step_boundaries(num_tokens, steps, schedule)
        for i in range(steps):
            masks.append((ranks >= int(bounds[i])) & (ranks < int(bounds[i + 1])))
    return jnp.stack(masks)


def sample_logits(rng: jax.Array, logits: jax.Array, temperature: float = 1.0, top_p: float = 1.0) -> jax.Array:
    """Draws one code per position. logits: (..., K) float -> (...) int32.

    temperature 0 takes the argmax; otherwise logits / temperature, restricted to the smallest set of most likely
    codes whose probability reaches `top_p` (nucleus sampling; 1.0 keeps every code).
    """
    if temperature == 0.0:
        return modules.argmax(logits)
    logits = logits.astype(jnp.float32) / temperature
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # probability of the strictly more likely codes
        keep = before < top_p
        threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits >= threshold, logits, -jnp.inf)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def draft_and_revise(predict: Callable[[jax.Array], jax.Array], rng: jax.Array, batch: int, num_tokens: int,
                     mask_id: int, settings: SamplerSettings = SamplerSettings()) -> jax.Array:
    """TECO's draft-and-revise sampler, one compiled `lax.fori_loop` over all rounds.

    predict: tokens (batch, num_tokens) int32, `mask_id` at masked places -> logits (batch, num_tokens, K), a pure
    function (the conditioning is closed over). Starts from an all-masked frame; round i masks the positions of
    `sampling_masks(...)[i]`, predicts, and samples those positions only (at `settings.temperature` and
    `settings.top_p`). Returns (batch, num_tokens) int32 codes in [0, K). Deterministic given rng.
    """
    mask_rng, sample_rng = jax.random.split(rng)
    masks = sampling_masks(mask_rng, batch, num_tokens, settings)
    keys = jax.random.split(sample_rng, masks.shape[0])

    def round_(i, tokens):
        mask = masks[i]
        tokens = jnp.where(mask, mask_id, tokens)
        drawn = sample_logits(keys[i], predict(tokens), settings.temperature, settings.top_p)
        return jnp.where(mask, drawn, tokens)

    start = jnp.full((batch, num_tokens), mask_id, jnp.int32)
    return jax.lax.fori_loop(0, masks.shape[0], round_, start)


def masked_cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """Prior loss as TECO scales it: mean cross-entropy over masked positions, times positions per frame.

    logits: (N, L, K) float; targets: (N, L) int; mask: (N, L) bool with at least one True. Returns () float32.
    """
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -modules.at_targets(log_probs, targets)
    mask = mask.astype(jnp.float32)
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0) * targets.shape[-1]


def sigmoid_gelu(x: jax.Array) -> jax.Array:
    """x * sigmoid(1.702 x), the sigmoid approximation of GELU (Hendrycks and Gimpel 2016) that TECO's transformer
    MLP uses (`gelu2` in `teco/models/transformer.py`). Any shape and float dtype."""
    return x * jax.nn.sigmoid(1.702 * x)


class _Block(nn.Module):
    """Pre-LayerNorm transformer block (TECO's TransformerLayer): x + SelfAttention(LN(x)), then
    x + MLP(LN(x)) with the MLP Dense -> sigmoid_gelu -> dropout -> Dense. x: (N, L, width)."""
    width: int
    mlp_dim: int
    num_heads: int
    dropout: float
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        h = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype)(x)
        h = nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads, dtype=self.dtype, dropout_rate=0.0, deterministic=True,
            kernel_init=nn.initializers.variance_scaling(1.0, "fan_in", "normal"))(h, h)
        x = x + nn.Dropout(self.dropout, deterministic=not train)(h)
        h = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype)(x)
        h = sigmoid_gelu(nn.Dense(self.mlp_dim, dtype=self.dtype)(h))
        h = nn.Dropout(self.dropout, broadcast_dims=(-2,), deterministic=not train)(h)
        h = nn.Dense(self.width, dtype=self.dtype)(h)
        return x + nn.Dropout(self.dropout, deterministic=not train)(h)


class MaskGitPrior(nn.Module):
    """Bidirectional transformer over the codes of one latent frame, conditioned on the backbone output (TECO's
    MaskGit, `teco/models/maskgit.py`, and its Transformer, `teco/models/transformer.py`).

    Per position: [code embedding (K + 1 rows, the last for "masked"), conditioning] -> Dense to `width`, plus a
    learned position embedding made of a row part (ceil(width / 2) channels) and a column part (floor(width / 2))
    concatenated; `layers` blocks; Dense(width) -> gelu -> LayerNorm; the MLM head Dense(token_dim) -> gelu ->
    LayerNorm, read out against the code embeddings plus a bias as logits over the K codes. gelu is the tanh
    approximation there, sigmoid_gelu inside the blocks' MLPs, as in the release; LayerNorm epsilons are 1e-6.
    """
    num_codes: int
    width: int = 512
    mlp_dim: int = 2048
    num_heads: int = 8
    layers: int = 8
    token_dim: int = 256
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @property
    def mask_id(self) -> int:
        """The token id of a masked position (one past the last code)."""
        return self.num_codes

    @nn.compact
    def __call__(self, tokens: jax.Array, cond: jax.Array, train: bool = False) -> jax.Array:
        """tokens: (N, h, w) int32 in [0, K] (K = masked); cond: (N, h, w, D) -> logits (N, h, w, K) float32."""
        n, height, width = tokens.shape
        embed = self.param("token_embedding", nn.initializers.normal(stddev=0.02),
                           (self.num_codes + 1, self.token_dim), jnp.float32)
        x = jnp.concatenate([embed[tokens].astype(self.dtype), cond.astype(self.dtype)], axis=-1)
        x = nn.Dense(self.width, dtype=self.dtype, name="input")(x)
        row_width = self.width - self.width // 2
        rows = self.param("row_embedding", nn.initializers.normal(stddev=0.02), (height, row_width))
        cols = self.param("column_embedding", nn.initializers.normal(stddev=0.02), (width, self.width // 2))
        positions = jnp.concatenate([jnp.broadcast_to(rows[:, None], (height, width, row_width)),
                                     jnp.broadcast_to(cols[None], (height, width, self.width // 2))], axis=-1)
        x = (x + positions.astype(self.dtype)).reshape(n, height * width, self.width)
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        for i in range(self.layers):
            x = _Block(self.width, self.mlp_dim, self.num_heads, self.dropout, self.dtype, name=f"block_{i}")(x, train)
        x = nn.gelu(nn.Dense(self.width, dtype=self.dtype, name="final_dense")(x), approximate=True)
        x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="final_norm")(x)
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x = nn.Dense(self.token_dim, dtype=self.dtype, kernel_init=nn.initializers.normal(stddev=0.02),
                     name="head")(x)
        x = nn.LayerNorm(epsilon=1e-6, dtype=jnp.float32, name="head_norm")(nn.gelu(x, approximate=True))
        bias = self.param("output_bias", nn.initializers.zeros, (self.num_codes,), jnp.float32)
        logits = x.astype(jnp.float32) @ embed[: self.num_codes].T + bias
        return logits.reshape(n, height, width, self.num_codes)
