"""BLIP's vision tower (`blip_vision_model`, and the `vision_model.*` part of any full `blip` checkpoint:
image-text, captioning, retrieval or VQA — everything outside `vision_model.` is dropped).

Pooled features are HF's `pooler_output`, which applies the post-layernorm to the CLS token twice (once to the
sequence, once more to the pooled token) — reproduced as is. Attention uses BLIP's fused qkv projection.
Other outputs: see `transformer`.
"""

from __future__ import annotations

import jax
from flax import nnx

from fxjax.backbones.convert import Rule
from fxjax.backbones.hf_names import LAYER_NAMES, vision_config, vision_prefix
from fxjax.backbones.transformer import TransformerSpec, VisionTransformer, block_rules, norm_rules, patch_rules


def spec(config) -> TransformerSpec:
    return TransformerSpec.from_hf(vision_config(config), fused_qkv=True)


class BlipVision(VisionTransformer):
    def finish(self, x: jax.Array) -> dict:
        normed = self.norm(x)
        return {"last_hidden_state": normed, "normed": normed, "pooled": self.norm(normed[:, 0])}


def build(config, *, dtype, param_dtype, rngs: nnx.Rngs) -> BlipVision:
    return BlipVision(spec(config), dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def conversion_rules(config) -> list[Rule]:
    full, prefix = vision_prefix(config, "blip")
    names = {k: v for k, v in LAYER_NAMES.items() if not k.startswith(r"self_attn")}
    names |= {r"self_attn\.qkv": "attn.qkv", r"self_attn\.projection": "attn.out"}
    rules = [
        Rule(rf"{prefix}embeddings\.class_embedding", "embeddings.cls_token"),
        Rule(rf"{prefix}embeddings\.position_embedding", "embeddings.position"),
        *patch_rules(rf"{prefix}embeddings\.patch_embedding"),
        *block_rules(rf"{prefix}encoder\.layers\.(\d+)", names),
        *norm_rules(rf"{prefix}post_layernorm", "norm"),
    ]
    return rules + ([Rule(r"(?!vision_model\.).*", None)] if full else [])
