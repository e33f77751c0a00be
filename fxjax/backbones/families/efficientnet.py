"""EfficientNet in Flax NNX: the Lite variant (ReLU6, no squeeze-excitation, fixed stem and head) and the
standard B0–B7 variant (swish, squeeze-excitation), in two checkpoint namings: the EfficientNet-PyTorch project's
(built-in Lite weights) and Hugging Face's `EfficientNetModel` (google/efficientnet-b*, model_type "efficientnet").

The network is held as stem → stages (lists of MBConv blocks) → head, so that freezing can be expressed in
stages. EfficientNet-PyTorch uses TensorFlow "SAME" padding; transformers pads explicitly (stem: one row and
column at the bottom/right; stride-2 depthwise: `correct_pad`), which equals "SAME" only for even input sizes,
so `padding="hf"` reproduces those pads exactly. timm's `efficientnet_*` pad `kernel // 2` on every side
(PyTorch style, `padding="symmetric"`); its `tf_efficientnet_*` use "SAME".
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

import jax
import jax.numpy as jnp
from flax import nnx

from fxjax.backbones.activations import activation
from fxjax.backbones.convert import Rule
from fxjax.backbones.layers import DepthwiseConv, PointwiseConv


@dataclass(frozen=True)
class BlockArgs:
    repeats: int
    kernel: int
    stride: int
    expand: int
    filters_in: int
    filters_out: int


# (repeats, kernel, stride, expand, in, out) of the seven stages of every EfficientNet.
BASE_BLOCKS = (
    BlockArgs(1, 3, 1, 1, 32, 16),
    BlockArgs(2, 3, 2, 6, 16, 24),
    BlockArgs(2, 5, 2, 6, 24, 40),
    BlockArgs(3, 3, 2, 6, 40, 80),
    BlockArgs(3, 5, 1, 6, 80, 112),
    BlockArgs(4, 5, 2, 6, 112, 192),
    BlockArgs(1, 3, 1, 6, 192, 320),
)


@dataclass(frozen=True)
class EfficientNetConfig:
    width: float = 1.0
    depth: float = 1.0
    resolution: int = 224
    lite: bool = True  # ReLU6, no squeeze-excitation, stem and head not scaled
    se_ratio: float = 0.25
    batch_norm_eps: float = 1e-3
    depth_divisor: int = 8
    base_blocks: tuple[BlockArgs, ...] = BASE_BLOCKS
    hidden_act: str = "swish"  # of the B variants; Lite always uses ReLU6
    padding: str = "same"  # "same": TF SAME everywhere; "hf": transformers' explicit pads; "symmetric": k // 2
    depthwise_padding: tuple[int, ...] = ()  # "hf": flat block indices whose stride-2 depthwise pads symmetrically
    first_block_skip: bool = True  # skip connection on a stage's first block when shapes allow (transformers: never)
    pooling: str = "mean"  # "mean" | "max" over the head's feature map

    @property
    def activation(self):
        return jax.nn.relu6 if self.lite else activation(self.hidden_act)

    def round_filters(self, filters: int, fixed: bool = False) -> int:
        if fixed:
            return filters
        scaled = filters * self.width
        divisor = self.depth_divisor
        rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
        return int(rounded + self.depth_divisor if rounded < 0.9 * scaled else rounded)

    def stages(self) -> list[BlockArgs]:
        stages = []
        for i, args in enumerate(self.base_blocks):
            fixed = self.lite and i in (0, len(self.base_blocks) - 1)  # Lite keeps the first and last stage's depth
            repeats = args.repeats if fixed or self.depth == 1.0 else math.ceil(self.depth * args.repeats)
            filters_in = 32 if self.lite and i == 0 else self.round_filters(args.filters_in)
            filters_out = self.round_filters(args.filters_out)
            stages.append(replace(args, repeats=repeats, filters_in=filters_in, filters_out=filters_out))
        return stages

    @property
    def stem_filters(self) -> int:
        return self.round_filters(32, fixed=self.lite)

    @property
    def head_filters(self) -> int:
        return self.round_filters(1280, fixed=self.lite)


# (width, depth, resolution) per variant, as published with the TF reference implementations.
VARIANTS = {
    **{
        f"efficientnet-lite{i}": EfficientNetConfig(w, d, r, lite=True)
        for i, (w, d, r) in enumerate(
            [(1.0, 1.0, 224), (1.0, 1.1, 240), (1.1, 1.2, 260), (1.2, 1.4, 280), (1.4, 1.8, 300)]
        )
    },
    **{
        f"efficientnet-b{i}": EfficientNetConfig(w, d, r, lite=False)
        for i, (w, d, r) in enumerate(
            [
                (1.0, 1.0, 224),
                (1.0, 1.1, 240),
                (1.1, 1.2, 260),
                (1.2, 1.4, 300),
                (1.4, 1.8, 380),
                (1.6, 2.2, 456),
                (1.8, 2.6, 528),
                (2.0, 3.1, 600),
            ]
        )
    },
}


def from_hf(config) -> EfficientNetConfig:
    """A transformers `EfficientNetConfig` → this module's config (B variant, transformers' padding and skips)."""
    blocks = tuple(
        BlockArgs(*args)
        for args in zip(
            config.num_block_repeats,
            config.kernel_sizes,
            config.strides,
            config.expand_ratios,
            config.in_channels,
            config.out_channels,
        )
    )
    size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
    return EfficientNetConfig(
        width=config.width_coefficient,
        depth=config.depth_coefficient,
        resolution=size,
        lite=False,
        se_ratio=config.squeeze_expansion_ratio,
        batch_norm_eps=config.batch_norm_eps,
        depth_divisor=config.depth_divisor,
        base_blocks=blocks,
        hidden_act=config.hidden_act,
        padding="hf",
        depthwise_padding=tuple(config.depthwise_padding),
        first_block_skip=False,
        pooling=config.pooling_type,
    )


def _depthwise_padding(config: EfficientNetConfig, kernel: int, stride: int, flat_index: int):
    """transformers' `correct_pad` for stride 2 (one less on the top/left unless the block is listed in
    `depthwise_padding`), `kernel // 2` all round for stride 1; `kernel // 2` all round under "symmetric";
    TF "SAME" otherwise."""
    if config.padding == "same":
        return "SAME"
    half = kernel // 2
    if config.padding == "symmetric":
        return ((half, half), (half, half))
    low = half - 1 if stride == 2 and flat_index not in config.depthwise_padding else half
    return ((low, half), (low, half))


def _conv(cin, cout, kernel, *, stride=1, bias=False, padding="SAME", dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    if kernel == 1 and stride == 1:  # a matmul: XLA's CPU 1x1 convolution is ~5x slower
        return PointwiseConv(cin, cout, use_bias=bias, **kw)
    return nnx.Conv(cin, cout, (kernel, kernel), strides=stride, padding=padding, use_bias=bias, **kw)


def _bn(features, config, *, dtype, param_dtype, rngs):
    # Backbone BatchNorm always uses its running statistics: frozen or fine-tuned with small batches alike.
    return nnx.BatchNorm(
        features,
        use_running_average=True,
        epsilon=config.batch_norm_eps,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )


class MBConv(nnx.Module):
    """Mobile inverted bottleneck: expand (1x1) → depthwise → [squeeze-excitation] → project (1x1) → +skip."""

    def __init__(
        self,
        args: BlockArgs,
        config: EfficientNetConfig,
        *,
        residual: bool,
        depthwise_padding="SAME",
        dtype,
        param_dtype,
        rngs,
    ):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        hidden = args.filters_in * args.expand
        self.activation = config.activation
        expands = args.expand != 1
        self.expand = _conv(args.filters_in, hidden, 1, **kw) if expands else None
        self.expand_bn = _bn(hidden, config, **kw) if expands else None
        self.depthwise = DepthwiseConv(hidden, args.kernel, stride=args.stride, padding=depthwise_padding, **kw)
        self.depthwise_bn = _bn(hidden, config, **kw)
        squeezed = max(1, int(args.filters_in * config.se_ratio))
        self.se_reduce = None if config.lite else _conv(hidden, squeezed, 1, bias=True, **kw)
        self.se_expand = None if config.lite else _conv(squeezed, hidden, 1, bias=True, **kw)
        self.project = _conv(hidden, args.filters_out, 1, **kw)
        self.project_bn = _bn(args.filters_out, config, **kw)
        self.residual = residual

    def __call__(self, x):  # [n, h, w, c]
        y = x
        if self.expand is not None:
            y = self.activation(self.expand_bn(self.expand(y)))
        y = self.activation(self.depthwise_bn(self.depthwise(y)))
        if self.se_reduce is not None:
            s = jnp.mean(y, axis=(1, 2), keepdims=True)
            y = y * jax.nn.sigmoid(self.se_expand(self.activation(self.se_reduce(s))))
        y = self.project_bn(self.project(y))
        return y + x if self.residual else y


class EfficientNet(nnx.Module):
    """Outputs `pooled` [n, head_filters] (global average, or max under `pooling="max"`, of the head: HF's
    `pooler_output`), `hidden_states` (stem, each stage, head: feature maps) and `feature_map` (head output)."""

    def __init__(self, config: EfficientNetConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.config = config
        self.activation = config.activation
        stem_padding = {"same": "SAME", "symmetric": ((1, 1), (1, 1))}.get(config.padding, ((0, 1), (0, 1)))
        self.stem = _conv(3, config.stem_filters, 3, stride=2, padding=stem_padding, **kw)
        self.stem_bn = _bn(config.stem_filters, config, **kw)
        stages, flat_index = [], 0
        for args in config.stages():
            blocks = []
            for j in range(args.repeats):
                block_args = args if j == 0 else replace(args, filters_in=args.filters_out, stride=1)
                skips = (
                    block_args.stride == 1
                    and block_args.filters_in == block_args.filters_out
                    and (j > 0 or config.first_block_skip)
                )
                padding = _depthwise_padding(config, block_args.kernel, block_args.stride, flat_index)
                blocks.append(MBConv(block_args, config, residual=skips, depthwise_padding=padding, **kw))
                flat_index += 1
            stages.append(nnx.List(blocks))
        self.stages = nnx.List(stages)
        self.head = _conv(config.stages()[-1].filters_out, config.head_filters, 1, **kw)
        self.head_bn = _bn(config.head_filters, config, **kw)

    def stage_paths(self) -> list[tuple[str, ...]]:
        """Module-path prefixes of each stage, input to output: stem, the seven block stages, head."""
        return [("stem", "stem_bn")] + [(f"stages.{i}",) for i in range(len(self.stages))] + [("head", "head_bn")]

    def __call__(self, x) -> dict:
        """x: [n, h, w, 3] normalised → pooled features, the final feature map and each stage's output."""
        x = self.activation(self.stem_bn(self.stem(x)))
        hidden = [x]
        for stage in self.stages:
            for block in stage:
                x = block(x)
            hidden.append(x)
        x = self.activation(self.head_bn(self.head(x)))
        hidden.append(x)
        pooled = jnp.max(x, axis=(1, 2)) if self.config.pooling == "max" else jnp.mean(x, axis=(1, 2))
        return {"pooled": pooled, "feature_map": x, "hidden_states": tuple(hidden)}


