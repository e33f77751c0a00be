"""DINOv3 ViT (`dinov3_vit`, transformers' `DINOv3ViTModel`): a ViT with no learned position embeddings but 2D
rotary ones (RoPE) on the patch tokens' queries and keys, register tokens after CLS, LayerScale, separate
query / key / value biases (the key has none by default) and a plain or gated (SwiGLU) MLP.

Pooled features are HF's `pooler_output`: the final-layernorm CLS token. RoPE tables are numpy constants for
the input's patch grid (patch centres on [-1, 1], so any input size works, as in the reference); the
reference's coordinate shift / jitter / rescale are training-time augmentations, off at evaluation, and left
out. Its RoPE is not EVA-02's (`families.eva`): rotate-half layout instead of interleaved pairs, on normalised
instead of index coordinates, so the two share no code. Other outputs: see `transformer`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fxjax.backbones.activations import activation
from fxjax.backbones.convert import Rule
from fxjax.backbones.layers import dot_general
from fxjax.backbones.transformer import (
    Block,
    TransformerSpec,
    VisionTransformer,
    attention,
    linear_rules,
    norm_rules,
    patch_rules,
)


def _square(value, key: str) -> int:
    """A config's int-or-pair size → int; a non-square pair is an error (fxjax's patch grid is square)."""
    if isinstance(value, Iterable):
        values = list(value)
        if len(set(values)) != 1:
            raise ValueError(f"dinov3_vit {key}={values!r} is not square; fxjax supports square sizes only")
        return int(values[0])
    return int(value)


@dataclass(frozen=True)
class Biases:
    """Which projections have a bias (transformers' `query_bias`, ..., `mlp_bias`)."""

    query: bool = True
    key: bool = False
    value: bool = True
    out: bool = True
    mlp: bool = True

    @classmethod
    def from_hf(cls, config) -> Biases:
        return cls(config.query_bias, config.key_bias, config.value_bias, config.proj_bias, config.mlp_bias)


def spec(config) -> TransformerSpec:
    if config.num_channels != 3:
        raise ValueError(f"dinov3_vit num_channels={config.num_channels}: fxjax takes RGB input (3 channels)")
    return TransformerSpec.from_hf(
        config,
        image_size=_square(config.image_size, "image_size"),
        patch_size=_square(config.patch_size, "patch_size"),
        layer_scale=config.layerscale_value,
        register_tokens=config.num_register_tokens,
        gated_mlp=config.use_gated_mlp,
        position_embeddings=False,
    )


def rope_tables(head_dim: int, theta: float, grid: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """transformers' `DINOv3ViTRopePositionEmbedding` at evaluation → (sin, cos), each [gh*gw, head_dim]:
    patch centres on [-1, 1] (row, column), head_dim/4 inverse frequencies theta^(-4i / head_dim) per axis,
    angles 2π·coord·freq laid out [rows' | columns'] and tiled twice (the rotate-half layout)."""
    freqs = (1 / theta ** np.arange(0, 1, 4 / head_dim, dtype=np.float32)).astype(np.float32)  # [head_dim / 4]
    axes = [2.0 * (np.arange(0.5, g, dtype=np.float32) / np.float32(g)) - 1.0 for g in grid]
    coords = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 2)  # [gh*gw, 2]
    angles = (np.float32(2 * math.pi) * coords[:, :, None] * freqs).reshape(coords.shape[0], -1)
    angles = np.tile(angles, 2)  # [gh*gw, head_dim]
    return np.sin(angles), np.cos(angles)


def apply_rope(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
    """x: [n, patches, heads, head_dim]; x·cos + rotate_half(x)·sin, rotate_half(x) = [-x2, x1]."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x * cos[None, :, None] + rotated * sin[None, :, None]


class RopeAttention(nnx.Module):
    """Multi-head self-attention with a bias switch per projection and RoPE on the patch tokens (the prefix
    tokens, CLS and registers, are not rotated)."""

    def __init__(self, biases: Biases, spec: TransformerSpec, *, dtype, param_dtype, rngs: nnx.Rngs):
        linear = partial(nnx.Linear, dtype=dtype, param_dtype=param_dtype, dot_general=dot_general, rngs=rngs)
        d = spec.dim
        self.heads, self.prefix, self.dtype = spec.heads, spec.prefix_tokens, dtype
        self.query = linear(d, d, use_bias=biases.query)
        self.key = linear(d, d, use_bias=biases.key)
        self.value = linear(d, d, use_bias=biases.value)
        self.out = linear(d, d, use_bias=biases.out)

    def __call__(self, x: jax.Array, rope: tuple[np.ndarray, np.ndarray]) -> jax.Array:  # [n, t, d]
        n, t, d = x.shape
        q, k, v = (f(x).reshape(n, t, self.heads, d // self.heads) for f in (self.query, self.key, self.value))
        sin, cos = (jnp.asarray(r, self.dtype) for r in rope)
        m = self.prefix
        q = jnp.concatenate([q[:, :m], apply_rope(q[:, m:], sin, cos)], axis=1)
        k = jnp.concatenate([k[:, :m], apply_rope(k[:, m:], sin, cos)], axis=1)
        return self.out(attention(q, k, v).reshape(n, t, d))


class Mlp(nnx.Module):
    """down(act(up(x))), or gated: down(act(gate(x)) * up(x)); biases per `mlp_bias`."""

    def __init__(self, biases: Biases, spec: TransformerSpec, *, dtype, param_dtype, rngs: nnx.Rngs):
        linear = partial(
            nnx.Linear, use_bias=biases.mlp, dtype=dtype, param_dtype=param_dtype, dot_general=dot_general, rngs=rngs
        )
        self.act = activation(spec.act)
        self.gate = linear(spec.dim, spec.mlp_dim) if spec.gated_mlp else None
        self.up = linear(spec.dim, spec.mlp_dim)
        self.down = linear(spec.mlp_dim, spec.dim)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.up(x)
        return self.down(self.act(h) if self.gate is None else self.act(self.gate(x)) * h)


class DINOv3ViT(VisionTransformer):
    def __init__(self, config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.biases = Biases.from_hf(config)  # before the trunk builds the blocks (make_block reads it)
        self.rope_theta = float(config.rope_theta)
        super().__init__(spec(config), dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def make_block(self, spec: TransformerSpec, **kw) -> Block:
        # the trunk block (its layer scale is always kept) around DINOv3's rotary attention and MLP
        return Block(spec, attn=RopeAttention(self.biases, spec, **kw), mlp=Mlp(self.biases, spec, **kw), **kw)

    def block_inputs(self, x: jax.Array) -> dict:
        p = self.spec.patch_size
        head_dim = self.spec.dim // self.spec.heads
        return {"rope": rope_tables(head_dim, self.rope_theta, (x.shape[1] // p, x.shape[2] // p))}


def build(config, *, dtype, param_dtype, rngs: nnx.Rngs) -> DINOv3ViT:
    return DINOv3ViT(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def conversion_rules(config) -> list[Rule]:
    """HF `DINOv3ViTModel` names → ours (the RoPE frequencies are a non-persistent buffer, not saved). Saved
    checkpoints name the blocks `layer.N` (transformers renames them to its module's `model.layer.N` on load, and
    back on save); both are read."""
    layer = r"(?:model\.)?layer\.(\d+)"
    registers = "embeddings.register_tokens" if config.num_register_tokens else None  # else saved as [1, 0, d]
    return [
        Rule(r"embeddings\.cls_token", "embeddings.cls_token"),
        Rule(r"embeddings\.register_tokens", registers),
        Rule(r"embeddings\.mask_token", None),  # masked-image-modelling input, unused here
        *patch_rules(r"embeddings\.patch_embeddings"),
        *norm_rules(rf"{layer}\.(norm1|norm2)", r"blocks.\1.\2"),
        *linear_rules(rf"{layer}\.attention\.q_proj", r"blocks.\1.attn.query"),
        *linear_rules(rf"{layer}\.attention\.k_proj", r"blocks.\1.attn.key"),
        *linear_rules(rf"{layer}\.attention\.v_proj", r"blocks.\1.attn.value"),
        *linear_rules(rf"{layer}\.attention\.o_proj", r"blocks.\1.attn.out"),
        *linear_rules(rf"{layer}\.mlp\.(gate|up|down)_proj", r"blocks.\1.mlp.\2"),
        Rule(rf"{layer}\.layer_scale([12])\.lambda1", r"blocks.\1.ls\2"),
        *norm_rules(r"norm", "norm"),
    ]
