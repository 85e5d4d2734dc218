"""The MaskGit prior: schedule and mask arithmetic, the sampler's rounds, nucleus sampling, the loss."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from teco_ssm import maskgit
from teco_ssm.maskgit import SamplerSettings


def test_mask_ratio_schedules_match_closed_forms():
    r = np.linspace(0.0, 1.0, 11)
    np.testing.assert_allclose(maskgit.mask_ratio(r, "cosine"), np.cos(np.pi * r / 2), atol=1e-12)
    np.testing.assert_allclose(maskgit.mask_ratio(r, "linear"), 1 - r, atol=1e-12)
    np.testing.assert_allclose(np.asarray(maskgit.mask_ratio(jnp.asarray(r, jnp.float32), "cosine")),
                               np.cos(np.pi * r / 2), atol=1e-6)
    with pytest.raises(ValueError, match="valid schedules: cosine"):
        maskgit.mask_ratio(r, "cosin")


def test_training_mask_counts_follow_the_cosine_schedule():
    rng = jax.random.key(3)
    batch, num_tokens = 256, 64
    mask = np.asarray(maskgit.training_mask(rng, batch, num_tokens, "cosine"))
    ratio_rng, _ = jax.random.split(rng)
    r = np.asarray(jax.random.uniform(ratio_rng, (batch,)), np.float64)
    expected = np.maximum(1, np.floor(np.cos(np.pi * r / 2) * num_tokens))
    np.testing.assert_array_equal(mask.sum(axis=1), expected)
    # Positions are chosen uniformly: every position is masked about equally often.
    frequency = mask.sum(axis=0) / mask.sum() * num_tokens
    assert np.all(np.abs(frequency - 1.0) < 0.35)
    # Mean masked fraction of a cosine schedule: E[cos(pi r / 2)] = 2 / pi.
    assert abs(mask.mean() - 2 / np.pi) < 0.05


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_step_boundaries(schedule):
    bounds = maskgit.step_boundaries(64, 8, schedule)
    if schedule == "linear":
        np.testing.assert_array_equal(bounds, np.arange(0, 72, 8))
    else:
        progress = np.arange(9) / 8
        np.testing.assert_array_equal(bounds, 64 - np.floor(np.cos(np.pi * progress / 2) * 64 + 1e-9))
    assert bounds[0] == 0 and bounds[-1] == 64 and np.all(np.diff(bounds) >= 0)


def test_linear_rounds_split_as_the_release():
    """TECO's sampler splits a random order of the codes with `jnp.array_split`: equal rounds, the larger first."""
    for num_tokens in range(1, 70):
        for steps in range(1, 13):
            sizes = [len(chunk) for chunk in np.array_split(np.arange(num_tokens), steps)]
            np.testing.assert_array_equal(np.diff(maskgit.step_boundaries(num_tokens, steps, "linear")), sizes)
    np.testing.assert_array_equal(np.diff(maskgit.step_boundaries(10, 4, "linear")), [3, 3, 2, 2])
    masks = np.asarray(maskgit.sampling_masks(jax.random.key(0), 2, 10,
                                              SamplerSettings(draft_steps=4, revise_steps=3, revise_rounds=1)))
    np.testing.assert_array_equal(masks.sum(axis=2), [[3, 3]] * 2 + [[2, 2]] * 2 + [[4, 4]] + [[3, 3]] * 2)


def test_sampling_masks_partition_every_pass():
    masks = np.asarray(maskgit.sampling_masks(jax.random.key(0), 3, 20,
                                              SamplerSettings(draft_steps=4, revise_steps=5, revise_rounds=2)))
    assert masks.shape == (4 + 2 * 5, 3, 20)
    for lo, hi in [(0, 4), (4, 9), (9, 14)]:
        np.testing.assert_array_equal(masks[lo:hi].sum(axis=0), np.ones((3, 20)))
    np.testing.assert_array_equal(masks[4:9].sum(axis=2), np.full((5, 3), 4))  # equal revision groups
    assert not np.array_equal(masks[0, 0], masks[0, 1])  # a fresh order per row


