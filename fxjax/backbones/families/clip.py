"""CLIP's vision tower (`clip_vision_model`, and the `vision_model.*` half of a full `clip` checkpoint).

Pooled features are HF's `pooler_output`: the post-layernorm CLS token (before the projection into the joint
image-text space). As in HF, `last_hidden_state` is the un-normed last block output; `patch_tokens` are
post-layernormed. A full `clip` checkpoint also yields `image_embeds` [n, projection_dim] (the
`visual_projection` of `pooled`, what `get_image_features` returns); its text tower and `logit_scale` are
dropped. Other outputs: see `transformer`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from fxjax.backbones.convert import Rule
from fxjax.backbones.hf_names import tower_rules, vision_config, vision_prefix
from fxjax.backbones.transformer import (
    TransformerSpec,
    VisionTransformer,
    linear_rules,
    norm_rules,
)


def spec(config) -> TransformerSpec:
    return TransformerSpec.from_hf(vision_config(config), patch_bias=False, pre_norm=True, batch_dims=False)


class CLIPVision(VisionTransformer):
    def __init__(
        self,
        spec: TransformerSpec,
        projection_dim: int | None = None,
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        super().__init__(spec, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.projection = (
            nnx.Linear(spec.dim, projection_dim, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            if projection_dim
            else None
        )

    def head_paths(self) -> tuple[str, ...]:
        return ("projection",) if self.projection is not None else ()

    def finish(self, x: jax.Array) -> dict:
        normed = self.norm(x)  # CLIP normalises only what it pools; the sequence is returned un-normed
        out = {"last_hidden_state": x, "normed": normed, "pooled": normed[:, 0]}
        if self.projection is not None:
            out["image_embeds"] = self.projection(out["pooled"])
        return out


def build(config, *, dtype, param_dtype, rngs: nnx.Rngs) -> CLIPVision:
    projection_dim = config.projection_dim if config.model_type == "clip" else None
    return CLIPVision(spec(config), projection_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def conversion_rules(config) -> list[Rule]:
    full, prefix = vision_prefix(config, "clip")
    rules = [*tower_rules(prefix), *norm_rules(rf"{prefix}pre_layrnorm", "embeddings.pre_norm")]
    if full:
        return rules + [
            *linear_rules(r"visual_projection", "projection"),
            Rule(r"(?:text_model\..*|text_projection\..*|logit_scale)", None),
        ]
    return rules + [Rule(r"visual_projection\..*", None)]  # a CLIPVisionModelWithProjection's projection
