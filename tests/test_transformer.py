"""The temporal transformer: parallel == step-by-step (also past the window), split calls, causality and the exact
receptive field of the sliding window, a float64 NumPy reference, remat, bfloat16, dropout, config errors."""
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from teco_ssm import backbones
from teco_ssm.backbones import transformer

# Toy sizes: 4x4 latent, downsample 2 -> 4 tokens per frame; a window of 3 frames.
TOY = dict(d_model=6, n_layers=2, dropout=0.0, downsample=2, embed_dim=16, mlp_dim=32, num_heads=4, max_len=3,
           remat=False, dtype="float32")


def random_variables(model, x, seed=1, scale=0.3):
    """Variables of `model` for frames like `x`, every parameter drawn N(0, scale^2): biases, LayerNorm scales and
    the position table away from their initial values make the checks stronger (and skip init's slow compile)."""
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(scale * rng.standard_normal(s.shape), s.dtype), shapes)


def make(rng_seed=0, batch=2, frames=8, size=4, channels=5, **overrides):
    """A toy model, its variables and random frames (B, T, size, size, channels)."""
    model = backbones.build("transformer", {**TOY, **overrides})
    x = jnp.asarray(np.random.default_rng(rng_seed).standard_normal((batch, frames, size, size, channels)),
                    jnp.float32)
    return model, random_variables(model, x), x


@functools.lru_cache(maxsize=None)
def _jitted(model, train):
    """One compiled program per model and mode (compiling is the slow part of these tests on CPU)."""
    return jax.jit(lambda v, x, s, r: model.apply(v, x, s, train=train, rngs=r))


@functools.lru_cache(maxsize=None)
def _jitted_rollout(model):
    def run(variables, state, xs):
        def body(carry, x_t):
            y_t, carry = model.apply(variables, x_t, carry, method=model.step)
            return carry, y_t
        return jax.lax.scan(body, state, xs)
    return jax.jit(run)


def forward(model, variables, x, state=None, train=False, rngs=None):
    """The parallel call, jitted."""
    return _jitted(model, train)(variables, x, state, rngs)


def rollout(model, variables, x, state=None):
    """init_state (unless given) then one `step` per frame, as a lax.scan: (B, T, H, W, C) -> (y, state)."""
    if state is None:
        state = model.apply(variables, x.shape[0], x.shape[2:4], method=model.init_state)
    state, ys = _jitted_rollout(model)(variables, state, jnp.swapaxes(x, 0, 1))
    return jnp.swapaxes(ys, 0, 1), state


def assert_states_close(a, b, atol=1e-5):
    assert len(a) == len(b)
    for entry_a, entry_b in zip(a, b):
        assert int(entry_a["time"]) == int(entry_b["time"])
        for name in ("key", "value"):
            np.testing.assert_allclose(entry_a[name], entry_b[name], atol=atol, rtol=1e-5)


def test_default_config_has_exactly_the_module_fields():
    fields = {f.name for f in dataclasses.fields(transformer.Backbone)} - {"parent", "name"}
    assert set(backbones.default_config("transformer")) == fields
    model = backbones.build("transformer")
    assert (model.embed_dim, model.mlp_dim, model.num_heads, model.n_layers, model.downsample) == (1024, 4096, 16, 8, 8)


@pytest.mark.parametrize("frames", [3, 8])  # within the window, and sliding past it (max_len = 3)
def test_parallel_equals_steps(frames):
    model, variables, x = make(frames=frames)
    y, final_state = forward(model, variables, x)
    y_steps, step_state = rollout(model, variables, x)
    assert y.shape == (2, frames, 4, 4, TOY["d_model"])
    np.testing.assert_allclose(y_steps, y, atol=1e-5, rtol=1e-5)
    assert_states_close(step_state, final_state)
    assert int(final_state[0]["time"]) == frames


@pytest.mark.parametrize("split", [2, 5])  # the second call starts inside / past the first window
def test_split_calls_equal_one_call(split):
    model, variables, x = make(frames=9)
    y, final_state = forward(model, variables, x)
    y_first, state = forward(model, variables, x[:, :split])
    y_second, state = forward(model, variables, x[:, split:], state)
    np.testing.assert_allclose(jnp.concatenate([y_first, y_second], axis=1), y, atol=1e-5, rtol=1e-5)
    assert_states_close(state, final_state)
    # A cache from a parallel call continues step by step just the same.
    _, state = forward(model, variables, x[:, :split])
    y_steps, _ = rollout(model, variables, x[:, split:], state)
    np.testing.assert_allclose(y_steps, y[:, split:], atol=1e-5, rtol=1e-5)


