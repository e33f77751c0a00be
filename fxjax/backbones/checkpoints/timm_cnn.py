"""timm's CNN architectures (`convnext_*`, `convnextv2_*`, `resnet*` / `resnext*` / `wide_resnet*`,
`efficientnet_*` / `tf_efficientnet_*`) on fxjax's families, with the tables that map timm's tensor names.

A timm Hub checkpoint names its `architecture` and may carry `model_args`; what those override are timm's
registry defaults for the architecture, copied here (`DEFAULTS`) so that loading needs no timm (nor torch).
`ARCHS[architecture](architecture, model_args, dtype=..., param_dtype=...)` returns the module and its rules:

    module, rules = ARCHS["resnet50d"]("resnet50d", {}, dtype=jnp.float32, param_dtype=jnp.float32)
    module = load_state(lambda: module, read_checkpoint(file), rules, source=str(file))

The module is abstract (shapes only, no random init): `load_state` fills it. Pooled features are timm's
`forward_head(forward_features(x), pre_logits=True)`. Arguments that only matter for training (drop rates,
classes, init) are ignored; one that changes the network in a way fxjax does not build is an error.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax.numpy as jnp
from flax import nnx

from fxjax.backbones.convert import Rule
from fxjax.backbones.families import (
    convnext as convnext_family,
    efficientnet as efficientnet_family,
    resnet as resnet_family,
)

Builder = Callable[..., tuple[nnx.Module, list[Rule]]]

# timm 1.0's registry `model_args` per architecture (`timm/models/{convnext,resnet,efficientnet}.py`).
_V2 = {"use_grn": True, "ls_init_value": None}
CONVNEXT_DEFAULTS: dict[str, dict] = {
    "convnext_atto": {"depths": (2, 2, 6, 2), "dims": (40, 80, 160, 320), "conv_mlp": True},
    "convnext_femto": {"depths": (2, 2, 6, 2), "dims": (48, 96, 192, 384), "conv_mlp": True},
    "convnext_pico": {"depths": (2, 2, 6, 2), "dims": (64, 128, 256, 512), "conv_mlp": True},
    "convnext_nano": {"depths": (2, 2, 8, 2), "dims": (80, 160, 320, 640), "conv_mlp": True},
    "convnext_tiny": {"depths": (3, 3, 9, 3), "dims": (96, 192, 384, 768)},
    "convnext_small": {"depths": (3, 3, 27, 3), "dims": (96, 192, 384, 768)},
    "convnext_base": {"depths": (3, 3, 27, 3), "dims": (128, 256, 512, 1024)},
    "convnext_large": {"depths": (3, 3, 27, 3), "dims": (192, 384, 768, 1536)},
    "convnext_large_mlp": {"depths": (3, 3, 27, 3), "dims": (192, 384, 768, 1536), "head_hidden_size": 1536},
    "convnext_xlarge": {"depths": (3, 3, 27, 3), "dims": (256, 512, 1024, 2048)},
    "convnext_xxlarge": {"depths": (3, 4, 30, 3), "dims": (384, 768, 1536, 3072), "norm_eps": 1e-5},
    "convnextv2_atto": {"depths": (2, 2, 6, 2), "dims": (40, 80, 160, 320), "conv_mlp": True, **_V2},
    "convnextv2_femto": {"depths": (2, 2, 6, 2), "dims": (48, 96, 192, 384), "conv_mlp": True, **_V2},
    "convnextv2_pico": {"depths": (2, 2, 6, 2), "dims": (64, 128, 256, 512), "conv_mlp": True, **_V2},
    "convnextv2_nano": {"depths": (2, 2, 8, 2), "dims": (80, 160, 320, 640), "conv_mlp": True, **_V2},
    "convnextv2_tiny": {"depths": (3, 3, 9, 3), "dims": (96, 192, 384, 768), **_V2},
    "convnextv2_small": {"depths": (3, 3, 27, 3), "dims": (96, 192, 384, 768), **_V2},
    "convnextv2_base": {"depths": (3, 3, 27, 3), "dims": (128, 256, 512, 1024), **_V2},
    "convnextv2_large": {"depths": (3, 3, 27, 3), "dims": (192, 384, 768, 1536), **_V2},
    "convnextv2_huge": {"depths": (3, 3, 27, 3), "dims": (352, 704, 1408, 2816), **_V2},
}

_DEPTHS = {
    "10": (1, 1, 1, 1),
    "14": (1, 1, 1, 1),
    "18": (2, 2, 2, 2),
    "26": (2, 2, 2, 2),
    "34": (3, 4, 6, 3),
    "50": (3, 4, 6, 3),
    "101": (3, 4, 23, 3),
    "152": (3, 8, 36, 3),
    "200": (3, 24, 36, 3),
}
_BASIC = ("10", "18", "34")
# ResNet suffixes (timm's ResNet docstring): c, deep stem; d, deep stem + average-pool shortcut; s, wide deep
# stem; t, tiered deep stem + average-pool shortcut.
_RESNET_VARIANTS = {
    "": {},
    "c": {"stem_width": 32, "stem_type": "deep"},
    "d": {"stem_width": 32, "stem_type": "deep", "avg_down": True},
    "s": {"stem_width": 64, "stem_type": "deep"},
    "t": {"stem_width": 32, "stem_type": "deep_tiered", "avg_down": True},
}
_RESNET_NAMES = {
    "": ("18", "26", "34", "50", "101", "152", "200"),
    "c": ("50", "101", "152"),
    "d": ("18", "26", "34", "50", "101", "152", "200"),
    "s": ("50", "101", "152"),
    "t": ("10", "14", "26", "50"),
}
RESNET_DEFAULTS: dict[str, dict] = {
    f"resnet{depth}{suffix}": {
        "block": "basic" if depth in _BASIC else "bottleneck",
        "layers": _DEPTHS[depth],
        **_RESNET_VARIANTS[suffix],
    }
    for suffix, depths in _RESNET_NAMES.items()
    for depth in depths
}
RESNET_DEFAULTS |= {
    "wide_resnet50_2": {"block": "bottleneck", "layers": _DEPTHS["50"], "base_width": 128},
    "wide_resnet101_2": {"block": "bottleneck", "layers": _DEPTHS["101"], "base_width": 128},
    "resnext50_32x4d": {"block": "bottleneck", "layers": _DEPTHS["50"], "cardinality": 32, "base_width": 4},
    "resnext50d_32x4d": {
        "block": "bottleneck",
        "layers": _DEPTHS["50"],
        "cardinality": 32,
        "base_width": 4,
        **_RESNET_VARIANTS["d"],
    },
    **{
        f"resnext101_{c}x{w}d": {"block": "bottleneck", "layers": _DEPTHS["101"], "cardinality": c, "base_width": w}
        for c, w in ((32, 4), (32, 8), (32, 16), (32, 32), (64, 4))
    },
}

# (channel_multiplier, depth_multiplier) of B0-B8 and Lite0-4; the `tf_` ports add TF's BatchNorm eps and padding.
_B = [(1.0, 1.0), (1.0, 1.1), (1.1, 1.2), (1.2, 1.4), (1.4, 1.8), (1.6, 2.2), (1.8, 2.6), (2.0, 3.1), (2.2, 3.6)]
_TF = {"bn_eps": 1e-3, "pad_type": "same"}
_LITE = [(1.0, 1.0), (1.0, 1.1), (1.1, 1.2), (1.2, 1.4), (1.4, 1.8)]
EFFICIENTNET_DEFAULTS: dict[str, dict] = {
    **{f"efficientnet_b{i}": {"channel_multiplier": w, "depth_multiplier": d} for i, (w, d) in enumerate(_B)},
    **{f"tf_efficientnet_b{i}": {"channel_multiplier": w, "depth_multiplier": d, **_TF} for i, (w, d) in enumerate(_B)},
}
EFFICIENTNET_LITE_DEFAULTS: dict[str, dict] = {
    **{f"efficientnet_lite{i}": {"channel_multiplier": w, "depth_multiplier": d} for i, (w, d) in enumerate(_LITE)},
    **{
        f"tf_efficientnet_lite{i}": {"channel_multiplier": w, "depth_multiplier": d, **_TF}
        for i, (w, d) in enumerate(_LITE)
    },
}

# Arguments that change training only (regularisation, the classifier fxjax drops, initialisation).
_IGNORED = frozenset(
    {
        "drop_rate",
        "drop_path_rate",
        "drop_block_rate",
        "proj_drop_rate",
        "num_classes",
        "head_init_scale",
        "zero_init_last",
        "pretrained_strict",
    }
)
_BN = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}


class _Args:
    """timm's defaults overridden by `model_args`, read key by key so that what no reader took is reported."""

    def __init__(self, architecture: str, defaults: Mapping, model_args: Mapping):
        self.architecture = architecture
        self.values = {**defaults, **model_args}
        self.read: set[str] = set()

    def get(self, key: str, default=None, *, allowed: tuple | None = None):
        self.read.add(key)
        value = self.values.get(key, default)
        if allowed is not None and value not in allowed:
            raise ValueError(
                f"timm {self.architecture}: {key}={value!r} is not supported by fxjax; supported: {allowed}"
            )
        return value

    def fixed(self, defaults: Mapping) -> None:
        """Arguments whose default is the only value fxjax implements."""
        for key, default in defaults.items():
            self.get(key, default, allowed=(default,))

    def done(self) -> None:
        unknown = sorted(k for k in self.values if k not in self.read and k not in _IGNORED)
        if unknown:
            given = ", ".join(f"{k}={self.values[k]!r}" for k in unknown)
            raise ValueError(f"timm {self.architecture}: model_args {given} not supported by fxjax; remove them")


