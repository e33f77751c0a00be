"""ConvNeXt in Flax NNX, in Hugging Face `ConvNextModel` naming (facebook/convnext-*).

Held as embeddings (patchify conv + LayerNorm) → stages (optional LayerNorm + 2x2 downsampling conv, then
blocks) → final LayerNorm on the pooled features, so that freezing is counted in stages. Drop-path is the
identity at inference and is left out. `ConvNextSpec` holds the architecture: `spec` reads a
transformers config into it, timm's builder (`checkpoints.timm_cnn`) fills the options transformers lacks:
global response normalisation in the MLP (ConvNeXt-V2), one eps for every LayerNorm, and an MLP pre-logits
head (timm's `head_hidden_size`). `naming_rules` maps either layout's tensor names onto the module.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from fxjax.backbones.convert import Rule
from fxjax.backbones.layers import ConvNextBlock, dot_general, two_pass_layer_norm

# HF ConvNeXt fixes this eps for every LayerNorm but the final one (config.layer_norm_eps).
INNER_NORM_EPS = 1e-6


@dataclass(frozen=True)
class ConvNextSpec:
    """The architecture. `layer_scale`: initial value of each block's scale, None for none; `norm_eps`: eps of
    every LayerNorm but the final one (`final_norm_eps`); `grn`: ConvNeXt-V2's global response norm in every
    block; `head_hidden` > 0: timm's pre-logits Linear + GELU of that width after the final norm."""

    hidden_sizes: tuple[int, ...]
    depths: tuple[int, ...]
    num_channels: int = 3
    patch_size: int = 4
    act: str = "gelu"
    layer_scale: float | None = 1e-6
    norm_eps: float = INNER_NORM_EPS
    final_norm_eps: float = 1e-12
    grn: bool = False
    head_hidden: int = 0


def spec(config) -> ConvNextSpec:
    """The spec of a transformers `ConvNextConfig` (its `layer_scale_init_value <= 0` means no layer scale)."""
    stages = config.num_stages
    return ConvNextSpec(
        hidden_sizes=tuple(config.hidden_sizes[:stages]),
        depths=tuple(config.depths[:stages]),
        num_channels=config.num_channels,
        patch_size=config.patch_size,
        act=config.hidden_act,
        layer_scale=config.layer_scale_init_value if config.layer_scale_init_value > 0 else None,
        final_norm_eps=config.layer_norm_eps,
    )


class Stage(nnx.Module):
    def __init__(self, cin: int, cout: int, stride: int, depth: int, spec: ConvNextSpec, *, dtype, param_dtype, rngs):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        downsamples = cin != cout or stride > 1
        self.downsample_norm = two_pass_layer_norm(cin, spec.norm_eps, **kw) if downsamples else None
        self.downsample = (
            nnx.Conv(cin, cout, (stride, stride), strides=stride, padding="VALID", **kw) if downsamples else None
        )
        block = {"act": spec.act, "layer_scale": spec.layer_scale, "norm_eps": spec.norm_eps, "grn": spec.grn}
        self.layers = nnx.List([ConvNextBlock(cout, **block, **kw) for _ in range(depth)])

    def __call__(self, x):  # [n, h, w, cin] → [n, h / stride, w / stride, cout]
        if self.downsample is not None:
            x = self.downsample(self.downsample_norm(x))
        for block in self.layers:
            x = block(x)
        return x