def test_draft_reveals_the_scheduled_number_of_codes_per_round():
    """A predictor whose argmax is the number of masked codes it sees shows which round filled each position."""
    num_tokens, batch = 16, 2

    def predict(tokens):
        masked = jnp.sum(tokens == num_tokens + 1, axis=-1)  # mask id = K = num_tokens + 1
        return 10.0 * jax.nn.one_hot(jnp.broadcast_to(masked[:, None], tokens.shape), num_tokens + 1)

    for schedule in ("linear", "cosine"):
        settings = SamplerSettings(draft_steps=5, revise_steps=4, revise_rounds=0, temperature=0.0,
                                   draft_schedule=schedule)
        out = maskgit.draft_and_revise(predict, jax.random.key(1), batch, num_tokens, num_tokens + 1, settings)
        bounds = maskgit.step_boundaries(num_tokens, 5, schedule)
        for row in np.asarray(out):
            for i in range(5):  # round i saw num_tokens - bounds[i] masked codes and filled bounds[i+1]-bounds[i]
                assert np.sum(row == num_tokens - bounds[i]) == (bounds[i + 1] - bounds[i]) or bounds[i + 1] == bounds[i]
    # After a revision pass of 4 groups, every position was last sampled with exactly its group (4 codes) masked.
    out = maskgit.draft_and_revise(predict, jax.random.key(1), batch, num_tokens, num_tokens + 1,
                                   SamplerSettings(draft_steps=5, revise_steps=4, revise_rounds=1, temperature=0.0))
    np.testing.assert_array_equal(np.asarray(out), 4)


def test_sampler_is_deterministic_and_runs_inside_scan():
    weights = jax.random.normal(jax.random.key(0), (5, 7))

    def predict(tokens):
        return jax.nn.one_hot(tokens, 8)[..., :5] @ weights + 0.0 * tokens[..., None]

    def body(carry, key):
        codes = maskgit.draft_and_revise(predict, key, 2, 9, 7, SamplerSettings(draft_steps=3, revise_steps=2))
        return carry, codes

    run = jax.jit(lambda key: jax.lax.scan(body, 0, jax.random.split(key, 4))[1])
    a, b, c = run(jax.random.key(5)), run(jax.random.key(5)), run(jax.random.key(6))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.shape == (4, 2, 9) and a.min() >= 0 and a.max() < 7


def test_sample_logits_temperature_and_nucleus():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = jnp.broadcast_to(jnp.log(jnp.asarray(probs, jnp.float32)), (20000, 4))
    np.testing.assert_array_equal(maskgit.sample_logits(jax.random.key(0), logits, temperature=0.0), 0)
    draws = np.asarray(maskgit.sample_logits(jax.random.key(0), logits))
    np.testing.assert_allclose(np.bincount(draws, minlength=4) / draws.size, probs, atol=0.015)
    draws = np.asarray(maskgit.sample_logits(jax.random.key(1), logits, top_p=0.8))
    np.testing.assert_allclose(np.bincount(draws, minlength=4) / draws.size, [0.625, 0.375, 0, 0], atol=0.015)
    draws = np.asarray(maskgit.sample_logits(jax.random.key(2), logits, top_p=0.81))
    assert set(np.unique(draws)) == {0, 1, 2}
    hot = np.asarray(maskgit.sample_logits(jax.random.key(3), logits, temperature=0.25))
    assert np.mean(hot == 0) > 0.85  # low temperature sharpens towards the mode


def test_masked_cross_entropy_against_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 10, 6))
    targets = rng.integers(0, 6, size=(3, 10))
    mask = rng.random((3, 10)) < 0.4
    mask[0, 0] = True
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
    expected = (nll * mask).sum() / mask.sum() * 10
    got = maskgit.masked_cross_entropy(jnp.asarray(logits, jnp.float32), jnp.asarray(targets), jnp.asarray(mask))
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def test_prior_is_bidirectional_and_conditioned():
    prior = maskgit.MaskGitPrior(num_codes=10, width=16, mlp_dim=32, num_heads=2, layers=1, token_dim=8)
    tokens = jnp.full((1, 3, 3), prior.mask_id, jnp.int32)
    cond = jax.random.normal(jax.random.key(0), (1, 3, 3, 4))
    params = jax.jit(prior.init)(jax.random.key(1), tokens, cond)
    apply = jax.jit(prior.apply)
    base = apply(params, tokens, cond)
    assert base.shape == (1, 3, 3, 10)
    # A code at the last position changes the prediction at the first (attention is not causal) ...
    changed = apply(params, tokens.at[0, 2, 2].set(4), cond)
    assert float(jnp.abs(changed[0, 0, 0] - base[0, 0, 0]).max()) > 1e-4
    # ... and so does the conditioning at another position.
    changed = apply(params, tokens, cond.at[0, 1, 1].add(1.0))
    assert float(jnp.abs(changed[0, 0, 0] - base[0, 0, 0]).max()) > 1e-4
    assert math.isfinite(float(base.sum()))


