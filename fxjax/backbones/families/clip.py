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
from fxjax.backbones.transformer import (
    TransformerSpec,
    VisionTransformer,
    block_rules,
    linear_rules,
    norm_rules,
    patch_rules,
)

# HF CLIP / SigLIP / BLIP encoder-layer names.
LAYER_NAMES = {
    r"self_attn\.q_proj": "attn.query",
    r"self_attn\.k_proj": "attn.key",
    r"self_attn\.v_proj": "attn.value",
    r"self_attn\.out_proj": "attn.out",
    r"mlp\.fc1": "mlp.fc1",
    r"mlp\.fc2": "mlp.fc2",
    "layer_norm1": "norm1",
    "layer_norm2": "norm2",
}


def vision_config(config):
    """The vision tower's config of a full image-text checkpoint, or the config itself."""
    return getattr(config, "vision_config", None) or config


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


def tower_rules(prefix: str) -> list[Rule]:
    """The embeddings, encoder and post-layernorm of a CLIP-style vision tower (CLIP and SigLIP naming)."""
    return [
        Rule(rf"{prefix}embeddings\.class_embedding", "embeddings.cls_token"),
        Rule(rf"{prefix}embeddings\.position_embedding\.(?:weight|embedding)", "embeddings.position"),
        *patch_rules(rf"{prefix}embeddings\.patch_embedding"),
        *block_rules(rf"{prefix}encoder\.layers\.(\d+)", LAYER_NAMES),
        *norm_rules(rf"{prefix}post_layernorm", "norm"),
        Rule(r".*position_ids", None),  # a buffer that older checkpoints saved
    ]


def conversion_rules(config) -> list[Rule]:
    full = config.model_type == "clip"
    prefix = r"vision_model\." if full else r"(?:vision_model\.)?"
    rules = [*tower_rules(prefix), *norm_rules(rf"{prefix}pre_layrnorm", "embeddings.pre_norm")]
    if full:
        return rules + [
            *linear_rules(r"visual_projection", "projection"),
            Rule(r"(?:text_model\..*|text_projection\..*|logit_scale)", None),
        ]
    return rules + [Rule(r"visual_projection\..*", None)]  # a CLIPVisionModelWithProjection's projection
