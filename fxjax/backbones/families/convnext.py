"""ConvNeXt in Flax NNX, in Hugging Face `ConvNextModel` naming (facebook/convnext-*).

Held as embeddings (patchify conv + LayerNorm) → stages (optional LayerNorm + 2x2 downsampling conv, then
blocks) → final LayerNorm on the pooled features, so that freezing is counted in stages. Drop-path is the
identity at inference and is left out. Options beyond the transformers config, for timm's checkpoints: global
response normalisation in the MLP (ConvNeXt-V2), one eps for every LayerNorm, and an MLP pre-logits head
(timm's `head_hidden_size`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from fxjax.backbones.convert import Rule
from fxjax.backbones.layers import INNER_NORM_EPS, ConvNextBlock, dot_general, two_pass_layer_norm


class Stage(nnx.Module):
    def __init__(
        self,
        cin: int,
        cout: int,
        stride: int,
        depth: int,
        config,
        *,
        grn: bool = False,
        norm_eps: float = INNER_NORM_EPS,
        dtype,
        param_dtype,
        rngs: nnx.Rngs,
    ):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        downsamples = cin != cout or stride > 1
        self.downsample_norm = two_pass_layer_norm(cin, norm_eps, **kw) if downsamples else None
        self.downsample = (
            nnx.Conv(cin, cout, (stride, stride), strides=stride, padding="VALID", **kw) if downsamples else None
        )
        self.layers = nnx.List([ConvNextBlock(cout, config, grn=grn, norm_eps=norm_eps, **kw) for _ in range(depth)])

    def __call__(self, x):  # [n, h, w, cin] → [n, h / stride, w / stride, cout]
        if self.downsample is not None:
            x = self.downsample(self.downsample_norm(x))
        for block in self.layers:
            x = block(x)
        return x


class ConvNext(nnx.Module):
    """Outputs `pooled` [n, hidden_sizes[-1]] (HF `pooler_output`: global average of the last stage, then the
    final LayerNorm), `feature_map` (last stage) and `hidden_states` (embeddings, then each stage: HF's).

    `grn` adds ConvNeXt-V2's global response norm to every block; `norm_eps` is the eps of every LayerNorm but
    the final one (`config.layer_norm_eps`); `head_hidden` > 0 appends timm's pre-logits Linear + GELU of that
    width to `pooled`."""

    def __init__(
        self,
        config,
        *,
        grn: bool = False,
        norm_eps: float = INNER_NORM_EPS,
        head_hidden: int = 0,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        patch, width = config.patch_size, config.hidden_sizes[0]
        self.patch_embeddings = nnx.Conv(
            config.num_channels, width, (patch, patch), strides=patch, padding="VALID", **kw
        )
        self.embeddings_norm = two_pass_layer_norm(width, norm_eps, **kw)
        stages, cin = [], width
        for i in range(config.num_stages):
            cout = config.hidden_sizes[i]
            stages.append(
                Stage(cin, cout, 2 if i > 0 else 1, config.depths[i], config, grn=grn, norm_eps=norm_eps, **kw)
            )
            cin = cout
        self.stages = nnx.List(stages)
        self.layernorm = two_pass_layer_norm(cin, config.layer_norm_eps, **kw)
        self.head_fc = nnx.Linear(cin, head_hidden, dot_general=dot_general, **kw) if head_hidden else None

    def stage_paths(self) -> list[tuple[str, ...]]:
        """Module-path prefixes of each stage, input to output: embeddings, each stage, the final norm."""
        stages = [(f"stages.{i}",) for i in range(len(self.stages))]
        head = ("layernorm",) if self.head_fc is None else ("layernorm", "head_fc")
        return [("patch_embeddings", "embeddings_norm"), *stages, head]

    def __call__(self, x) -> dict:
        """x: [n, h, w, c] normalised → pooled features, the final feature map and each stage's output."""
        x = self.embeddings_norm(self.patch_embeddings(x))  # [n, h / patch, w / patch, width]
        hidden = [x]
        for stage in self.stages:
            x = stage(x)
            hidden.append(x)
        pooled = self.layernorm(jnp.mean(x, axis=(1, 2)))
        if self.head_fc is not None:
            pooled = jax.nn.gelu(self.head_fc(pooled), approximate=False)
        return {"pooled": pooled, "feature_map": x, "hidden_states": tuple(hidden)}


def build(config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs) -> ConvNext:
    """The module for a transformers `ConvNextConfig`."""
    return ConvNext(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def conversion_rules(config) -> list[Rule]:
    """HF names (`ConvNextModel`, or `ConvNextForImageClassification` under `convnext.`) → module paths."""
    p = r"(?:convnext\.)?"
    norm = {"weight": "scale", "bias": "bias"}
    layer = rf"{p}encoder\.stages\.(\d+)\.layers\.(\d+)"
    down = rf"{p}encoder\.stages\.(\d+)\.downsampling_layer"
    rules = [Rule(r"classifier\..*", None)]  # ImageNet classifier unused
    rules += [
        Rule(rf"{p}embeddings\.patch_embeddings\.weight", "patch_embeddings.kernel", "conv"),
        Rule(rf"{p}embeddings\.patch_embeddings\.bias", "patch_embeddings.bias"),
        Rule(rf"{down}\.1\.weight", r"stages.\1.downsample.kernel", "conv"),
        Rule(rf"{down}\.1\.bias", r"stages.\1.downsample.bias"),
        Rule(rf"{layer}\.dwconv\.weight", r"stages.\1.layers.\2.dwconv.kernel", "conv"),
        Rule(rf"{layer}\.dwconv\.bias", r"stages.\1.layers.\2.dwconv.bias"),
        Rule(rf"{layer}\.(pwconv[12])\.weight", r"stages.\1.layers.\2.\3.kernel", "dense"),
        Rule(rf"{layer}\.(pwconv[12])\.bias", r"stages.\1.layers.\2.\3.bias"),
        Rule(rf"{layer}\.layer_scale_parameter", r"stages.\1.layers.\2.layer_scale"),
    ]
    for theirs, ours in (
        (rf"{p}embeddings\.layernorm", "embeddings_norm"),
        (rf"{p}layernorm", "layernorm"),
        (rf"{down}\.0", r"stages.\1.downsample_norm"),
        (rf"{layer}\.layernorm", r"stages.\1.layers.\2.layernorm"),
    ):
        rules += [Rule(rf"{theirs}\.{k}", f"{ours}.{v}") for k, v in norm.items()]
    return rules
