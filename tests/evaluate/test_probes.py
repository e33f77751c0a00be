"""Probes against exact references: numpy solves for ridge, scikit-learn for logistic, brute force for kNN."""

import json

import numpy as np
import pytest
from scipy.special import logsumexp
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

from fxjax.evaluate import probes


def _blobs(n: int = 600, d: int = 32, c: int = 5, seed: int = 0, spread: float = 1.5):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(c, d)) * spread / np.sqrt(d) * 3
    y = rng.integers(0, c, size=n)
    x = centers[y] + rng.normal(size=(n, d))
    return x.astype(np.float32), y


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    x = (x - x.mean(0)) / np.where(x.std(0) > 0, x.std(0), 1.0)
    perm = np.random.default_rng(0).permutation(len(y))
    x, y = x[perm].astype(np.float32), y[perm]
    return (x[:1000], y[:1000]), (x[1000:1400], y[1000:1400]), (x[1400:], y[1400:])


def _ridge_reference(x, y, c, lam):
    x = x.astype(np.float64)
    t = np.eye(c)[y]
    xc, tc = x - x.mean(0), t - t.mean(0)
    w = np.linalg.solve(xc.T @ xc + lam * np.eye(x.shape[1]), xc.T @ tc)
    return w, t.mean(0) - x.mean(0) @ w