def _layer_norm(x, p, eps=1e-6):
    return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps) * p["scale"] + p["bias"]


def _tanh_gelu(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def _prior_reference(p, tokens, cond):
    """TECO's MaskGit network (`teco/models/maskgit.py`, `transformer.py`) in float64 NumPy: input Dense, row and
    column position embeddings of half width each concatenated, pre-LN blocks with x * sigmoid(1.702 x) in the
    MLP, Dense -> gelu -> LayerNorm, then the MLM head Dense -> gelu -> LayerNorm -> logits against the token
    embeddings plus a bias. LayerNorm epsilon 1e-6; gelu outside the MLPs is the tanh form."""
    n, h, w = tokens.shape
    embed = p["token_embedding"]
    x = np.concatenate([embed[tokens], cond], axis=-1) @ p["input"]["kernel"] + p["input"]["bias"]
    rows, cols = p["row_embedding"], p["column_embedding"]
    positions = np.concatenate([np.broadcast_to(rows[:, None], (h, w, rows.shape[-1])),
                                np.broadcast_to(cols[None], (h, w, cols.shape[-1]))], axis=-1)
    x = (x + positions).reshape(n, h * w, -1)
    for name in sorted(k for k in p if k.startswith("block_")):
        b = p[name]
        attention = b["MultiHeadDotProductAttention_0"]
        y = _layer_norm(x, b["LayerNorm_0"])
        q, k, v = (np.einsum("nld,dhk->nlhk", y, attention[c]["kernel"]) + attention[c]["bias"]
                   for c in ("query", "key", "value"))
        scores = np.einsum("nqhd,nkhd->nhqk", q, k) / np.sqrt(q.shape[-1])
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        out = np.einsum("nhqk,nkhd->nqhd", weights, v)
        x = x + np.einsum("nqhd,hdo->nqo", out, attention["out"]["kernel"]) + attention["out"]["bias"]
        y = _layer_norm(x, b["LayerNorm_1"]) @ b["Dense_0"]["kernel"] + b["Dense_0"]["bias"]
        y = y / (1 + np.exp(-1.702 * y))
        x = x + y @ b["Dense_1"]["kernel"] + b["Dense_1"]["bias"]
    x = _layer_norm(_tanh_gelu(x @ p["final_dense"]["kernel"] + p["final_dense"]["bias"]), p["final_norm"])
    x = _layer_norm(_tanh_gelu(x @ p["head"]["kernel"] + p["head"]["bias"]), p["head_norm"])
    logits = x @ embed[:-1].T + p["output_bias"]
    return logits.reshape(n, h, w, -1)


def test_prior_against_float64_release_structure():
    """Fed the module's own (perturbed) parameters; width 9 splits into a 5-channel row and a 4-channel column
    embedding, on a 3 x 4 grid so rows and columns cannot be confused."""
    prior = maskgit.MaskGitPrior(num_codes=10, width=9, mlp_dim=12, num_heads=3, layers=2, token_dim=6)
    tokens = jax.random.randint(jax.random.key(0), (2, 3, 4), 0, 11)
    cond = jax.random.normal(jax.random.key(1), (2, 3, 4, 5))
    params = prior.init(jax.random.key(2), tokens, cond)["params"]
    assert params["row_embedding"].shape == (3, 5) and params["column_embedding"].shape == (4, 4)
    leaves, tree = jax.tree.flatten(params)
    noise = jax.random.split(jax.random.key(3), len(leaves))
    params = jax.tree.unflatten(tree, [leaf + 0.3 * jax.random.normal(k, leaf.shape) for leaf, k in zip(leaves, noise)])
    got = np.asarray(prior.apply({"params": params}, tokens, cond))
    expected = _prior_reference(jax.tree.map(lambda a: np.asarray(a, np.float64), params), np.asarray(tokens),
                                np.asarray(cond, np.float64))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_sigmoid_gelu():
    x = np.linspace(-6, 6, 101)
    np.testing.assert_allclose(np.asarray(maskgit.sigmoid_gelu(jnp.asarray(x, jnp.float32))),
                               x / (1 + np.exp(-1.702 * x)), atol=1e-6)
