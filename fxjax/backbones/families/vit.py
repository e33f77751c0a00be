"""ViT and DeiT (`vit`, `deit`): the original vision transformer, and DeiT's variant with a distillation
token.

Pooled features are the final-norm CLS token (`last_hidden_state[:, 0]`), not ViT's tanh `pooler`, which
was trained only for a pre-training head and is dropped with the classifiers. Other outputs: see
`transformer`. Checkpoints load with or without the task model's prefix (`vit.` / `deit.`), in PyTorch or
HF Flax naming.
"""

from __future__ import annotations

from flax import nnx

from fxjax.backbones.convert import Rule
from fxjax.backbones.transformer import TransformerSpec, VisionTransformer, block_rules, norm_rules, patch_rules

# HF ViT / DeiT / DINOv2 attention names (shared by `dinov2`).
ATTENTION_NAMES = {
    r"attention\.attention\.query": "attn.query",
    r"attention\.attention\.key": "attn.key",
    r"attention\.attention\.value": "attn.value",
    r"attention\.output\.dense": "attn.out",
}


def spec(config) -> TransformerSpec:
    return TransformerSpec.from_hf(config, qkv_bias=config.qkv_bias, dist_token=config.model_type == "deit")


def build(config, *, dtype, param_dtype, rngs: nnx.Rngs) -> VisionTransformer:
    return VisionTransformer(spec(config), dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def embedding_rules(prefix: str) -> list[Rule]:
    """HF `embeddings.*` names shared by ViT, DeiT and DINOv2."""
    return [
        Rule(rf"{prefix}embeddings\.cls_token", "embeddings.cls_token"),
        Rule(rf"{prefix}embeddings\.distillation_token", "embeddings.dist_token"),
        Rule(rf"{prefix}embeddings\.position_embeddings", "embeddings.position"),
        Rule(rf"{prefix}embeddings\.mask_token", None),  # masked-image-modelling input, unused here
        *patch_rules(rf"{prefix}embeddings\.patch_embeddings\.projection"),
        *norm_rules(rf"{prefix}layernorm", "norm"),
    ]


def conversion_rules(config) -> list[Rule]:
    prefix = rf"(?:{config.model_type}\.)?"
    names = {
        **ATTENTION_NAMES,
        r"intermediate\.dense": "mlp.fc1",
        r"output\.dense": "mlp.fc2",
        "layernorm_before": "norm1",
        "layernorm_after": "norm2",
    }
    return [
        *embedding_rules(prefix),
        *block_rules(rf"{prefix}encoder\.layer\.(\d+)", names),
        # The tanh pooler and the classifiers (DeiT: CLS and distillation heads) are not part of the backbone.
        Rule(rf"{prefix}pooler\..*", None),
        Rule(r"(?:classifier|cls_classifier|distillation_classifier)\..*", None),
    ]