def build(config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs) -> EfficientNet:
    """The module for a transformers `EfficientNetConfig`."""
    return EfficientNet(from_hf(config), dtype=dtype, param_dtype=param_dtype, rngs=rngs)


_BN = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}


def _block_rule(config: EfficientNetConfig, prefix: str, suffix: str, ours: str, transform: str = "none") -> Rule:
    """A rule for `{prefix}N.{suffix}`: checkpoints number blocks flat, the module groups them by stage
    (`stages.i.j`)."""
    flat_index = [(i, j) for i, args in enumerate(config.stages()) for j in range(args.repeats)]

    def target(match: re.Match) -> str:
        i, j = flat_index[int(match.group(1))]
        return f"stages.{i}.{j}.{ours}"

    return Rule(rf"{prefix}(\d+)\.{re.escape(suffix)}", target, transform)


def conversion_rules(config) -> list[Rule]:
    """Family contract: a transformers `EfficientNetConfig` → HF names; this module's `EfficientNetConfig`
    (the built-in Lite weights) → EfficientNet-PyTorch names."""
    if isinstance(config, EfficientNetConfig):
        return efficientnet_pytorch_rules(config)
    return hf_rules(from_hf(config))


def efficientnet_pytorch_rules(config: EfficientNetConfig) -> list[Rule]:
    """EfficientNet-PyTorch (`_conv_stem`, `_blocks.N._expand_conv`, ...) names → module paths."""

    def block(torch_suffix: str, ours: str, transform: str = "none") -> Rule:
        return _block_rule(config, r"_blocks\.", torch_suffix, ours, transform)

    rules = [Rule(r".*num_batches_tracked", None), Rule(r"_fc\.(weight|bias)", None)]  # ImageNet classifier unused
    rules += [Rule(r"_conv_stem\.weight", "stem.kernel", "conv"), Rule(r"_conv_head\.weight", "head.kernel", "conv")]
    for torch_name, ours in (("_bn0", "stem_bn"), ("_bn1", "head_bn")):
        rules += [Rule(rf"{torch_name}\.{k}", f"{ours}.{v}") for k, v in _BN.items()]
    for torch_name, ours in (("_bn0", "expand_bn"), ("_bn1", "depthwise_bn"), ("_bn2", "project_bn")):
        rules += [block(f"{torch_name}.{k}", f"{ours}.{v}") for k, v in _BN.items()]
    for torch_name, ours in (
        ("_expand_conv", "expand"),
        ("_depthwise_conv", "depthwise"),
        ("_project_conv", "project"),
        ("_se_reduce", "se_reduce"),
        ("_se_expand", "se_expand"),
    ):
        rules += [block(f"{torch_name}.weight", f"{ours}.kernel", "conv"), block(f"{torch_name}.bias", f"{ours}.bias")]
    return rules


