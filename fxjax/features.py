"""Feature extraction: one pass of a frozen backbone over a split, batched and sharded over devices."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable

import jax
import numpy as np
from tqdm import tqdm

from fxjax import parallel
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
