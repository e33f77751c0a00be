"""Feature extraction: one pass of a frozen backbone over a split, batched and sharded over devices, streamed
into the feature cache chunk by chunk by every host for its own rows (see `fxjax.features.entry`)."""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Iterable, Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils

import fxjax
from fxjax import parallel
from fxjax.backbones.backbone import Backbone
from fxjax.data import images as pipeline
from fxjax.features import store as cache
from fxjax.features.entry import ENTRY_FORMAT, ChunkedArray, ChunkedEntry
from fxjax.progress import Progress

CHUNK_ROWS = 4096  # rows per chunk file: small enough to bound memory, large enough for few files


def _local_rows(value: jax.Array, sharding) -> jax.Array | np.ndarray:
    """This host's rows of a batch-sharded global output (in the order its batch slice was given)."""
    if jax.process_count() == 1:
        return value
    if not value.sharding.is_equivalent_to(sharding, value.ndim):
        value = jax.device_put(value, sharding)  # XLA chose another output layout: back to the batch's
    return multihost_utils.global_array_to_host_local_array(value, sharding.mesh, sharding.spec)


def run_batches(
    backbone: Backbone,
    batches: Iterable[dict],
    *,
    mesh,
    variants: tuple[str, ...],
    param_sharding: parallel.ShardingFn | None = None,
) -> Iterator[tuple[dict[str, np.ndarray], dict]]:
    """({variant: this host's rows [b, d]}, batch) per batch, pipelined: batch i+1 is read, preprocessed and
    placed on the devices while batch i computes, and i's features come back by an asynchronous
    device-to-host copy started as soon as it is dispatched. No features cross hosts.

    The step is the backbone's own jitted forward (`Backbone._variants`) on inputs already placed on their
    shardings, so that its compilation is reused by every split instead of repeated per call.
    """
    sharding = parallel.batch_sharding(mesh)
    layout = parallel.replicated(mesh) if param_sharding is None else param_sharding(backbone.state, mesh)
    state = jax.device_put(backbone.state, layout)
    pending = None
    for batch in batches:
        images = parallel.to_global({"x": batch["x"]}, sharding)["x"]
        outputs = {k: _local_rows(v, sharding) for k, v in backbone._variants(state, images, variants).items()}
        for value in outputs.values():
            value.copy_to_host_async()
        if pending is not None:
            yield {k: np.asarray(v) for k, v in pending[0].items()}, pending[1]
        pending = (outputs, batch)
    if pending is not None:
        yield {k: np.asarray(v) for k, v in pending[0].items()}, pending[1]


def extract(
    backbone: Backbone,
    batches: Iterable[dict],
    *,
    total: int,
    mesh,
    desc: str = "features",
    param_sharding: parallel.ShardingFn | None = None,
    variants: tuple[str, ...] = ("pooled",),
) -> dict[str, np.ndarray]:
    """Feature variants {name: [total, d_name]} in source order from padded, masked batches ({"x", "mask"}),
    in memory on every host: for small splits and tests; the cache path (`extract_to_entry`) streams instead."""
    parts, masks = {name: [] for name in variants}, []
    progress = Progress(total, desc=desc, unit="img")
    for rows, batch in run_batches(backbone, batches, mesh=mesh, variants=variants, param_sharding=param_sharding):
        for name in variants:
            parts[name].append(rows[name])
        masks.append(np.asarray(batch["mask"], bool))
        progress.update(int(masks[-1].sum()) * jax.process_count())
    progress.close()
    if not masks:
        return {name: np.zeros((0, backbone.feature_dim), np.float32) for name in variants}
    hosts = jax.process_count()
    mask = parallel.gather(np.concatenate(masks)).reshape(hosts, -1)  # [hosts, local rows]
    out = {}
    for name, p in parts.items():
        value = parallel.gather(np.concatenate(p)).reshape(hosts, mask.shape[1], -1)
        out[name] = np.concatenate([value[h][mask[h]] for h in range(hosts)]).astype(np.float32)
    return out


def chunk_rows_for(unit: int, chunk_rows: int = CHUNK_ROWS) -> int:
    """`chunk_rows` rounded up to whole units (per-host batches, and whole images' views): a resumed run
    restarts at a batch boundary with the same batch composition as an uninterrupted one, which is what
    makes its features bitwise equal."""
    return max(1, math.ceil(chunk_rows / unit)) * unit


def _all_min(value: int) -> int:
    if jax.process_count() == 1:
        return value
    return int(parallel.gather(np.asarray([value], np.int64)).min())


