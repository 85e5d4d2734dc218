"""The temporal transformer: parallel == step-by-step (also past the window), split calls, causality and the exact
receptive field of the sliding window, a float64 NumPy reference of TECO's temporal transformer, the start token,
the DMLab parameter count, remat, bfloat16, dropout, config errors."""
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import dmlab
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
    fields = {f.name for f in dataclasses.fields(transformer.TransformerSettings)}
    assert set(backbones.default_config("transformer")) == fields
    model = backbones.build("transformer")
    settings = model.settings
    assert (settings.embed_dim, settings.mlp_dim, settings.num_heads, settings.n_layers, settings.downsample) == (
        1024, 4096, 16, 8, 8)


@pytest.mark.parametrize("frames", [3, 8])  # within the window, and sliding past it (max_len = 3)
def test_parallel_equals_steps(frames):
    model, variables, x = make(frames=frames)
    y, final_state = forward(model, variables, x)
    y_steps, step_state = rollout(model, variables, x)
    assert y.shape == (2, frames, 4, 4, TOY["d_model"])
    np.testing.assert_allclose(y_steps, y, atol=1e-5, rtol=1e-5)
    assert_states_close(step_state, final_state)
    assert int(final_state[0]["time"]) == frames + 1  # the start frame and the inputs


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
    assert np.all(effect[:reach + 1] > 1e-5), effect
    assert np.all(effect[reach + 1:] == 0.0), effect


def test_long_rollout_constant_memory():
    """1,030 generated frames with an 8-frame window: the state never grows and steps equal the parallel call."""
    model, variables, x = make(batch=1, frames=1030, size=2, channels=3, embed_dim=8, mlp_dim=16, num_heads=2,
                               max_len=8)
    initial = model.apply(variables, 1, (2, 2), method=model.init_state)
    y_steps, state = rollout(model, variables, x)
    y, _ = forward(model, variables, x)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), state) == jax.tree.map(lambda a: (a.shape, a.dtype), initial)
    assert int(state[0]["time"]) == 1031
    np.testing.assert_allclose(y_steps, y, atol=2e-5, rtol=1e-4)


# --- float64 NumPy reference of TECO's temporal transformer ----------------------------------------------------

def _layer_norm(x, p):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-6) * p["scale"] + p["bias"]


