"""HiPPO-N initialisation and ZOH discretisation against direct float64 computations."""
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from teco_ssm.backbones import common


def test_hippo_n_matches_equation_29():
    n = 5
    a = common.hippo_n(n)
    for i in range(n):
        for k in range(n):
            expected = -0.5 if i == k else np.sqrt(i + 0.5) * np.sqrt(k + 0.5) * (-1 if i > k else 1)
            assert a[i, k] == expected


def test_initial_eigenvalues_are_hippo_n_eigenvalues_block_by_block():
    ssm_size, blocks = 12, 3
    Lambda, V, V_inv = common.hippo_n_eigendecomposition(ssm_size, blocks)
    size = ssm_size // blocks
    want = np.linalg.eigvals(common.hippo_n(size))
    for blk in range(blocks):
        lam = Lambda[blk * size // 2:(blk + 1) * size // 2]
        got = np.concatenate([lam, lam.conj()])
        by_frequency = lambda z: z[np.argsort(z.imag)]
        np.testing.assert_allclose(by_frequency(got), by_frequency(want), atol=1e-10)
    # V holds the kept eigenvectors: A V = V diag(Lambda) with A block diagonal
    a = scipy.linalg.block_diag(*([common.hippo_n(size)] * blocks))
    np.testing.assert_allclose(a @ V, V * Lambda[None, :], atol=1e-10)
    np.testing.assert_allclose(V_inv @ V, np.eye(len(Lambda)), atol=1e-10)


def test_zoh_matches_matrix_exponential():
    rng = np.random.default_rng(0)
    Lambda = -rng.uniform(0.1, 1, 4) + 1j * rng.normal(size=4)
    B = rng.normal(size=(4, 3)) + 1j * rng.normal(size=(4, 3))
    Delta = rng.uniform(0.01, 0.5, 4)
    lam_bar, B_bar = common.discretize_zoh(jnp.asarray(Lambda, jnp.complex64), jnp.asarray(B, jnp.complex64),
                                           jnp.asarray(Delta, jnp.float32))
    for p in range(4):
        # ZOH of the scalar system: A_bar = e^{lam d}, B_bar = int_0^d e^{lam s} ds B
        aug = np.zeros((2, 2), complex)
        aug[0, 0], aug[0, 1] = Lambda[p] * Delta[p], Delta[p]
        e = scipy.linalg.expm(aug)
        np.testing.assert_allclose(lam_bar[p], e[0, 0], rtol=1e-5)
        np.testing.assert_allclose(B_bar[p], e[0, 1] * B[p], rtol=1e-4)
