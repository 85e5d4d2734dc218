"""The TECO model at toy size, for every registered backbone: losses, DropLoss, label smoothing, action dropout,
future-frame masking, the parallel path against the step path, deterministic generation, and learning."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from teco_ssm import backbones, modules
from teco_ssm.maskgit import SamplerSettings
from teco_ssm.modules import Decoder
from teco_ssm.teco import (Teco, drop_loss_count, drop_loss_steps, init_variables, set_code_embeddings,
                           smoothed_cross_entropy, top_hits)

from toy import TOY_BACKBONES, TOY_MODEL


def toy_model(name="convs5", **overrides):
    return Teco(backbone=backbones.build(name, TOY_BACKBONES[name]), **{**TOY_MODEL, **overrides})


def toy_batch(batch=2, frames=6, seed=1):
    codes = jax.random.randint(jax.random.key(seed), (batch, frames, 8, 8), 0, 12)
    actions = jax.random.randint(jax.random.key(seed + 1), (batch, frames), 0, 3)
    return codes, actions


@functools.lru_cache(maxsize=None)
def toy_variables(name, **overrides):
    return init_variables(toy_model(name, **dict(overrides)), jax.random.key(0))


def test_toy_backbones_cover_the_registry():
    assert set(TOY_BACKBONES) == set(backbones.NAMES)


@pytest.mark.parametrize("name", backbones.NAMES)
def test_loss_terms_finite_and_sum_for_every_backbone(name):
    model = toy_model(name, drop_loss_rate=0.5)
    variables = toy_variables(name, drop_loss_rate=0.5)
    assert set(variables) == {"params", "tokenizer"}
    codes, actions = toy_batch()
    loss, metrics = jax.jit(functools.partial(model.apply, train=True))(variables, codes, actions,
                                                                         rng=jax.random.key(2))
    for key, value in metrics.items():
        assert value.shape == () and np.isfinite(float(value)), key
    total = metrics["recon_loss"] + metrics["prior_loss"] + metrics["codebook_loss"] + metrics["commitment_loss"]
    np.testing.assert_allclose(float(loss), float(total), rtol=1e-6)
    # At initialisation the reconstruction loss is near 64 positions x log(12 codes).
    assert 0.5 * 64 * np.log(12) < float(metrics["recon_loss"]) < 2 * 64 * np.log(12)
    assert 1.0 <= float(metrics["code_perplexity"]) <= 16.0
    assert 0.0 <= float(metrics["recon_accuracy"]) <= 1.0


def test_label_smoothing_against_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 5, 7)) * 3
    targets = rng.integers(0, 7, size=(4, 5))
    labels = np.eye(7)[targets] * 0.99 + 0.01 / 7
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = -(labels * log_probs).sum(-1)
    got = smoothed_cross_entropy(jnp.asarray(logits, jnp.float32), jnp.asarray(targets), 0.01)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5)


def test_label_smoothing_gradient_is_softmax_minus_labels():
    """The written-out gradient against float64 NumPy (softmax - labels, times each position's cotangent) and
    against automatic differentiation of the log-softmax form, for a non-uniform cotangent and two smoothings."""
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(3, 4, 9)) * 3
    targets = rng.integers(0, 9, size=(3, 4))
    weights = rng.uniform(0.5, 2.0, size=(3, 4))

    def autodiff_form(z, t, smoothing):
        log_probs = jax.nn.log_softmax(z, axis=-1)
        nll = -jnp.take_along_axis(log_probs, t[..., None], axis=-1)[..., 0]
        return (1.0 - smoothing) * nll - smoothing * jnp.mean(log_probs, axis=-1)

    for smoothing in (0.0, 0.1):
        labels = np.eye(9)[targets] * (1 - smoothing) + smoothing / 9
        softmax = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
        expected = weights[..., None] * (softmax - labels)
        z, t = jnp.asarray(logits, jnp.float32), jnp.asarray(targets)
        got = jax.grad(lambda z: jnp.sum(weights * smoothed_cross_entropy(z, t, smoothing)))(z)
        np.testing.assert_allclose(np.asarray(got), expected, atol=1e-6)
        autodiff = jax.grad(lambda z: jnp.sum(weights * autodiff_form(z, t, smoothing)))(z)
        np.testing.assert_allclose(np.asarray(got), np.asarray(autodiff), atol=1e-6)
    bf16 = jax.grad(lambda z: jnp.sum(smoothed_cross_entropy(z, t, 0.01)))(z.astype(jnp.bfloat16))
    assert bf16.dtype == jnp.bfloat16
    traced = jax.jit(jax.grad(lambda z, s: jnp.sum(weights * smoothed_cross_entropy(z, t, s))))(z, 0.1)
    np.testing.assert_allclose(np.asarray(traced), np.asarray(got), atol=1e-6)  # got: smoothing 0.1


def test_argmax_and_top_hits_against_jnp_argmax():
    """`modules.argmax` equals `jnp.argmax` on ties (the first maximum) and NaN (the first NaN); `top_hits` equals
    `argmax == target` away from ties and counts a tied maximum as a hit."""
    x = np.array(jax.random.normal(jax.random.key(0), (6, 5, 40)))
    x[0, 0, [3, 17]] = 9.0       # a tie: the first index wins
    x[0, 1, [2, 30]] = np.nan    # NaN: the first NaN wins, as in jnp.argmax
    x[0, 2, :] = 1.0             # all equal
    np.testing.assert_array_equal(np.asarray(modules.argmax(jnp.asarray(x))), np.asarray(jnp.argmax(x, axis=-1)))
    assert int(modules.argmax(jnp.asarray(x))[0, 0]) == 3 and modules.argmax(jnp.asarray(x)).dtype == jnp.int32
    # At the sizes of real logits the CPU backend's fused maximum can skip NaN; argmax must still take the first NaN.
    big = np.zeros((32, 512), np.float32)
    big[:, 0], big[:, 3] = 2.0, np.nan
    big[1, 3], big[2, 0] = 1.0, np.nan
    np.testing.assert_array_equal(np.asarray(modules.argmax(jnp.asarray(big))), np.asarray(jnp.argmax(big, axis=-1)))
    np.testing.assert_array_equal(np.asarray(jax.jit(modules.argmax)(jnp.asarray(big)))[:3], [3, 0, 0])
    targets = np.array(jax.random.randint(jax.random.key(1), (6, 5), 0, 40))
    targets[1:3] = np.argmax(x[1:3], axis=-1)  # some hits
    hits = np.asarray(top_hits(jnp.asarray(x), jnp.asarray(targets)))
    np.testing.assert_array_equal(hits[1:], (np.argmax(x, -1) == targets)[1:])
    assert hits[1:3].all() and not hits[3:].all()
    assert bool(top_hits(jnp.asarray(x[:1, :1]), jnp.asarray([[17]]))[0, 0])  # the later of two tied maxima


def test_drop_loss_count_is_the_release_count():
    """TECO's count, `max(1, int((1 - rate) * T))` with T = frames after the conditioning frames, in Python float
    arithmetic: the truncated float product, 1.9999999999999996 -> 1 (no rounding up)."""
    for rate in [round(0.05 * k, 2) for k in range(20)]:
        for num_steps in range(2, 301):
            assert drop_loss_count(num_steps, rate) == max(1, int((1 - rate) * num_steps)), (num_steps, rate)
    assert drop_loss_count(299, 0.9) == 29 and drop_loss_count(300, 0.9) == 29  # 29.999999999999996
    assert drop_loss_count(10, 0.8) == 1 and drop_loss_count(90, 0.3) == 62
    assert drop_loss_count(5, 0.9) == 1 and drop_loss_count(7, 0.0) == 7


def test_drop_loss_steps():
    steps = np.asarray(drop_loss_steps(jax.random.key(0), 299, 0.9))
    assert steps.shape == (29,) and np.all(np.diff(steps) > 0) and steps.min() >= 0 and steps.max() < 299
    np.testing.assert_array_equal(drop_loss_steps(jax.random.key(0), 7, 0.0), np.arange(7))


def test_drop_loss_scores_exactly_the_sampled_steps():
    """Gradients reach the backbone output at the sampled frames only, and the decoder sees only those frames."""
    model = toy_model("convs5", drop_loss_rate=0.7)
    codes, actions = toy_batch(frames=11)
    rng = jax.random.key(7)
    variables = jax.jit(functools.partial(model.init, train=True))({"params": jax.random.key(0)}, codes, actions,
                                                                    rng=rng)
    assert variables["perturbations"]["hidden"].shape[:2] == (2, 10)

    def loss(perturbations):
        return model.apply({**variables, "perturbations": perturbations}, codes, actions, train=True, rng=rng)[0]

    grads = jax.jit(jax.grad(loss))(variables["perturbations"])["hidden"]
    touched = np.flatnonzero(np.abs(np.asarray(grads)).sum(axis=(0, 2, 3, 4)) > 0)
    expected = np.asarray(drop_loss_steps(jax.random.split(rng, 3)[1], 10, 0.7))
    assert len(expected) == 3
    np.testing.assert_array_equal(touched, expected)

    params = {k: v for k, v in variables.items() if k != "perturbations"}
    decoded_shape = lambda train: jax.eval_shape(functools.partial(
        model.apply, train=train, capture_intermediates=True, mutable=["intermediates"]),
        params, codes, actions, rng=rng)[1]["intermediates"]["decoder"]["__call__"][0].shape
    assert decoded_shape(True) == (2 * 3, 8, 8, 12)  # 3 of 10 frames per sequence were decoded
    assert decoded_shape(False) == (2 * 10, 8, 8, 12)  # evaluation scores every frame


def _conv_same(x, kernel, bias=None):
    """float64 'SAME' convolution, stride 1: x (N, H, W, C), kernel (k, k, C, O)."""
    k = kernel.shape[0]
    padded = np.pad(x, ((0, 0), (k // 2, k // 2), (k // 2, k // 2), (0, 0)))
    out = sum(np.einsum("nhwc,co->nhwo", padded[:, i:i + x.shape[1], j:j + x.shape[2]], kernel[i, j])
              for i in range(k) for j in range(k))
    return out if bias is None else out + bias


def _group_norm(x, p, groups=32, eps=1e-6):
    n, h, w, c = x.shape
    g = x.reshape(n, h, w, groups, c // groups)
    g = (g - g.mean(axis=(1, 2, 4), keepdims=True)) / np.sqrt(g.var(axis=(1, 2, 4), keepdims=True) + eps)
    return g.reshape(x.shape) * p["scale"] + p["bias"]


def _resnet_block(x, p):
    """TECO's ResNetBlock (`teco/models/base.py`): 1x1 bias-free skip when widths differ, 32-group GroupNorms."""
    elu = lambda v: np.where(v > 0, v, np.expm1(np.minimum(v, 0)))
    skip = _conv_same(x, p["skip"]["kernel"]) if "skip" in p else x
    h = _conv_same(elu(_group_norm(x, p["GroupNorm_0"])), p["Conv_0"]["kernel"], p["Conv_0"]["bias"])
    h = _conv_same(elu(_group_norm(h, p["GroupNorm_1"])), p["Conv_1"]["kernel"], p["Conv_1"]["bias"])
    return skip + 0.1 * h


def test_decoder_against_float64_release_structure():
    """TECO's ResNetDecoder with depths (32, 64): a 3x3 conv to depths[0] = 32 (the config order), the 64-wide
    block widening through its 1x1 skip, nearest upsampling, the 32-wide block, LayerNorm, Dense; fed the
    module's own (perturbed) parameters."""
    decoder = Decoder((32, 64), 1, 12)
    hidden = jax.random.normal(jax.random.key(0), (2, 4, 4, 6))
    latent = jax.random.normal(jax.random.key(1), (2, 4, 4, 4))
    params = decoder.init(jax.random.key(2), hidden, latent)["params"]
    leaves, tree = jax.tree.flatten(params)
    noise = jax.random.split(jax.random.key(3), len(leaves))
    params = jax.tree.unflatten(tree, [leaf + 0.1 * jax.random.normal(k, leaf.shape) for leaf, k in zip(leaves, noise)])
    got = np.asarray(decoder.apply({"params": params}, hidden, latent))

    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    x = np.concatenate([np.asarray(hidden, np.float64), np.asarray(latent, np.float64)], axis=-1)
    x = _conv_same(x, p["Conv_0"]["kernel"], p["Conv_0"]["bias"])
    assert x.shape[-1] == 32
    x = _resnet_block(x, p["ResNetBlock_0"])
    x = x.repeat(2, axis=1).repeat(2, axis=2)
    x = _resnet_block(x, p["ResNetBlock_1"])
    x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
    x = x * p["LayerNorm_0"]["scale"] + p["LayerNorm_0"]["bias"]
    expected = x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
    assert got.shape == (2, 8, 8, 12)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_frozen_code_embeddings_and_tokenizer_codebook():
    model = toy_model("convs5")
    variables = toy_variables("convs5")
    codes, actions = toy_batch()
    assert "code_embeddings" not in variables["params"]
    table = jax.random.normal(jax.random.key(9), (12, 8))
    loaded = set_code_embeddings(variables, table)
    np.testing.assert_array_equal(loaded["tokenizer"]["code_embeddings"], table)
    run = jax.jit(functools.partial(model.apply, train=False, rng=jax.random.key(0)))
    before, after = run(variables, codes, actions)[0], run(loaded, codes, actions)[0]
    assert float(before) != float(after)
    with pytest.raises(ValueError, match=r"vqgan_codes, vqgan_embedding_dim"):
        set_code_embeddings(variables, jnp.zeros((12, 9)))
    learned = init_variables(toy_model("convs5", learn_code_embeddings=True), jax.random.key(0))
    assert "tokenizer" not in learned and learned["params"]["code_embeddings"].shape == (12, 8)


def test_action_dropout_and_no_actions():
    codes, actions = toy_batch()
    other = (actions + 1) % 3
    rng = jax.random.key(4)
    variables = toy_variables("convs5")
    model = toy_model("convs5", action_dropout=1.0)
    run = jax.jit(model.apply, static_argnames="train")
    # Every sequence's actions dropped in training: the actions make no difference, as if none were given ...
    dropped, metrics = run(variables, codes, actions, train=True, rng=rng)
    np.testing.assert_allclose(float(run(variables, codes, other, train=True, rng=rng)[0]), float(dropped), rtol=1e-6)
    np.testing.assert_allclose(float(run(variables, codes, None, train=True, rng=rng)[0]), float(dropped), rtol=1e-6)
    assert float(metrics["actions_given"]) == 0.0
    # ... while evaluation keeps them, and they matter.
    kept, metrics = run(variables, codes, actions, train=False, rng=rng)
    assert abs(float(run(variables, codes, other, train=False, rng=rng)[0]) - float(kept)) > 1e-4
    assert float(metrics["actions_given"]) == 1.0


@pytest.mark.parametrize("name, start_position", [("convs5", False), ("transformer", False), ("convs5", True)])
def test_action_zero_reaches_nothing_without_a_start_position(name, start_position):
    """TECO feeds frames 0..T-2 with actions 1..T-1: action 0 changes no loss term, no prediction, no carry and no
    generated frame. With `start_position` it enters the first backbone position and changes them all."""
    model = toy_model(name, start_position=start_position, action_dropout=0.0)
    variables = toy_variables(name, start_position=start_position)
    assert ("start_latent" in variables["params"]) == start_position
    codes, actions = toy_batch(frames=5)
    other = actions.at[:, 0].set((actions[:, 0] + 1) % 3)

    @jax.jit
    def outputs(actions):
        _, metrics = model.apply(variables, codes, actions, train=True, rng=jax.random.key(3))
        predicted = model.apply(variables, codes, actions, method=Teco.predict)
        carry = model.apply(variables, codes[:, :3], actions[:, :3], method=Teco.condition)
        carry, frame = model.apply(variables, carry, actions[:, 3], jax.random.key(4), method=Teco.generate_step,
                                   settings=SamplerSettings(draft_steps=2, revise_steps=2, revise_rounds=1))
        return dict(metrics=metrics, logits=predicted["logits"], hidden=predicted["hidden"], state=carry["state"],
                    frame=frame)

    a, b = outputs(actions), outputs(other)
    differs = jax.tree.map(lambda x, y: bool(np.any(np.asarray(x) != np.asarray(y))), a, b)
    for key in ("loss", "recon_loss", "prior_loss"):
        assert differs["metrics"][key] == start_position, key
    for key in ("logits", "hidden", "state"):
        assert any(jax.tree.leaves(differs[key])) == start_position, key
    if not start_position:
        assert not differs["frame"]


def test_future_frame_masking():
    """With actions, predictions past the context ignore the frames after it; without actions they do not."""
    model = toy_model("convs5", mask_future_frames=True, mask_future_after=3)
    variables = toy_variables("convs5", mask_future_frames=True, mask_future_after=3)
    codes, actions = toy_batch(frames=8)
    changed = codes.at[:, 4:].set((codes[:, 4:] + 5) % 12)
    predict = jax.jit(functools.partial(model.apply, method=Teco.predict), static_argnames="use_actions")
    for use_actions in (True, False):
        a = predict(variables, codes, actions, use_actions=use_actions)["hidden"]
        b = predict(variables, changed, actions, use_actions=use_actions)["hidden"]
        # hidden index k is frame k + 1; frames 1..4 only see frames < 4 either way.
        np.testing.assert_allclose(a[:, :4], b[:, :4], atol=1e-6)
        assert np.allclose(a[:, 5:], b[:, 5:], atol=1e-6) == use_actions


@pytest.mark.parametrize("name, mask_future, context, start_position",
                         [(name, False, 3, False) for name in backbones.NAMES] + [("convs5", True, 3, False)]
                         + [("transformer", False, 1, False), ("convs5", False, 1, False), ("convs5", False, 3, True)])
def test_step_path_equals_parallel_predictions(name, mask_future, context, start_position):
    """`condition` on `context` frames (one frame: no backbone position, the carry holds the initial state) then
    teacher-forced steps give `predict`'s logits."""
    overrides = dict(mask_future_frames=mask_future, mask_future_after=3, start_position=start_position)
    model = toy_model(name, **overrides)
    variables = toy_variables(name, **overrides)
    codes, actions = toy_batch(frames=7)
    parallel = jax.jit(functools.partial(model.apply, method=Teco.predict))(variables, codes, actions)
    carry = jax.jit(functools.partial(model.apply, method=Teco.condition))(variables, codes[:, :context],
                                                                            actions[:, :context])

    def body(carry, inputs):
        action, latent_codes = inputs
        return model.apply(variables, carry, action, latent_codes, method=Teco.teacher_forced_step)

    inputs = (jnp.moveaxis(actions[:, context:], 1, 0), jnp.moveaxis(parallel["latent_codes"][:, context:], 1, 0))
    _, logits = jax.jit(lambda c, i: jax.lax.scan(body, c, i))(carry, inputs)
    expected = parallel["logits"][:, context - model.condition_frames:]
    np.testing.assert_allclose(np.moveaxis(np.asarray(logits), 0, 1), expected, atol=2e-3, rtol=2e-3)
    np.testing.assert_array_equal(np.moveaxis(np.asarray(logits), 0, 1).argmax(-1), np.asarray(expected).argmax(-1))


def test_generation_is_deterministic_in_one_scan():
    """One backbone here: the step path of every backbone is checked above; long rollouts of every backbone
    belong to the sampler's tests."""
    model = toy_model("convs5")
    variables = toy_variables("convs5")
    codes, actions = toy_batch(frames=4)
    step = functools.partial(model.apply, method=Teco.generate_step,
                             settings=SamplerSettings(draft_steps=3, revise_steps=2, revise_rounds=1, top_p=0.9))

    @jax.jit
    def rollout(variables, rng):
        carry = model.apply(variables, codes[:, :2], actions[:, :2], method=Teco.condition)
        keys = jax.random.split(rng, 5)
        future = jnp.concatenate([actions[:, 2:], actions[:, :2], actions[:, :1]], axis=1)
        return jax.lax.scan(lambda c, x: step(variables, c, x[0], x[1]), carry, (future.T, keys))

    carry, frames = rollout(variables, jax.random.key(0))
    _, again = rollout(variables, jax.random.key(0))
    _, other = rollout(variables, jax.random.key(1))
    assert frames.shape == (5, 2, 8, 8) and frames.dtype == jnp.int32
    np.testing.assert_array_equal(frames, again)
    assert not np.array_equal(frames, other)
    assert int(carry["time"]) == 2 + 5
    assert frames.min() >= 0 and frames.max() < 12


@pytest.mark.parametrize("condition_frames", [1, 2])
def test_posterior_feedback_feeds_back_the_posterior_latent_of_the_decoded_frame(condition_frames):
    """feedback 'posterior': the next input latent is the one `predict` (training's posterior) gives the decoded
    frame after the previous frame; 'sample' keeps the prior's sampled latent, and the frame is the same."""
    model = toy_model("convs5", condition_frames=condition_frames)
    variables = toy_variables("convs5", condition_frames=condition_frames)
    codes, actions = toy_batch(frames=4)
    settings = SamplerSettings(draft_steps=2, revise_steps=2, revise_rounds=1)

    @functools.partial(jax.jit, static_argnames="feedback")
    def two_frames(feedback):
        carry = model.apply(variables, codes[:, :2], actions[:, :2], method=Teco.condition)
        chosen = dataclasses.replace(settings, feedback=feedback)
        first, frame = model.apply(variables, carry, actions[:, 2], jax.random.key(5), method=Teco.generate_step,
                                   settings=chosen)
        return carry, first, frame

    carry, posterior, frame = two_frames("posterior")
    _, sampled, same_frame = two_frames("sample")
    np.testing.assert_array_equal(carry["codes"], codes[:, 1])
    np.testing.assert_array_equal(frame, same_frame)
    np.testing.assert_array_equal(posterior["codes"], frame)
    sequence = jnp.concatenate([codes[:, :2], frame[:, None]], axis=1)
    latent_codes = model.apply(variables, sequence, actions[:, :3], method=Teco.predict)["latent_codes"][:, -1]
    lookup = lambda c: model.apply(variables, c, method=lambda m, c: m.codebook.lookup(c))
    np.testing.assert_allclose(posterior["latent"], lookup(latent_codes), atol=1e-6)
    assert not np.allclose(sampled["latent"], posterior["latent"], atol=1e-3)
    with pytest.raises(ValueError, match="feedback must be one of sample, posterior, got 'decoded'"):
        SamplerSettings(feedback="decoded")


def test_short_training_run_reduces_the_loss():
    """Sequences of a pattern that moves one column per frame, direction given by the action: a model that learns
    the dynamics drives the loss far below its start."""
    model = toy_model("convs5", drop_loss_rate=0.5, action_dropout=0.0, prior_layers=1)
    rng = np.random.default_rng(0)
    base = rng.integers(0, 12, size=(4, 8, 8))

    def make_batch(seed):
        r = np.random.default_rng(seed)
        actions = r.integers(0, 2, size=(8, 6))
        offsets = np.cumsum(np.where(actions == 0, 1, -1), axis=1)
        start = r.integers(0, 4, size=8)
        codes = np.stack([np.stack([np.roll(base[start[b]], offsets[b, t], axis=1) for t in range(6)])
                          for b in range(8)])
        return jnp.asarray(codes, jnp.int32), jnp.asarray(actions, jnp.int32)

    variables = init_variables(model, jax.random.key(0))
    params, frozen = variables["params"], {k: v for k, v in variables.items() if k != "params"}
    optimizer = optax.adamw(3e-3, weight_decay=0.0)
    opt_state = optimizer.init(params)

    @jax.jit
    def train_step(params, opt_state, codes, actions, key):
        def loss_fn(p):
            return model.apply({"params": p, **frozen}, codes, actions, train=True, rng=key)
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, metrics

    losses = []
    for i in range(150):
        codes, actions = make_batch(i % 16)
        params, opt_state, metrics = train_step(params, opt_state, codes, actions, jax.random.key(i))
        losses.append(float(metrics["loss"]))
    start, end = np.mean(losses[:5]), np.mean(losses[-10:])
    assert end < 0.35 * start, (start, end)


def test_init_variables_compiles_once_and_draws_the_parameters_training_starts_from():
    from teco_ssm import optim, sharding, teco, train
    model = toy_model("convs5")
    key = train.init_key(3)
    compiled = teco._init_variables._cache_size()
    first = init_variables(model, key)
    again = init_variables(toy_model("convs5"), key)
    assert teco._init_variables._cache_size() == compiled + 1  # an equal model reuses the compiled initialiser
    jax.tree_util.tree_map(np.testing.assert_array_equal, first, again)
    state, _ = train.init_state(key, None, model=model, settings=optim.OptimizerSettings(lr=1e-3, total_steps=10, warmup_steps=1),
                                mesh=sharding.make_mesh(1, jax.devices()[:1]))
    jax.tree_util.tree_map(np.testing.assert_array_equal, first["params"], state["params"])
    other = jax.tree_util.tree_leaves(init_variables(model, train.init_key(4))["params"])
    assert any(not np.array_equal(a, b) for a, b in zip(other, jax.tree_util.tree_leaves(first["params"])))
