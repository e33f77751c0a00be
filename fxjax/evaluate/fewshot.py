"""Few-shot pieces: big_vision's subsets and ridge, and hyper-parameter selection that sees only the shots.

A k-shot result means k labelled examples per class. Choosing a regulariser on test, or on a validation split
larger than the shots, quietly uses more labels than that; so selection here runs on the shots themselves:
exact leave-one-out for ridge (closed form from one eigendecomposition), stratified k-fold for any other
probe. Both need at least 2 shots per class (with 1, holding an example out removes its class), so a
1-shot selection falls back to the fixed default and says so.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

BIAS_CONSTANT = 100.0  # big_vision fewshot_lsr.py: a constant feature, large so its weight is nearly unpenalised
STD_EPS = 1e-5  # big_vision: std + 1e-5


def bigvision_subset(labels: Any, num_classes: int, shots: int, seed: int) -> np.ndarray:
    """big_vision's draw: per class, a seeded permutation of its indices, first `shots` of each.

    `np.random.default_rng(seed).permutation` per class in class order, once per seed, so the subsets of
    one seed are nested across shot counts (5 shots contain the 1-shot example), as in `compute_fewshot_metrics`.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]
    short = [(c, p.size) for c, p in enumerate(per_class) if p.size < shots]
    if short:
        c, size = short[0]
        raise ValueError(f"class {c} has {size} training examples, fewer than shots={shots}: lower the shot count")
    return np.concatenate([p[:shots] for p in per_class])


class RidgeSystem(NamedTuple):
    """big_vision's whitened, bias-padded few-shot problem, decomposed once for every l2 strength."""

    mean: np.ndarray  # [d]
    std: np.ndarray  # [d]
    design: np.ndarray  # [n, d + 1]: whitened features and the bias constant
    targets: np.ndarray  # [n, c] in {-1, 1}
    eigs: np.ndarray  # [k]
    lhs: np.ndarray  # [d + 1, k]
    rhs: np.ndarray  # [k, c]
    basis: np.ndarray  # [n, k]: diag(H) = sum_j basis_ij^2 numer_j / (eigs_j + l2)
    numer: np.ndarray  # [k]

    def weights(self, l2: float) -> np.ndarray:
        """(X^T X + l2 I)^-1 X^T Y (or the dual form when n < d): [d + 1, c]."""
        return (self.lhs / (self.eigs + l2)) @ self.rhs

    def features(self, x: Any) -> np.ndarray:
        z = (np.asarray(x, np.float64) - self.mean) / self.std
        return np.pad(z, ((0, 0), (0, 1)), constant_values=BIAS_CONSTANT)

    def scores(self, x: Any, l2: float) -> np.ndarray:
        return self.features(x) @ self.weights(l2)  # [m, c]

    def hat_diagonal_and_fit(self, l2: float) -> tuple[np.ndarray, np.ndarray]:
        """diag(H) [n] and H Y [n, c] for the hat matrix H = X (X^T X + l2 I)^-1 X^T."""
        h = np.sum(self.basis**2 * (self.numer / (self.eigs + l2)), -1)
        return h, self.design @ self.weights(l2)


def ridge_system(x: Any, y: Any, num_classes: int) -> RidgeSystem:
    """big_vision `_precompute_cache` in float64: whiten with the shots' own mean/std, append the bias
    constant, ±1 one-hot targets, eigh of X^T X (n >= d + 1) or X X^T (n < d + 1).

    The hat matrix follows from the same decomposition: X Q diag(1 / (e + l2)) Q^T X^T in the primal form,
    Q diag(e / (e + l2)) Q^T in the dual one.
    """
    x = np.asarray(x, np.float64)
    mean, std = x.mean(0), x.std(0) + STD_EPS
    design = np.pad((x - mean) / std, ((0, 0), (0, 1)), constant_values=BIAS_CONSTANT)
    targets = 2.0 * np.eye(num_classes)[np.asarray(y)] - 1.0
    n, d = design.shape
    if n >= d:
        eigs, q = np.linalg.eigh(design.T @ design)
        eigs = np.maximum(eigs, 0.0)
        lhs, rhs, basis, numer = q, q.T @ (design.T @ targets), design @ q, np.ones_like(eigs)
    else:
        eigs, q = np.linalg.eigh(design @ design.T)
        eigs = np.maximum(eigs, 0.0)
        lhs, rhs, basis, numer = design.T @ q, q.T @ targets, q, eigs
    return RidgeSystem(mean, std, design, targets, eigs, lhs, rhs, basis, numer)


def ridge_loo_scores(system: RidgeSystem, l2: float) -> np.ndarray:
    """Exact leave-one-out scores [n, c]: each row as predicted by the ridge fitted without that row.

    For linear smoothers y_hat = H y, the held-out prediction is (y_hat_i - h_ii y_i) / (1 - h_ii). The
    whitening statistics stay those of all shots (they use no labels).
    """
    h, fitted = system.hat_diagonal_and_fit(l2)
    return (fitted - h[:, None] * system.targets) / (1.0 - h)[:, None]


class Selection(NamedTuple):
    value: float
    on: str  # "loo", "kfold", or "fixed"
    table: list[dict[str, float]]  # one row per candidate: {"value", "accuracy"}
    note: str


def select_ridge_loo(system: RidgeSystem, labels: Any, l2_grid: Sequence[float], default: float) -> Selection:
    """The l2 with the best leave-one-out accuracy on the shots; ties go to the strongest regularisation."""
    labels = np.asarray(labels)
    if np.bincount(labels)[np.unique(labels)].min() < 2:
        return Selection(default, "fixed", [], "1 shot per class: leaving one out removes its class")
    table = [
        {"value": float(l2), "accuracy": float(np.mean(ridge_loo_scores(system, l2).argmax(-1) == labels))}
        for l2 in l2_grid
    ]
    best = max(sorted(table, key=lambda r: -r["value"]), key=lambda r: r["accuracy"])
    return Selection(best["value"], "loo", table, f"leave-one-out over the {len(labels)} few-shot examples")


def stratified_folds(labels: Any, folds: int, seed: int) -> np.ndarray:
    """Fold id [n] per example: each class's examples, seeded-shuffled, dealt round-robin into folds."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    fold = np.empty(labels.size, np.int64)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        fold[idx] = np.arange(idx.size) % folds
    return fold


def select_kfold(
    fit_predict: Callable[[np.ndarray, np.ndarray, np.ndarray, float], np.ndarray],
    x: Any,
    y: Any,
    candidates: Sequence[float],
    default: float,
    folds: int = 5,
    seed: int = 0,
) -> Selection:
    """The candidate with the best stratified k-fold accuracy on the shots (folds = min(folds, shots)).

    `fit_predict(train_x, train_y, held_x, value)` returns predicted labels for `held_x`; it only ever sees
    the shots passed here. Ties go to the first candidate.
    """
    x, y = np.asarray(x), np.asarray(y)
    shots = int(np.bincount(y)[np.unique(y)].min())
    if shots < 2:
        return Selection(default, "fixed", [], "1 shot per class: no fold can hold an example out")
    k = min(folds, shots)
    fold = stratified_folds(y, k, seed)
    table = []
    for value in candidates:
        right = sum(
            int(np.sum(fit_predict(x[fold != f], y[fold != f], x[fold == f], value) == y[fold == f])) for f in range(k)
        )
        table.append({"value": float(value), "accuracy": right / y.size})
    best = max(table, key=lambda r: r["accuracy"])
    return Selection(best["value"], "kfold", table, f"{k}-fold over the {y.size} few-shot examples")
