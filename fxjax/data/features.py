"""Batches of cached features, in the same schema as image batches: {"x", "label"} for training and
{"x", "label", "mask"} for evaluation, where "x" is an array [b, d] or a dict of them (feature variants)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np

from fxjax.data.shards import eval_batch_count, per_host_batch, shard_bounds

Features = np.ndarray | Mapping[str, np.ndarray]  # [n, d], or variant → [n, d_variant]


def _take(features: Features, index: np.ndarray):
    if isinstance(features, Mapping):
        return {name: f[index] for name, f in features.items()}
    return features[index]


class FeatureBatches:
    """Training batches: a seeded permutation per epoch, this host's slice of each global batch. The state is
    the step count alone, since the order is a pure function of (seed, step)."""

    def __init__(
        self,
        features: Features,
        labels: np.ndarray,
        *,
        batch_size: int,
        seed: int,
        shard_index: int = 0,
        shard_count: int = 1,
    ):
        self.features, self.labels = features, labels
        self.batch_size, self.seed = batch_size, seed
        self.per_host = per_host_batch(batch_size, shard_index, shard_count)
        self.offset = shard_index * self.per_host
        self.steps_per_epoch = len(labels) // batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(labels)} training examples cannot fill one batch of {batch_size}")
        self.step = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        epoch, within = divmod(self.step, self.steps_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.labels))
        start = within * self.batch_size + self.offset
        index = np.sort(order[start : start + self.per_host])
        self.step += 1
        return {"x": _take(self.features, index), "label": self.labels[index]}

    def get_state(self) -> dict:
        return {"step": self.step}

    def set_state(self, state: dict) -> None:
        self.step = int(state["step"])


def feature_eval_batches(
    features: Features, labels: np.ndarray, batch_size: int, shard_index: int = 0, shard_count: int = 1
) -> Iterator[dict]:
    """Padded, masked eval batches; every example once over all hosts; every host yields as many batches."""
    per_host = per_host_batch(batch_size, shard_index, shard_count)
    start, stop = shard_bounds(len(labels), shard_index, shard_count)
    for offset in range(0, eval_batch_count(len(labels), per_host, shard_count) * per_host, per_host):
        index = np.arange(start + offset, start + offset + per_host)
        mask = index < stop
        index = np.where(mask, index, start if stop > start else 0)
        if len(labels) == 0:
            continue
        yield {"x": _take(features, index), "label": np.where(mask, labels[index], 0).astype(np.int32), "mask": mask}
