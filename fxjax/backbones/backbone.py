"""The loaded backbone: an NNX module, its preprocessing and where its weights came from."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fxjax.backbones.xla import compiler_options
from fxjax.data.preprocess import PreprocessSpec


def _avgpool(outputs):  # mean of the final-normed patch tokens [n, d]
    return jnp.mean(outputs["patch_tokens"], axis=1)


def _cls_last4(outputs):  # final-normed CLS of each of the last 4 blocks, concatenated [n, 4d]
    cls = outputs["block_cls_normed"][:, -4:]
    return cls.reshape(cls.shape[0], -1)


def _embedding(outputs):  # the image embedding in the joint image-text space, L2-normalised [n, e]
    if "embedding" in outputs:  # open_clip's encode_image
        x = outputs["embedding"]
    elif "image_embeds" in outputs:  # HF CLIP's get_image_features, SigLIP's pooled
        x = outputs["image_embeds"]
    else:
        raise ValueError(
            "feature variant 'embedding' needs a CLIP-family backbone with both towers (HF clip / siglip, open_clip)"
        )
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


# Feature variants for linear evaluation as DINOv2's (`dinov2/eval/linear.py`): the final norm applied to each
# of the last 4 blocks' outputs, their CLS tokens concatenated, optionally with the average-pooled patch tokens
# of the last block; computed from a family's outputs in the same pass. Every family has `pooled`; the others
# need the ViT-family outputs `block_cls_normed` / `patch_tokens`; `embedding` a CLIP-family backbone's projection.
VARIANTS = {
    "pooled": lambda o: o["pooled"],
    "cls_last4": _cls_last4,
    "pooled_avgpool": lambda o: jnp.concatenate([o["pooled"], _avgpool(o)], axis=-1),
    "cls_last4_avgpool": lambda o: jnp.concatenate([_cls_last4(o), _avgpool(o)], axis=-1),
    "embedding": _embedding,  # what zero-shot scores and a text-initialised head trains on (CLIP as it compares)
}


@dataclass(eq=False)  # identity semantics: each instance owns its jitted functions
class Backbone:
    module: nnx.Module
    preprocess: PreprocessSpec
    info: dict = field(default_factory=dict)  # name, model_type, revision, weight_files, weight_sha256
    compute_dtype: str | jnp.dtype = "float32"  # what the module computes in; picks the XLA options

    def __post_init__(self):
        self.graphdef, self.state = nnx.split(self.module)
        jit = partial(jax.jit, compiler_options=self.compiler_options)
        self._pooled = jit(lambda state, x: self._forward(state, x)["pooled"])
        self._outputs = jit(self._forward)
        self._variants = jit(
            lambda state, x, names: {n: VARIANTS[n](self._forward(state, x)) for n in names}, static_argnums=(2,)
        )

    def _forward(self, state, x) -> dict:
        return nnx.merge(self.graphdef, state)(x)

    @property
    def compiler_options(self) -> dict[str, str]:
        """XLA options for computations that run this backbone (e.g. an online training step)."""
        return compiler_options(self.compute_dtype)

    @property
    def num_stages(self) -> int:
        return len(self.module.stage_paths())

    def features(self, x) -> jax.Array:
        """x: [n, h, w, 3] float32 normalised per `preprocess` → pooled features [n, d]."""
        return self._pooled(self.state, x)

    def variants(self, x, names: tuple[str, ...] = ("pooled",)) -> dict:
        """The named feature variants (see VARIANTS) of x, from one forward pass."""
        unknown = [n for n in names if n not in VARIANTS]
        if unknown:
            raise ValueError(f"unknown feature variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
        return self._variants(self.state, x, tuple(names))

    def outputs(self, x) -> dict:
        """Every output of the family (pooled, hidden states, tokens or feature maps), for probes that
        concatenate layers. Jitted: outputs nobody reads still cost memory, not extra compute passes."""
        return self._outputs(self.state, x)

    @property
    def feature_dim(self) -> int:
        return self.variant_dim("pooled")

    def variant_dim(self, name: str) -> int:
        """The width of feature variant `name` (see VARIANTS), from shapes alone."""
        x = jax.ShapeDtypeStruct((1, *self.preprocess.size, 3), np.float32)
        return int(jax.eval_shape(lambda state, x: VARIANTS[name](self._forward(state, x)), self.state, x).shape[-1])
