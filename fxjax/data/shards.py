"""Shard arithmetic shared by every loader: how a global batch and an evaluation split divide over hosts."""

from __future__ import annotations

import math


def per_host_batch(batch_size: int, shard_index: int, shard_count: int) -> int:
    """Each host's share of a global batch."""
    if shard_count < 1 or not 0 <= shard_index < shard_count:
        raise ValueError(f"need 0 <= shard_index < shard_count, got {shard_index} of {shard_count}")
    if batch_size <= 0 or batch_size % shard_count:
        raise ValueError(f"batch_size {batch_size} must be a positive multiple of shard_count {shard_count}")
    return batch_size // shard_count


def shard_bounds(num_examples: int, shard_index: int, shard_count: int) -> tuple[int, int]:
    """[start, stop) of a host's contiguous eval shard; sizes differ by at most one."""
    return (num_examples * shard_index // shard_count, num_examples * (shard_index + 1) // shard_count)


def eval_batch_count(num_examples: int, per_host: int, shard_count: int, rows_per_example: int = 1) -> int:
    """Batches every host yields in an evaluation pass: enough for the largest shard (the eval step is a
    collective every host must enter, so hosts that run out first yield all-padding batches)."""
    return math.ceil(math.ceil(num_examples / shard_count) * rows_per_example / per_host)