def test_causality():
    model, variables, x = make(frames=8)
    t = 3
    changed = x.at[:, t + 1:].set(np.random.default_rng(9).standard_normal(x[:, t + 1:].shape))
    y, _ = forward(model, variables, x)
    y_changed, _ = forward(model, variables, changed)
    np.testing.assert_allclose(y_changed[:, :t + 1], y[:, :t + 1], atol=1e-6, rtol=0)
    assert np.all(np.abs(np.asarray(y_changed[:, t + 1:] - y[:, t + 1:])).max(axis=(0, 2, 3, 4)) > 1e-3)


@pytest.mark.parametrize("n_layers", [1, 2])
def test_sliding_window_receptive_field(n_layers):
    """Frame 0 reaches output t exactly while t <= n_layers * (max_len - 1): each layer looks max_len - 1 back."""
    model, variables, x = make(frames=8, n_layers=n_layers)
    changed = x.at[:, 0].add(1.0)
    y, _ = forward(model, variables, x)
    y_changed, _ = forward(model, variables, changed)
    effect = np.abs(np.asarray(y_changed - y)).max(axis=(0, 2, 3, 4))
    reach = n_layers * (TOY["max_len"] - 1)
    assert np.all(effect[:reach + 1] > 1e-3), effect
    assert np.all(effect[reach + 1:] == 0.0), effect


def test_long_rollout_constant_memory():
    """1,030 generated frames with an 8-frame window: the state never grows and steps equal the parallel call."""
    model, variables, x = make(batch=1, frames=1030, size=2, channels=3, embed_dim=8, mlp_dim=16, num_heads=2,
                               max_len=8)
    initial = model.apply(variables, 1, (2, 2), method=model.init_state)
    y_steps, state = rollout(model, variables, x)
    y, _ = forward(model, variables, x)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), state) == jax.tree.map(lambda a: (a.shape, a.dtype), initial)
    assert int(state[0]["time"]) == 1030
    np.testing.assert_allclose(y_steps, y, atol=2e-5, rtol=1e-4)


# --- float64 NumPy reference of one layer ---------------------------------------------------------------------

def _layer_norm(x, p):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-6) * p["scale"] + p["bias"]


