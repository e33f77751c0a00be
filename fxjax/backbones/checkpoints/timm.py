"""timm's Hub layout: a folder with `config.json` (`architecture`, `pretrained_cfg`, optional `model_args`) and
`model.safetensors` or `pytorch_model.bin` holding timm's native state dict (what `push_to_hf_hub` writes).

The architecture name resolves to the constructor arguments of timm's registry (our own table,
`timm_archs`: no timm at run time), `model_args` override them, and the input size comes from
`pretrained_cfg` as timm's builder takes it. `ARCHS` dispatches by name prefix to builders
`build(architecture, args, *, dtype, param_dtype) -> (nnx.Module, list[Rule])`. Preprocessing is timm's eval
transform for `pretrained_cfg` (`resolve_data_config` + `create_transform`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

from flax import nnx

from fxjax.backbones import formats
from fxjax.backbones.backbone import Backbone
from fxjax.backbones.checkpoints import timm_archs, timm_cnn
from fxjax.backbones.convert import Rule
from fxjax.backbones.families import eva, timm_vit
from fxjax.data.preprocess import PreprocessSpec

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # timm pushes one or both; safetensors first

# timm's defaults where `pretrained_cfg` leaves a field out (timm.data.constants, resolve_data_config).
_DEFAULT_CROP_PCT = 0.875
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

Builder = Callable[..., tuple[nnx.Module, list[Rule]]]


def _build_vit(architecture: str, args: dict, *, dtype, param_dtype) -> tuple[nnx.Module, list[Rule]]:
    vit = timm_vit.from_args(architecture, {**timm_archs.vit_args(architecture), **args})
    return timm_vit.build(vit, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)), timm_vit.conversion_rules()


def _build_eva(architecture: str, args: dict, *, dtype, param_dtype) -> tuple[nnx.Module, list[Rule]]:
    config = eva.from_args(architecture, {**timm_archs.eva02_args(architecture), **args})
    return eva.build(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)), eva.conversion_rules()


VIT_ARCHS: dict[str, Builder] = {"vit_": _build_vit, "deit3_": _build_vit, "eva02_": _build_eva}
# One registry: the transformers by name prefix, the CNNs (timm_cnn) by exact name.
ARCHS: dict[str, Builder] = {**VIT_ARCHS, **timm_cnn.ARCHS}


def read_config(folder: Path) -> tuple[str, dict, dict]:
    """`config.json` → (architecture, pretrained_cfg, model_args); the legacy single-dict form too."""
    config = json.loads((folder / "config.json").read_text())
    if "pretrained_cfg" not in config:  # legacy: the pretrained_cfg itself, with the architecture in it
        config = {"architecture": config["architecture"], "pretrained_cfg": config}
    return config["architecture"], dict(config["pretrained_cfg"]), dict(config.get("model_args") or {})


def matches(path: Path) -> bool:
    """A folder whose config.json names a timm architecture (transformers configs have `model_type`)."""
    config_file = path / "config.json"
    if not (path.is_dir() and config_file.is_file()):
        return False
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "architecture" in config and "model_type" not in config


def builder(architecture: str) -> Builder:
    """The builder for an architecture name, by its longest registered prefix."""
    prefixes = sorted((p for p in ARCHS if architecture.startswith(p)), key=len, reverse=True)
    if not prefixes:
        raise ValueError(
            f"unsupported timm architecture {architecture!r}; supported: {', '.join(f'{p}*' for p in sorted(ARCHS))}"
        )
    return ARCHS[prefixes[0]]


def model_args(pretrained_cfg: dict, args: dict) -> dict:
    """The checkpoint's `model_args`, plus what timm's builder takes from `pretrained_cfg` when they are absent:
    the input size of a fixed-size model, the global pool where the cfg names one. Both override the registry
    defaults; timm lets EVA's registry `img_size` win over `pretrained_cfg`, which its published checkpoints
    never contradict."""
    args = dict(args)
    if pretrained_cfg.get("fixed_input_size") and pretrained_cfg.get("input_size"):
        args.setdefault("img_size", list(pretrained_cfg["input_size"][-2:]))
    if pretrained_cfg.get("global_pool") is not None:
        args.setdefault("global_pool", pretrained_cfg["global_pool"])
    return args


def preprocess_spec(pretrained_cfg: dict) -> PreprocessSpec:
    """timm's eval transform (`transforms_imagenet_eval`) for a `pretrained_cfg`: resize to size / crop_pct
    (shorter side, or both sides for crop_mode="squash"), centre crop, normalise."""
    _, height, width = pretrained_cfg.get("input_size", (3, 224, 224))
    crop_pct = pretrained_cfg.get("crop_pct") or _DEFAULT_CROP_PCT
    crop_mode = pretrained_cfg.get("crop_mode") or "center"
    interpolation = pretrained_cfg.get("interpolation") or "bicubic"
    if height != width:
        raise ValueError(f"timm input_size {(height, width)} is not square; fxjax reads square inputs only")
    if crop_mode not in ("center", "squash"):
        raise ValueError(f"timm crop_mode {crop_mode!r} is not supported; supported: center, squash")
    if interpolation not in ("bilinear", "bicubic", "nearest"):
        raise ValueError(f"timm interpolation {interpolation!r} is not supported; use bilinear, bicubic or nearest")
    return PreprocessSpec(
        size=(height, width),
        resize_shortest=math.floor(height / crop_pct),
        mean=tuple(pretrained_cfg.get("mean") or _IMAGENET_MEAN),
        std=tuple(pretrained_cfg.get("std") or _IMAGENET_STD),
        resample=interpolation,
        resize_mode="squash" if crop_mode == "squash" else "shortest",
        crop_rounding="round",
    )


def weight_file(folder: Path) -> Path:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{folder}: no timm weight file; expected one of {', '.join(WEIGHT_FILES)}")


def load(path: Path, *, name: str, revision: str | None, dtype, param_dtype) -> Backbone:
    architecture, pretrained_cfg, args = read_config(path)
    build = builder(architecture)
    args = model_args(pretrained_cfg, args)
    rules: list[Rule] = []

    def make() -> nnx.Module:  # the builder gives the module and its rules together
        module, module_rules = build(architecture, args, dtype=dtype, param_dtype=param_dtype)
        rules[:] = module_rules
        return module

    nnx.eval_shape(make)  # abstractly (no init), to learn the rules before loading
    file = weight_file(path)
    module = formats.load_module(make, file, rules, param_dtype=param_dtype)
    info = {
        "name": name,
        "model_type": f"timm:{architecture}",
        "revision": revision,
        "weight_files": [str(file)],
        "weight_sha256": formats.sha256_files([file]),
    }
    return Backbone(module, preprocess_spec(pretrained_cfg), info, dtype)
