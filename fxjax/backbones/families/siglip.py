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
from fxjax.backbones.hf_names import tower_rules, vision_config
from fxjax.backbones.transformer import (
    Mlp,
    TransformerSpec,
    VisionTransformer,
    layer_norm,
    linear_rules,
    norm_rules,
)


def spec(config) -> TransformerSpec:
    return TransformerSpec.from_hf(vision_config(config), cls_token=False, batch_dims=False)


class AttentionPool(nnx.Module):
    """Multi-head attention pooling (torch `nn.MultiheadAttention` with a learned probe as the one query),
    then x + mlp(norm(x)). `in_proj` holds query, key and value stacked, as the checkpoint does."""

    def __init__(self, spec: TransformerSpec, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.heads, self.dtype = spec.heads, dtype
        self.probe = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (1, 1, spec.dim), param_dtype))
        self.in_proj = nnx.Linear(spec.dim, 3 * spec.dim, **kw)
        self.out = nnx.Linear(spec.dim, spec.dim, **kw)
        self.norm = layer_norm(spec, **kw)
        self.mlp = Mlp(spec, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:  # [n, t, d] → [n, d]
        n, t, d = x.shape
        w = self.in_proj.kernel[...].astype(self.dtype)  # [d, 3d]: query | key | value
        b = self.in_proj.bias[...].astype(self.dtype)
        q = self.probe[...].astype(self.dtype) @ w[:, :d] + b[:d]  # [1, 1, d]
        kv = x.astype(self.dtype) @ w[:, d:] + b[d:]  # [n, t, 2d]
        k, v = jnp.split(kv.reshape(n, t, 2, self.heads, d // self.heads), 2, axis=2)
        q = jnp.broadcast_to(q.reshape(1, 1, self.heads, d // self.heads), (n, 1, self.heads, d // self.heads))
        y = self.out(jax.nn.dot_product_attention(q, k[:, :, 0], v[:, :, 0]).reshape(n, 1, d))
        return (y + self.mlp(self.norm(y)))[:, 0]


class SiglipVision(VisionTransformer):
    def __init__(
        self,
        spec: TransformerSpec,
        use_head: bool = True,
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        super().__init__(spec, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.head = AttentionPool(spec, dtype=dtype, param_dtype=param_dtype, rngs=rngs) if use_head else None

    def head_paths(self) -> tuple[str, ...]:
        return ("head",) if self.head is not None else ()

    def finish(self, x: jax.Array) -> dict:
        normed = self.norm(x)
        pooled = self.head(normed) if self.head is not None else jnp.mean(normed, axis=1)
        return {"last_hidden_state": normed, "normed": normed, "pooled": pooled, "image_embeds": pooled}


def build(config, *, dtype, param_dtype, rngs: nnx.Rngs) -> SiglipVision:
    return SiglipVision(
        spec(config), vision_config(config).vision_use_head, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )


def conversion_rules(config) -> list[Rule]:
    full = config.model_type == "siglip"
    prefix = r"vision_model\." if full else r"(?:vision_model\.)?"
    rules = [
        *tower_rules(prefix),
        Rule(rf"{prefix}head\.probe", "head.probe"),
        Rule(rf"{prefix}head\.attention\.in_proj_weight", "head.in_proj.kernel", "dense"),
        Rule(rf"{prefix}head\.attention\.in_proj_bias", "head.in_proj.bias"),
        *linear_rules(rf"{prefix}head\.attention\.out_proj", "head.out"),
        *norm_rules(rf"{prefix}head\.layernorm", "head.norm"),
        *linear_rules(rf"{prefix}head\.mlp\.fc1", "head.mlp.fc1"),
        *linear_rules(rf"{prefix}head\.mlp\.fc2", "head.mlp.fc2"),
    ]
    return rules + ([Rule(r"(?:text_model\..*|logit_scale|logit_bias)", None)] if full else [])
