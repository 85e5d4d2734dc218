"""Every registered backbone honours the protocol: parallel == step by step, causal, splittable, configurable."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from teco_ssm import backbones

TOY = {
    "transformer": dict(d_model=16, n_layers=2, downsample=2, embed_dim=8, mlp_dim=16, num_heads=2, max_len=16),
    "s5": dict(d_model=16, n_layers=2, ssm_size=8, blocks=2, downsample=2, embed_dim=4),
    "convs5": dict(d_model=8, n_layers=2, ssm_size=8, blocks=2),
    "convt3": dict(d_model=8, n_layers=2, ssm_size=8, blocks=2),
}


def toy(name, **overrides):
    cfg = backbones.default_config(name)
    cfg.update({**TOY[name], **overrides})
    return backbones.build(name, cfg)


def frames(key, shape=(2, 6, 4, 4, 5)):
    return jax.random.normal(jax.random.key(key), shape)


def run_steps(model, variables, x, state=None):
    state = model.apply(variables, x.shape[0], x.shape[2:4], method=model.init_state) if state is None else state
    ys = []
    for t in range(x.shape[1]):
        y, state = model.apply(variables, x[:, t], state, method=model.step)
        ys.append(y)
    return jnp.stack(ys, 1), state


def assert_tree_close(a, b, atol):
    for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), atol=atol, rtol=0)


def test_registry_names_and_unknown_name():
    assert set(backbones.NAMES) == {"transformer", "s5", "convs5", "convt3"}
    with pytest.raises(ValueError, match="transformer, s5, convs5, convt3"):
        backbones.build("lstm", {})
    with pytest.raises(ValueError, match="valid backbones"):
        backbones.default_config("convs6")


@pytest.mark.parametrize("name", backbones.NAMES)
def test_unknown_field_is_an_error_listing_valid_ones(name):
    with pytest.raises(ValueError, match="d_model"):
        backbones.build(name, {"d_modle": 4})


@pytest.mark.parametrize("name", backbones.NAMES)
def test_parallel_equals_step_by_step(name):
    model, x = toy(name), frames(0)
    variables = model.init(jax.random.key(1), x)
    y, final = model.apply(variables, x)
    assert y.shape == x.shape[:4] + (model.d_model,)
    y_steps, state = run_steps(model, variables, x)
    np.testing.assert_allclose(y_steps, y, atol=2e-5)
    assert_tree_close(state, final, atol=2e-5)
    assert len(final) == model.n_layers


@pytest.mark.parametrize("name", backbones.NAMES)
def test_split_sequence_equals_one_call(name):
    model, x = toy(name), frames(2)
    variables = model.init(jax.random.key(3), x)
    y, final = model.apply(variables, x)
    y1, s1 = model.apply(variables, x[:, :2])
    y2, s2 = model.apply(variables, x[:, 2:], s1)
    np.testing.assert_allclose(jnp.concatenate([y1, y2], 1), y, atol=2e-5)
    assert_tree_close(s2, final, atol=2e-5)


@pytest.mark.parametrize("name", backbones.NAMES)
def test_causal(name):
    model, x = toy(name), frames(4)
    variables = model.init(jax.random.key(5), x)
    y, _ = model.apply(variables, x)
    t = 3
    x2 = x.at[:, t + 1:].set(frames(6, x[:, t + 1:].shape))
    y2, _ = model.apply(variables, x2)
    np.testing.assert_allclose(y2[:, :t + 1], y[:, :t + 1], atol=1e-6)
    assert float(jnp.abs(y2[:, t + 1:] - y[:, t + 1:]).max()) > 1e-3  # the future does change


@pytest.mark.parametrize("name", backbones.NAMES)
def test_random_configs_round_trip(name):
    """Random valid sizes build, keep their config, and still agree in parallel and step modes."""
    rng = np.random.default_rng(sum(map(ord, name)))
    for _ in range(2):
        overrides = {"n_layers": int(rng.integers(1, 3))}
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
            assert getattr(model, key) == value
        x = frames(7, (1, 4, 4, 4, 3))
        variables = model.init(jax.random.key(8), x)
        y, _ = model.apply(variables, x)
        y_steps, _ = run_steps(model, variables, x)
        np.testing.assert_allclose(y_steps, y, atol=2e-5)


@pytest.mark.parametrize("name", backbones.NAMES)
def test_remat_same_values_and_gradients(name):
    x = frames(9, (1, 4, 4, 4, 3))
    plain, remat = toy(name), toy(name, remat=True)
    variables = plain.init(jax.random.key(10), x)

    def loss(params, model):
        y, _ = model.apply({"params": params}, x)
        return jnp.sum(y ** 2)

    g_plain = jax.grad(loss)(variables["params"], plain)
    g_remat = jax.grad(loss)(variables["params"], remat)
    assert_tree_close(g_remat, g_plain, atol=1e-4)


@pytest.mark.parametrize("name", backbones.NAMES)
def test_bfloat16_compute_stays_close(name):
    x = frames(11, (1, 4, 4, 4, 3))
    f32, bf16 = toy(name), toy(name, dtype="bfloat16")
    variables = f32.init(jax.random.key(12), x)
    y32, s32 = f32.apply(variables, x)
    y16, s16 = bf16.apply(variables, x)
    assert y16.dtype == jnp.float32
    assert float(jnp.abs(y16 - y32).mean()) < 0.05 * float(jnp.abs(y32).mean())
