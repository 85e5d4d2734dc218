"""ConvS5 and S5 as released: the layer against a float64 NumPy reference written from the release's structure, fed
the module's own parameters, and the initial B_tilde, C_tilde against the release's constructions.

Structure (NVlabs/ConvSSM, `convS5/diagonal_ssm.py` with `C_D_config: resnet`, `conv_ops.ResnetBlock`,
`layers.SequenceLayer`): x_k = lam_bar x_{k-1} + B_bar (*) u_k; y_k = 2 Re(C_tilde (*) x_k) (no D);
r_k = gelu(y_k + conv(gelu(GN(conv(gelu(GN(y_k))))))); out_k = LayerNorm(u_k + r_k).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from teco_ssm import backbones
from teco_ssm.backbones import common

EPS = 1e-6  # flax's GroupNorm and LayerNorm epsilon, the release's too


# ----------------------------------------------------------------------------------------------- float64 reference
def conv_same(x, kernel):
    """'SAME' zero-padded convolution. x (N, H, W, Cin), kernel (k, k, Cin, Cout) -> (N, H, W, Cout)."""
    k = kernel.shape[0]
    pad = (k - 1) // 2
    xp = np.pad(x, ((0, 0), (pad, k - 1 - pad), (pad, k - 1 - pad), (0, 0)))
    H, W = x.shape[1:3]
    return sum(np.einsum("nhwc,co->nhwo", xp[:, a:a + H, b:b + W], kernel[a, b]) for a in range(k) for b in range(k))


def gelu(x):
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def group_norm(x, groups, scale, bias):
    n, h, w, c = x.shape
    g = x.reshape(n, h, w, groups, c // groups)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = g.var(axis=(1, 2, 4), keepdims=True)
    return ((g - mean) / np.sqrt(var + EPS)).reshape(x.shape) * scale + bias


def layer_norm(x, scale, bias):
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + EPS) * scale + bias


def f64(tree):
    return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), tree)


def reference_layer(p, u, kB, kC, groups, x0=None):
    """One release ConvS5 layer over u (B, T, H, W, U) float64 -> (out (B, T, H, W, U), last state)."""
    d = p["ssm"]["diagonal"]
    U = u.shape[-1]
    Lambda = d["Lambda_re"] + 1j * d["Lambda_im"]
    lam_bar = np.exp(Lambda * np.exp(d["log_step"]))
    B_tilde = d["B"][..., 0] + 1j * d["B"][..., 1]
    C_tilde = d["C"][..., 0] + 1j * d["C"][..., 1]
    P = len(Lambda)
    B_bar = ((lam_bar - 1.0) / Lambda)[:, None] * B_tilde
    B_kernel = B_bar.reshape(P, kB, kB, U).transpose(1, 2, 3, 0)
    C_kernel = C_tilde.reshape(kC, kC, U, P).transpose(0, 1, 3, 2)
    a = p["activation"]
    x = np.zeros(u.shape[:1] + u.shape[2:4] + (P,), complex) if x0 is None else x0
    outs = []
    for k in range(u.shape[1]):
        x = lam_bar * x + conv_same(u[:, k], B_kernel)
        y = 2.0 * conv_same(x, C_kernel).real
        h = gelu(group_norm(y, groups, a["GroupNorm_0"]["scale"], a["GroupNorm_0"]["bias"]))
        h = conv_same(h, a["Conv_0"]["kernel"]) + a["Conv_0"]["bias"]
        h = gelu(group_norm(h, groups, a["GroupNorm_1"]["scale"], a["GroupNorm_1"]["bias"]))
        h = conv_same(h, a["Conv_1"]["kernel"]) + a["Conv_1"]["bias"]
        r = gelu(y + h)
        outs.append(layer_norm(u[:, k] + r, p["norm"]["scale"], p["norm"]["bias"]))
    return np.stack(outs, 1), x


def reference_stack(params, x, n_layers, kB, kC, groups):
    h = x @ params["input_proj"]["kernel"] + params["input_proj"]["bias"]
    for i in range(n_layers):
        h, _ = reference_layer(params[f"layer_{i}"], h, kB, kC, groups)
    return h


# ----------------------------------------------------------------------------------------------------- the layer
def build(name, **overrides):
    cfg = backbones.default_config(name)
    cfg.update({**dict(d_model=8, ssm_size=8, blocks=2, num_groups=4, B_kernel_size=3, C_kernel_size=3), **overrides})
    return backbones.build(name, cfg)


def init(model, x):
    variables = jax.jit(model.init)(jax.random.key(3), x)
    # trained-looking values: larger norms' affine terms and conv biases, so every term of the block matters
    leaves, tree = jax.tree_util.tree_flatten(variables)
    keys = jax.random.split(jax.random.key(4), len(leaves))
    leaves = [v + 0.3 * jax.random.normal(k, v.shape) if v.ndim == 1 and v.shape[0] == 8 else v
              for v, k in zip(leaves, keys)]
    return jax.tree_util.tree_unflatten(tree, leaves)


@pytest.mark.parametrize("name", ["convs5", "convt3"])
@pytest.mark.parametrize("n_layers", [1, 2])
@pytest.mark.parametrize("mode", ["associative", "sequential", "fft"])
def test_layer_stack_matches_release_reference(name, n_layers, mode):
    """ConvT3 with its stencils at 0 is ConvS5 exactly, so both follow the same reference."""
    extra = dict(stencil_init=0.0) if name == "convt3" else {}
    model = build(name, n_layers=n_layers, scan_mode=mode, **extra)
    x = jax.random.normal(jax.random.key(0), (2, 5, 4, 4, 3))
    variables = init(model, x)
    if name == "convt3":
        assert all(float(jnp.abs(v).max()) == 0.0 for path, v in jax.tree_util.tree_leaves_with_path(variables)
                   if "raw_b" in jax.tree_util.keystr(path))
    want = reference_stack(f64(variables["params"]), np.asarray(x, np.float64), n_layers, 3, 3, 4)
    got, _ = jax.jit(model.apply)(variables, x)
    scale = np.abs(want).max()
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5 * scale)

    state = model.apply(variables, 2, (4, 4), method=model.init_state)
    steps = []
    step = jax.jit(lambda v, xt, s: model.apply(v, xt, s, method=model.step))
    for t in range(x.shape[1]):
        y_t, state = step(variables, x[:, t], state)
        steps.append(y_t)
    np.testing.assert_allclose(np.stack(steps, 1), want, atol=1e-5 * scale)


def test_layer_with_initial_state_matches_reference():
    layer_cls = backbones.convs5.ConvS5Layer
    layer = layer_cls(backbones.convs5.ConvS5Settings(d_model=8, ssm_size=8, blocks=2, num_groups=4))
    u = jax.random.normal(jax.random.key(1), (2, 4, 4, 4, 8))
    x0 = jax.lax.complex(*jax.random.normal(jax.random.key(2), (2, 2, 4, 4, 4)))
    variables = jax.jit(layer.init)(jax.random.key(5), u, x0)
    (out, last) = jax.jit(layer.apply)(variables, u, x0)
    want, want_last = reference_layer(f64(variables["params"]), np.asarray(u, np.float64), 3, 3, 4,
                                      np.asarray(x0, np.complex128))
    np.testing.assert_allclose(np.asarray(out), want, atol=1e-5 * np.abs(want).max())
    np.testing.assert_allclose(np.asarray(last), want_last, atol=1e-5 * np.abs(want_last).max())


def test_D_term_is_an_option_off_by_default():
    x = jax.random.normal(jax.random.key(0), (1, 3, 4, 4, 3))
    plain = jax.jit(build("convs5").init)(jax.random.key(1), x)
    assert "D" not in plain["params"]["layer_0"]
    with_d = build("convs5", D_term=True)
    variables = jax.jit(with_d.init)(jax.random.key(1), x)
    assert variables["params"]["layer_0"]["D"].shape == (8,)
    y_d, _ = with_d.apply(variables, x)
    no_d = jax.tree_util.tree_map(lambda a: a, variables)
    no_d["params"]["layer_0"]["D"] = jnp.zeros(8)
    y_0, _ = with_d.apply(no_d, x)
    assert float(jnp.abs(y_d - y_0).max()) > 1e-3


def test_group_count_must_divide_width():
    x = jnp.zeros((1, 2, 4, 4, 3))
    with pytest.raises(ValueError, match="num_groups"):
        build("convs5", num_groups=3).init(jax.random.key(0), x)


# ------------------------------------------------------------------------------------------------ initialisation
def mean_square(kind, key, *, init, U=16, ssm_size=16, blocks=2, k=3):
    """Mean |B_tilde|^2 or |C_tilde|^2 of one draw of DiagonalSSM's parameters."""
    ssm = common.DiagonalSSM(ssm_size, blocks, U * k * k if k else U, U * k * k if k else U, init_scheme=init,
                             c_kernel_area=k * k if k else 1)
    p = jax.jit(ssm.init)(key)["params"][kind]
    return float(jnp.mean(p[..., 0] ** 2 + p[..., 1] ** 2))


