"""Model families: each module holds an NNX backbone and the table that maps its checkpoint names onto it.

A family module exposes `build(config, *, dtype, param_dtype, rngs) -> nnx.Module` and
`conversion_rules(config) -> list[Rule]`, where `config` is the checkpoint's transformers config. Its module's
`__call__(x)` returns a dict with at least `pooled` [n, d] and `hidden_states`, and `stage_paths()` lists each
stage's module-path prefixes, input to output (what `config.freeze = "K"` counts; freezing itself is decided by
the training step, never by the module).
"""

from __future__ import annotations

import importlib
from types import ModuleType

# model_type (from the checkpoint's config.json) → family module.
FAMILIES: dict[str, str] = {
    "efficientnet_lite": "fxjax.backbones.families.efficientnet",
    "efficientnet": "fxjax.backbones.families.efficientnet",
    "resnet": "fxjax.backbones.families.resnet",
    "convnext": "fxjax.backbones.families.convnext",
    "vit": "fxjax.backbones.families.vit",
    "deit": "fxjax.backbones.families.vit",
    "dinov2": "fxjax.backbones.families.dinov2",
    "dinov2_with_registers": "fxjax.backbones.families.dinov2",
    "dinov3_vit": "fxjax.backbones.families.dinov3_vit",
    "dinov3_convnext": "fxjax.backbones.families.dinov3_convnext",
    "clip": "fxjax.backbones.families.clip",
    "clip_vision_model": "fxjax.backbones.families.clip",
    "siglip": "fxjax.backbones.families.siglip",
    "siglip_vision_model": "fxjax.backbones.families.siglip",
    "blip": "fxjax.backbones.families.blip",
    "blip_vision_model": "fxjax.backbones.families.blip",
}


def family(model_type: str) -> ModuleType:
    """The family module for a checkpoint's `model_type`; an unknown one lists the supported types."""
    if model_type not in FAMILIES:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(FAMILIES))}")
    return importlib.import_module(FAMILIES[model_type])