def hf_rules(config: EfficientNetConfig) -> list[Rule]:
    """HF names (`EfficientNetModel`, or `EfficientNetForImageClassification` under `efficientnet.`) → module paths."""
    p = r"(?:efficientnet\.)?"

    def block(suffix: str, ours: str, transform: str = "none") -> Rule:
        return _block_rule(config, rf"{p}encoder\.blocks\.", suffix, ours, transform)

    rules = [Rule(r".*num_batches_tracked", None), Rule(r"classifier\..*", None)]  # ImageNet classifier unused
    rules += [
        Rule(rf"{p}embeddings\.convolution\.weight", "stem.kernel", "conv"),
        Rule(rf"{p}encoder\.top_conv\.weight", "head.kernel", "conv"),
    ]
    for theirs, ours in ((r"embeddings\.batchnorm", "stem_bn"), (r"encoder\.top_bn", "head_bn")):
        rules += [Rule(rf"{p}{theirs}\.{k}", f"{ours}.{v}") for k, v in _BN.items()]
    for theirs, ours in (
        ("expansion.expand_bn", "expand_bn"),
        ("depthwise_conv.depthwise_norm", "depthwise_bn"),
        ("projection.project_bn", "project_bn"),
    ):
        rules += [block(f"{theirs}.{k}", f"{ours}.{v}") for k, v in _BN.items()]
    for theirs, ours in (
        ("expansion.expand_conv", "expand"),
        ("depthwise_conv.depthwise_conv", "depthwise"),
        ("projection.project_conv", "project"),
    ):
        rules.append(block(f"{theirs}.weight", f"{ours}.kernel", "conv"))
    for theirs, ours in (("squeeze_excite.reduce", "se_reduce"), ("squeeze_excite.expand", "se_expand")):
        rules += [block(f"{theirs}.weight", f"{ours}.kernel", "conv"), block(f"{theirs}.bias", f"{ours}.bias")]
    return rules
