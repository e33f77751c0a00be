"""SigLIP2's vision tower (`siglip2_vision_model`, and the `vision_model.*` half of a full `siglip2` checkpoint).

SigLIP2 (NaFlex) takes images patchified as transformers' processor gives them: `pixel_values` [n, max_patches,
p*p*3] (each patch row-major, channels last), `pixel_attention_mask` [n, max_patches] (1: a patch, 0: padding)
and `spatial_shapes` [n, 2] (each image's patch grid, rows x columns; its patches come first, row-major). The
square grid of learned position embeddings is resized per image to its own grid (bilinear, antialiased), padded
patches are masked out of every attention and of the attention-pooling head (`pooled`, as SigLIP's).

The Backbone API hands dense batches [n, h, w, 3] of one size: `__call__(x)` patchifies them (every patch valid).
`naflex_inputs` batches images of different sizes (the `resize_mode="naflex"` preprocessing) into NaFlex inputs.
`block_cls` holds each block's mean over the valid patches; `patch_tokens` keeps every position, padding too.
Other outputs: see `transformer`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fxjax.backbones.convert import Rule
from fxjax.backbones.hf_names import attention_pool_rules, tower_rules, vision_config, vision_prefix
from fxjax.backbones.layers import dot_general
from fxjax.backbones.transformer import PooledVisionTransformer, TransformerSpec, linear_rules


def spec(config) -> TransformerSpec:
    """The checkpoint's position grid is square: num_patches = grid²; image_size stands for grid * patch."""
    config = vision_config(config)
    grid = math.isqrt(config.num_patches)
    if grid * grid != config.num_patches:
        raise ValueError(f"siglip2 num_patches={config.num_patches} is not a square grid of position embeddings")
    return TransformerSpec(
        dim=config.hidden_size,
        depth=config.num_hidden_layers,
        heads=config.num_attention_heads,
        mlp_dim=config.intermediate_size,
        image_size=grid * config.patch_size,
        patch_size=config.patch_size,
        act=config.hidden_act,
        eps=config.layer_norm_eps,
        cls_token=False,
        batch_dims=False,
    )


