"""DINOv3 ConvNeXt (`dinov3_convnext`, transformers' `DINOv3ConvNextModel`): ConvNeXt distilled from the DINOv3
ViT-7B. The blocks are HF ConvNeXt's (`layers.ConvNextBlock`), with `config.layer_norm_eps` in every LayerNorm;
stage 0 starts with the 4x4 patchify conv + LayerNorm, each later stage with LayerNorm + 2x2 conv.

Outputs: `pooled` [n, c] is HF's `pooler_output`: the last stage's spatial mean through the final LayerNorm;
`patch_tokens` [n, h*w, c] the last stage's positions through that LayerNorm (HF's `last_hidden_state` is
[pooled; patch tokens]), so the `*_avgpool` feature variants work; `feature_map` the last stage's output
[n, h, w, c]; `hidden_states` as HF's `output_hidden_states=True`: the input image, then each stage's output
(channels last). Stages, for freezing: each stage, then the final LayerNorm.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from fxjax.backbones.convert import Rule
from fxjax.backbones.layers import ConvNextBlock, two_pass_layer_norm


class Stage(nnx.Module):
    """Stage 0: patchify conv → LayerNorm → blocks; later stages: LayerNorm → 2x2 stride-2 conv → blocks."""

    def __init__(self, config, index: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        eps, cout = config.layer_norm_eps, config.hidden_sizes[index]
        cin = config.hidden_sizes[index - 1] if index else config.num_channels
        k = 2 if index else 4
        self.norm_first = index > 0
        self.downsample_norm = two_pass_layer_norm(cin if index else cout, eps, **kw)
        self.downsample = nnx.Conv(cin, cout, (k, k), strides=k, padding="VALID", **kw)
        self.layers = nnx.List([ConvNextBlock(cout, config, norm_eps=eps, **kw) for _ in range(config.depths[index])])

    def __call__(self, x: jax.Array) -> jax.Array:  # [n, h, w, cin] → [n, h / k, w / k, cout]
        if self.norm_first:
            x = self.downsample(self.downsample_norm(x))
        else:
            x = self.downsample_norm(self.downsample(x))
        for block in self.layers:
            x = block(x)
        return x


class DINOv3ConvNext(nnx.Module):
    def __init__(self, config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        if config.num_channels != 3:
            raise ValueError(f"dinov3_convnext num_channels={config.num_channels}: fxjax takes RGB input (3 channels)")
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.stages = nnx.List([Stage(config, i, **kw) for i in range(len(config.hidden_sizes))])
        self.layer_norm = two_pass_layer_norm(config.hidden_sizes[-1], config.layer_norm_eps, **kw)

    def stage_paths(self) -> list[tuple[str, ...]]:
        """Module-path prefixes of each stage, input to output: each stage, then the final LayerNorm."""
        return [(f"stages.{i}",) for i in range(len(self.stages))] + [("layer_norm",)]

    def __call__(self, x: jax.Array) -> dict:
        """x: [n, h, w, 3] normalised → pooled features, normed last-stage tokens, each stage's output."""
        hidden = [x]
        for stage in self.stages:
            x = stage(x)
            hidden.append(x)
        n, h, w, c = x.shape
        tokens = x.reshape(n, h * w, c)
        return {
            "pooled": self.layer_norm(jnp.mean(tokens, axis=1)),
            "patch_tokens": self.layer_norm(tokens),
            "feature_map": x,
            "hidden_states": tuple(hidden),
        }


def build(config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs) -> DINOv3ConvNext:
    return DINOv3ConvNext(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def conversion_rules(config) -> list[Rule]:
    """HF `DINOv3ConvNextModel` names → module paths. Saved checkpoints name the stages `stages.N` (transformers
    renames them to its module's `model.stages.N` on load, and back on save); both are read."""
    stage = r"(?:model\.)?stages\.(\d+)"
    layer = rf"{stage}\.layers\.(\d+)"
    return [
        # downsample_layers: [conv, norm] in stage 0, [norm, conv] in the others (stage 0's rules come first).
        Rule(r"(?:model\.)?stages\.0\.downsample_layers\.0\.weight", "stages.0.downsample.kernel", "conv"),
        Rule(r"(?:model\.)?stages\.0\.downsample_layers\.0\.bias", "stages.0.downsample.bias"),
        Rule(r"(?:model\.)?stages\.0\.downsample_layers\.1\.weight", "stages.0.downsample_norm.scale"),
        Rule(r"(?:model\.)?stages\.0\.downsample_layers\.1\.bias", "stages.0.downsample_norm.bias"),
        Rule(rf"{stage}\.downsample_layers\.0\.weight", r"stages.\1.downsample_norm.scale"),
        Rule(rf"{stage}\.downsample_layers\.0\.bias", r"stages.\1.downsample_norm.bias"),
        Rule(rf"{stage}\.downsample_layers\.1\.weight", r"stages.\1.downsample.kernel", "conv"),
        Rule(rf"{stage}\.downsample_layers\.1\.bias", r"stages.\1.downsample.bias"),
        Rule(rf"{layer}\.gamma", r"stages.\1.layers.\2.layer_scale"),
        Rule(rf"{layer}\.depthwise_conv\.weight", r"stages.\1.layers.\2.dwconv.kernel", "conv"),
        Rule(rf"{layer}\.depthwise_conv\.bias", r"stages.\1.layers.\2.dwconv.bias"),
        Rule(rf"{layer}\.layer_norm\.weight", r"stages.\1.layers.\2.layernorm.scale"),
        Rule(rf"{layer}\.layer_norm\.bias", r"stages.\1.layers.\2.layernorm.bias"),
        Rule(rf"{layer}\.pointwise_conv([12])\.weight", r"stages.\1.layers.\2.pwconv\3.kernel", "dense"),
        Rule(rf"{layer}\.pointwise_conv([12])\.bias", r"stages.\1.layers.\2.pwconv\3.bias"),
        Rule(r"layer_norm\.weight", "layer_norm.scale"),
        Rule(r"layer_norm\.bias", "layer_norm.bias"),
    ]