def release_mean_square(kind, *, U, ssm_size, blocks, k):
    """E|B_tilde|^2 (B_tilde = V^-1 B) or E|C_tilde|^2 (C_tilde = C V) with B, C of the release's he_normal:
    variance 2 / fan_in, fan_in = U k^2 for B (`initialize_B_kernel`) and ssm_size k^2 for C
    (`initialize_C_kernel`). With iid entries, E|(V^-1 B)_pj|^2 = var * sum_i |V^-1_pi|^2."""
    _, V, V_inv = common.hippo_n_eigendecomposition(ssm_size, blocks)
    if kind == "B":
        return 2.0 / (U * k * k) * float(np.mean(np.sum(np.abs(V_inv) ** 2, axis=1)))
    return 2.0 / (ssm_size * k * k) * float(np.mean(np.sum(np.abs(V) ** 2, axis=0)))


@pytest.mark.parametrize("kind", ["B", "C"])
def test_convs5_initial_B_C_scale_is_the_release_he_normal(kind):
    draws = [mean_square(kind, jax.random.key(s), init="he_normal") for s in range(20)]
    want = release_mean_square(kind, U=16, ssm_size=16, blocks=2, k=3)
    assert abs(np.sqrt(np.mean(draws)) / np.sqrt(want) - 1.0) < 0.05


