"""Probes on a mesh of 8 simulated CPU devices against the same probes on one device (the reference).

kNN must agree exactly, ties included; ridge and logistic to float32 rounding (1e-5). Row counts are chosen
not to divide by 8, so the padding rows that make shards equal are exercised too.
"""

import jax
import numpy as np
import pytest
from sklearn.datasets import load_digits

from fxjax.evaluate import probes
from fxjax.parallel import make_mesh


@pytest.fixture(scope="module")
def mesh():
    assert jax.device_count() == 8, "tests/conftest.py should give 8 simulated CPU devices"
    return make_mesh(data=4, fsdp=2)  # rows go over both axes


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32)
    return (x[:1001], y[:1001]), (x[1001:1401], y[1001:1401]), (x[1401:], y[1401:])


def _bank_with_ties(n=1003, d=16, c=7, seed=0):
    """Random bank whose second half repeats its first rows: exact ties in similarity, to be broken the same way."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = rng.integers(0, c, size=n)
    half, dup = n // 2, min(100, n // 4)
    x[half : half + dup] = x[:dup]
    y[half : half + dup] = (y[:dup] + 1) % c  # a tie broken the other way would change the vote
    queries = np.concatenate([rng.normal(size=(150, d)).astype(np.float32), x[:40]])
    return x, y, queries, c


def test_sharded_knn_equals_one_device_exactly(mesh):
    x, y, queries, c = _bank_with_ties()
    one = probes._knn_predict_many(x, y, queries, c, probes.DINOV2_KS, 0.07, 64)
    many = probes._knn_predict_many(x, y, queries, c, probes.DINOV2_KS, 0.07, 64, mesh)
    assert one.shape == many.shape == (4, len(queries))
    np.testing.assert_array_equal(many, one)
    # k=1 on a duplicated row: both copies are equally similar; the lower row (label y[i]) must win.
    np.testing.assert_array_equal(probes.knn_predict(x, y, x[:40], c, k=1, mesh=mesh), y[:40])


def test_sharded_knn_bank_smaller_than_k_per_shard(mesh):
    """k=200 on a 203-row bank: every shard holds fewer than k rows (and the last one padding)."""
    x, y, queries, c = _bank_with_ties(n=203)
    one = probes._knn_predict_many(x, y, queries, c, (1, 200, 203), 0.07, 1024)
    np.testing.assert_array_equal(probes._knn_predict_many(x, y, queries, c, (1, 200, 203), 0.07, 1024, mesh), one)


def test_sharded_knn_probe_table(mesh, digits):
    (tx, ty), (vx, vy), (sx, sy) = digits
    one = probes.knn_probe(probes.Splits((tx, ty), (vx, vy), (sx, sy)), 10, ks=probes.DINOV2_KS)
    many = probes.knn_probe(probes.Splits((tx, ty), (vx, vy), (sx, sy)), 10, ks=probes.DINOV2_KS, mesh=mesh, chunk=128)
    assert many.table == one.table and many.best == one.best


def test_sharded_ridge_within_1e5(mesh, digits):
    (tx, ty), (vx, vy), (sx, sy) = digits
    lambdas = [1e-2, 1.0, 1e2, 1e4]
    one = probes.ridge_fit(tx, ty, 10, lambdas)
    many = probes.ridge_fit(tx, ty, 10, lambdas, mesh=mesh)
    np.testing.assert_allclose(many.weights, one.weights, atol=1e-5)
    np.testing.assert_allclose(many.bias, one.bias, atol=1e-5)
    np.testing.assert_array_equal(many.predict(sx), one.predict(sx))
    assert (
        probes.ridge_probe(probes.Splits((tx, ty), (vx, vy), (sx, sy)), 10, lambdas, mesh=mesh).table
        == probes.ridge_probe(probes.Splits((tx, ty), (vx, vy), (sx, sy)), 10, lambdas).table
    )


@pytest.mark.parametrize("use_mesh", [False, True])
def test_ridge_from_chunks_equals_one_array(mesh, digits, use_mesh):
    (tx, ty), _, _ = digits
    lambdas = [1e-2, 1.0, 1e2]
    one = probes.ridge_fit(tx + 100.0, ty, 10, lambdas)  # an offset the shifted sums must not lose
    chunks = ((tx[i : i + 97] + 100.0, ty[i : i + 97]) for i in range(0, len(ty), 97))  # a generator, uneven
    fit = probes.ridge_fit_chunks(chunks, 10, lambdas, mesh=mesh if use_mesh else None)
    tol = 1e-5 if use_mesh else 1e-9  # float32 device sums, or float64 numpy ones
    np.testing.assert_allclose(fit.weights, one.weights, atol=tol)
    np.testing.assert_allclose(fit.bias, one.bias, rtol=tol, atol=tol)  # |bias| up to ~60 after the offset


def test_ridge_chunks_bad_input():
    with pytest.raises(ValueError, match="no rows"):
        probes.ridge_fit_chunks(iter(()), 3)
    x = np.zeros((4, 2), np.float32)
    with pytest.raises(ValueError, match="chunk 1 has 3 features"):
        probes.ridge_fit_chunks([(x, np.arange(4) % 3), (np.zeros((4, 3)), np.arange(4) % 3)], 3)


def test_sharded_logistic_steps_within_1e5(mesh, digits):
    """A fixed number of L-BFGS steps: sharded loss and gradient sums must equal the one-device ones."""
    (tx, ty), _, _ = digits
    one = probes.logistic_fit(tx, ty, 10, C=1.0, standardize=True, max_iter=10)
    many = probes.logistic_fit(tx, ty, 10, C=1.0, standardize=True, max_iter=10, mesh=mesh)
    assert one.iterations == many.iterations == 10
    np.testing.assert_allclose(many.weights, one.weights, atol=1e-5)
    np.testing.assert_allclose(many.bias, one.bias, atol=1e-5)
    assert abs(many.objective - one.objective) < 1e-5


def test_sharded_logistic_state_replicated_rows_sharded(mesh, digits):
    (tx, ty), _, _ = digits
    inputs = probes._solver_inputs(tx, ty, 10, True, mesh)
    assert inputs.xs.shape == (1008, 64)  # 1001 rows padded to a multiple of 8
    assert {s.data.shape for s in inputs.xs.addressable_shards} == {(126, 64)}  # each device: its rows only
    params = probes._zeros(64, 10, inputs.replicate)
    out, *_ = probes._lbfgs_solve(
        params, inputs.xs, inputs.onehot, inputs.weight, 1.0, 5, 1e-6, replicate=inputs.replicate
    )
    assert all(leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(out))


def test_sharded_logistic_probe_converged_agrees(mesh, digits):
    """Run to convergence, float32 L-BFGS stops at its own resolution: the objective agrees to 1e-5 and the
    chosen C and accuracies agree (the weights, flat along some directions, agree to about 1e-2)."""
    (tx, ty), (vx, vy), (sx, sy) = digits
    cs = [1e-3, 1e-1, 10.0]
    one = probes.logistic_probe(probes.Splits((tx, ty), (vx, vy), (sx, sy)), 10, Cs=cs, standardize=True)
    many = probes.logistic_probe(probes.Splits((tx, ty), (vx, vy), (sx, sy)), 10, Cs=cs, standardize=True, mesh=mesh)
    assert many.best == one.best
    for a, b in zip(one.table, many.table, strict=True):
        assert abs(a["objective"] - b["objective"]) <= 1e-5 * max(1.0, abs(a["objective"]))
        for split in ("train", "val", "test"):
            assert abs(a[f"{split}_accuracy"] - b[f"{split}_accuracy"]) <= 2.5e-3  # at most one example
