"""Metrics against scikit-learn, and the bootstrap against a plain numpy loop over the same resamples."""

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, top_k_accuracy_score

from fxjax.evaluate import metrics


def _scores(n=300, c=12, seeds=None, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    shape = (n, c) if seeds is None else (seeds, n, c)
    scores = rng.normal(size=shape) + 1.5 * np.eye(c)[y]
    return scores, y


def test_point_metrics_match_sklearn():
    scores, y = _scores()
    m = metrics.point_metrics(scores, y)
    assert m["top1"] == pytest.approx(top_k_accuracy_score(y, scores, k=1, labels=range(12)))
    assert m["top5"] == pytest.approx(top_k_accuracy_score(y, scores, k=5, labels=range(12)))
    assert m["mean_per_class_recall"] == pytest.approx(balanced_accuracy_score(y, scores.argmax(-1)))


def test_top5_is_nan_with_five_classes_or_fewer():
    scores, y = _scores(c=5)
    assert np.isnan(metrics.point_metrics(scores, y)["top5"])


def test_recall_ignores_classes_absent_from_labels():
    scores, y = _scores(c=10)
    keep = y != 3
    m = metrics.point_metrics(scores[keep], y[keep])
    assert m["mean_per_class_recall"] == pytest.approx(balanced_accuracy_score(y[keep], scores[keep].argmax(-1)))


def test_bootstrap_matches_numpy_loop():
    scores, y = _scores(n=200)
    out = metrics.bootstrap_metrics(scores, y, num_resamples=150, seed=3)
    idx = np.random.default_rng(3).integers(0, len(y), (150, len(y)))  # one draw: the module draws in blocks
    ref = {"top1": [], "top5": [], "mean_per_class_recall": []}
    for row in idx:
        s, t = scores[row], y[row]
        ref["top1"].append(top_k_accuracy_score(t, s, k=1, labels=range(12)))
        ref["top5"].append(top_k_accuracy_score(t, s, k=5, labels=range(12)))
        ref["mean_per_class_recall"].append(balanced_accuracy_score(t, s.argmax(-1)))
    for name, values in ref.items():
        lo, hi = np.quantile(values, [0.025, 0.975])
        assert out[name]["ci_low"] == pytest.approx(lo, abs=1e-6), name
        assert out[name]["ci_high"] == pytest.approx(hi, abs=1e-6), name
        assert out[name]["ci_low"] <= out[name]["value"] <= out[name]["ci_high"]


def test_bootstrap_of_seed_mean_and_spread():
    scores, y = _scores(n=150, seeds=3)
    out = metrics.bootstrap_metrics(scores, y, num_resamples=100, seed=0)
    per_seed = [top_k_accuracy_score(y, s, k=1, labels=range(12)) for s in scores]
    assert out["top1"]["per_seed"] == pytest.approx(per_seed)
    assert out["top1"]["std"] == pytest.approx(np.std(per_seed))
    assert out["top1"]["value"] == pytest.approx(np.mean(per_seed))
    idx = np.random.default_rng(0).integers(0, len(y), (100, len(y)))
    means = [np.mean([np.mean(s[row].argmax(-1) == y[row]) for s in scores]) for row in idx]
    assert out["top1"]["ci_low"] == pytest.approx(np.quantile(means, 0.025), abs=1e-6)


def test_bad_labels_name_the_range():
    scores, y = _scores(c=4)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        metrics.point_metrics(scores, y + 1)
