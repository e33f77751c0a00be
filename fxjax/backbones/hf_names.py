"""Hugging Face checkpoint naming shared by several transformer families (ViT/DeiT/DINOv2, CLIP/SigLIP/BLIP):
the conversion helpers each of those families uses, kept here so that no family imports a sibling."""

from __future__ import annotations

from fxjax.backbones.convert import Rule
from fxjax.backbones.transformer import block_rules, linear_rules, norm_rules, patch_rules

# HF ViT / DeiT / DINOv2 attention names (shared by `dinov2`).
ATTENTION_NAMES = {
    r"attention\.attention\.query": "attn.query",
    r"attention\.attention\.key": "attn.key",
    r"attention\.attention\.value": "attn.value",
    r"attention\.output\.dense": "attn.out",
}


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


def vision_prefix(config, full_type: str) -> tuple[bool, str]:
    """(whether `config` is a full image-text checkpoint of `full_type`, the pattern its vision tower's tensor
    names start with): `vision_model.` in a full checkpoint, optional in a vision-only one."""
    full = config.model_type == full_type
    return full, r"vision_model\." if full else r"(?:vision_model\.)?"


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


def attention_pool_rules(src: str, dst: str) -> list[Rule]:
    """SigLIP's / SigLIP2's attention-pooling head (`head.*`) → the trunk's `AttentionPool` at `dst`."""
    return [
        Rule(rf"{src}\.probe", f"{dst}.probe"),
        Rule(rf"{src}\.attention\.in_proj_weight", f"{dst}.in_proj.kernel", "dense"),
        Rule(rf"{src}\.attention\.in_proj_bias", f"{dst}.in_proj.bias"),
        *linear_rules(rf"{src}\.attention\.out_proj", f"{dst}.out"),
        *norm_rules(rf"{src}\.layernorm", f"{dst}.norm"),
        *linear_rules(rf"{src}\.mlp\.fc1", f"{dst}.mlp.fc1"),
        *linear_rules(rf"{src}\.mlp\.fc2", f"{dst}.mlp.fc2"),
    ]