def reference_forward(params, x, cfg):
    """Dense float64 forward of a one-layer model with a hand-written block-causal sliding-window softmax."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    x = np.asarray(x, np.float64)
    batch, frames, height, width, channels = x.shape
    ds, dim, heads, window = cfg["downsample"], cfg["embed_dim"], cfg["num_heads"], cfg["max_len"]
    rows, cols, head_dim = height // ds, width // ds, dim // heads
    per_frame = rows * cols
    patches = x.reshape(batch, frames, rows, ds, cols, ds, channels)
    tokens = np.einsum("ntiajkc,akce->ntije", patches, p["tokenize"]["kernel"]) + p["tokenize"]["bias"]
    tokens = tokens.reshape(batch, frames, per_frame, dim) + p["spatial_position"]["embedding"]
    time_embedding = np.zeros((frames, dim))
    for t in range(frames):
        for i in range(dim // 2):
            angle = t / 10000.0 ** (2 * i / dim)
            time_embedding[t, i], time_embedding[t, dim // 2 + i] = math.sin(angle), math.cos(angle)
    h = (tokens + time_embedding[None, :, None]).reshape(batch, frames * per_frame, dim)

    layer = p["layers_0"]
    normed = _layer_norm(h, layer["attention_norm"])
    q, k, v = (np.einsum("ble,ehd->blhd", normed, layer[n]["kernel"]) + layer[n]["bias"]
               for n in ("query", "key", "value"))
    attended = np.zeros_like(q)
    for b in range(batch):
        for head in range(heads):
            for qi in range(frames * per_frame):
                query_frame = qi // per_frame
                keys = [ki for ki in range(frames * per_frame)
                        if query_frame - window < ki // per_frame <= query_frame]
                logits = np.array([q[b, qi, head] @ k[b, ki, head] for ki in keys]) / math.sqrt(head_dim)
                weights = np.exp(logits - logits.max())
                weights /= weights.sum()
                attended[b, qi, head] = sum(w * v[b, ki, head] for w, ki in zip(weights, keys))
    h = h + np.einsum("blhd,hde->ble", attended, layer["attention_out"]["kernel"]) + layer["attention_out"]["bias"]
    hidden = _layer_norm(h, layer["mlp_norm"]) @ layer["mlp_in"]["kernel"] + layer["mlp_in"]["bias"]
    hidden = hidden / (1.0 + np.exp(-1.702 * hidden))
    h = h + hidden @ layer["mlp_out"]["kernel"] + layer["mlp_out"]["bias"]

    g = h @ p["head_dense"]["kernel"] + p["head_dense"]["bias"]
    g = 0.5 * g * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (g + 0.044715 * g ** 3)))
    g = _layer_norm(g, p["head_norm"]).reshape(batch, frames, rows, cols, dim)
    kernel = p["untokenize"]["kernel"][::-1, ::-1]  # flax's ConvTranspose applies the spatially flipped kernel
    y = np.einsum("ntije,akeo->ntiajko", g, kernel)
    return y.reshape(batch, frames, height, width, -1)


def test_matches_float64_numpy_reference():
    model, variables, x = make(frames=7, n_layers=1)
    y, _ = forward(model, variables, x)
    expected = reference_forward(variables["params"], x, {**TOY, "n_layers": 1})
    np.testing.assert_allclose(np.asarray(y, np.float64), expected, atol=2e-5, rtol=1e-4)


def test_remat_same_outputs_and_gradients():
    model, variables, x = make(frames=6)
    remat_model = backbones.build("transformer", {**TOY, "remat": True})
    weights = jnp.asarray(np.random.default_rng(5).standard_normal((2, 6, 4, 4, TOY["d_model"])), jnp.float32)

    def loss(params, m):
        y, _ = m.apply({"params": params}, x, train=True)
        return jnp.sum(y * weights)

    def checkpointed_programs(m):
        return str(jax.make_jaxpr(lambda p: loss(p, m))(variables["params"])).count("remat")

    assert (checkpointed_programs(model), checkpointed_programs(remat_model)) == (0, TOY["n_layers"])
    value, grads = jax.jit(jax.value_and_grad(lambda p: loss(p, model)))(variables["params"])
    remat_value, remat_grads = jax.jit(jax.value_and_grad(lambda p: loss(p, remat_model)))(variables["params"])
    np.testing.assert_allclose(remat_value, value, rtol=1e-6)
    assert jax.tree.structure(remat_grads) == jax.tree.structure(grads)
    for a, b in zip(jax.tree.leaves(remat_grads), jax.tree.leaves(grads)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) > 0


def test_bfloat16_runs_and_stays_close():
    model, variables, x = make(frames=6)
    bf16 = backbones.build("transformer", {**TOY, "dtype": "bfloat16"})
    bf16_variables = jax.eval_shape(bf16.init, jax.random.PRNGKey(1), x)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(bf16_variables))
    y, _ = forward(model, variables, x)
    y_bf16, state = forward(bf16, variables, x)
    assert y_bf16.dtype == jnp.float32 and state[0]["key"].dtype == jnp.bfloat16
    relative = float(jnp.linalg.norm(y_bf16.astype(jnp.float32) - y) / jnp.linalg.norm(y))
    assert relative < 3e-2, relative
    y_steps, _ = rollout(bf16, variables, x)
    relative_steps = float(jnp.linalg.norm(y_steps.astype(jnp.float32) - y) / jnp.linalg.norm(y))
    assert relative_steps < 3e-2, relative_steps


def test_dropout_only_in_training():
    model, variables, x = make(frames=4, dropout=0.3, n_layers=1)
    plain = backbones.build("transformer", {**TOY, "dropout": 0.0, "n_layers": 1})
    y_eval, _ = forward(model, variables, x)
    np.testing.assert_array_equal(y_eval, forward(plain, variables, x)[0])
    y_a, _ = forward(model, variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(0)})
    y_b, _ = forward(model, variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(0)})
    y_c, _ = forward(model, variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
    np.testing.assert_array_equal(y_a, y_b)
    assert float(jnp.abs(y_a - y_eval).max()) > 1e-2 and float(jnp.abs(y_a - y_c).max()) > 1e-2


def test_bad_config_and_inputs_raise_clear_errors():
    x = jnp.zeros((1, 2, 5, 4, 3))

    def init_shapes(overrides, frames):
        model = backbones.build("transformer", {**TOY, **overrides})
        return jax.eval_shape(model.init, jax.random.PRNGKey(0), frames)

    with pytest.raises(ValueError, match="transformer.py: field downsample=2 must divide"):
        init_shapes({}, x)
    with pytest.raises(ValueError, match="transformer.py: field embed_dim=16 must be divisible by num_heads=5"):
        init_shapes({"num_heads": 5}, x[:, :, :4])
    with pytest.raises(ValueError, match="transformer.py: field dtype='int32'"):
        init_shapes({"dtype": "int32"}, x[:, :, :4])
    with pytest.raises(ValueError, match="valid fields"):
        backbones.build("transformer", {"hidden": 3})
    model, variables, frames = make(frames=2)
    state = model.apply(variables, 2, (8, 8), method=model.init_state)
    with pytest.raises(ValueError, match=r"state\[0\]\['key'\] has shape"):
        model.apply(variables, frames[:, 0], state, method=model.step)
