"""DINOv2 (`dinov2`, `dinov2_with_registers`): ViT with LayerScale, optionally SwiGLU MLPs (giant), trained
without labels; the registers variant adds register tokens between CLS and the patches (no position
embedding; they are not in `patch_tokens`).

Pooled features are HF's `pooler_output`: the final-layernorm CLS token. Position embeddings are resized
(bicubic) whenever the input's patch grid differs from the checkpoint's, as DINOv2 always does; the registers
variant's reference resizes them with `antialias=True`, a different filter. Other outputs: see `transformer`.
"""

from __future__ import annotations

from flax import nnx

from fxjax.backbones.convert import Rule
from fxjax.backbones.hf_names import ATTENTION_NAMES, embedding_rules
from fxjax.backbones.transformer import TransformerSpec, VisionTransformer, block_rules


def spec(config) -> TransformerSpec:
    mlp_dim = int(config.hidden_size * config.mlp_ratio)
    if config.use_swiglu_ffn:  # two thirds of the MLP width, rounded up to a multiple of 8
        mlp_dim = (int(mlp_dim * 2 / 3) + 7) // 8 * 8
    registers = config.model_type == "dinov2_with_registers"
    return TransformerSpec.from_hf(
        config,
        mlp_dim=mlp_dim,
        qkv_bias=config.qkv_bias,
        gated_mlp=config.use_swiglu_ffn,
        layer_scale=config.layerscale_value,
        register_tokens=config.num_register_tokens if registers else 0,
        antialias_positions=registers,
    )


def build(config, *, dtype, param_dtype, rngs: nnx.Rngs) -> VisionTransformer:
    return VisionTransformer(spec(config), dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def conversion_rules(config) -> list[Rule]:
    prefix = rf"(?:{config.model_type}\.)?"  # the task models' backbone: `dinov2.` / `dinov2_with_registers.`
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
        Rule(rf"{prefix}embeddings\.register_tokens", "embeddings.register_tokens"),
        *block_rules(rf"{prefix}encoder\.layer\.(\d+)", names),
        Rule(r"classifier\..*", None),  # the ImageNet linear head of Dinov2(WithRegisters)ForImageClassification
    ]
