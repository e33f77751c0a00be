"""ResNet in Flax NNX, in Hugging Face `ResNetModel` naming (microsoft/resnet-*): basic and bottleneck layers.

Held as embedder (7x7 conv + max pool) → stages (lists of residual layers), so that freezing is counted in
stages. Convolutions pad `kernel // 2` on every side, as the PyTorch reference does; BatchNorm always uses its
running statistics. `ResNetSpec` holds the architecture: `spec` reads a transformers config into
it, timm's builder (`checkpoints.timm_cnn`) fills the options transformers lacks: a deep stem of three 3x3
convolutions (ResNet-C/D/S/T), an average-pooled projection shortcut (ResNet-D), grouped and widened
bottlenecks (ResNeXt, Wide ResNet).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from fxjax.backbones.activations import activation
from fxjax.backbones.convert import Rule

BATCH_NORM_EPS = 1e-5  # torch.nn.BatchNorm2d's default; the HF config has no field for it


@dataclass(frozen=True)
class ResNetSpec:
    """The architecture. `bottleneck`: 1x1-3x3-1x1 layers (else basic 3x3-3x3); `downsample_in_bottleneck`: the
    stride sits on the first 1x1, not the 3x3; `stem_widths` (two widths): the deep stem; `avg_down`, `groups`,
    `width_per_group`: see `ResidualLayer`. The defaults are transformers' ResNet."""

    hidden_sizes: tuple[int, ...]
    depths: tuple[int, ...]
    bottleneck: bool = True
    num_channels: int = 3
    embedding_size: int = 64
    act: str = "relu"
    downsample_in_first_stage: bool = False
    downsample_in_bottleneck: bool = False
    stem_widths: tuple[int, ...] = ()
    avg_down: bool = False
    groups: int = 1
    width_per_group: int = 64


def spec(config) -> ResNetSpec:
    """The spec of a transformers `ResNetConfig`."""
    return ResNetSpec(
        hidden_sizes=tuple(config.hidden_sizes),
        depths=tuple(config.depths),
        bottleneck=config.layer_type == "bottleneck",
        num_channels=config.num_channels,
        embedding_size=config.embedding_size,
        act=config.hidden_act,
        downsample_in_first_stage=config.downsample_in_first_stage,
        downsample_in_bottleneck=config.downsample_in_bottleneck,
    )


