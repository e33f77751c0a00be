"""Test metrics of a classifier from its class scores, each with a seeded bootstrap confidence interval.

The field reports top-1, top-5 (CLIP_benchmark, DINOv2) and mean per-class recall (CLIP_benchmark's
`balanced_accuracy_score`, the headline for imbalanced sets like Pets, Flowers or Caltech). A point estimate on
one test set hides how much it would move on another draw of the same size, so every value comes with a
percentile bootstrap interval over test examples; few-shot results also carry the spread over sampling seeds.
"""

from __future__ import annotations

from typing import Any

import numpy as np

METRICS = ("top1", "top5", "mean_per_class_recall")
BOOTSTRAP_CHUNK = 64  # resamples per block: memory stays at [chunk, n]


def _check(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores)
    labels = np.asarray(labels)
    if scores.ndim == 2:
        scores = scores[None]
    if scores.ndim != 3 or labels.ndim != 1 or scores.shape[1] != labels.shape[0]:
        raise ValueError(
            f"scores must be [n, c] or [seeds, n, c] with n = len(labels) = {labels.shape}, got {scores.shape}"
        )
    if labels.size == 0:
        raise ValueError("labels is empty: metrics need at least one test example")
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= scores.shape[-1]:
        raise ValueError(f"labels must be integers in [0, {scores.shape[-1]}) (the score columns), got {labels.dtype}")
    return scores, labels


def _hits(scores: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Per-example correctness [seeds, n] for top-1 and (with more than 5 classes) top-5."""
    out = {"top1": scores.argmax(-1) == labels}
    if scores.shape[-1] > 5:
        # The true class is in the top 5 when fewer than 5 classes score strictly higher (ties count in the
        # example's favour, as in sklearn's top_k_accuracy_score).
        true_score = np.take_along_axis(scores, np.broadcast_to(labels[None, :, None], (*scores.shape[:2], 1)), -1)
        out["top5"] = (scores > true_score).sum(-1) < 5
    return out


def _recall(correct: np.ndarray, labels: np.ndarray, num_classes: int, weights: np.ndarray) -> np.ndarray:
    """Mean per-class recall over the classes present, for each row of example weights.

    correct [n] bool, labels [n], weights [b, n] (bootstrap counts, or ones) -> [b]. Per-class sums by bincount,
    so memory stays at [b, n] even with a thousand classes.
    """
    b = weights.shape[0]
    flat = (np.arange(b)[:, None] * num_classes + labels[None, :]).reshape(-1)  # [b * n]: row-major class ids
    total = np.bincount(flat, weights=weights.reshape(-1), minlength=b * num_classes).reshape(b, num_classes)
    right = np.bincount(flat, weights=(weights * correct).reshape(-1), minlength=b * num_classes)
    present = total > 0
    return np.where(present, right.reshape(b, num_classes) / np.maximum(total, 1), 0.0).sum(-1) / present.sum(-1)


def point_metrics(scores: Any, labels: Any) -> dict[str, float]:
    """Top-1, top-5 (NaN with 5 classes or fewer, like CLIP_benchmark) and mean per-class recall,
    averaged over seeds when scores are [seeds, n, c]."""
    scores, labels = _check(scores, labels)
    hits = _hits(scores, labels)
    ones = np.ones((1, labels.size))
    return {
        "top1": float(hits["top1"].mean()),
        "top5": float(hits["top5"].mean()) if "top5" in hits else float("nan"),
        "mean_per_class_recall": float(np.mean([_recall(h, labels, scores.shape[-1], ones)[0] for h in hits["top1"]])),
    }


def bootstrap_metrics(
    scores: Any,
    labels: Any,
    num_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, dict[str, Any]]:
    """Every metric with its percentile bootstrap interval over test examples.

    The resamples are `np.random.default_rng(seed).integers(0, n, (num_resamples, n))` (drawn in blocks, the
    same stream), shared by every metric and every seed, so the interval of a seed-mean reflects test-set
    sampling only. With [seeds, n, c] scores each entry also lists `per_seed` values and their `std` (ddof=0).
    """
    scores, labels = _check(scores, labels)
    if num_resamples < 1 or not 0 < level < 1:
        raise ValueError(f"need num_resamples >= 1 and 0 < level < 1, got {num_resamples} and {level}")
    hits = _hits(scores, labels)
    n, c = labels.size, scores.shape[-1]
    rng = np.random.default_rng(seed)
    draws = {name: [] for name in METRICS}
    for start in range(0, num_resamples, BOOTSTRAP_CHUNK):
        idx = rng.integers(0, n, (min(BOOTSTRAP_CHUNK, num_resamples - start), n))  # [b, n]
        counts = np.stack([np.bincount(row, minlength=n) for row in idx]).astype(np.float64)  # [b, n]
        for name in ("top1", "top5"):
            if name in hits:
                draws[name].append((counts @ hits[name].T.astype(np.float64)).mean(-1) / n)  # [b]
        draws["mean_per_class_recall"].append(np.mean([_recall(h, labels, c, counts) for h in hits["top1"]], 0))
    point = point_metrics(scores, labels)
    alpha = (1 - level) / 2
    out = {}
    for name in METRICS:
        entry: dict[str, Any] = {"value": point[name], "ci_low": float("nan"), "ci_high": float("nan")}
        if draws[name]:
            lo, hi = np.quantile(np.concatenate(draws[name]), [alpha, 1 - alpha])
            entry.update(ci_low=float(lo), ci_high=float(hi))
        if scores.shape[0] > 1:
            per_seed = [point_metrics(s, labels)[name] for s in scores]
            entry.update(per_seed=per_seed, std=float(np.std(per_seed)))
        out[name] = entry
    return out
