"""Device mesh and shardings: every compiled step runs under `jax.jit` with explicit NamedShardings (pjit
semantics). The batch is split over the `data` and `fsdp` axes; parameters are replicated unless a
`ShardingFn` (e.g. `sharding.fsdp_shardings`) lays them out."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")

# (state, mesh) → a sharding per leaf of the state (e.g. `sharding.fsdp_shardings`); None means replicated.
ShardingFn = Callable[[Any, Mesh], Any]


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp) mesh over all devices; data=-1 takes every device fsdp leaves."""
    devices = list(jax.devices() if devices is None else devices)
    if fsdp < 1 or len(devices) % fsdp:
        raise ValueError(f"config.mesh.fsdp={fsdp} must divide the device count ({len(devices)})")
    if data == -1:
        data = len(devices) // fsdp
    if data * fsdp != len(devices):
        raise ValueError(f"config.mesh data={data} x fsdp={fsdp} must equal the device count ({len(devices)})")
    return Mesh(np.asarray(devices).reshape(data, fsdp), BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch_size(batch_size: int, mesh: Mesh, name: str = "config.batch_size") -> None:
    devices = mesh.devices.size
    if batch_size % devices or batch_size % jax.process_count():
        raise ValueError(
            f"{name}={batch_size} must be divisible by the number of devices ({devices}); "
            f"use a multiple of {devices}, e.g. {max(devices, batch_size // devices * devices)}"
        )


def to_global(batch: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """This process's slice of the batch → global arrays laid out on `sharding` (multi-host safe)."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def gather(x) -> np.ndarray:
    """A batch-sharded global array, or each host's local numpy slice → the whole array (slices concatenated
    in process order) on every host."""
    if jax.process_count() == 1:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def host_major(parts: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> np.ndarray:
    """Per-batch gathered rows (host 0's slice, host 1's, ...) → real rows in source order.

    Evaluation gives each host a contiguous range of the split, so source order is every batch of host 0,
    then every batch of host 1, ...; padding rows (mask False) are dropped.
    """
    hosts = jax.process_count()
    rows = [[] for _ in range(hosts)]
    for values, mask in zip(parts, masks):
        for h, (v, m) in enumerate(zip(np.split(values, hosts), np.split(np.asarray(mask, bool), hosts))):
            rows[h].append(v[m])
    return np.concatenate([np.concatenate(r) for r in rows])


ROW_CHUNK = 4096  # rows read at a time when a lazy array goes onto a mesh


def rows_on_mesh(
    x, mesh: Mesh, *, transform: Callable[[np.ndarray], np.ndarray] | None = None, chunk_rows: int = ROW_CHUNK
) -> jax.Array:
    """Rows of a lazy [n, ...] array (numpy, a memory map, a cache entry's chunked array: anything sliced by
    rows) as a global jax.Array laid out over every axis of `mesh`, zero-padded to a multiple of its devices.

    Each process reads only its own devices' rows, `chunk_rows` at a time, so its host memory holds one chunk
    plus its own shard, never the split. `transform` maps each chunk of rows (cast, standardise, one-hot)
    before it is placed; padding rows stay zero after it.
    """
    n = len(x)
    sample = np.asarray(x[:1]) if n else np.zeros((1, *x.shape[1:]), getattr(x, "dtype", np.float32))
    sample = sample if transform is None else transform(sample)
    shape = (-(-n // mesh.devices.size) * mesh.devices.size, *sample.shape[1:])
    sharding = NamedSharding(mesh, P(tuple(mesh.axis_names)))

    def read(index: tuple[slice, ...]) -> np.ndarray:
        start, stop, _ = index[0].indices(shape[0])
        out = np.zeros((stop - start, *shape[1:]), sample.dtype)
        for a in range(start, min(stop, n), chunk_rows):
            b = min(a + chunk_rows, stop, n)
            rows = np.asarray(x[a:b])
            out[a - start : b - start] = rows if transform is None else transform(rows)
        return out[(slice(None), *index[1:])]

    return jax.make_array_from_callback(shape, sharding, read)