@pytest.mark.parametrize("kind", ["B", "C"])
def test_convs5_layer_uses_release_initialisation_by_default(kind):
    layer = backbones.convs5.ConvS5Layer(backbones.convs5.ConvS5Settings(d_model=16, ssm_size=16, blocks=2,
                                                                         num_groups=4))
    u = jnp.zeros((1, 2, 4, 4, 16))
    draws = []
    for s in range(20):
        p = jax.jit(layer.init)(jax.random.key(s), u, None)["params"]["ssm"]["diagonal"][kind]
        draws.append(float(jnp.mean(p[..., 0] ** 2 + p[..., 1] ** 2)))
    want = release_mean_square(kind, U=16, ssm_size=16, blocks=2, k=3)
    assert abs(np.sqrt(np.mean(draws)) / np.sqrt(want) - 1.0) < 0.05


def test_s5_initial_C_is_complex_lecun_normal():
    """S5's C (`S5/diagonal_ssm.py` trunc_standard_normal: real and imaginary parts lecun-normal over the
    ssm_size states, variance 1 / ssm_size each), so E|C_tilde|^2 = 2 / ssm_size * sum_i |V_ip|^2."""
    ssm_size, blocks, U = 16, 2, 24
    draws = [mean_square("C", jax.random.key(s), init="s5", U=U, ssm_size=ssm_size, blocks=blocks, k=0)
             for s in range(20)]
    _, V, _ = common.hippo_n_eigendecomposition(ssm_size, blocks)
    want = 2.0 / ssm_size * float(np.mean(np.sum(np.abs(V) ** 2, axis=0)))
    assert abs(np.sqrt(np.mean(draws)) / np.sqrt(want) - 1.0) < 0.05
    # genuinely complex before the change of basis: C = C_tilde V^H has an imaginary part as large as its real part
    ssm = common.DiagonalSSM(ssm_size, blocks, U, U, init_scheme="s5")
    c = jax.jit(ssm.init)(jax.random.key(0))["params"]["C"]
    C = (np.asarray(c[..., 0]) + 1j * np.asarray(c[..., 1])) @ V.conj().T
    assert 0.8 < np.std(C.imag) / np.std(C.real) < 1.25


def test_unknown_initialisation_is_an_error():
    with pytest.raises(ValueError, match="initialisation"):
        common.DiagonalSSM(8, 1, 4, 4, init_scheme="glorot").init(jax.random.key(0))


# ------------------------------------------------------------------------------------ the Winograd convolution
def conv_same_adjoint(x, kernel, g):
    """The float64 gradients of sum(g * conv_same(x, kernel)) with respect to x and kernel (3x3, 'SAME')."""
    H, W = x.shape[1:3]
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    dkernel = np.stack([np.stack([np.einsum("nhwc,nhwo->co", xp[:, a:a + H, b:b + W], g) for b in range(3)])
                        for a in range(3)])
    dx = conv_same(g, kernel[::-1, ::-1].transpose(0, 1, 3, 2))
    return dx, dkernel