def _shape(cls: type[nnx.Module], spec, *, dtype, param_dtype) -> nnx.Module:
    """`cls(spec)` built abstractly (shapes only): the weights come from the checkpoint."""
    return nnx.eval_shape(lambda: cls(spec, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))


# timm ConvNeXt's tensor names. `conv_mlp` models hold the MLP as 1x1 convolutions ([out, in, 1, 1]).
TIMM_CONVNEXT_NAMES = convnext_family.ConvNextNames(
    stem_conv=r"stem\.0",
    stem_norm=r"stem\.1",
    downsample_norm=r"stages\.(\d+)\.downsample\.0",
    downsample_conv=r"stages\.(\d+)\.downsample\.1",
    block=r"stages\.(\d+)\.blocks\.(\d+)",
    dwconv="conv_dw",
    norm="norm",
    pwconv1=r"mlp\.fc1",
    pwconv2=r"mlp\.fc2",
    layer_scale="gamma",
    final_norm=r"head\.norm",
    unused=r"head\.fc\.(weight|bias)",  # the ImageNet classifier
    grn=r"mlp\.grn",
    head_fc=r"head\.pre_logits\.fc",
)


def convnext(architecture: str, model_args: Mapping, *, dtype=jnp.float32, param_dtype=jnp.float32):
    """timm `ConvNeXt` (V1 and V2) → `families.convnext.ConvNext` and timm's names."""
    args = _Args(architecture, CONVNEXT_DEFAULTS[architecture], model_args)
    depths, dims = tuple(args.get("depths")), tuple(args.get("dims"))
    conv_mlp, grn = args.get("conv_mlp", False), args.get("use_grn", False)
    layer_scale = args.get("ls_init_value", 1e-6)  # None: no layer scale; 0 still holds `gamma`, as in timm
    eps = args.get("norm_eps") or 1e-6
    head_hidden = args.get("head_hidden_size") or 0
    args.fixed({
        "stem_type": "patch", "kernel_sizes": 7, "mlp_ratio": 4, "head_norm_first": False, "conv_bias": True,
        "act_layer": "gelu", "global_pool": "avg", "norm_layer": None,
    })  # fmt: skip
    spec = convnext_family.ConvNextSpec(
        hidden_sizes=dims,
        depths=depths,
        num_channels=args.get("in_chans", 3),
        patch_size=args.get("patch_size", 4),
        layer_scale=layer_scale,
        norm_eps=eps,
        final_norm_eps=eps,
        grn=grn,
        head_hidden=head_hidden,
    )
    args.done()
    module = _shape(convnext_family.ConvNext, spec, dtype=dtype, param_dtype=param_dtype)
    return module, convnext_family.naming_rules(TIMM_CONVNEXT_NAMES, mlp="conv1x1_dense" if conv_mlp else "dense")


