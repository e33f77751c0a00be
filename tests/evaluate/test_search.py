"""The coarse-to-fine λ walk replays CLIP_benchmark's own `evaluate` sweep code on the same validation curve."""

import inspect
import textwrap

import numpy as np
import pytest

from fxjax.evaluate import search


def _clip_benchmark_walk(curve):
    """Run the sweep lines of clip_benchmark.metrics.linear_probe.evaluate and its own find_peak, with training
    replaced by a lookup of `curve` (index in their weight-decay grid -> validation accuracy)."""
    from clip_benchmark.metrics import linear_probe

    source = inspect.getsource(linear_probe.evaluate)
    start = source.rindex("\n", 0, source.index("wd_list = np.logspace")) + 1
    stop = source.index("\n", source.index("best_wd = wd_list[peak_idx]"))
    block = textwrap.dedent(source[start:stop])
    grid = np.logspace(-6, 2, num=97).tolist()
    visited = []

    class Logits:  # what `infer` returns; `.float()` is all `find_peak` calls on it before `accuracy`
        def __init__(self, index):
            self.index = index

        def float(self):
            return self

    def train(loader, input_shape, output_shape, weight_decay, *args):
        visited.append(grid.index(weight_decay))
        return weight_decay

    namespace = dict(vars(linear_probe))
    namespace.update(
        train=train,
        infer=lambda model, loader, amp, device: (Logits(grid.index(model)), Logits(None)),
        accuracy=lambda logits, target, topk: (curve(logits.index),),
    )
    find_peak = type(linear_probe.find_peak)(linear_probe.find_peak.__code__, namespace)  # their code, our globals
    names = "feature_train_loader feature_val_loader input_shape output_shape lr epochs amp device verbose seed"
    namespace.update(find_peak=find_peak, **dict.fromkeys(names.split()))
    exec(block, namespace)  # one namespace: the block's list comprehension reads its own variables
    return grid.index(namespace["best_wd"]), visited


@pytest.mark.parametrize("peak", [0, 5, 37, 50, 96])
@pytest.mark.parametrize("shape", ["smooth", "bumpy", "plateau"])  # plateau: ties decide the walk
def test_walk_matches_clip_benchmark(peak, shape):
    rng = np.random.default_rng(peak)
    noise = rng.uniform(0, 0.05, 97) if shape == "bumpy" else np.zeros(97)
    cap = 0.85 if shape == "plateau" else 1.0

    def curve(i):
        return float(min(cap, 0.9 - 0.004 * abs(i - peak) + noise[i]))

    ref_best, ref_visited = _clip_benchmark_walk(curve)
    best, asked = search.coarse_to_fine(curve, 97)
    assert asked == ref_visited
    assert best == ref_best
    # The protocol's λ grid, [1e-6, 1e6] at 8 per decade, has the same 97 points: the same walk picks its λ.
    lambdas = search.log_grid(-6, 6, 8)
    assert lambdas.size == 97 and lambdas[0] == pytest.approx(1e-6) and lambdas[-1] == pytest.approx(1e6)


def test_walk_calls_each_value_once():
    calls = []
    best, asked = search.coarse_to_fine(lambda i: calls.append(i) or -abs(i - 40), 97)
    assert best == 40 and len(calls) == len(set(calls)) == len(set(asked))


def test_log_grid_rejects_a_fractional_step_count():
    with pytest.raises(ValueError, match="per_decade"):
        search.log_grid(-6, 6, 7.9)
