"""Feature extraction: one pass of a frozen backbone over a split, batched and sharded over devices."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable

import jax
import numpy as np
from tqdm import tqdm

import fxjax
from fxjax import cache, parallel
from fxjax.data import pipeline
from fxjax.models.backbone import Backbone


def extract(backbone: Backbone, batches: Iterable[dict], *, total: int, mesh, desc: str = "features",
            param_sharding: parallel.ShardingFn | None = None) -> np.ndarray:
    """Pooled features [total, d] in source order from padded, masked batches ({"image", "mask"}).

    The backbone state is replicated unless `param_sharding` lays it out (e.g. `sharding.fsdp_shardings`).
    The step is the backbone's own jitted `_pooled` on inputs already placed on their shardings, so that its
    compilation is reused by every split instead of repeated per call.
    """
    sharding = parallel.batch_sharding(mesh)
    layout = parallel.replicated(mesh) if param_sharding is None else param_sharding(backbone.state, mesh)
    state = jax.device_put(backbone.state, layout)
    compiled = backbone._pooled
    feats_parts, mask_parts = [], []
    start = time.perf_counter()
    with tqdm(total=total, desc=desc, unit="img", file=sys.stderr, disable=jax.process_index() != 0,
              dynamic_ncols=True) as bar:
        for batch in batches:
            feats = compiled(state, parallel.to_global({"image": batch["image"]}, sharding)["image"])
            feats_parts.append(parallel.gather(feats))
            mask_parts.append(parallel.gather_host_local(batch["mask"]))
            bar.update(int(np.sum(batch["mask"])) * jax.process_count())
            bar.set_postfix(img_s=f"{bar.n / (time.perf_counter() - start):.0f}")
    if not feats_parts:
        return np.zeros((0, backbone.feature_dim), np.float32)
    return parallel.host_major(feats_parts, mask_parts).astype(np.float32)


def fingerprint(backbone: Backbone, data, split: str, dtype: str, param_dtype: str) -> dict:
    """Everything that changes a split's features; the feature-cache key."""
    info = backbone.info
    return {"backbone": info["name"], "revision": info["revision"], "weight_sha256": info["weight_sha256"],
            "preprocess": backbone.preprocess.to_dict(), "dataset": data.name, "split": split,
            "split_fingerprint": data.fingerprint[split], "outputs": ["pooled"], "dtype": dtype,
            "param_dtype": param_dtype, "code": fxjax.__version__, "format": cache.FORMAT}


def cached_features(backbone: Backbone, data, *, mesh, batch_size: int, cache_dir: str | None, dtype: str,
                    param_dtype: str, worker_count: int = 0,
                    param_sharding: parallel.ShardingFn | None = None) -> tuple[dict, dict, dict]:
    """Pooled features and labels of every split, from the on-disk cache or extracted once into it.

    → (features {split: [n, d]}, labels {split: [n]}, hits {split: bool}). Every host computes when any
    host misses, since extraction is a collective step all hosts must enter.
    """
    store = cache.FeatureCache(cache.cache_root(cache_dir))
    shard = {"shard_index": jax.process_index(), "shard_count": jax.process_count()}
    feats, labels, hits = {}, {}, {}
    for split, source in data.splits.items():
        key = fingerprint(backbone, data, split, dtype, param_dtype)
        arrays = store.get(key)
        if jax.process_count() > 1:
            everyone_hit = parallel.gather_host_local(np.asarray([arrays is not None])).all()
            arrays = arrays if everyone_hit else None
        hits[split] = arrays is not None
        if arrays is None:
            arrays = {
                "features": extract(backbone, pipeline.eval_batches(source, backbone.preprocess,
                                                                    batch_size=batch_size,
                                                                    worker_count=worker_count, **shard),
                                    total=len(source), mesh=mesh, desc=f"features[{split}]",
                                    param_sharding=param_sharding),
                "labels": np.asarray([source.label(i) for i in range(len(source))], np.int32),
            }
            if jax.process_index() == 0:
                store.put(key, arrays)
        feats[split], labels[split] = arrays["features"], np.asarray(arrays["labels"])
    return feats, labels, hits