@pytest.mark.parametrize("n", [600, 20])  # eigh path (n >= d) and SVD path (n < d)
def test_ridge_matches_direct_solve(n):
    x, y = _blobs(n=n)
    lambdas = [1e-2, 1.0, 10.0, 1e3]
    fit = probes.ridge_fit(x, y, 5, lambdas)
    assert fit.weights.shape == (4, 32, 5) and fit.bias.shape == (4, 5)
    for i, lam in enumerate(lambdas):
        w, b = _ridge_reference(x, y, 5, lam)
        np.testing.assert_allclose(fit.weights[i], w, atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(fit.bias[i], b, atol=1e-4, rtol=1e-4)


def test_ridge_probe_selects_best_val(digits):
    (tx, ty), (vx, vy), (sx, sy) = digits
    res = probes.ridge_probe(probes.Splits((tx, ty), (vx, vy), (sx, sy)), 10, lambdas=[1e-3, 1.0, 1e2, 1e4, 1e6])
    best_val = max(r["val_accuracy"] for r in res.table)
    assert res.param == "lambda" and res.val_accuracy == best_val
    (row,) = [r for r in res.table if r["lambda"] == res.best]
    assert row["val_accuracy"] == best_val and row["test_accuracy"] == res.test_accuracy
    assert res.test_accuracy > 0.9
    assert json.loads(json.dumps(res.to_dict()))["name"] == "ridge"


def _sk_objective(x, y, w, b, C):
    z = x.astype(np.float64) @ w + b
    return np.sum(logsumexp(z, axis=1) - z[np.arange(len(y)), y]) + 0.5 / C * np.sum(w**2)


@pytest.mark.parametrize("C", [0.05, 10.0])
def test_logistic_matches_sklearn(digits, C):
    (tx, ty), _, (sx, sy) = digits
    fit = probes.logistic_fit(tx, ty, 10, C=C)
    sk = LogisticRegression(C=C, solver="lbfgs", max_iter=5000, tol=1e-8).fit(tx.astype(np.float64), ty)
    ours, theirs = (
        _sk_objective(tx, ty, fit.weights, fit.bias, C),
        _sk_objective(tx, ty, sk.coef_.T, sk.intercept_, C),
    )
    assert abs(ours - theirs) <= 1e-3 * theirs
    np.testing.assert_allclose(fit.objective, theirs / len(ty), rtol=1e-3)
    acc, sk_acc = np.mean(fit.predict(sx) == sy), sk.score(sx, sy)
    assert abs(acc - sk_acc) <= 0.005
    assert np.mean(fit.predict(sx) == sk.predict(sx)) >= 0.99


def test_logistic_standardize_folds_into_weights(digits):
    (tx, ty), _, _ = digits
    raw_x = tx * np.linspace(0.1, 10, tx.shape[1], dtype=np.float32) + 3.0
    mean, std = raw_x.mean(0), np.where(raw_x.std(0) > 0, raw_x.std(0), 1.0)
    raw = probes.logistic_fit(raw_x, ty, 10, C=1.0, standardize=True)
    ref = probes.logistic_fit((raw_x - mean) / std, ty, 10, C=1.0)
    np.testing.assert_allclose(raw.objective, ref.objective, rtol=1e-4)
    np.testing.assert_allclose(raw.weights * std[:, None], ref.weights, atol=1e-3)
    assert np.mean(raw.predict(raw_x) == ref.predict((raw_x - mean) / std)) >= 0.99


def test_logistic_probe_sweep(digits):
    (tx, ty), (vx, vy), (sx, sy) = digits
    res = probes.logistic_probe(probes.Splits((tx, ty), (vx, vy), (sx, sy)), 10, Cs=[10.0, 1e-4, 0.1])
    assert [r["C"] for r in res.table] == [1e-4, 0.1, 10.0]  # solved in increasing order (warm starts)
    best_val = max(r["val_accuracy"] for r in res.table)
    (row,) = [r for r in res.table if r["C"] == res.best]
    assert row["val_accuracy"] == best_val == res.val_accuracy and row["test_accuracy"] == res.test_accuracy
    assert res.test_accuracy > 0.9
    # Warm-started sweep lands on the same optimum as a cold fit.
    cold = probes.logistic_fit(tx, ty, 10, C=0.1)
    np.testing.assert_allclose(res.table[1]["objective"], cold.objective, rtol=1e-4)


def _knn_reference(train_x, train_y, query_x, c, k, t=0.07):
    a = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    q = query_x / np.linalg.norm(query_x, axis=1, keepdims=True)
    sim = q @ a.T
    preds = []
    for row in sim:
        idx = np.argsort(-row)[:k]
        votes = np.zeros(c)
        np.add.at(votes, train_y[idx], np.exp(row[idx] / t))
        preds.append(votes.argmax())
    return np.array(preds)


def test_knn_matches_brute_force():
    x, y = _blobs(n=500, spread=0.8)
    (tx, ty), (qx, qy) = (x[:400], y[:400]), (x[400:], y[400:])
    for k in (1, 10, 20):
        ours = probes.knn_predict(tx, ty, qx, 5, k=k, chunk=32)  # 100 queries: 4 chunks, last one padded
        np.testing.assert_array_equal(ours, _knn_reference(tx, ty, qx, 5, k))
    res = probes.knn_probe(probes.Splits((tx, ty), (qx, qy), (qx, qy)), 5, ks=(10, 20), chunk=64)
    for row in res.table:
        assert row["val_accuracy"] == np.mean(_knn_reference(tx, ty, qx, 5, row["k"]) == qy)
    assert res.val_accuracy == max(r["val_accuracy"] for r in res.table)


def test_few_shot_indices():
    y = np.repeat(np.arange(4), [10, 7, 12, 5])
    a = probes.few_shot_indices(y, 5, seed=0)
    np.testing.assert_array_equal(np.bincount(y[a]), [5, 5, 5, 5])
    assert len(set(a.tolist())) == 20
    np.testing.assert_array_equal(a, probes.few_shot_indices(y, 5, seed=0))
    assert not np.array_equal(a, probes.few_shot_indices(y, 5, seed=1))
    with pytest.raises(ValueError, match="class 3 has 5 examples"):
        probes.few_shot_indices(y, 6, seed=0)


def test_few_shot_eval(digits):
    (tx, ty), _, (sx, sy) = digits
    rows = probes.few_shot_eval(tx, ty, sx, sy, 10, ks=(1, 10), seeds=(0, 1), probe="ridge")
    assert [r["k"] for r in rows] == [1, 10]
    for r in rows:
        assert 0.0 <= r["mean_accuracy"] <= 1.0 and len(r["accuracies"]) == 2
        assert r["mean_accuracy"] == pytest.approx(np.mean(r["accuracies"]))
        assert r["std_accuracy"] == pytest.approx(np.std(r["accuracies"]))
    assert rows[1]["mean_accuracy"] > rows[0]["mean_accuracy"] > 0.3
    (log_row,) = probes.few_shot_eval(tx, ty, sx, sy, 10, ks=(5,), seeds=(0,), probe="logistic")
    assert log_row["mean_accuracy"] > 0.7


def test_input_validation():
    x, y = _blobs(n=50)
    with pytest.raises(ValueError, match="label 7 outside"):
        probes.ridge_fit(x, np.where(y == 0, 7, y), 5, [1.0])
    with pytest.raises(ValueError, match="label -1 outside"):
        probes.logistic_fit(x, np.where(y == 0, -1, y), 5)
    with pytest.raises(ValueError, match="labels must be"):
        probes.ridge_fit(x, y[:-1], 5, [1.0])
    with pytest.raises(ValueError, match="feature dimensions differ"):
        probes.ridge_probe(probes.Splits((x, y), (x[:, :-1], y), (x, y)), 5, [1.0])
    with pytest.raises(ValueError, match="query features"):
        probes.knn_predict(x, y, x[:, :3], 5, k=3)
    with pytest.raises(ValueError, match="positive"):
        probes.ridge_fit(x, y, 5, [0.0])
