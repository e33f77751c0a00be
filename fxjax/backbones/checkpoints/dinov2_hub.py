"""DINOv2's own torch-hub weight files (`dinov2_vits14_pretrain.pth`, `dinov2_vitg14_reg4_pretrain.pth`, ...):
a bare state dict in the naming of `dinov2/models/vision_transformer.py`, loaded into the shared ViT trunk.

A file is claimed by its name: a `.pth` / `.pt` file whose name contains `dinov2`. The architecture comes from
the tensors, not the name (so a renamed or fine-tuned file loads as what it holds): width from `cls_token`,
depth from the block count, patch size from `patch_embed.proj`, registers from `register_tokens`, SwiGLU
(`mlp.w12` / `w3`, ViT-g) or plain MLP and its width from the MLP weights, LayerScale from `ls1.gamma`. The
head count is the one thing tensors cannot tell: it is width / 64, the head width of all four released models
(ViT-S/B/L/g: 6/12/16/24 heads); a model trained with another head count names it in the file name as
`heads<N>` (e.g. `dinov2_vits14_heads8_pretrain.pth`).

Position embeddings are stored for 518 px (37x37 patches) and resized to the input's grid as the hub models
do: bicubic by the scale factor (grid + 0.1) / 37 without antialiasing, or, for the register models
(`interpolate_antialias=True, interpolate_offset=0`), bicubic with antialiasing to the grid's size.

Pooled features are `x_norm_clstoken` (the final-normed CLS token); `patch_tokens` are `x_norm_patchtokens`.
Preprocessing is DINOv2's evaluation transform: bicubic resize of the shorter side to 256, centre crop 224,
ImageNet mean / std.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from flax import nnx

from fxjax.backbones import formats
from fxjax.backbones.backbone import Backbone
from fxjax.backbones.convert import Rule, load_state
from fxjax.backbones.transformer import TransformerSpec, VisionTransformer, block_rules, norm_rules, patch_rules
from fxjax.data.preprocess import PreprocessSpec

_SUFFIXES = (".pth", ".pt")
_HEAD_DIM = 64  # every released DINOv2 model's width per head
_POSITION_OFFSET = 0.1  # `interpolate_offset` of the models without registers

PREPROCESS = PreprocessSpec(
    size=(224, 224), resize_shortest=256, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), resample="bicubic"
)

RULES = [
    Rule(r"cls_token", "embeddings.cls_token"),
    Rule(r"register_tokens", "embeddings.register_tokens"),
    Rule(r"pos_embed", "embeddings.position"),
    Rule(r"mask_token", None),  # the masked-image-modelling input of iBOT's loss, unused here
    *patch_rules(r"patch_embed\.proj"),
    *block_rules(
        r"blocks\.(\d+)",
        {
            "norm1": "norm1",
            "norm2": "norm2",
            r"attn\.qkv": "attn.qkv",
            r"attn\.proj": "attn.out",
            r"mlp\.(?:fc1|w12)": "mlp.fc1",
            r"mlp\.(?:fc2|w3)": "mlp.fc2",
            r"ls1\.gamma": "ls1",
            r"ls2\.gamma": "ls2",
        },
    ),
    *norm_rules("norm", "norm"),
]


def matches(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in _SUFFIXES and "dinov2" in path.name.lower()


def spec(tensors: dict[str, np.ndarray], path: Path) -> TransformerSpec:
    """The architecture the state dict holds (see the module docstring)."""
    required = ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight")
    absent = [name for name in required if name not in tensors]
    if absent:
        raise ValueError(f"{path}: not a DINOv2 state dict (no {', '.join(absent)}); expected torch-hub naming")
    dim = tensors["cls_token"].shape[-1]
    patch = tensors["patch_embed.proj.weight"].shape[-1]
    grid = int(round(np.sqrt(tensors["pos_embed"].shape[1] - 1)))
    depth = 1 + max(int(m.group(1)) for name in tensors if (m := re.match(r"blocks\.(\d+)\.", name)))
    named = re.search(r"heads(\d+)", path.name)
    heads = int(named.group(1)) if named else dim // _HEAD_DIM
    if heads < 1 or dim % heads:
        raise ValueError(
            f"{path}: cannot split width {dim} into heads of {_HEAD_DIM}; name the head count in the file name, "
            f"e.g. {path.stem}_heads8{path.suffix}"
        )
    gated = "blocks.0.mlp.w12.weight" in tensors
    mlp_dim = tensors["blocks.0.mlp.w3.weight" if gated else "blocks.0.mlp.fc2.weight"].shape[1]
    registers = tensors["register_tokens"].shape[1] if "register_tokens" in tensors else 0
    return TransformerSpec(
        dim=dim,
        depth=depth,
        heads=heads,
        mlp_dim=mlp_dim,
        image_size=grid * patch,
        patch_size=patch,
        act="gelu",
        eps=1e-6,
        qkv_bias="blocks.0.attn.qkv.bias" in tensors,
        fused_qkv=True,
        gated_mlp=gated,
        layer_scale=1.0 if "blocks.0.ls1.gamma" in tensors else None,
        register_tokens=registers,
        antialias_positions=bool(registers),
        position_offset=0.0 if registers else _POSITION_OFFSET,
    )


def load(path: Path, *, name: str, revision: str | None, dtype, param_dtype) -> Backbone:
    tensors = formats.read_checkpoint(path)
    arch = spec(tensors, path)
    module = load_state(
        lambda: VisionTransformer(arch, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)),
        tensors,
        RULES,
        source=str(path),
        param_dtype=param_dtype,
    )
    info = {
        "name": name,
        "model_type": "dinov2_with_registers" if arch.register_tokens else "dinov2",
        "revision": revision,
        "weight_files": [str(path)],
        "weight_sha256": formats.sha256_files([path]),
    }
    return Backbone(module, PREPROCESS, info, dtype)