def resnet(architecture: str, model_args: Mapping, *, dtype=jnp.float32, param_dtype=jnp.float32):
    """timm `ResNet` (with ResNet-C/D/S/T stems and shortcuts, ResNeXt, Wide ResNet) → `families.resnet.ResNet`
    and timm's names."""
    args = _Args(architecture, RESNET_DEFAULTS[architecture], model_args)
    block = args.get("block", allowed=("basic", "bottleneck"))
    layers = tuple(args.get("layers"))
    channels = tuple(args.get("channels", (64, 128, 256, 512)))
    stem_type = args.get("stem_type", "", allowed=("", "deep", "deep_tiered"))
    stem_width = args.get("stem_width", 64)
    avg_down = args.get("avg_down", False)
    cardinality, base_width = args.get("cardinality", 1), args.get("base_width", 64)
    args.fixed({
        "output_stride": 32, "global_pool": "avg", "block_reduce_first": 1, "down_kernel_size": 1,
        "replace_stem_pool": False, "act_layer": None, "norm_layer": None, "aa_layer": None, "attn_layer": None,
        "block_args": None,
    })  # fmt: skip
    if block == "basic" and (cardinality, base_width) != (1, 64):
        raise ValueError(f"timm {architecture}: basic blocks take cardinality=1, base_width=64 only")
    deep = stem_type.startswith("deep")
    stem_widths = ()
    if deep:
        stem_widths = (3 * (stem_width // 4), stem_width) if stem_type == "deep_tiered" else (stem_width, stem_width)
    expansion = 4 if block == "bottleneck" else 1
    spec = resnet_family.ResNetSpec(
        hidden_sizes=tuple(c * expansion for c in channels),
        depths=layers,
        bottleneck=block == "bottleneck",
        num_channels=args.get("in_chans", 3),
        embedding_size=2 * stem_width if deep else 64,
        stem_widths=stem_widths,
        avg_down=avg_down,
        groups=cardinality,
        width_per_group=base_width,
    )
    args.done()
    module = _shape(resnet_family.ResNet, spec, dtype=dtype, param_dtype=param_dtype)
    return module, resnet_rules(deep_stem=deep, avg_down=avg_down)


def _stage_target(template: str) -> Callable:
    """timm numbers stages `layer1`..`layer4`; the module counts from 0."""
    return lambda m: template.format(stage=int(m.group(1)) - 1, layer=m.group(2), index=int(m.group(3)) - 1)


def resnet_rules(*, deep_stem: bool, avg_down: bool) -> list[Rule]:
    """timm ResNet names → module paths."""
    rules = [Rule(r".*num_batches_tracked", None), Rule(r"fc\.(weight|bias)", None)]  # classifier unused
    if deep_stem:  # conv1 = Sequential(conv, bn, act, conv, bn, act, conv), then bn1
        convs, bns = {"0": 0, "3": 1, "6": 2}, {"1": 0, "4": 1}
        rules += [Rule(rf"conv1\.{i}\.weight", f"embedder.layers.{j}.conv.kernel", "conv") for i, j in convs.items()]
        rules += [
            Rule(rf"conv1\.{i}\.{k}", f"embedder.layers.{j}.bn.{v}") for i, j in bns.items() for k, v in _BN.items()
        ]
        rules += [Rule(rf"bn1\.{k}", f"embedder.layers.2.bn.{v}") for k, v in _BN.items()]
    else:
        rules.append(Rule(r"conv1\.weight", "embedder.conv.kernel", "conv"))
        rules += [Rule(rf"bn1\.{k}", f"embedder.bn.{v}") for k, v in _BN.items()]
    layer = r"layer(\d)\.(\d+)"
    rules.append(
        Rule(rf"{layer}\.conv(\d)\.weight", _stage_target("stages.{stage}.{layer}.layer.{index}.conv.kernel"), "conv")
    )
    rules += [
        Rule(rf"{layer}\.bn(\d)\.{k}", _stage_target(f"stages.{{stage}}.{{layer}}.layer.{{index}}.bn.{v}"))
        for k, v in _BN.items()
    ]
    conv, bn = ("1", "2") if avg_down else ("0", "1")  # avg_down: downsample = Sequential(pool, conv, bn)
    shortcut = r"layer(\d)\.(\d+)\.downsample"

    def target(suffix: str) -> Callable:
        return lambda m: f"stages.{int(m.group(1)) - 1}.{m.group(2)}.shortcut.{suffix}"

    rules.append(Rule(rf"{shortcut}\.{conv}\.weight", target("conv.kernel"), "conv"))
    rules += [Rule(rf"{shortcut}\.{bn}\.{k}", target(f"bn.{v}")) for k, v in _BN.items()]
    return rules


def _efficientnet(architecture: str, model_args: Mapping, *, lite: bool, dtype, param_dtype):
    defaults = (EFFICIENTNET_LITE_DEFAULTS if lite else EFFICIENTNET_DEFAULTS)[architecture]
    args = _Args(architecture, defaults, model_args)
    pad_type = args.get("pad_type", "", allowed=("", "same"))
    args.fixed({
        "channel_divisor": 8, "in_chans": 3, "global_pool": "avg", "act_layer": None, "norm_layer": None,
        "se_layer": None, "group_size": None, "output_stride": 32, "fix_stem": lite, "stem_size": 32,
    })  # fmt: skip
    config = efficientnet_family.EfficientNetConfig(
        width=args.get("channel_multiplier", 1.0),
        depth=args.get("depth_multiplier", 1.0),
        lite=lite,
        batch_norm_eps=args.get("bn_eps", 1e-5),  # timm's `efficientnet_*` keep torch's BatchNorm eps
        padding="same" if pad_type == "same" else "symmetric",
        first_block_skip=True,
    )
    args.done()
    module = _shape(efficientnet_family.EfficientNet, config, dtype=dtype, param_dtype=param_dtype)
    return module, efficientnet_rules(config)


def efficientnet(architecture: str, model_args: Mapping, *, dtype=jnp.float32, param_dtype=jnp.float32):
    """timm `efficientnet_b*` / `tf_efficientnet_b*` → `families.efficientnet.EfficientNet` and timm's names."""
    return _efficientnet(architecture, model_args, lite=False, dtype=dtype, param_dtype=param_dtype)


def efficientnet_lite(architecture: str, model_args: Mapping, *, dtype=jnp.float32, param_dtype=jnp.float32):
    """timm `efficientnet_lite*` / `tf_efficientnet_lite*` (ReLU6, no squeeze-excitation, fixed stem and head)."""
    return _efficientnet(architecture, model_args, lite=True, dtype=dtype, param_dtype=param_dtype)


def efficientnet_rules(config: efficientnet_family.EfficientNetConfig) -> list[Rule]:
    """timm EfficientNet names → module paths. A stage without expansion is timm's DepthwiseSeparableConv
    (`conv_dw`, `bn1`, `conv_pw` projects, `bn2`); the others are InvertedResidual (`conv_pw` expands, `bn1`,
    `conv_dw`, `bn2`, `conv_pwl` projects, `bn3`)."""
    rules = [Rule(r".*num_batches_tracked", None), Rule(r"classifier\.(weight|bias)", None)]  # classifier unused
    rules += [Rule(r"conv_stem\.weight", "stem.kernel", "conv"), Rule(r"conv_head\.weight", "head.kernel", "conv")]
    rules += [Rule(rf"bn1\.{k}", f"stem_bn.{v}") for k, v in _BN.items()]
    rules += [Rule(rf"bn2\.{k}", f"head_bn.{v}") for k, v in _BN.items()]
    for i, stage in enumerate(config.stages()):
        if stage.expand == 1:
            convs = {"conv_dw": "depthwise", "conv_pw": "project"}
            bns = {"bn1": "depthwise_bn", "bn2": "project_bn"}
        else:
            convs = {"conv_pw": "expand", "conv_dw": "depthwise", "conv_pwl": "project"}
            bns = {"bn1": "expand_bn", "bn2": "depthwise_bn", "bn3": "project_bn"}
        block, ours = rf"blocks\.{i}\.(\d+)", rf"stages.{i}.\1"
        rules += [
            Rule(rf"{block}\.{theirs}\.weight", f"{ours}.{mine}.kernel", "conv") for theirs, mine in convs.items()
        ]
        rules += [
            Rule(rf"{block}\.{theirs}\.{k}", f"{ours}.{mine}.{v}")
            for theirs, mine in bns.items()
            for k, v in _BN.items()
        ]
        for theirs, mine in (("conv_reduce", "se_reduce"), ("conv_expand", "se_expand")):
            rules.append(Rule(rf"{block}\.se\.{theirs}\.weight", f"{ours}.{mine}.kernel", "conv"))
            rules.append(Rule(rf"{block}\.se\.{theirs}\.bias", f"{ours}.{mine}.bias"))
    return rules


DEFAULTS: dict[str, dict] = {
    **CONVNEXT_DEFAULTS,
    **RESNET_DEFAULTS,
    **EFFICIENTNET_DEFAULTS,
    **EFFICIENTNET_LITE_DEFAULTS,
}

# timm architecture name → builder(architecture, model_args, *, dtype, param_dtype) -> (abstract module, rules).
ARCHS: dict[str, Builder] = {
    **dict.fromkeys(CONVNEXT_DEFAULTS, convnext),
    **dict.fromkeys(RESNET_DEFAULTS, resnet),
    **dict.fromkeys(EFFICIENTNET_DEFAULTS, efficientnet),
    **dict.fromkeys(EFFICIENTNET_LITE_DEFAULTS, efficientnet_lite),
}


def builder(architecture: str) -> Builder:
    """The builder for a timm architecture name; an unknown one says which names fxjax builds."""
    if architecture not in ARCHS:
        families = "convnext_*, convnextv2_*, resnet*, resnext*, wide_resnet*, efficientnet_*, tf_efficientnet_*"
        raise ValueError(
            f"timm architecture {architecture!r} is not one fxjax builds; supported: {families} "
            f"(the names in fxjax.backbones.checkpoints.timm_cnn.ARCHS)"
        )
    return ARCHS[architecture]
