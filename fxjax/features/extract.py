"""Feature extraction: one pass of a frozen backbone over a split, batched and sharded over devices."""

from __future__ import annotations

from collections.abc import Iterable

import jax
import numpy as np

import fxjax
from fxjax import parallel
from fxjax.backbones.backbone import Backbone
from fxjax.data import images as pipeline
from fxjax.data.sources import split_labels
from fxjax.features import store as cache
from fxjax.progress import Progress


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
    """Feature variants {name: [total, d_name]} in source order from padded, masked batches ({"x", "mask"}).

    When the batches carry "label", the labels of the same rows come back too, as "labels" [total]: rows
    masked out (padding, unreadable images) are dropped from both alike.

    The backbone state is replicated unless `param_sharding` lays it out (e.g. `sharding.fsdp_shardings`).
    The step is the backbone's own jitted forward (`Backbone._variants`) on inputs already placed on their
    shardings, so that its compilation is reused by every split instead of repeated per call.
    """
    sharding = parallel.batch_sharding(mesh)
    layout = parallel.replicated(mesh) if param_sharding is None else param_sharding(backbone.state, mesh)
    state = jax.device_put(backbone.state, layout)
    parts, mask_parts, label_parts = {name: [] for name in variants}, [], []
    with Progress(total, desc=desc, unit="img") as bar:
        for batch in batches:
            images = parallel.to_global({"x": batch["x"]}, sharding)["x"]
            for name, value in backbone._variants(state, images, tuple(variants)).items():
                parts[name].append(parallel.gather(value))
            mask_parts.append(parallel.gather(batch["mask"]))
            if "label" in batch:
                label_parts.append(parallel.gather(batch["label"]))
            bar.update(int(np.sum(batch["mask"])) * jax.process_count())
    if not mask_parts:
        return {name: np.zeros((0, backbone.feature_dim), np.float32) for name in variants}
    out = {name: parallel.host_major(p, mask_parts).astype(np.float32) for name, p in parts.items()}
    if label_parts:
        out["labels"] = parallel.host_major(label_parts, mask_parts).astype(np.int32)
    return out


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
        "format": cache.FORMAT,
    }


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
) -> tuple[dict, dict, dict]:
    """Features (pooled, plus any extra `variants`) and labels of every split, from the on-disk cache or
    extracted once into it.

    → (features {split: {variant: [n, d]}}, labels {split: [n]}, hits {split: bool}). Every host computes
    when any host misses, since extraction is a collective step all hosts must enter.
    """
    variants = ("pooled", *(v for v in variants if v != "pooled"))
    store = cache.FeatureCache(cache.cache_root(cache_dir))
    shard = {"shard_index": jax.process_index(), "shard_count": jax.process_count()}
    feats, labels, hits = {}, {}, {}
    for split, source in data.splits.items():
        key = fingerprint(backbone, data, split, dtype, param_dtype, variants)
        arrays = store.get(key)
        if jax.process_count() > 1:
            everyone_hit = parallel.gather(np.asarray([arrays is not None])).all()
            arrays = arrays if everyone_hit else None
        hits[split] = arrays is not None
        if arrays is None:
            batches = pipeline.eval_batches(
                source, backbone.preprocess, batch_size=batch_size, worker_count=worker_count, **shard
            )
            arrays = extract(
                backbone,
                batches,
                total=len(source),
                mesh=mesh,
                desc=f"features[{split}]",
                param_sharding=param_sharding,
                variants=variants,
            )
            arrays.setdefault("labels", split_labels(source))  # extract's own, unless the split was empty
            if jax.process_index() == 0:
                store.put(key, arrays)
        feats[split] = {name: arrays[name] for name in variants}
        labels[split] = np.asarray(arrays["labels"])
    return feats, labels, hits
