"""Augmented views extracted once: K seeded random-resized-crop + flip views of every training image go into
the feature cache, so a head trained with augmentation runs on cached features, one view per image per epoch.

View k of image i is exactly what the online pipeline (`images._Augment`, the same `augment_image`) gives that
image in the k-th epoch of an unshuffled grain stream under the same seed: grain hands record position p the
rng Philox(key=seed + p), and image i sits at position k * n + i in epoch k.
"""

from __future__ import annotations

import math

import jax
import numpy as np

from fxjax import parallel
from fxjax.backbones.backbone import Backbone
from fxjax.data.images import eval_batches
from fxjax.data.preprocess import PreprocessSpec, augment_image
from fxjax.features import extract as extraction, store as cache
from fxjax.features.entry import ChunkedEntry


def view_rng(seed: int, view: int, index: int, num_images: int) -> np.random.Generator:
    """The rng grain's sampler gives image `index` in epoch `view` of an unshuffled stream of `num_images`."""
    return np.random.Generator(np.random.Philox(key=seed + view * num_images + index))


class _AugmentView:
    """View `view` of image `index`: the online augmentation under the rng grain would give it (picklable,
    for grain's worker processes)."""

    def __init__(self, spec: PreprocessSpec, seed: int, num_images: int):
        self.spec, self.seed, self.num_images = spec, seed, num_images

    def __call__(self, image: np.ndarray, index: int, view: int) -> np.ndarray:
        return augment_image(image, self.spec, view_rng(self.seed, view, index, self.num_images))


def cached_views(
    backbone: Backbone,
    data,
    *,
    views: int,
    seed: int,
    mesh,
    batch_size: int,
    cache_dir: str | None,
    dtype: str,
    param_dtype: str,
    split: str = "train",
    worker_count: int = 0,
    param_sharding: parallel.ShardingFn | None = None,
    variants: tuple[str, ...] = ("pooled",),
    chunk_rows: int = extraction.CHUNK_ROWS,
    rows: str = "all",
) -> tuple[dict, np.ndarray, bool]:
    """({variant: [n, views, d]}, labels [n], hit): `views` augmented views of every image of `split`, from
    the feature cache or extracted once into it (streamed, sharded and resumable like `cached_features`)."""
    if views < 1:
        raise ValueError(f"views must be >= 1, got {views}")
    source = data.splits[split]
    host, hosts = jax.process_index(), jax.process_count()
    per_host = batch_size // hosts
    key = {
        **extraction.fingerprint(backbone, data, split, dtype, param_dtype, variants),
        "augment": {"views": views, "seed": seed, "recipe": "random_resized_crop+flip"},
    }
    root = cache.as_path(cache.cache_root(cache_dir))

    def make_batches(start_batch):
        return eval_batches(
            source,
            backbone.preprocess,
            views=views,
            transform=_AugmentView(backbone.preprocess, seed, len(source)),
            batch_size=batch_size,
            shard_index=host,
            shard_count=hosts,
            worker_count=worker_count,
            start_batch=start_batch,
        )

    arrays, hit = extraction.cached_split(
        backbone,
        ChunkedEntry(root / cache.fingerprint_key(key), key),
        make_batches,
        total=len(source),
        num_batches=math.ceil(math.ceil(len(source) / hosts) * views / per_host),
        per_host=per_host,
        mesh=mesh,
        desc=f"views[{split}]x{views}",
        variants=tuple(variants),
        param_sharding=param_sharding,
        chunk_rows=chunk_rows,
        rows_per_image=views,
        rows=rows,
    )
    return {name: arrays[name] for name in variants}, np.asarray(arrays["labels"]), hit
