"""The three scan modes and the single step against a float64 NumPy loop, values and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from teco_ssm import scan


def reference(decay, b, x0=None):
    """float64 loop: x_k = decay * x_{k-1} + b_k."""
    decay, b = np.asarray(decay, np.complex128), np.asarray(b, np.complex128)
    x = np.zeros_like(b[:, 0]) if x0 is None else np.asarray(x0, np.complex128)
    out = []
    for k in range(b.shape[1]):
        x = decay * x + b[:, k]
        out.append(x)
    return np.stack(out, 1)


def random_problem(rng, decay_shape, state_shape, length=37, batch=2):
    radius = rng.uniform(0.3, 0.999, decay_shape)
    decay = radius * np.exp(1j * rng.uniform(-np.pi, np.pi, decay_shape))
    b = rng.normal(size=(batch, length) + state_shape) + 1j * rng.normal(size=(batch, length) + state_shape)
    x0 = rng.normal(size=(batch,) + state_shape) + 1j * rng.normal(size=(batch,) + state_shape)
    return decay.astype(np.complex64), b.astype(np.complex64), x0.astype(np.complex64)


SHAPES = [((6,), (6,)), ((6,), (3, 4, 6)), ((3, 4, 6), (3, 4, 6))]


@pytest.mark.parametrize("mode", scan.MODES)
@pytest.mark.parametrize("decay_shape,state_shape", SHAPES)
@pytest.mark.parametrize("with_x0", [False, True])
def test_modes_match_float64_loop(mode, decay_shape, state_shape, with_x0):
    decay, b, x0 = random_problem(np.random.default_rng(0), decay_shape, state_shape)
    x0 = x0 if with_x0 else None
    got = np.asarray(jax.jit(scan.scan, static_argnames="mode")(decay, b, x0, mode=mode))
    want = reference(decay, b, x0)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())


def test_real_inputs_stay_real():
    rng = np.random.default_rng(1)
    decay = rng.uniform(0.1, 0.9, (5,)).astype(np.float32)
    b = rng.normal(size=(2, 20, 5)).astype(np.float32)
    for mode in scan.MODES:
        got = scan.scan(decay, b, mode=mode)
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(got, reference(decay, b).real, atol=1e-5)


def test_step_continues_a_scan():
    decay, b, x0 = random_problem(np.random.default_rng(2), (3, 4, 6), (3, 4, 6), length=10)
    states = scan.scan(decay, b, x0)
    x = x0
    for k in range(b.shape[1]):
        x = scan.step(decay, x, b[:, k])
    np.testing.assert_allclose(x, states[:, -1], atol=1e-5)
    # splitting the sequence in two scans equals one scan
    first = scan.scan(decay, b[:, :4], x0)
    second = scan.scan(decay, b[:, 4:], first[:, -1])
    np.testing.assert_allclose(np.concatenate([first, second], 1), states, atol=1e-5)


def test_gradients_agree_across_modes():
    decay, b, x0 = random_problem(np.random.default_rng(3), (6,), (2, 3, 6), length=16)

    def loss(decay, b, x0, mode):
        xs = scan.scan(decay, b, x0, mode=mode)
        weights = jnp.cos(jnp.arange(xs.size, dtype=jnp.float32)).reshape(xs.shape)
        return jnp.sum(weights * (xs.real ** 2 - xs.imag))

    grads = {m: jax.grad(loss, argnums=(0, 1, 2))(decay, b, x0, m) for m in scan.MODES}
    # float64 finite-difference check of the reference gradient with respect to one decay entry
    eps = 1e-6
    def ref_loss(decay):
        xs = reference(decay, b, x0)
        weights = np.cos(np.arange(xs.size)).reshape(xs.shape)
        return np.sum(weights * (xs.real ** 2 - xs.imag))
    d = np.asarray(decay, np.complex128)
    dr = d.copy(); dr[2] += eps
    di = d.copy(); di[2] += 1j * eps
    numeric = (ref_loss(dr) - ref_loss(d)) / eps - 1j * (ref_loss(di) - ref_loss(d)) / eps
    # JAX's gradient of a real loss with respect to a complex input is dL/dRe - i dL/dIm
    np.testing.assert_allclose(np.asarray(grads["sequential"][0][2]), numeric, rtol=1e-3)
    for mode in ("associative", "fft"):
        for g, g_ref in zip(grads[mode], grads["sequential"]):
            np.testing.assert_allclose(g, g_ref, rtol=0, atol=2e-4 * np.abs(g_ref).max())


def test_unknown_mode_lists_valid_ones():
    with pytest.raises(ValueError, match="associative, sequential, fft"):
        scan.scan(jnp.ones(2), jnp.ones((1, 3, 2)), mode="parallel")


def test_auto_is_the_sequential_scan_on_cpu_and_the_associative_one_elsewhere(monkeypatch):
    decay, b, x0 = random_problem(np.random.default_rng(3), (6,), (3, 4, 6))
    assert jax.default_backend() == "cpu" and scan.resolve("auto") == "sequential"
    np.testing.assert_array_equal(scan.scan(decay, b, x0, mode="auto"), scan.scan(decay, b, x0, mode="sequential"))
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert scan.resolve("auto") == "associative"
    np.testing.assert_array_equal(scan.scan(decay, b, x0, mode="auto"), scan.scan(decay, b, x0, mode="associative"))
    with pytest.raises(ValueError, match="unknown scan mode 'parallel'; valid modes: auto, associative"):
        scan.scan(decay, b, mode="parallel")
