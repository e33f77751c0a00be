"""Parallelism: the device mesh and batch shardings (`mesh`), FSDP rules for large frozen tensors
(`sharding`) and multi-host start-up (`distributed`). Every stage may import this package; it imports none."""

from fxjax.parallel.mesh import (
    BATCH_AXES,
    ShardingFn,
    batch_sharding,
    check_batch_size,
    gather,
    host_major,
    make_mesh,
    replicated,
    rows_on_mesh,
    to_global,
)

__all__ = [
    "BATCH_AXES",
    "ShardingFn",
    "batch_sharding",
    "check_batch_size",
    "gather",
    "host_major",
    "make_mesh",
    "replicated",
    "rows_on_mesh",
    "to_global",
]
