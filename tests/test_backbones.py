"""Every registered backbone honours the protocol: parallel == step by step, causal, splittable, configurable."""
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from teco_ssm import backbones

TOY = {
    "transformer": dict(d_model=16, n_layers=2, downsample=2, embed_dim=8, mlp_dim=16, num_heads=2, max_len=16),
    "s5": dict(d_model=16, n_layers=2, ssm_size=8, blocks=2, downsample=4, out_dim=6, scan_mode="sequential"),
    "convs5": dict(d_model=8, n_layers=2, ssm_size=8, blocks=2, num_groups=4, scan_mode="sequential"),
    "convt3": dict(d_model=8, n_layers=2, ssm_size=8, blocks=2, num_groups=4, scan_mode="sequential"),
}


def toy(name, **overrides):
    cfg = backbones.default_config(name)
    cfg.update({**TOY[name], **overrides})
    return backbones.build(name, cfg)


def frames(key, shape=(2, 6, 4, 4, 5)):
    return jax.random.normal(jax.random.key(key), shape)


def run_steps(model, variables, x, state=None):
    if state is None:
        state = model.apply(variables, x.shape[0], x.shape[2:4], method=model.init_state)
    step = jax.jit(functools.partial(model.apply, method=model.step))
    ys = []
    for t in range(x.shape[1]):
        y, state = step(variables, x[:, t], state)
        ys.append(y)
    return jnp.stack(ys, 1), state


def init_and_apply(model, x, key):
    """Variables and a jitted parallel call `apply(variables, x, state=None)`."""
    variables = jax.jit(model.init)(jax.random.key(key), x)
    return variables, jax.jit(model.apply)


def assert_tree_close(a, b, atol):
    for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), atol=atol, rtol=0)


def test_registry_names_and_unknown_name():
    assert set(backbones.NAMES) == {"transformer", "s5", "convs5", "convt3"}
    with pytest.raises(ValueError, match="transformer, s5, convs5, convt3"):
        backbones.build("lstm", {})
    with pytest.raises(ValueError, match="valid backbones"):
        backbones.default_config("convs6")


def test_s5_needs_one_token_per_frame():
    message = r"downsample=2 must equal the latent height and width, got \(H, W\) = \(4, 4\)"
    with pytest.raises(ValueError, match=message):
        init_and_apply(toy("s5", downsample=2), frames(0), 1)


@pytest.mark.parametrize("name", backbones.NAMES)
def test_unknown_field_is_an_error_listing_valid_ones(name):
    with pytest.raises(ValueError, match="d_model"):
        backbones.build(name, {"d_modle": 4})


