"""SigLIP's vision tower (`siglip_vision_model`, and the `vision_model.*` half of a full `siglip` checkpoint).

SigLIP has no CLS token. Pooled features are HF's `pooler_output`: the attention-pooling head (`head.*`: a
learned probe attends over the post-layernormed tokens, then a residual MLP). A tower built without a head
(`vision_use_head=False`, where HF has no pooler output) pools by the mean of the final tokens. `block_cls`
holds each block's mean token; `image_embeds` is `pooled` (SigLIP's joint image-text space has no
projection). Other outputs: see `transformer`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from fxjax.backbones.convert import Rule
from fxjax.backbones.hf_names import attention_pool_rules, tower_rules, vision_config, vision_prefix
from fxjax.backbones.transformer import PooledVisionTransformer, TransformerSpec


def spec(config) -> TransformerSpec:
    return TransformerSpec.from_hf(vision_config(config), cls_token=False, batch_dims=False)


class SiglipVision(PooledVisionTransformer):
    def finish(self, x: jax.Array) -> dict:
        normed = self.norm(x)
        pooled = self.head(normed) if self.head is not None else jnp.mean(normed, axis=1)
        return {"last_hidden_state": normed, "normed": normed, "pooled": pooled, "image_embeds": pooled}


def build(config, *, dtype, param_dtype, rngs: nnx.Rngs) -> SiglipVision:
    return SiglipVision(
        spec(config), vision_config(config).vision_use_head, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )


def conversion_rules(config) -> list[Rule]:
    full, prefix = vision_prefix(config, "siglip")
    rules = [*tower_rules(prefix), *attention_pool_rules(rf"{prefix}head", "head")]
    return rules + ([Rule(r"(?:text_model\..*|logit_scale|logit_bias)", None)] if full else [])
