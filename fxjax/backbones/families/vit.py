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
from fxjax.backbones.hf_names import ATTENTION_NAMES, embedding_rules
from fxjax.backbones.transformer import TransformerSpec, VisionTransformer, block_rules


def spec(config) -> TransformerSpec:
    return TransformerSpec.from_hf(config, qkv_bias=config.qkv_bias, dist_token=config.model_type == "deit")


def build(config, *, dtype, param_dtype, rngs: nnx.Rngs) -> VisionTransformer:
    return VisionTransformer(spec(config), dtype=dtype, param_dtype=param_dtype, rngs=rngs)


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
