"""ConvT3 against its definition (docs/backbones.md): a 3x3 state kernel recurrence, computed spectrally."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from teco_ssm.backbones import common, convs5, convt3

H, W, U, SSM = 7, 6, 3, 8


SETTINGS = {convt3.ConvT3SSM: convt3.ConvT3Settings, convs5.ConvS5SSM: convs5.ConvS5Settings}


def make_ssm(cls=convt3.ConvT3SSM, **kw):
    return cls(SETTINGS[cls](ssm_size=SSM, blocks=2, **kw))


def init(module, u, key=0):
    return jax.jit(module.init)(jax.random.key(key), u, None)


def set_stencils(variables, raw_h, raw_w):
    params = jax.tree_util.tree_map(lambda x: x, variables["params"])
    params["raw_b_H"], params["raw_b_W"] = jnp.asarray(raw_h, jnp.float32), jnp.asarray(raw_w, jnp.float32)
    return {"params": params}


def direct_recurrence(module, variables, u, x0):
    """x_k = A_bar (*) x_{k-1} + B_bar (*) u_k with the explicit complex 3x3 depthwise kernel, sequentially."""
    params = variables["params"]
    cfg = module.settings
    diag = common.DiagonalSSM(cfg.ssm_size, cfg.blocks, U * cfg.B_kernel_size ** 2, U * cfg.C_kernel_size ** 2)
    lam_bar, B_bar, C_tilde = diag.apply({"params": params["diagonal"]})
    P, kB, kC = lam_bar.shape[0], cfg.B_kernel_size, cfg.C_kernel_size
    (a_h, b_h) = convt3.stencil(params["raw_b_H"], cfg.stencil_bound)
    (a_w, b_w) = convt3.stencil(params["raw_b_W"], cfg.stencil_bound)
    t_h = jnp.stack([b_h, a_h, b_h], 0)  # (3, P)
    t_w = jnp.stack([b_w, a_w, b_w], 0)
    a_kernel = (lam_bar[None, None, :] * t_h[:, None, :] * t_w[None, :, :])[:, :, None, :]  # (3, 3, 1, P)
    b_kernel = B_bar.reshape(P, kB, kB, U).transpose(1, 2, 3, 0)
    c_kernel = C_tilde.reshape(kC, kC, U, P).transpose(0, 1, 3, 2)
    x, ys, xs = x0, [], []
    for k in range(u.shape[1]):
        ax = jax.lax.conv_general_dilated(x, a_kernel.astype(x.dtype), (1, 1), "SAME",
                                          dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=P)
        x = ax + common.conv2d(u[:, k], b_kernel)
        xs.append(x)
        ys.append(2 * common.conv2d(x, c_kernel).real)
    return jnp.stack(ys, 1), jnp.stack(xs, 1)


def random_inputs(key, T=5):
    k1, k2, k3 = jax.random.split(jax.random.key(key), 3)
    u = jax.random.normal(k1, (2, T, H, W, U))
    x0 = (jax.random.normal(k2, (2, H, W, SSM // 2)) + 1j * jax.random.normal(k3, (2, H, W, SSM // 2))).astype(
        jnp.complex64)
    return u, x0


def rel_err(a, b):
    return float(jnp.linalg.norm((a - b).ravel()) / jnp.linalg.norm(b.ravel()))


@pytest.mark.parametrize("mode", ["associative", "sequential", "fft"])
def test_spectral_scan_equals_direct_3x3_recurrence(mode):
    module = make_ssm(scan_mode=mode)
    u, x0 = random_inputs(0)
    variables = set_stencils(init(module, u), np.linspace(-2, 2, SSM // 2), np.linspace(1.5, -1, SSM // 2))
    y, xs = jax.jit(module.apply)(variables, u, x0)
    y_ref, xs_ref = jax.jit(functools.partial(direct_recurrence, module))(variables, u, x0)
    assert rel_err(xs, xs_ref) < 1e-5
    assert rel_err(y, y_ref) < 1e-5


def test_zero_stencil_is_convs5():
    u, x0 = random_inputs(1)
    t3 = make_ssm(stencil_init=0.0)
    variables = init(t3, u)
    a, b = convt3.stencil(variables["params"]["raw_b_H"], t3.settings.stencil_bound)
    np.testing.assert_array_equal(a, 1.0)
    np.testing.assert_array_equal(b, 0.0)
    s5_params = {k: v for k, v in variables["params"].items() if not k.startswith("raw_b")}
    y_t3, xs_t3 = t3.apply(variables, u, x0)
    y_s5, xs_s5 = make_ssm(convs5.ConvS5SSM).apply({"params": s5_params}, u, x0)
    np.testing.assert_allclose(y_t3, y_s5, atol=1e-5)
    np.testing.assert_allclose(xs_t3, xs_s5, atol=1e-5)


def test_parallel_step_and_fft_modes_agree_with_initial_state():
    u, x0 = random_inputs(2, T=6)
    variables = init(make_ssm(), u)
    outs = {m: jax.jit(make_ssm(scan_mode=m).apply)(variables, u, x0) for m in ("associative", "sequential", "fft")}
    x, steps, step = x0, [], jax.jit(make_ssm().apply)
    for k in range(u.shape[1]):
        y_k, xs_k = step(variables, u[:, k:k + 1], x)
        x = xs_k[:, -1]
        steps.append(y_k)
    outs["step"] = (jnp.concatenate(steps, 1), None)
    for mode, (y, _) in outs.items():
        assert rel_err(y, outs["associative"][0]) < 1e-5, mode


def reach(field, threshold):
    """Largest Chebyshev distance from the centre pixel at which |field| exceeds threshold. field: (H, W)."""
    h, w = field.shape
    ii, jj = np.meshgrid(np.arange(h) - h // 2, np.arange(w) - w // 2, indexing="ij")
    dist = np.maximum(np.abs(ii), np.abs(jj))
    active = np.abs(field) > threshold
    return int(dist[active].max()), active, dist


@pytest.mark.parametrize("kernel", [1, 3])
def test_locality_of_an_impulse(kernel):
    size, steps, radius = 13, 4, (kernel - 1) // 2
    u = jnp.zeros((1, steps + 1, size, size, 1)).at[0, 0, size // 2, size // 2, 0].set(1.0)
    for cls in (convt3.ConvT3SSM, convs5.ConvS5SSM):
        module = cls(SETTINGS[cls](ssm_size=4, blocks=1, B_kernel_size=kernel, C_kernel_size=kernel))
        variables = init(module, u, 3)
        if cls is convt3.ConvT3SSM:
            variables = set_stencils(variables, [1.5, -1.2], [-1.0, 1.3])
        y, xs = jax.jit(module.apply)(variables, u, None)
        for k in range(steps + 1):
            state = np.abs(np.asarray(xs[0, k])).sum(-1)
            out = np.abs(np.asarray(y[0, k, :, :, 0]))
            grow = k if cls is convt3.ConvT3SSM else 0
            for field, expected in ((state, radius + grow), (out, 2 * radius + grow)):
                r, active, dist = reach(field, 1e-5 * field.max())
                assert r == expected, (cls.__name__, k, r, expected)
                assert active[dist <= expected].all()  # every pixel within reach is touched


def test_stable_for_any_raw_parameters():
    rng = np.random.default_rng(4)
    module = make_ssm(clip_eigs=True, scan_mode="sequential")
    u = jnp.zeros((1, 2000, H, W, U)).at[0, 0].set(jax.random.normal(jax.random.key(5), (H, W, U)))
    variables = init(module, u[:, :2])
    apply = jax.jit(module.apply)
    for trial in range(3):
        params = jax.tree_util.tree_map(lambda x: x, variables["params"])
        for name in ("raw_b_H", "raw_b_W"):
            params[name] = jnp.asarray(rng.normal(0, 10, SSM // 2), jnp.float32)
        diag = dict(params["diagonal"])
        diag["Lambda_re"] = jnp.asarray(rng.normal(0, 3, SSM // 2), jnp.float32)  # clip_eigs keeps it negative
        params["diagonal"] = diag
        _, xs = apply({"params": params}, u, None)
        norms = np.linalg.norm(np.asarray(xs).reshape(2000, -1), axis=1)
        assert np.isfinite(norms).all()
        assert norms.max() <= norms[0] * (1 + 1e-4)  # a contraction in the orthonormal spectral basis


def test_dst_diagonalises_every_symmetric_tridiagonal_toeplitz():
    n = 6
    s = convt3.dst1_matrix(n)
    np.testing.assert_allclose(s @ s, np.eye(n), atol=1e-12)
    a, b = 0.3, -0.2
    t = a * np.eye(n) + b * (np.eye(n, k=1) + np.eye(n, k=-1))
    mu = np.asarray(convt3.tridiagonal_eigenvalues(jnp.asarray([a]), jnp.asarray([b]), n))[:, 0]
    np.testing.assert_allclose(s @ t @ s, np.diag(mu), atol=1e-6)