def extract_to_entry(
    backbone: Backbone,
    entry: ChunkedEntry,
    make_batches: Callable[[int], Iterable[dict]],
    *,
    total: int,
    num_batches: int,
    per_host: int,
    mesh,
    desc: str,
    variants: tuple[str, ...],
    param_sharding: parallel.ShardingFn | None = None,
    chunk_rows: int = CHUNK_ROWS,
    rows_per_image: int = 1,
) -> None:
    """Streams this host's rows of a split into `entry` (arrays `variants` and "labels") and finishes its shard;
    the caller commits. Resumes after the last chunk every host has complete, so the collective forward
    passes stay in step; rewritten chunks are bitwise what was there.

    `make_batches(start_batch)` gives this host's padded batches from `start_batch` on; `rows_per_image`
    consecutive batch rows form one stored row (K augmented views of one image → [K, d]).
    """
    host, hosts = jax.process_index(), jax.process_count()
    chunk = chunk_rows_for(math.lcm(per_host, rows_per_image), chunk_rows * rows_per_image)
    per_chunk = chunk // per_host  # batches per chunk
    writer = entry.shard_writer(host, hosts, chunk // rows_per_image)
    names = (*variants, "labels")
    finished = entry.shard_done(host, hosts) is not None
    done_batches = num_batches if finished else writer.resume_chunks(names) * per_chunk
    start_batch = min(_all_min(done_batches), num_batches)
    if start_batch == num_batches and finished:
        if hosts > 1:
            _all_min(0)  # the barrier the other hosts' extraction loop does not need; keeps calls in step
        return
    writer.start(start_batch // per_chunk, names)
    done = min(total, start_batch * per_host * hosts) * rows_per_image
    progress = Progress(total * rows_per_image, desc=desc, unit="img", initial=done)
    buffer: dict[str, list] = {name: [] for name in names}
    try:
        batches = make_batches(start_batch)
        for rows, batch in run_batches(backbone, batches, mesh=mesh, variants=variants, param_sharding=param_sharding):
            mask = np.asarray(batch["mask"], bool)
            for name in variants:
                buffer[name].append(rows[name][mask])
            buffer["labels"].append(np.asarray(batch["label"], np.int32)[mask])
            progress.update(int(mask.sum()) * hosts)
            if len(buffer["labels"]) == per_chunk:
                _flush(writer, buffer, rows_per_image)
        if hosts > 1:
            _all_min(0)
        _flush(writer, buffer, rows_per_image)
        writer.finish()
    finally:
        writer.close()
        progress.close()


def _flush(writer, buffer: dict[str, list], rows_per_image: int) -> None:
    if not buffer["labels"]:
        return
    arrays = {name: np.concatenate(parts) for name, parts in buffer.items()}
    for parts in buffer.values():
        parts.clear()
    if not len(arrays["labels"]):
        return
    for name, value in arrays.items():
        arrays[name] = value.reshape(-1, rows_per_image, *value.shape[1:]) if rows_per_image > 1 else value
    if rows_per_image > 1:
        arrays["labels"] = arrays["labels"][:, 0]
    writer.append({k: v.astype(np.float32) if k != "labels" else v for k, v in arrays.items()})


def fingerprint(
    backbone: Backbone, data, split: str, dtype: str, param_dtype: str, variants: tuple[str, ...] = ("pooled",)
) -> dict:
    """Everything that changes a split's features; the feature-cache key."""
    info = backbone.info
    return {
        "backbone": info["name"],
        "revision": info["revision"],
        "weight_sha256": info["weight_sha256"],
        "preprocess": backbone.preprocess.to_dict(),
        "dataset": data.name,
        "split": split,
        "split_fingerprint": data.fingerprint[split],
        "outputs": sorted(variants),
        "dtype": dtype,
        "param_dtype": param_dtype,
        "code": fxjax.__version__,
        "format": ENTRY_FORMAT,
    }


def store_is_shared(root) -> bool:
    """Whether every host sees the same cache root (a shared disk or bucket) or each its own local disk: host 0
    writes a marker file there, and every host looks for it."""
    if jax.process_count() == 1:
        return True
    token = int(multihost_utils.broadcast_one_to_all(np.random.randint(0, 2**31 - 1)))  # noqa: NPY002
    marker = cache.as_path(root) / f".hosts-{token}"
    if jax.process_index() == 0:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("")
    _all_min(0)  # every host looks only after host 0 wrote
    shared = bool(parallel.gather(np.asarray([marker.exists()])).all())
    if jax.process_index() == 0:
        marker.unlink()
    return shared


def commit(entry: ChunkedEntry, shared: bool) -> None:
    """Commits a finished extraction: on a shared store host 0 writes the manifest of every shard once all
    hosts finished theirs; on per-host disks each host commits its own shard."""
    host, hosts = jax.process_index(), jax.process_count()
    if not shared:
        entry.commit(hosts, [host])
        return
    _all_min(0)  # every shard finished
    if host == 0:
        entry.commit(hosts, range(hosts))
    _all_min(0)  # committed before anyone reads


def gather_rows(entry: ChunkedEntry) -> dict[str, np.ndarray]:
    """Every row of an entry held in per-host shards, assembled chunk by chunk through all-gathers into a
    memory-mapped temporary file on each host (the whole split never sits in host memory)."""
    host, hosts = jax.process_index(), jax.process_count()
    mine = entry.host_rows(host, hosts)
    counts = parallel.gather(np.asarray([len(mine["labels"])], np.int64))  # [hosts]
    offsets = np.concatenate([[0], np.cumsum(counts)])
    out = {}
    for name, value in mine.items():
        with tempfile.TemporaryFile(prefix="fxjax-gathered-") as f:  # unlinked: freed with the array
            out[name] = np.memmap(f, dtype=value.dtype, mode="w+", shape=(int(offsets[-1]), *value.tail))
        step = CHUNK_ROWS
        for start in range(0, int(counts.max()), step):
            rows = value.rows(start, start + step)
            padded = np.zeros((step, *value.tail), value.dtype)
            padded[: len(rows)] = rows
            every = parallel.gather(padded).reshape(hosts, step, *value.tail)
            for h in range(hosts):
                n = int(max(0, min(step, counts[h] - start)))
                out[name][offsets[h] + start : offsets[h] + start + n] = every[h, :n]
    return out


def cached_split(
    backbone: Backbone,
    entry: ChunkedEntry,
    make_batches: Callable[[int], Iterable[dict]],
    *,
    rows: str = "all",
    shared: list | None = None,
    **extraction,
) -> tuple[dict, bool]:
    """(arrays {variant..., "labels"}, hit) of one entry: read when every host holds it, else extracted
    (resumed) into it and committed first. `shared` memoises `store_is_shared` across splits ([] or [bool]);
    `extraction`: the keyword arguments of `extract_to_entry` (sizes, mesh, variants, ...)."""
    if rows not in ("all", "host"):
        raise ValueError(f"rows must be 'all' or 'host', got {rows!r}")
    host, hosts = jax.process_index(), jax.process_count()
    hit = entry.holds(host, hosts)
    if hosts > 1:
        hit = bool(parallel.gather(np.asarray([hit])).all())
    if not hit:
        extract_to_entry(backbone, entry, make_batches, **extraction)
        shared = [] if shared is None else shared
        if not shared:
            shared.append(store_is_shared(entry.path.parent))
        commit(entry, shared[0])
    return _read(entry, rows), hit


def cached_features(
    backbone: Backbone,
    data,
    *,
    mesh,
    batch_size: int,
    cache_dir: str | None,
    dtype: str,
    param_dtype: str,
    worker_count: int = 0,
    param_sharding: parallel.ShardingFn | None = None,
    variants: tuple[str, ...] = (),
    chunk_rows: int = CHUNK_ROWS,
    rows: str = "all",
) -> tuple[dict, dict, dict]:
    """Features (pooled, plus any extra `variants`) and labels of every split, from the feature cache or
    extracted once into it, each host streaming its own rows (resumable after a kill).

    → (features {split: {variant: [n, d]}}, labels {split: [n]}, hits {split: bool}). Features are lazy
    (chunk files read as indexed). rows="all": every row on every host (gathered in chunks when each host
    keeps its own local cache); rows="host": this host's contiguous rows only (`shard_bounds`), for head
    training. Every host computes when any host misses, since extraction is a collective step.
    """
    variants = ("pooled", *(v for v in variants if v != "pooled"))
    root = cache.as_path(cache.cache_root(cache_dir))
    host, hosts = jax.process_index(), jax.process_count()
    per_host, shared = batch_size // hosts, []
    feats, labels, hits = {}, {}, {}
    for split, source in data.splits.items():
        key = fingerprint(backbone, data, split, dtype, param_dtype, variants)

        def make_batches(start_batch, source=source):
            return pipeline.eval_batches(
                source,
                backbone.preprocess,
                batch_size=batch_size,
                worker_count=worker_count,
                shard_index=host,
                shard_count=hosts,
                start_batch=start_batch,
            )

        arrays, hits[split] = cached_split(
            backbone,
            ChunkedEntry(root / cache.fingerprint_key(key), key),
            make_batches,
            total=len(source),
            num_batches=math.ceil(math.ceil(len(source) / hosts) / per_host),
            per_host=per_host,
            mesh=mesh,
            desc=f"features[{split}]",
            variants=variants,
            param_sharding=param_sharding,
            chunk_rows=chunk_rows,
            rows=rows,
            shared=shared,
        )
        feats[split] = {name: arrays[name] for name in variants}
        labels[split] = np.asarray(arrays["labels"])
    return feats, labels, hits


def _read(entry: ChunkedEntry, rows: str) -> dict[str, ChunkedArray | np.ndarray]:
    host, hosts = jax.process_index(), jax.process_count()
    if rows == "host":
        return entry.host_rows(host, hosts)
    manifest = entry.manifest()
    everyone_whole = len(manifest["shards"]) == manifest["hosts"]
    if hosts > 1:
        everyone_whole = bool(parallel.gather(np.asarray([everyone_whole])).all())
    return entry.arrays() if everyone_whole else gather_rows(entry)
