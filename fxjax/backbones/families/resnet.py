"""ResNet in Flax NNX, in Hugging Face `ResNetModel` naming (microsoft/resnet-*): basic and bottleneck layers.

Held as embedder (7x7 conv + max pool) → stages (lists of residual layers), so that freezing is counted in
stages. Convolutions pad `kernel // 2` on every side, as the PyTorch reference does; BatchNorm always uses its
running statistics.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from fxjax.backbones.activations import activation
from fxjax.backbones.convert import Rule

BATCH_NORM_EPS = 1e-5  # torch.nn.BatchNorm2d's default; the HF config has no field for it


class ConvBN(nnx.Module):
    """Convolution without bias → BatchNorm (HF `ResNetConvLayer` / `ResNetShortCut`, less the activation)."""

    def __init__(self, cin: int, cout: int, kernel: int, *, stride: int = 1, dtype, param_dtype, rngs: nnx.Rngs):
        pad = kernel // 2
        self.conv = nnx.Conv(
            cin,
            cout,
            (kernel, kernel),
            strides=stride,
            padding=((pad, pad), (pad, pad)),
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


class ResidualLayer(nnx.Module):
    """Basic (3x3, 3x3) or bottleneck (1x1 reduce by 4, 3x3, 1x1) residual layer with a projection shortcut
    where the shape changes. Inner activations are ReLU whatever `hidden_act` says, as in the reference."""

    def __init__(self, cin: int, cout: int, stride: int, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        if config.layer_type == "bottleneck":
            mid = cout // 4
            first, second = (stride, 1) if config.downsample_in_bottleneck else (1, stride)
            specs = [(cin, mid, 1, first), (mid, mid, 3, second), (mid, cout, 1, 1)]
        else:
            specs = [(cin, cout, 3, stride), (cout, cout, 3, 1)]
        self.layer = nnx.List([ConvBN(i, o, k, stride=s, **kw) for i, o, k, s in specs])
        self.shortcut = ConvBN(cin, cout, 1, stride=stride, **kw) if cin != cout or stride != 1 else None
        self.activation = activation(config.hidden_act)

    def __call__(self, x):  # [n, h, w, cin]
        y = x
        for i, conv_bn in enumerate(self.layer):
            y = conv_bn(y)
            if i < len(self.layer) - 1:
                y = jax.nn.relu(y)
        return self.activation(y + (x if self.shortcut is None else self.shortcut(x)))


class ResNet(nnx.Module):
    """Outputs `pooled` [n, hidden_sizes[-1]] (HF `pooler_output`: global average of the last stage,
    flattened), `feature_map` (last stage) and `hidden_states` (embedder output, then each stage: as HF)."""

    def __init__(self, config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.activation = activation(config.hidden_act)
        self.embedder = ConvBN(config.num_channels, config.embedding_size, 7, stride=2, **kw)
        stages, cin = [], config.embedding_size
        for i, (cout, depth) in enumerate(zip(config.hidden_sizes, config.depths)):
            stride = 2 if i > 0 or config.downsample_in_first_stage else 1
            layers = [ResidualLayer(cin, cout, stride, config, **kw)]
            layers += [ResidualLayer(cout, cout, 1, config, **kw) for _ in range(depth - 1)]
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
    return ResNet(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


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
