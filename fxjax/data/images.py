"""grain input pipelines: a resumable, sharded, shuffled training stream and exact, padded evaluation passes.

Batch sizes here are global; each host (shard) gets `batch_size // shard_count` examples per batch, so the
global batch assembled from all hosts is `batch_size`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import grain
import numpy as np
from absl import flags

from fxjax.data.preprocess import PreprocessSpec, augment_image, preprocess_image
from fxjax.data.shards import eval_batch_count, per_host_batch, shard_bounds
from fxjax.data.sources import SkipUnreadable, Source


class _Preprocess(grain.transforms.Map):
    """Eval-style geometry + normalisation of one record."""

    def __init__(self, spec: PreprocessSpec):
        self.spec = spec

    def map(self, element: dict) -> dict:
        return {"x": preprocess_image(element["image"], self.spec), "label": np.int32(element["label"])}


class _Augment(grain.transforms.RandomMap):
    """Random resized crop + flip; grain hands each record an rng derived from (seed, record index)."""

    def __init__(self, spec: PreprocessSpec):
        self.spec = spec

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        return {"x": augment_image(element["image"], self.spec, rng), "label": np.int32(element["label"])}


def read_options(per_host: int, num_threads: int | None = None) -> grain.ReadOptions:
    """grain's reader threads sized to the machine: its default of 16 threads (and 500 prefetched records)
    oversubscribes a small host, where decoding competes with XLA for the same cores (measured 3x slower on 2
    cores); half the cores (at least 1, at most 16) and two batches of prefetch keep the device fed."""
    threads = num_threads or min(16, max(1, (os.cpu_count() or 1) // 2))
    return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * per_host)


def _use_default_absl_flags() -> None:
    """grain reads absl flags when it starts worker processes; outside `absl.app.run` nothing has parsed
    them and that read raises UnparsedFlagAccessError, so declare "no command-line flags" (defaults). Needed
    because fxjax is also a library (a notebook's loader), and because its CLI parses `--config.*` with
    config_flags on a private FlagValues, leaving the global flags untouched."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def train_loader(
    source: Source,
    spec: PreprocessSpec,
    *,
    batch_size: int,
    seed: int,
    shard_index: int = 0,
    shard_count: int = 1,
    augment: bool = False,
    worker_count: int = 0,
    num_epochs: int | None = None,
) -> grain.DataLoader:
    """Training stream of {"x": float32 [b, h, w, 3], "label": int32 [b]}, b = batch_size // shard_count.

    Each host reads its own contiguous shard of `source` (equal sizes, remainder dropped so all hosts take
    the same number of steps), reshuffled every epoch from `seed`. Batches run across epoch boundaries; with
    `num_epochs` set, the incomplete last batch is dropped. `iter(loader)` has get_state() / set_state():
    order and augmentation depend only on (seed, position), so a restored iterator continues exactly.
    With worker processes each worker batches its own records, so the stream depends on `worker_count`;
    resume with the same value (grain checks it).
    """
    per_host = per_host_batch(batch_size, shard_index, shard_count)
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be a 32-bit non-negative integer, got {seed}")
    shard_options = grain.sharding.ShardOptions(shard_index, shard_count, drop_remainder=True)
    if len(source) // shard_count < per_host:
        raise ValueError(
            f"{len(source)} examples over {shard_count} host(s) cannot fill one batch of {per_host} per host"
        )
    sampler = grain.samplers.IndexSampler(
        num_records=len(source), shard_options=shard_options, shuffle=True, num_epochs=num_epochs, seed=seed
    )
    transform = _Augment(spec) if augment else _Preprocess(spec)
    if worker_count:
        _use_default_absl_flags()
    return grain.DataLoader(
        data_source=SkipUnreadable(source),  # an unreadable image is replaced by a rule of its index
        sampler=sampler,
        operations=[transform, grain.transforms.Batch(per_host, drop_remainder=True)],
        worker_count=worker_count,
        read_options=read_options(per_host),
        shard_options=shard_options,
    )


class PaddedShard:
    """One host's contiguous images [start, stop) of a source, `views` rows per image (row r: image
    start + r // views, view r % views), padded with masked blanks to `length` rows. Each row's pixels are
    `transform(image, index, view)` (default: eval preprocessing); an unreadable image is masked like padding."""

    def __init__(
        self,
        source: Source,
        spec: PreprocessSpec,
        start: int,
        stop: int,
        length: int,
        *,
        views: int = 1,
        transform: Callable[[np.ndarray, int, int], np.ndarray] | None = None,
    ):
        self.source, self.spec, self.views, self.transform = source, spec, views, transform
        self.start, self.stop, self.length = start, stop, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, row: int) -> dict[str, np.ndarray]:
        image, view = divmod(int(row), self.views)
        if image < self.stop - self.start:
            index = self.start + image
            record = self.source[index]
            if record.get("readable", True):
                pixels, transform = record["image"], self.transform
                x = preprocess_image(pixels, self.spec) if transform is None else transform(pixels, index, view)
                return {"x": x, "label": np.int32(record["label"]), "mask": np.True_}
        height, width = self.spec.size
        return {"x": np.zeros((height, width, 3), np.float32), "label": np.int32(0), "mask": np.False_}

    def __repr__(self) -> str:
        return f"PaddedShard({self.source!r}, {self.start}:{self.stop}, views={self.views}, length={self.length})"


def eval_batches(
    source: Source,
    spec: PreprocessSpec,
    *,
    batch_size: int,
    shard_index: int = 0,
    shard_count: int = 1,
    worker_count: int = 0,
    start_batch: int = 0,
    views: int = 1,
    transform: Callable[[np.ndarray, int, int], np.ndarray] | None = None,
) -> Iterator[dict]:
    """Each example exactly once across all hosts, in order, as {"x", "label", "mask": bool [b]} batches.

    The last batch is padded (mask False); an image that cannot be decoded is masked out the same way. Every
    host yields the same number of batches, all-padding ones where it runs out first, because the jitted eval
    step is a collective that every host must enter. `start_batch` skips that many batches on every host (a
    resumed extraction). `views` rows per image (adjacent), each `transform(image, index, view)` (see
    `PaddedShard`): the cached augmented views.
    """
    per_host = per_host_batch(batch_size, shard_index, shard_count)
    num_batches = eval_batch_count(len(source), per_host, shard_count, views) - start_batch
    if num_batches <= 0:
        return iter(())
    start, stop = shard_bounds(len(source), shard_index, shard_count)
    if worker_count:
        _use_default_absl_flags()
    skipped = start_batch * per_host // views  # images already extracted: a whole number (chunk boundary)
    padded = PaddedShard(source, spec, start + skipped, stop, num_batches * per_host, views=views, transform=transform)
    loader = grain.DataLoader(
        data_source=padded,
        sampler=grain.samplers.SequentialSampler(len(padded), grain.sharding.NoSharding()),
        operations=[grain.transforms.Batch(per_host, drop_remainder=False)],
        worker_count=worker_count,
        read_options=read_options(per_host),
        shard_options=grain.sharding.NoSharding(),
    )
    return iter(loader)
