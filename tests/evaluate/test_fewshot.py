"""Few-shot pieces: big_vision's closed form, exact leave-one-out against brute force, k-fold on shots only."""

import numpy as np
import pytest

from fxjax.evaluate import fewshot


def _data(n=120, d=16, c=4, seed=0):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(c), n // c)
    x = rng.normal(size=(c, d))[y] + rng.normal(size=(n, d))
    return x.astype(np.float32), y


def _design(x):
    x = x.astype(np.float64)
    z = (x - x.mean(0)) / (x.std(0) + 1e-5)
    return np.pad(z, ((0, 0), (0, 1)), constant_values=100.0)


@pytest.mark.parametrize("n", [120, 12])  # primal (n >= d + 1) and dual (n < d + 1) forms
def test_ridge_system_matches_direct_solve(n):
    x, y = _data(n=n)
    system = fewshot.ridge_system(x, y, 4)
    a, t = _design(x), 2.0 * np.eye(4)[y] - 1.0
    for l2 in (1e-2, 1.0, 2.0**10):
        w = np.linalg.solve(a.T @ a + l2 * np.eye(a.shape[1]), a.T @ t)
        np.testing.assert_allclose(system.weights(l2), w, rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(system.scores(x, l2), a @ w, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("n", [60, 12])
def test_loo_matches_brute_force(n):
    x, y = _data(n=n)
    system = fewshot.ridge_system(x, y, 4)
    a, t = _design(x), 2.0 * np.eye(4)[y] - 1.0  # whitening from all shots, as in the closed form
    for l2 in (0.1, 10.0, 1000.0):
        brute = np.empty_like(t)
        for i in range(n):
            keep = np.arange(n) != i
            w = np.linalg.solve(a[keep].T @ a[keep] + l2 * np.eye(a.shape[1]), a[keep].T @ t[keep])
            brute[i] = a[i] @ w
        np.testing.assert_allclose(fewshot.ridge_loo_scores(system, l2), brute, rtol=1e-5, atol=1e-7)


def test_loo_selection_and_one_shot_fallback():
    x, y = _data(n=40)
    sel = fewshot.select_ridge_loo(fewshot.ridge_system(x, y, 4), y, [1e-3, 1.0, 1e3, 1e6], default=1024.0)
    assert sel.on == "loo" and len(sel.table) == 4
    assert sel.value == max(sel.table, key=lambda r: (r["accuracy"], r["value"]))["value"]
    one = fewshot.bigvision_subset(y, 4, 1, seed=0)
    sel1 = fewshot.select_ridge_loo(fewshot.ridge_system(x[one], y[one], 4), y[one], [1.0], default=1024.0)
    assert (sel1.on, sel1.value, sel1.table) == ("fixed", 1024.0, [])


def test_bigvision_subset_is_nested_and_seeded():
    _, y = _data(n=200)
    five = fewshot.bigvision_subset(y, 4, 5, seed=1)
    ten = fewshot.bigvision_subset(y, 4, 10, seed=1)
    assert set(five) <= set(ten)
    assert np.array_equal(np.bincount(y[ten]), [10] * 4)
    assert not np.array_equal(ten, fewshot.bigvision_subset(y, 4, 10, seed=2))
    rng = np.random.default_rng(1)  # big_vision's own draw, written out
    expected = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:5] for c in range(4)])
    assert np.array_equal(five, expected)
    with pytest.raises(ValueError, match="shots=60"):
        fewshot.bigvision_subset(y, 4, 60, seed=0)


def test_kfold_sees_only_the_shots():
    x, y = _data(n=400)
    idx = fewshot.bigvision_subset(y, 4, 5, seed=0)
    seen = []

    def fit_predict(tx, ty, hx, value):
        seen.append((len(ty), len(hx)))
        means = np.stack([tx[ty == c].mean(0) for c in range(4)])
        return np.argmin(((hx[:, None] - means) ** 2).sum(-1) + value * np.arange(4), -1)

    sel = fewshot.select_kfold(fit_predict, x[idx], y[idx], [0.0, 100.0], default=1.0, folds=5)
    assert sel.on == "kfold" and sel.value == 0.0  # the penalty of 100 forces class 0: worse accuracy
    assert all(tr + held == 20 for tr, held in seen) and len(seen) == 2 * 5
    one = fewshot.bigvision_subset(y, 4, 1, seed=0)
    assert fewshot.select_kfold(fit_predict, x[one], y[one], [0.0], default=1.0).on == "fixed"
