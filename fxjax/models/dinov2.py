"""DINOv2 (`dinov2`): ViT with LayerScale, optionally SwiGLU MLPs (giant), trained without labels.

Pooled features are HF's `pooler_output`: the final-layernorm CLS token. Position embeddings are resized
(bicubic) whenever the input's patch grid differs from the checkpoint's, as DINOv2 always does. Other outputs:
see `transformer`.
"""

from __future__ import annotations

from flax import nnx

from fxjax.models.convert import Rule
from fxjax.models.transformer import TransformerSpec, VisionTransformer, block_rules
from fxjax.models.vit import ATTENTION_NAMES, embedding_rules

MODEL_TYPES = ("dinov2",)


def spec(config) -> TransformerSpec:
    mlp_dim = int(config.hidden_size * config.mlp_ratio)
    if config.use_swiglu_ffn:  # two thirds of the MLP width, rounded up to a multiple of 8
        mlp_dim = (int(mlp_dim * 2 / 3) + 7) // 8 * 8
    return TransformerSpec.from_hf(config, mlp_dim=mlp_dim, qkv_bias=config.qkv_bias,
                                   gated_mlp=config.use_swiglu_ffn, layer_scale=config.layerscale_value)


def build(config, *, dtype, param_dtype, rngs: nnx.Rngs) -> VisionTransformer:
    return VisionTransformer(spec(config), dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def conversion_rules(config) -> list[Rule]:
    prefix = r"(?:dinov2\.)?"
    names = {
        **ATTENTION_NAMES,
        "norm1": "norm1",
        "norm2": "norm2",
        r"mlp\.(?:fc1|weights_in)": "mlp.fc1",
        r"mlp\.(?:fc2|weights_out)": "mlp.fc2",
        r"layer_scale1\.lambda1": "ls1",
        r"layer_scale2\.lambda1": "ls2",
    }
    return [
        *embedding_rules(prefix),
        *block_rules(rf"{prefix}encoder\.layer\.(\d+)", names),
        Rule(r"classifier\..*", None),  # the ImageNet linear head of Dinov2ForImageClassification
    ]