def _sinusoids(length, dim):
    """TECO's SinusoidalPositionBiases: row p = [sin(p w_i)..., cos(p w_i)...], w_i = 10000 ** (-2 i / dim)."""
    table = np.zeros((length, dim))
    for position in range(length):
        for i in range(dim // 2):
            angle = position / 10000.0 ** (2 * i / dim)
            table[position, i], table[position, dim // 2 + i] = math.sin(angle), math.cos(angle)
    return table


def reference_forward(params, x, cfg):
    """Dense float64 forward of TECO's `temporal_transformer` (teco/models/teco.py) with its `Transformer`
    (teco/models/transformer.py, pos_embed_type='sinusoidal'), written from the release's structure:
    z_proj (bias-free strided conv), the sos frame first, the input Dense, sinusoids over the flattened token index,
    pre-LayerNorm blocks, the head Dense -> tanh GELU -> LayerNorm, the sos output dropped, z_unproj (bias-free
    transposed conv). Attention is block-causal over frames (the release's tril mask repeated per token), limited
    to the last cfg['max_len'] frames; with max_len >= T + 1 it is the release's full mask."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    x = np.asarray(x, np.float64)
    batch, frames, height, width, channels = x.shape
    ds, dim, heads, window = cfg["downsample"], cfg["embed_dim"], cfg["num_heads"], cfg["max_len"]
    rows, cols, head_dim = height // ds, width // ds, dim // heads
    per_frame = rows * cols
    patches = x.reshape(batch, frames, rows, ds, cols, ds, channels)
    tokens = np.einsum("ntiajkc,akce->ntije", patches, p["tokenize"]["kernel"]).reshape(batch, frames, per_frame, dim)
    sos = np.broadcast_to(p["sos"]["embedding"].reshape(1, 1, per_frame, dim), (batch, 1, per_frame, dim))
    tokens = np.concatenate([sos, tokens], axis=1)
    length = (frames + 1) * per_frame
    h = tokens @ p["project"]["kernel"] + p["project"]["bias"]
    h = h.reshape(batch, length, dim) + _sinusoids(length, dim)

    frame = np.arange(length) // per_frame
    mask = (frame[None, :] <= frame[:, None]) & (frame[None, :] > frame[:, None] - window)
    for i in range(cfg["n_layers"]):
        layer = p[f"layers_{i}"]
        normed = _layer_norm(h, layer["attention_norm"])
        q, k, v = (np.einsum("ble,ehd->blhd", normed, layer[n]["kernel"]) + layer[n]["bias"]
                   for n in ("query", "key", "value"))
        logits = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
        logits = np.where(mask, logits, -np.inf)
        weights = np.exp(logits - logits.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        attended = np.einsum("bhqk,bkhd->bqhd", weights, v)
        h = h + np.einsum("blhd,hde->ble", attended, layer["attention_out"]["kernel"]) + layer["attention_out"]["bias"]
        hidden = _layer_norm(h, layer["mlp_norm"]) @ layer["mlp_in"]["kernel"] + layer["mlp_in"]["bias"]
        hidden = hidden / (1.0 + np.exp(-1.702 * hidden))
        h = h + hidden @ layer["mlp_out"]["kernel"] + layer["mlp_out"]["bias"]

    g = h @ p["head_dense"]["kernel"] + p["head_dense"]["bias"]
    g = 0.5 * g * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (g + 0.044715 * g ** 3)))
    g = _layer_norm(g, p["head_norm"]).reshape(batch, frames + 1, rows, cols, dim)[:, 1:]
    kernel = p["untokenize"]["kernel"][::-1, ::-1]  # flax's ConvTranspose applies the spatially flipped kernel
    y = np.einsum("ntije,akeo->ntiajko", g, kernel)
    return y.reshape(batch, frames, height, width, -1)


@pytest.mark.parametrize("max_len", [8, 3])  # the release's full causal mask (sos + 7 frames), a sliding window
def test_matches_float64_numpy_reference(max_len):
    model, variables, x = make(frames=7, max_len=max_len)
    y, _ = forward(model, variables, x)
    expected = reference_forward(variables["params"], x, {**TOY, "max_len": max_len})
    np.testing.assert_allclose(np.asarray(y, np.float64), expected, atol=1e-5, rtol=1e-5)
    y_steps, _ = rollout(model, variables, x)
    np.testing.assert_allclose(np.asarray(y_steps, np.float64), expected, atol=1e-5, rtol=1e-5)


def test_start_token():
    """init_state holds the processed sos frame (time 1); the sos reaches every output in the window; without
    start_token the state starts empty at time 0 and the parallel call equals steps from it."""
    model, variables, x = make(frames=4)
    state = model.apply(variables, 2, (4, 4), method=model.init_state)
    assert all(int(entry["time"]) == 1 for entry in state)
    assert all(float(jnp.abs(entry["key"][:, 0]).min()) > 0 for entry in state)
    assert all(float(jnp.abs(entry["key"][:, 1:]).max()) == 0 for entry in state)
    y, _ = forward(model, variables, x)
    moved = jax.tree.map(lambda a: a, variables)
    moved["params"]["sos"]["embedding"] = variables["params"]["sos"]["embedding"] + 0.5
    y_moved, _ = forward(model, moved, x)
    assert np.all(np.abs(np.asarray(y_moved - y)).max(axis=(0, 2, 3, 4)) > 1e-3)

    plain = backbones.build("transformer", {**TOY, "start_token": False})
    plain_variables = {"params": {k: v for k, v in variables["params"].items() if k != "sos"}}
    assert jax.tree.structure(jax.eval_shape(plain.init, jax.random.PRNGKey(0), x)) == jax.tree.structure(
        plain_variables)
    empty = plain.apply(plain_variables, 2, (4, 4), method=plain.init_state)
    assert int(empty[0]["time"]) == 0 and float(jnp.abs(empty[0]["key"]).max()) == 0
    y_plain, final = forward(plain, plain_variables, x)
    assert int(final[0]["time"]) == 4 and float(jnp.abs(y_plain - y).max()) > 1e-3
    y_steps, _ = rollout(plain, plain_variables, x)
    np.testing.assert_allclose(y_steps, y_plain, atol=1e-5, rtol=1e-5)


def test_dmlab_temporal_parameter_count_matches_the_release():
    """112,309,248 parameters: TECO's DMLab temporal model (configs/dmlab.yaml: z_ds 8, embed 1024, mlp 4096,
    8 layers) counted by hand from its modules, on 8x8 latents of 64 channels plus a 16-wide action embedding."""
    config = dmlab.get_config("transformer")
    model = backbones.build("transformer", config.transformer)
    channels = config.model.latent_dim + config.model.action_embed_dim
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 2, 8, 8, channels)))
    count = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes["params"]))

    embed, mlp, kernel, layers = 1024, 4096, 8, 8
    dense = embed * embed + embed
    z_proj, sos, fc_in = kernel * kernel * channels * embed, embed, dense
    layer = 2 * 2 * embed + 4 * dense + (embed * mlp + mlp) + (mlp * embed + embed)
    head = dense + 2 * embed
    z_unproj = kernel * kernel * embed * config.model.latent_dim
    assert count == z_proj + sos + fc_in + layers * layer + head + z_unproj == 112_309_248


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


@pytest.mark.parametrize("rates", [dict(dropout=0.3), dict(attention_dropout=0.3)])
def test_dropout_only_in_training(rates):
    model, variables, x = make(frames=4, n_layers=1, **rates)
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
    with pytest.raises(ValueError, match="transformer.py: field attention_dropout must lie in"):
        init_shapes({"attention_dropout": 1.0}, x[:, :, :4])
    with pytest.raises(ValueError, match="valid fields"):
        backbones.build("transformer", {"hidden": 3})
    model, variables, frames = make(frames=2)
    state = model.apply(variables, 3, (4, 4), method=model.init_state)
    with pytest.raises(ValueError, match=r"state\[0\]\['key'\] has shape"):
        model.apply(variables, frames[:, 0], state, method=model.step)
