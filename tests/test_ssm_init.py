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


def test_block_wise_basis_change_is_the_dense_product(monkeypatch):
    """B_tilde = V^-1 B and C_tilde = C V taken block by block equal the dense float64 products, for real and
    complex B and C; and DiagonalSSM's parameters equal those of the dense complex64 products of the same draws."""
    import jax

    ssm_size, blocks = 24, 3
    _, V, V_inv = common.hippo_n_eigendecomposition(ssm_size, blocks)
    block_v = V[:ssm_size // blocks, :ssm_size // blocks // 2]
    rng = np.random.default_rng(1)
    for complex_input in (False, True):
        B = rng.normal(size=(ssm_size, 5)) + (1j * rng.normal(size=(ssm_size, 5)) if complex_input else 0)
        C = rng.normal(size=(7, ssm_size)) + (1j * rng.normal(size=(7, ssm_size)) if complex_input else 0)
        to = lambda x: jnp.asarray(x, jnp.complex64 if complex_input else jnp.float32)
        np.testing.assert_allclose(common.to_eigenbasis_b(to(B), block_v), V_inv @ B, atol=2e-6)
        np.testing.assert_allclose(common.to_eigenbasis_c(to(C), block_v), C @ V, atol=2e-6)

    def init(scheme):
        ssm = common.DiagonalSSM(ssm_size, blocks, in_features=5, out_features=6, init_scheme=scheme)
        return ssm.init(jax.random.key(0))["params"]

    block_wise = {scheme: init(scheme) for scheme in common.INITS}
    monkeypatch.setattr(common, "to_eigenbasis_b", lambda B, _: jnp.asarray(V_inv, jnp.complex64) @ B)
    monkeypatch.setattr(common, "to_eigenbasis_c", lambda C, _: C @ jnp.asarray(V, jnp.complex64))
    for scheme in common.INITS:
        dense = init(scheme)
        for name in ("B", "C"):
            np.testing.assert_allclose(block_wise[scheme][name], dense[name], atol=1e-6, err_msg=f"{scheme} {name}")