class ConvBN(nnx.Module):
    """Convolution without bias → BatchNorm (HF `ResNetConvLayer` / `ResNetShortCut`, less the activation)."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int,
        *,
        stride: int = 1,
        groups: int = 1,
        dtype,
        param_dtype,
        rngs: nnx.Rngs,
    ):
        pad = kernel // 2
        self.conv = nnx.Conv(
            cin,
            cout,
            (kernel, kernel),
            strides=stride,
            padding=((pad, pad), (pad, pad)),
            feature_group_count=groups,
            use_bias=False,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.bn = nnx.BatchNorm(
            cout, use_running_average=True, epsilon=BATCH_NORM_EPS, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )

    def __call__(self, x):  # [n, h, w, cin] → [n, h / stride, w / stride, cout]
        return self.bn(self.conv(x))


def avg_pool_ceil(x, stride: int):
    """`nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False)`: a partial window at the
    bottom/right edge averages only the pixels it covers."""
    pads = ((0, -x.shape[1] % stride), (0, -x.shape[2] % stride))
    return nnx.avg_pool(x, (stride, stride), strides=(stride, stride), padding=pads, count_include_pad=False)


class ResidualLayer(nnx.Module):
    """Basic (3x3, 3x3) or bottleneck (1x1 reduce by 4, 3x3, 1x1) residual layer with a projection shortcut
    where the shape changes. Inner activations are ReLU whatever `spec.act` says, as in the reference.

    `avg_down`: the shortcut average-pools by the stride, then projects with a stride-1 1x1 conv (ResNet-D).
    `groups` / `width_per_group`: the bottleneck's 3x3 is grouped, its width `cout / 4 · width_per_group / 64 ·
    groups` (ResNeXt, Wide ResNet; the defaults give `cout / 4`)."""

    def __init__(self, cin: int, cout: int, stride: int, spec: ResNetSpec, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        groups = spec.groups
        if spec.bottleneck:
            mid = cout // 4 * spec.width_per_group // 64 * groups
            first, second = (stride, 1) if spec.downsample_in_bottleneck else (1, stride)
            specs = [(cin, mid, 1, first, 1), (mid, mid, 3, second, groups), (mid, cout, 1, 1, 1)]
        else:
            specs = [(cin, cout, 3, stride, 1), (cout, cout, 3, 1, 1)]
        self.layer = nnx.List([ConvBN(i, o, k, stride=s, groups=g, **kw) for i, o, k, s, g in specs])
        projects = cin != cout or stride != 1
        self.shortcut_pool = stride if spec.avg_down else 1
        shortcut_stride = 1 if spec.avg_down else stride
        self.shortcut = ConvBN(cin, cout, 1, stride=shortcut_stride, **kw) if projects else None
        self.activation = activation(spec.act)

    def __call__(self, x):  # [n, h, w, cin]
        y = x
        for i, conv_bn in enumerate(self.layer):
            y = conv_bn(y)
            if i < len(self.layer) - 1:
                y = jax.nn.relu(y)
        if self.shortcut is None:
            return self.activation(y + x)
        pooled = avg_pool_ceil(x, self.shortcut_pool) if self.shortcut_pool > 1 else x
        return self.activation(y + self.shortcut(pooled))


class DeepStem(nnx.Module):
    """Three 3x3 convolutions (the first of stride 2) in place of the 7x7: ResNet-C/D/S/T's stem, widths
    `widths[0]`, `widths[1]`, then `cout`; ReLU between them, the caller's activation after."""

    def __init__(self, cin: int, widths: tuple[int, int], cout: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        chans = (cin, *widths, cout)
        self.layers = nnx.List([ConvBN(chans[i], chans[i + 1], 3, stride=2 if i == 0 else 1, **kw) for i in range(3)])

    def __call__(self, x):  # [n, h, w, cin] → [n, h / 2, w / 2, cout]
        for i, conv_bn in enumerate(self.layers):
            x = conv_bn(x)
            if i < len(self.layers) - 1:
                x = jax.nn.relu(x)
        return x


class ResNet(nnx.Module):
    """Outputs `pooled` [n, hidden_sizes[-1]] (HF `pooler_output`: global average of the last stage,
    flattened), `feature_map` (last stage) and `hidden_states` (embedder output, then each stage: as HF)."""

    def __init__(self, spec: ResNetSpec, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.activation = activation(spec.act)
        if spec.stem_widths:
            self.embedder = DeepStem(spec.num_channels, spec.stem_widths, spec.embedding_size, **kw)
        else:
            self.embedder = ConvBN(spec.num_channels, spec.embedding_size, 7, stride=2, **kw)
        stages, cin = [], spec.embedding_size
        for i, (cout, depth) in enumerate(zip(spec.hidden_sizes, spec.depths)):
            stride = 2 if i > 0 or spec.downsample_in_first_stage else 1
            layers = [ResidualLayer(cin, cout, stride, spec, **kw)]
            layers += [ResidualLayer(cout, cout, 1, spec, **kw) for _ in range(depth - 1)]
            stages.append(nnx.List(layers))
            cin = cout
        self.stages = nnx.List(stages)

    def stage_paths(self) -> list[tuple[str, ...]]:
        """Module-path prefixes of each stage, input to output: the embedder, then each stage."""
        return [("embedder",)] + [(f"stages.{i}",) for i in range(len(self.stages))]

    def __call__(self, x) -> dict:
        """x: [n, h, w, c] normalised → pooled features, the final feature map and each stage's output."""
        x = self.activation(self.embedder(x))  # [n, h/2, w/2, embedding_size]
        x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))  # [n, h/4, w/4, e]
        hidden = [x]
        for stage in self.stages:
            for layer in stage:
                x = layer(x)
            hidden.append(x)
        return {"pooled": jnp.mean(x, axis=(1, 2)), "feature_map": x, "hidden_states": tuple(hidden)}


def build(config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs) -> ResNet:
    """The module for a transformers `ResNetConfig`."""
    return ResNet(spec(config), dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def conversion_rules(config) -> list[Rule]:
    """HF names (`ResNetModel`, or `ResNetForImageClassification` under `resnet.`) → module paths."""
    prefix = r"(?:resnet\.)?"
    bn = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}
    # BatchNorm's step counter and the ImageNet classifier are not used.
    rules = [Rule(r".*num_batches_tracked", None), Rule(r"classifier\..*", None)]
    sites = (
        (r"embedder\.embedder", "embedder"),
        (r"encoder\.stages\.(\d+)\.layers\.(\d+)\.(layer\.\d+|shortcut)", r"stages.\1.\2.\3"),
    )
    for theirs, ours in sites:
        rules.append(Rule(rf"{prefix}{theirs}\.convolution\.weight", f"{ours}.conv.kernel", "conv"))
        rules += [Rule(rf"{prefix}{theirs}\.normalization\.{k}", f"{ours}.bn.{v}") for k, v in bn.items()]
    return rules
