"""The loaded backbone: an NNX module, its preprocessing and where its weights came from."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import jax
import numpy as np
from flax import nnx

from fxjax.data.preprocess import PreprocessSpec


@dataclass(eq=False)  # identity hash: the jitted methods are keyed on the instance
class Backbone:
    module: nnx.Module
    preprocess: PreprocessSpec
    info: dict = field(default_factory=dict)  # name, model_type, revision, weight_files, weight_sha256

    def __post_init__(self):
        self.graphdef, self.state = nnx.split(self.module)

    @property
    def num_stages(self) -> int:
        return len(self.module.stage_paths())

    @partial(jax.jit, static_argnums=(0,))
    def _pooled(self, state, x):
        return nnx.merge(self.graphdef, state)(x)["pooled"]

    def features(self, x) -> jax.Array:
        """x: [n, h, w, 3] float32 normalised per `preprocess` → pooled features [n, d]."""
        return self._pooled(self.state, x)

    @partial(jax.jit, static_argnums=(0,))
    def _outputs(self, state, x):
        return nnx.merge(self.graphdef, state)(x)

    def outputs(self, x) -> dict:
        """Every output of the family (pooled, hidden states, tokens or feature maps), for probes that
        concatenate layers. Jitted: outputs nobody reads still cost memory, not extra compute passes."""
        return self._outputs(self.state, x)

    @property
    def feature_dim(self) -> int:
        x = jax.ShapeDtypeStruct((1, *self.preprocess.size, 3), np.float32)
        shape = jax.eval_shape(self._pooled, self.state, x)
        return int(shape.shape[-1])
