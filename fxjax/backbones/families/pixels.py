"""Raw pixels as features: the no-transfer baseline, through the same pipeline as a real backbone."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx


class Pixels(nnx.Module):
    """The normalised image, flattened: pooled [n, h * w * 3]. No parameters, so nothing to freeze."""

    def __init__(self, *, dtype=jnp.float32):
        self.dtype = dtype

    def stage_paths(self) -> list[tuple[str, ...]]:
        return []

    def __call__(self, x) -> dict:  # x: [n, h, w, 3]
        return {"pooled": x.reshape(x.shape[0], -1).astype(self.dtype), "hidden_states": ()}