@pytest.mark.parametrize("name", backbones.NAMES)
def test_misspelt_setting_is_an_error_at_every_level(name):
    """A field no settings class has fails when the config is read (not silently defaulted further down), and the
    settings value is frozen."""
    with pytest.raises(ValueError, match=r"no field\(s\) n_layer; valid fields: .*n_layers"):
        backbones.settings(name, {"n_layer": 3})
    with pytest.raises(TypeError, match="n_layer"):
        backbones.settings_class(name)(n_layer=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        backbones.settings(name).n_layers = 3


@pytest.mark.parametrize("name", backbones.NAMES)
def test_one_settings_value_reaches_every_submodule(name):
    """The stack, its layers and their SSMs all hold the backbone's settings value itself."""
    model = toy(name)
    seen = []

    def record(next_fn, args, kwargs, context):
        seen.append(getattr(context.module, "settings", None))
        return next_fn(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(model.init, jax.random.key(0), frames(0))
    holders = [s for s in seen if s is not None]
    assert holders and all(s is model.settings for s in holders)
    if name != "transformer":  # the stack, each layer and, for the convolutional SSMs, each layer's SSM
        per_layer = 2 if name in ("convs5", "convt3") else 1
        assert len(holders) >= 1 + per_layer * model.settings.n_layers


@pytest.mark.parametrize("name", backbones.NAMES)
def test_parallel_step_split_and_causal(name):
    """One model per backbone, checked four ways with the same compiled calls."""
    model, x = toy(name), frames(0)
    variables, apply = init_and_apply(model, x, 1)
    y, final = apply(variables, x)
    assert y.shape == x.shape[:4] + (model.output_width,) and len(final) == model.settings.n_layers

    # init_state then one step per frame == the parallel call, outputs and final state
    y_steps, state = run_steps(model, variables, x)
    np.testing.assert_allclose(y_steps, y, atol=2e-5)
    assert_tree_close(state, final, atol=2e-5)

    # two calls, the second continuing from the first's state == one call
    half = x.shape[1] // 2
    y1, s1 = apply(variables, x[:, :half])
    y2, s2 = apply(variables, x[:, half:], s1)
    np.testing.assert_allclose(jnp.concatenate([y1, y2], 1), y, atol=2e-5)
    assert_tree_close(s2, final, atol=2e-5)

    # causality: changing frames after t leaves outputs up to t unchanged, and does change later ones
    t = 3
    x2 = x.at[:, t + 1:].set(frames(6, x[:, t + 1:].shape))
    y_changed, _ = apply(variables, x2)
    np.testing.assert_allclose(y_changed[:, :t + 1], y[:, :t + 1], atol=1e-6)
    assert float(jnp.abs(y_changed[:, t + 1:] - y[:, t + 1:]).max()) > 1e-3


@pytest.mark.parametrize("name", backbones.NAMES)
def test_random_configs_round_trip(name):
    """Random valid sizes build, keep their config, and still agree in parallel and step modes."""
    rng = np.random.default_rng(sum(map(ord, name)))
    overrides = {"n_layers": 1}
    if name in ("s5", "convs5", "convt3"):
        blocks = int(rng.choice([1, 2]))
        overrides.update(ssm_size=2 * blocks * int(rng.integers(1, 4)), blocks=blocks,
                         scan_mode=str(rng.choice(["associative", "sequential", "fft"])))
    if name in ("convs5", "convt3"):
        overrides.update(B_kernel_size=int(rng.choice([1, 3])), C_kernel_size=int(rng.choice([1, 3])),
                         D_kernel_size=int(rng.choice([1, 3])))
    cfg = backbones.default_config(name)
    cfg.update({**TOY[name], **overrides})
    model = backbones.build(name, cfg)
    for key, value in overrides.items():
        assert getattr(model.settings, key) == value
    x = frames(7, (1, 4, 4, 4, 3))
    variables, apply = init_and_apply(model, x, 8)
    y, _ = apply(variables, x)
    y_steps, _ = run_steps(model, variables, x)
    np.testing.assert_allclose(y_steps, y, atol=2e-5)


@pytest.mark.parametrize("name", backbones.NAMES)
def test_remat_same_values_and_gradients(name):
    x = frames(9, (1, 4, 4, 4, 3))
    plain, remat = toy(name, n_layers=1), toy(name, n_layers=1, remat=True)
    variables = jax.jit(plain.init)(jax.random.key(10), x)

    def loss(params, model):
        y, _ = model.apply({"params": params}, x)
        return jnp.sum(y ** 2)

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    g_plain = grad(variables["params"], plain)
    g_remat = grad(variables["params"], remat)
    assert_tree_close(g_remat, g_plain, atol=1e-4)


@pytest.mark.parametrize("name", backbones.NAMES)
def test_bfloat16_compute_stays_close(name):
    x = frames(11, (1, 4, 4, 4, 3))
    f32, bf16 = toy(name, n_layers=1), toy(name, n_layers=1, dtype="bfloat16")
    variables = jax.jit(f32.init)(jax.random.key(12), x)
    y32, _ = jax.jit(f32.apply)(variables, x)
    y16, _ = jax.jit(bf16.apply)(variables, x)
    assert y16.dtype == jnp.float32
    assert float(jnp.abs(y16 - y32).mean()) < 0.05 * float(jnp.abs(y32).mean())
