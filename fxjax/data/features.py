"""Batches of cached features, in the same schema as image batches: {"x", "label"} for training and
{"x", "label", "mask"} for evaluation, where "x" is an array [b, d] or a dict of them (feature variants).

Each host reads only its own contiguous rows (`shard_bounds`): pass them with `total`, the split's row count
over all hosts (without it, the arrays hold every row)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np

from fxjax.data.shards import eval_batch_count, per_host_batch, shard_bounds

Features = np.ndarray | Mapping[str, np.ndarray]  # [n, d], or variant → [n, d_variant]; [n, views, d] with views


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a well-spread uint64 hash of each element."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def epoch_views(epoch: int, examples, views: int, seed: int) -> np.ndarray:
    """The cached view each example trains on in `epoch` (int64, shaped like `examples`): a seeded per-example
    offset plus the epoch, so every image cycles through all its views once per `views` epochs, out of step
    with the others."""
    examples = np.asarray(examples, np.uint64)
    with np.errstate(over="ignore"):
        offset = _mix(examples + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)) % np.uint64(views)
    return ((offset.astype(np.int64) + epoch) % views).astype(np.int64)


def view_for(epoch: int, example: int, views: int, seed: int) -> int:
    """`epoch_views` for one example."""
    return int(epoch_views(epoch, [example], views, seed)[0])


def _take(features: Features, index: np.ndarray, view: np.ndarray | None = None):
    """Rows `index` of every variant; with `view` [b], row i's cached view view[i] ([n, views, d] → [b, d])."""

    def take(f):
        rows = f[index]
        return rows if view is None else rows[np.arange(len(index)), view]

    if isinstance(features, Mapping):
        return {name: take(f) for name, f in features.items()}
    return take(features)


def _host_rows(labels: np.ndarray, total: int | None, shard_index: int, shard_count: int) -> tuple[int, int, int]:
    """(total rows, this host's first global row, its last + 1), checking that `labels` holds those rows."""
    total = len(labels) if total is None else total
    start, stop = shard_bounds(total, shard_index, shard_count)
    if len(labels) not in (total, stop - start):
        raise ValueError(
            f"host {shard_index} of {shard_count} was given {len(labels)} rows: expected its shard "
            f"[{start}, {stop}) of total={total}, or all {total} rows"
        )
    return total, start, stop


class FeatureBatches:
    """Training batches, each host reading only its own contiguous rows.

    The split is cut into `batch_size` blocks (`shard_bounds(n, j, batch_size)`); every epoch each block is
    permuted (seeded by seed, epoch, block) and global batch b takes element b of every block. Host h's share
    of a global batch is blocks [h * per_host, (h + 1) * per_host), which lie exactly in its rows
    `shard_bounds(n, h, hosts)`, so the batches are the same for any number of hosts and no host reads
    another's rows. With `views` (features [n, views, d]), example i trains on view `epoch_views` of it.
    The state is the step count alone, since the order is a pure function of (seed, step).
    """

    def __init__(
        self,
        features: Features,
        labels: np.ndarray,
        *,
        batch_size: int,
        seed: int,
        shard_index: int = 0,
        shard_count: int = 1,
        total: int | None = None,
        views: int = 0,
    ):
        self.features, self.labels = features, labels
        self.batch_size, self.seed, self.views = batch_size, seed, views
        self.per_host = per_host_batch(batch_size, shard_index, shard_count)
        self.total, start, stop = _host_rows(labels, total, shard_index, shard_count)
        self.offset = 0 if len(labels) == self.total else start  # the global row of labels[0]
        self.steps_per_epoch = self.total // batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"{self.total} training examples cannot fill one batch of {batch_size}")
        self.blocks = range(shard_index * self.per_host, (shard_index + 1) * self.per_host)  # this host's
        self.step, self._epoch = 0, (None, None)

    def __iter__(self):
        return self

    def _order(self, epoch: int) -> np.ndarray:
        """[steps_per_epoch, per_host] global rows of this host's share of every batch of `epoch`."""
        if self._epoch[0] != epoch:
            columns = []
            for j in self.blocks:
                start, stop = shard_bounds(self.total, j, self.batch_size)  # global rows of block j
                rng = np.random.default_rng([self.seed, epoch, j])
                columns.append(start + rng.permutation(stop - start)[: self.steps_per_epoch])
            self._epoch = (epoch, np.stack(columns, axis=1))
        return self._epoch[1]

    def __next__(self) -> dict:
        epoch, within = divmod(self.step, self.steps_per_epoch)
        rows = self._order(epoch)[within]  # increasing: blocks are in row order
        self.step += 1
        view = epoch_views(epoch, rows, self.views, self.seed) if self.views else None
        index = rows - self.offset
        return {"x": _take(self.features, index, view), "label": self.labels[index]}

    def get_state(self) -> dict:
        return {"step": self.step}

    def set_state(self, state: dict) -> None:
        self.step = int(state["step"])


def feature_eval_batches(
    features: Features,
    labels: np.ndarray,
    batch_size: int,
    shard_index: int = 0,
    shard_count: int = 1,
    total: int | None = None,
) -> Iterator[dict]:
    """Padded, masked eval batches; every example once over all hosts; every host yields as many batches.
    Reads rows `shard_bounds(total, shard_index, shard_count)` only, so `features` may be just those."""
    per_host = per_host_batch(batch_size, shard_index, shard_count)
    total, start, stop = _host_rows(labels, total, shard_index, shard_count)
    offset = 0 if len(labels) == total else start
    for first in range(0, eval_batch_count(total, per_host, shard_count) * per_host, per_host):
        index = np.arange(start + first, start + first + per_host)
        mask = index < stop
        index = np.where(mask, index, start if stop > start else 0) - offset
        if len(labels) == 0:
            continue
        yield {"x": _take(features, index), "label": np.where(mask, labels[index], 0).astype(np.int32), "mask": mask}