@pytest.mark.parametrize("shape", [(3, 8, 8, 5, 6), (2, 7, 9, 4, 3), (1, 1, 1, 2, 2), (2, 5, 6, 3, 8)])
def test_winograd_convolution_and_its_gradients_equal_a_float64_convolution(shape):
    n, h, w, cin, cout = shape
    x = jax.random.normal(jax.random.key(0), (n, h, w, cin))
    kernel = jax.random.normal(jax.random.key(1), (3, 3, cin, cout))
    g = jax.random.normal(jax.random.key(2), (n, h, w, cout))
    y, vjp = jax.vjp(jax.jit(common.winograd_conv3x3), x, kernel)
    want = conv_same(*f64((x, kernel)))
    np.testing.assert_allclose(np.asarray(y), want, atol=1e-5 * np.abs(want).max())
    for got, want in zip(vjp(g), conv_same_adjoint(*f64((x, kernel, g)))):
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-5 * np.abs(want).max())


def test_the_convolution_algorithm_by_backend_width_and_dtype():
    wide, narrow = jnp.zeros((1, 4, 4, 256)), jnp.zeros((1, 4, 4, 128))
    assert common.conv_algorithm(wide, jnp.zeros((3, 3, 256, 512))) == "winograd"  # on this CPU backend
    assert common.conv_algorithm(narrow, jnp.zeros((3, 3, 128, 256))) == "xla"
    assert common.conv_algorithm(wide, jnp.zeros((5, 5, 256, 512))) == "xla"
    assert common.conv_algorithm(wide.astype(jnp.bfloat16), jnp.zeros((3, 3, 256, 512), jnp.bfloat16)) == "xla"
    assert common.conv_algorithm(wide.astype(jnp.complex64), jnp.zeros((3, 3, 256, 512), jnp.complex64)) == "xla"
    with pytest.raises(ValueError, match="3x3 float32"):
        common.conv2d(wide, jnp.zeros((5, 5, 256, 8)), "winograd")
    with pytest.raises(ValueError, match="unknown convolution algorithm 'fast'"):
        common.conv2d(wide, jnp.zeros((3, 3, 256, 8)), "fast")


@pytest.mark.parametrize("name", ["convs5", "convt3"])
def test_layer_stack_with_winograd_convolutions_matches_release_reference(name, monkeypatch):
    """Every ConvSSM core convolution as Winograd's (the CPU's choice at DMLab width, here forced at toy width),
    forward and step by step, against the float64 release reference; gradients against the XLA convolutions'."""
    extra = dict(stencil_init=0.0) if name == "convt3" else {}
    model = build(name, n_layers=2, scan_mode="sequential", **extra)
    x = jax.random.normal(jax.random.key(0), (2, 5, 4, 4, 3))
    variables = init(model, x)
    loss = lambda v: jnp.mean(model.apply(v, x)[0] ** 2)
    reference_grads = jax.jit(jax.grad(loss))(variables)
    monkeypatch.setattr(common, "WINOGRAD_MIN_CHANNELS", 1)
    assert common.conv_algorithm(x, jnp.zeros((3, 3, 8, 8))) == "winograd"
    want = reference_stack(f64(variables["params"]), np.asarray(x, np.float64), 2, 3, 3, 4)
    got, _ = jax.jit(lambda v, x: model.apply(v, x))(variables, x)
    scale = np.abs(want).max()
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5 * scale)
    state = model.apply(variables, 2, (4, 4), method=model.init_state)
    step = jax.jit(lambda v, xt, s: model.apply(v, xt, s, method=model.step))
    steps = []
    for t in range(x.shape[1]):
        y_t, state = step(variables, x[:, t], state)
        steps.append(y_t)
    np.testing.assert_allclose(np.stack(steps, 1), want, atol=1e-5 * scale)
    # a new function, so that tracing (cached per function) sees the lowered threshold
    grads = dict(jax.tree_util.tree_leaves_with_path(jax.jit(jax.grad(lambda v: jnp.mean(model.apply(v, x)[0] ** 2)))(
        variables)))
    for path, a in jax.tree_util.tree_leaves_with_path(reference_grads):
        b = grads[path]
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5 * float(jnp.abs(a).max()) + 1e-9,
                                   err_msg=jax.tree_util.keystr(path))
