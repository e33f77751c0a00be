"""CLIP's coarse-to-fine search of a log-spaced regularisation grid (CLIP paper, appendix A.3).

CLIP_benchmark (`clip_benchmark/metrics/linear_probe.py`, `evaluate` + `find_peak`) implements it on a grid of
97 log-spaced values: score every 16th value (7 coarse points), then repeatedly score the two values `span`
steps either side of the current peak with span 8, 4, 2, 1 — the last round resolves the grid's full
resolution. This module runs the same index walk on any grid, so the protocol can use CLIP's λ range
[1e-6, 1e6] (8 values per decade) while a test replays CLIP_benchmark's own walk on the same curve.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

COARSE_STRIDE = 16  # CLIP_benchmark: np.logspace(-6, 2, 7) inside np.logspace(-6, 2, 97)
SPANS = (8, 4, 2, 1)  # step_span = 8, halved while > 0


def log_grid(low_power: float, high_power: float, per_decade: int) -> np.ndarray:
    """10 ** linspace(low, high), `per_decade` steps per decade, both ends included."""
    steps = round((high_power - low_power) * per_decade)
    if steps < 1 or not np.isclose(steps, (high_power - low_power) * per_decade):
        raise ValueError(
            f"(high_power - low_power) * per_decade must be a positive integer, got "
            f"({high_power} - {low_power}) * {per_decade}"
        )
    return np.logspace(low_power, high_power, steps + 1)


def coarse_to_fine(
    score: Callable[[int], float],
    num_values: int,
    coarse_stride: int = COARSE_STRIDE,
    spans: Sequence[int] = SPANS,
) -> tuple[int, list[int]]:
    """Index of the peak of `score` over range(num_values), and every index scored, in the order asked.

    Each round keeps the first index with the strictly highest score among those it scores, in order
    (coarse: left to right; refinement: left, peak, right), as `find_peak` does. `score` is called once per
    distinct index (values are cached); the returned order repeats the peak as CLIP_benchmark re-trains it.
    Unlike `find_peak`, whose running best starts at (index 0, accuracy 0), a round whose scores are all 0
    keeps its own first index instead of jumping to index 0.
    """
    if num_values < 1:
        raise ValueError(f"num_values must be >= 1, got {num_values}")
    cache: dict[int, float] = {}
    asked: list[int] = []

    def peak(indices: Sequence[int]) -> int:
        best, best_score = indices[0], -np.inf
        for i in indices:
            asked.append(i)
            if i not in cache:
                cache[i] = float(score(i))
            if cache[i] > best_score:
                best, best_score = i, cache[i]
        return best

    best = peak(list(range(0, num_values, coarse_stride)))
    for span in spans:
        best = peak([max(best - span, 0), best, min(best + span, num_values - 1)])
    return best, asked