class ConvNext(nnx.Module):
    """Outputs `pooled` [n, hidden_sizes[-1]] (HF `pooler_output`: global average of the last stage, then the
    final LayerNorm, then timm's pre-logits head if the spec has one), `feature_map` (last stage) and
    `hidden_states` (embeddings, then each stage: HF's)."""

    def __init__(self, spec: ConvNextSpec, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        patch, width = spec.patch_size, spec.hidden_sizes[0]
        self.patch_embeddings = nnx.Conv(spec.num_channels, width, (patch, patch), strides=patch, padding="VALID", **kw)
        self.embeddings_norm = two_pass_layer_norm(width, spec.norm_eps, **kw)
        stages, cin = [], width
        for i, (cout, depth) in enumerate(zip(spec.hidden_sizes, spec.depths)):
            stages.append(Stage(cin, cout, 2 if i > 0 else 1, depth, spec, **kw))
            cin = cout
        self.stages = nnx.List(stages)
        self.layernorm = two_pass_layer_norm(cin, spec.final_norm_eps, **kw)
        head = spec.head_hidden
        self.head_fc = nnx.Linear(cin, head, dot_general=dot_general, **kw) if head else None

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
    return ConvNext(spec(config), dtype=dtype, param_dtype=param_dtype, rngs=rngs)


@dataclass(frozen=True)
class ConvNextNames:
    """Where a checkpoint layout keeps each ConvNeXt tensor: regexes of module names (no `.weight` / `.bias`),
    stage-level ones with the stage index as group 1, `block` with (stage, block) as groups 1 and 2 and the
    in-block names relative to it. `unused`: tensors dropped (the ImageNet classifier); None: no such tensor."""

    stem_conv: str
    stem_norm: str
    downsample_norm: str
    downsample_conv: str
    block: str
    dwconv: str
    norm: str
    pwconv1: str
    pwconv2: str
    layer_scale: str  # the parameter's full name, relative to the block
    final_norm: str
    unused: str
    grn: str | None = None
    head_fc: str | None = None


_P = r"(?:convnext\.)?"  # `ConvNextForImageClassification` nests the model under `convnext.`
HF_NAMES = ConvNextNames(
    stem_conv=rf"{_P}embeddings\.patch_embeddings",
    stem_norm=rf"{_P}embeddings\.layernorm",
    downsample_norm=rf"{_P}encoder\.stages\.(\d+)\.downsampling_layer\.0",
    downsample_conv=rf"{_P}encoder\.stages\.(\d+)\.downsampling_layer\.1",
    block=rf"{_P}encoder\.stages\.(\d+)\.layers\.(\d+)",
    dwconv="dwconv",
    norm="layernorm",
    pwconv1="pwconv1",
    pwconv2="pwconv2",
    layer_scale="layer_scale_parameter",
    final_norm=rf"{_P}layernorm",
    unused=r"classifier\..*",
)


def naming_rules(names: ConvNextNames, *, mlp: str = "dense") -> list[Rule]:
    """A layout's names (`names`) → module paths. `mlp`: the transform of the MLP kernels ("dense" for
    Linear layers, "conv1x1_dense" for 1x1 convolutions)."""
    block, ours = names.block, r"stages.\1.layers.\2"
    weighted = [
        (names.stem_conv, "patch_embeddings", "conv"),
        (names.downsample_conv, r"stages.\1.downsample", "conv"),
        (rf"{block}\.{names.dwconv}", f"{ours}.dwconv", "conv"),
        (rf"{block}\.{names.pwconv1}", f"{ours}.pwconv1", mlp),
        (rf"{block}\.{names.pwconv2}", f"{ours}.pwconv2", mlp),
    ]
    norms = [
        (names.stem_norm, "embeddings_norm"),
        (names.downsample_norm, r"stages.\1.downsample_norm"),
        (rf"{block}\.{names.norm}", f"{ours}.layernorm"),
        (names.final_norm, "layernorm"),
    ]
    if names.head_fc is not None:
        weighted.append((names.head_fc, "head_fc", "dense"))
    if names.grn is not None:
        norms.append((rf"{block}\.{names.grn}", f"{ours}.grn"))
    rules = [Rule(names.unused, None), Rule(rf"{block}\.{names.layer_scale}", f"{ours}.layer_scale")]
    for theirs, target, transform in weighted:
        rules += [Rule(rf"{theirs}\.weight", f"{target}.kernel", transform), Rule(rf"{theirs}\.bias", f"{target}.bias")]
    for theirs, target in norms:
        rules += [Rule(rf"{theirs}\.weight", f"{target}.scale"), Rule(rf"{theirs}\.bias", f"{target}.bias")]
    return rules


def conversion_rules(config) -> list[Rule]:
    """HF names (`ConvNextModel`, or `ConvNextForImageClassification` under `convnext.`) → module paths."""
    return naming_rules(HF_NAMES)