def patchify(images, patch: int):
    """[n, h, w, c] → [n, (h/p)*(w/p), p*p*c] in the processor's order: patches row-major, each patch's pixels
    row-major with channels last (numpy in, numpy out; jax in, jax out)."""
    n, h, w, c = images.shape
    if h % patch or w % patch:
        raise ValueError(f"image size {h}x{w} is not divisible by the patch size {patch}")
    grid = (h // patch, w // patch)
    x = images.reshape(n, grid[0], patch, grid[1], patch, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, grid[0] * grid[1], patch * patch * c)


def naflex_inputs(
    images: Sequence[np.ndarray], patch: int, max_patches: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Preprocessed images [h_i, w_i, 3] (sides multiples of `patch`, at most `max_patches` patches each; any
    sizes) → (pixel_values [n, max_patches, p*p*3] float32, pixel_attention_mask [n, max_patches] int32,
    spatial_shapes [n, 2] int64), as transformers' Siglip2 image processor returns them: padding is zeros."""
    n = len(images)
    pixels = np.zeros((n, max_patches, patch * patch * 3), np.float32)
    mask = np.zeros((n, max_patches), np.int32)
    shapes = np.zeros((n, 2), np.int64)
    for i, image in enumerate(images):
        rows = patchify(np.asarray(image, np.float32)[None], patch)[0]
        if len(rows) > max_patches:
            raise ValueError(
                f"image {i} of size {image.shape[0]}x{image.shape[1]} has {len(rows)} patches of {patch} px, "
                f"more than max_patches={max_patches}; preprocess it with resize_mode='naflex'"
            )
        pixels[i, : len(rows)], mask[i, : len(rows)] = rows, 1
        shapes[i] = (image.shape[0] // patch, image.shape[1] // patch)
    return pixels, mask, shapes


def resize_positions(table: jax.Array, spatial_shapes: jax.Array, length: int) -> jax.Array:
    """Position embeddings [g*g, d] (a row-major square grid) → [n, length, d]: for each image, the grid resized
    to its `spatial_shapes` (rows, columns) as `F.interpolate(mode="bilinear", antialias=True,
    align_corners=False)`, row-major, padding positions given the first one's (transformers'
    `Siglip2VisionEmbeddings.resize_positional_embeddings`, which builds the same separable weights; float32)."""
    grid = math.isqrt(table.shape[0])
    sizes = spatial_shapes.astype(jnp.float32)[:, None]  # [n, 1, 2]
    positions = jnp.arange(length, dtype=jnp.float32)[None, :, None]  # [1, length, 1]
    rows = jnp.floor(positions / sizes[..., 1:])
    index = jnp.concatenate([rows, positions - rows * sizes[..., 1:]], axis=-1)  # [n, length, 2]: row, column
    index = index * (positions < sizes.prod(-1, keepdims=True))
    scale = grid / sizes  # [n, 1, 2]
    support = jnp.maximum(scale, 1.0)
    center = (index + 0.5) * scale - 0.5
    source = jnp.arange(grid, dtype=jnp.float32)
    weights = jnp.maximum(1 - jnp.abs(source - center[..., None]) / support[..., None], 0)  # [n, length, 2, g]
    weights = weights / weights.sum(-1, keepdims=True)
    weights = (weights[..., 0, :, None] * weights[..., 1, None, :]).reshape(*weights.shape[:2], grid * grid)
    out = jnp.matmul(weights, table.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return out.astype(table.dtype)


class NaflexEmbeddings(nnx.Module):
    """Patchified pixels → a linear patch embedding plus the position grid resized to each image's patch grid."""

    def __init__(self, spec: TransformerSpec, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        self.patch_embed = nnx.Linear(
            spec.patch_size**2 * 3, spec.dim, dtype=dtype, param_dtype=param_dtype, dot_general=dot_general, rngs=rngs
        )
        init = nnx.initializers.normal(0.02)
        self.position = nnx.Param(init(rngs.params(), (spec.grid**2, spec.dim), param_dtype))

    def __call__(self, pixel_values: jax.Array, spatial_shapes: jax.Array) -> jax.Array:
        positions = resize_positions(self.position[...], spatial_shapes, pixel_values.shape[1])
        return self.patch_embed(pixel_values.astype(self.dtype)) + positions.astype(self.dtype)


class Siglip2Vision(PooledVisionTransformer):
    def make_embeddings(self, spec: TransformerSpec, **kw) -> nnx.Module:
        return NaflexEmbeddings(spec, **kw)

    def __call__(
        self,
        x: jax.Array,
        pixel_attention_mask: jax.Array | None = None,
        spatial_shapes: jax.Array | None = None,
    ) -> dict:
        """Dense images x [n, h, w, 3] (normalised; sides multiples of the patch size), or NaFlex inputs as
        transformers takes them: x = pixel_values [n, max_patches, p*p*3], with the mask and spatial shapes."""
        if pixel_attention_mask is None:
            n, h, w, _ = x.shape
            p = self.spec.patch_size
            x = patchify(x, p)
            pixel_attention_mask = jnp.ones(x.shape[:2], jnp.int32)
            spatial_shapes = jnp.broadcast_to(jnp.asarray([h // p, w // p], jnp.int32), (n, 2))
        mask = pixel_attention_mask.astype(bool)
        h = self.embeddings(x, spatial_shapes)
        hidden = [h]
        for block in self.blocks:
            h = block(h, mask=mask)
            hidden.append(h)
        normed = self.norm(h)
        weights = (mask / mask.sum(axis=1, keepdims=True))[:, :, None].astype(normed.dtype)  # mean of valid patches
        pooled = self.head(normed, mask) if self.head is not None else jnp.sum(normed * weights, axis=1)
        cls = jnp.stack([jnp.sum(y * weights.astype(y.dtype), axis=1) for y in hidden[1:]], axis=1)
        return {
            "pooled": pooled,
            "last_hidden_state": normed,
            "patch_tokens": normed,
            "hidden_states": tuple(hidden),
            "block_cls": cls,
            "block_cls_normed": self.final_norm(cls),
        }


def build(config, *, dtype, param_dtype, rngs: nnx.Rngs) -> Siglip2Vision:
    return Siglip2Vision(
        spec(config), vision_config(config).vision_use_head, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )


def conversion_rules(config) -> list[Rule]:
    full, prefix = vision_prefix(config, "siglip2")
    rules = [
        # a linear layer on patchified pixels (before tower_rules, whose patch rule is the convolution's)
        *linear_rules(rf"{prefix}embeddings\.patch_embedding", "embeddings.patch_embed"),
        *tower_rules(prefix),
        *attention_pool_rules(rf"{prefix}head", "head"),
    ]
    return rules + ([Rule(r"(?:text_model\..*|logit_scale|logit_bias)", None)] if full else [])
