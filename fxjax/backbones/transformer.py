"""Vision-transformer pieces shared by the ViT, DeiT, DINOv2, DINOv3, CLIP, SigLIP, SigLIP2 and BLIP families.

`VisionTransformer` is the common trunk (patch embedding → prefix tokens + position embeddings → pre-LN blocks
→ final norm); a family subclasses it for what its checkpoints differ in: token layout, pooling head, names.
Parameters keep the checkpoint's shapes (e.g. CLIP's class embedding is [d], ViT's [1, 1, d]) so that every
conversion rule stays a plain rename or transpose.

Outputs of `VisionTransformer.__call__` (every family):
  pooled             [n, d']          the family's pooled features (see each family's module docstring)
  last_hidden_state  [n, tokens, d]   as the reference's `last_hidden_state`
  hidden_states      tuple of [n, tokens, d]: embeddings output, then each block's output (pre-final-norm),
                                      as the reference's `output_hidden_states=True`
  patch_tokens       [n, patches, d]  final-normed patch tokens (prefix tokens removed)
  block_cls          [n, layers, d]   CLS token of each block's output, pre-final-norm (a model with no CLS
                                      token — SigLIP — gives each block's mean patch token instead)
  block_cls_normed   [n, layers, d]   the same through the final norm, as DINOv2's linear evaluation takes
                                      them (`get_intermediate_layers(norm=True)`)
Take "CLS of the last N blocks" as `block_cls[:, -N:]` (or `block_cls_normed[:, -N:]`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fxjax.backbones.activations import activation
from fxjax.backbones.convert import Rule
from fxjax.backbones.layers import dot_general, matmul


@dataclass(frozen=True)
class TransformerSpec:
    """The architecture, read from a transformers config by each family's `spec(config)`."""

    dim: int
    depth: int
    heads: int
    mlp_dim: int
    image_size: int
    patch_size: int
    act: str = "gelu"
    eps: float = 1e-12
    qkv_bias: bool = True
    fused_qkv: bool = False  # one [d, 3d] projection (BLIP) instead of separate query / key / value
    gated_mlp: bool = False  # SwiGLU (DINOv2 giant): fc1 gives [gate, up], silu(gate) * up
    layer_scale: float | None = None  # DINOv2's per-channel residual scale (initial value)
    cls_token: bool = True
    dist_token: bool = False  # DeiT's distillation token, after the CLS token
    register_tokens: int = 0  # DINOv2-with-registers' extra tokens after CLS, with no position embedding
    antialias_positions: bool = False  # resize positions as PyTorch's `antialias=True` (DINOv2 with registers)
    # DINOv2's original code resizes positions by the scale factor (grid + offset) / grid_in, offset 0.1 (its
    # "avoid floating point error" kludge), which PyTorch uses as given: taps sit slightly off the size ratio's.
    position_offset: float = 0.0
    patch_bias: bool = True
    pre_norm: bool = False  # CLIP normalises the embeddings before the first block
    batch_dims: bool = True  # tokens stored [1, 1, d] / positions [1, t, d] (else [d] / [t, d], nn.Embedding)
    # Prefix tokens that have a position embedding, counted from the first; None: the class tokens. timm's
    # `no_embed_class` models have 0; its register models without it have all (class tokens and registers).
    positioned_prefix: int | None = None
    final_norm: bool = True  # False: no norm after the blocks (timm's `fc_norm` models norm after pooling)
    position_embeddings: bool = True  # False: no learned positions (DINOv3 puts RoPE in its blocks instead)

    @classmethod
    def from_hf(cls, config, **overrides) -> TransformerSpec:
        """The fields every transformers vision config spells the same way; a family adds its own."""
        fields = dict(
            dim=config.hidden_size,
            depth=config.num_hidden_layers,
            heads=config.num_attention_heads,
            mlp_dim=getattr(config, "intermediate_size", None),
            act=config.hidden_act,
            eps=config.layer_norm_eps,
        )
        for key in ("image_size", "patch_size"):  # text configs have neither: their towers pass them
            if key not in overrides:
                fields[key] = getattr(config, key)
        return cls(**{**fields, **overrides})

    @property
    def class_tokens(self) -> int:
        """Prefix tokens that have a position embedding (CLS, distillation)."""
        return int(self.cls_token) + int(self.dist_token)

    @property
    def prefix_tokens(self) -> int:
        """Tokens before the patch tokens: class tokens, then registers."""
        return self.class_tokens + self.register_tokens

    @property
    def position_prefix(self) -> int:
        """Prefix tokens with a position embedding (the first ones); the others get none."""
        return self.class_tokens if self.positioned_prefix is None else self.positioned_prefix

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


def bicubic_matrix(size_in: int, size_out: int, antialias: bool = False, offset: float = 0.0) -> np.ndarray:
    """[size_out, size_in] weights of PyTorch's `F.interpolate(mode="bicubic", align_corners=False)` along one
    axis (Keys kernel, a=-0.75, border-clamped taps, no antialiasing), which every reference uses to resize
    position embeddings; `jax.image.resize` differs (a=-0.5, antialiased downsampling). `antialias`: PyTorch's
    `antialias=True` instead (DINOv2 with registers), a different filter even when upsampling: a=-0.5, widened
    by the scale when downsampling, taps outside the input dropped and the rest renormalised. `offset`: the
    scale PyTorch is given as `scale_factor` is (size_out + offset) / size_in instead of the size ratio."""
    a = -0.5 if antialias else -0.75

    def keys(t):  # the cubic kernel at distance t
        t = abs(t)
        if t <= 1:
            return ((a + 2) * t - (a + 3)) * t * t + 1
        if t < 2:
            return ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
        return 0.0

    weights = np.zeros((size_out, size_in), np.float64)
    scale = size_in / (size_out + offset)
    stretch = max(scale, 1.0) if antialias else 1.0
    for i in range(size_out):
        if antialias:  # PyTorch's `_compute_weights_aa`
            center = scale * (i + 0.5)
            lo, hi = max(int(center - 2 * stretch + 0.5), 0), min(int(center + 2 * stretch + 0.5), size_in)
            w = np.array([keys((j - center + 0.5) / stretch) for j in range(lo, hi)])
            weights[i, lo:hi] = w / w.sum()
            continue
        src = scale * (i + 0.5) - 0.5
        base = math.floor(src)
        t = src - base
        for offset in (-1, 0, 1, 2):
            weights[i, min(max(base + offset, 0), size_in - 1)] += keys(offset - t)
    return weights


def resize_positions(
    pos: jax.Array,
    grid_in: tuple[int, int],
    grid_out: tuple[int, int],
    antialias: bool = False,
    offset: float = 0.0,
) -> jax.Array:
    """Patch position embeddings [..., gh*gw, d], row-major on `grid_in` → on `grid_out` (in float32);
    `antialias`, `offset`: see `bicubic_matrix`."""
    if grid_in == grid_out:
        return pos
    lead, dim = pos.shape[:-2], pos.shape[-1]
    wh = jnp.asarray(bicubic_matrix(grid_in[0], grid_out[0], antialias, offset), jnp.float32)  # [gh', gh]
    ww = jnp.asarray(bicubic_matrix(grid_in[1], grid_out[1], antialias, offset), jnp.float32)  # [gw', gw]
    table = pos.astype(jnp.float32).reshape(*lead, *grid_in, dim)
    out = jnp.einsum("ah,bw,...hwd->...abd", wh, ww, table, precision=jax.lax.Precision.HIGHEST)
    return out.reshape(*lead, grid_out[0] * grid_out[1], dim).astype(pos.dtype)


class PatchEmbed(nnx.Module):
    """Non-overlapping patches → tokens, as one matmul over flattened patches (same maths as the stride-p
    convolution in the checkpoints; the kernel is kept HWIO so the conversion is the usual "conv")."""

    def __init__(self, patch: int, dim: int, *, bias: bool, dtype, param_dtype, rngs: nnx.Rngs):
        self.patch, self.dtype = patch, dtype
        self.kernel = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), (patch, patch, 3, dim), param_dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype)) if bias else None

    def __call__(self, x: jax.Array) -> tuple[jax.Array, tuple[int, int]]:
        n, h, w, c = x.shape
        p = self.patch
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not divisible by the patch size {p}")
        grid = (h // p, w // p)
        x = x.reshape(n, grid[0], p, grid[1], p, c).transpose(0, 1, 3, 2, 4, 5)  # [n, gh, gw, p, p, c]
        x = x.reshape(n, grid[0] * grid[1], p * p * c).astype(self.dtype)
        y = matmul(x, self.kernel[...].reshape(p * p * c, -1).astype(self.dtype))  # [n, gh*gw, d]
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y, grid


class Embeddings(nnx.Module):
    """Patch tokens with the class tokens (CLS, distillation) in front, plus position embeddings (if the model
    has them), resized (bicubic, as the references do) when the input's patch grid differs from the
    checkpoint's; then the register tokens, if any, between the class tokens and the patches (they have no
    position embedding)."""

    def __init__(self, spec: TransformerSpec, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.spec, self.dtype = spec, dtype
        init = nnx.initializers.normal(0.02)
        token_shape = (1, 1, spec.dim) if spec.batch_dims else (spec.dim,)
        self.patch_embed = PatchEmbed(
            spec.patch_size, spec.dim, bias=spec.patch_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.cls_token = nnx.Param(init(rngs.params(), token_shape, param_dtype)) if spec.cls_token else None
        self.dist_token = nnx.Param(init(rngs.params(), token_shape, param_dtype)) if spec.dist_token else None
        self.register_tokens = (
            nnx.Param(init(rngs.params(), (1, spec.register_tokens, spec.dim), param_dtype))
            if spec.register_tokens
            else None
        )
        positions = (spec.position_prefix + spec.grid**2, spec.dim)
        shape = (1, *positions) if spec.batch_dims else positions
        self.position = nnx.Param(init(rngs.params(), shape, param_dtype)) if spec.position_embeddings else None
        self.pre_norm = layer_norm(spec, dtype=dtype, param_dtype=param_dtype, rngs=rngs) if spec.pre_norm else None

    def __call__(self, x: jax.Array) -> jax.Array:
        tokens, grid = self.patch_embed(x)  # [n, p, d]
        n, dim = tokens.shape[0], self.spec.dim
        k = self.spec.prefix_tokens
        if k:
            prefix = [t[...].reshape(1, 1, dim) for t in (self.cls_token, self.dist_token) if t is not None]
            if self.register_tokens is not None:
                prefix.append(self.register_tokens[...].reshape(1, -1, dim))
            prefix = jnp.broadcast_to(jnp.concatenate(prefix, axis=1).astype(self.dtype), (n, k, dim))
            tokens = jnp.concatenate([prefix, tokens], axis=1)  # [n, k + p, d]: class tokens, registers, patches
        if self.position is not None:
            tokens = tokens + self.positions(grid)
        return self.pre_norm(tokens) if self.pre_norm is not None else tokens

    def positions(self, grid: tuple[int, int]) -> jax.Array:
        """Position embeddings [1, k + gh*gw, d] for the input's patch grid; prefix tokens past the first
        `position_prefix` get zeros (adding them is exact)."""
        k, m, dim = self.spec.prefix_tokens, self.spec.position_prefix, self.spec.dim
        pos = self.position[...].reshape(1, -1, dim)  # [1, m + g*g, d]
        grid_in = (self.spec.grid, self.spec.grid)
        patch_pos = resize_positions(
            pos[:, m:], grid_in, grid, self.spec.antialias_positions, self.spec.position_offset
        )
        unplaced = jnp.zeros((1, k - m, dim), pos.dtype)
        return jnp.concatenate([pos[:, :m], unplaced, patch_pos], axis=1).astype(self.dtype)


def layer_norm(spec: TransformerSpec, *, dtype, param_dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # Flax normalises in float32 whatever the compute dtype, as the references do for half precision.
    return nnx.LayerNorm(spec.dim, epsilon=spec.eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


_CACHE_BYTES = 8 << 20  # the scores of one attention chunk on CPU: about a CPU's L2


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Softmax attention, [n, t, heads, head_dim] each → [n, t, heads, head_dim]; scores and softmax in float32.
    `mask` [n, s] (bool): the keys each example may attend to (NaFlex's padded patches are False); None: all.

    Accelerators take `jax.nn.dot_product_attention` (fused kernels where the platform has them). On CPU the
    batch goes through a loop in chunks whose [heads, t, t] scores stay in cache: the whole batch's scores
    (30 MB for ViT-B/16 at batch 16) round-trip through memory three times (scores, exp, sum) and make
    attention 2x slower than the chunked loop (bench/extract.py; docs/benchmarks.md)."""
    if jax.default_backend() != "cpu":
        return jax.nn.dot_product_attention(q, k, v, mask=None if mask is None else mask[:, None, None, :])
    n, t, heads, head_dim = q.shape
    dtype = q.dtype

    def one(qkvm):  # a single example: [t, heads, head_dim] x 3, and its key mask [s] (or None)
        q, k, v = (a.swapaxes(0, 1) for a in qkvm[:3])  # [heads, t, head_dim]
        scores = jnp.einsum(
            "hqd,hkd->hqk", q * jnp.asarray(head_dim**-0.5, dtype), k, preferred_element_type=jnp.float32
        )
        if qkvm[3] is not None:
            scores = jnp.where(qkvm[3], scores, jnp.finfo(jnp.float32).min)
        weights = jnp.exp(scores - scores.max(axis=-1, keepdims=True))
        out = jnp.einsum("hqk,hkd->hqd", weights.astype(dtype), v, preferred_element_type=jnp.float32)
        return (out / weights.sum(axis=-1, keepdims=True)).astype(dtype).swapaxes(0, 1)

    chunk = max(1, _CACHE_BYTES // (heads * t * t * 4))
    return jax.lax.map(one, (q, k, v, None if mask is None else mask.astype(bool)), batch_size=min(chunk, n))


class Attention(nnx.Module):
    """Multi-head self-attention with separate query / key / value projections (or BLIP's fused one)."""

    def __init__(self, spec: TransformerSpec, *, dtype, param_dtype, rngs: nnx.Rngs):
        linear = partial(nnx.Linear, dtype=dtype, param_dtype=param_dtype, dot_general=dot_general, rngs=rngs)
        d, bias = spec.dim, spec.qkv_bias
        self.heads = spec.heads
        self.qkv = linear(d, 3 * d, use_bias=bias) if spec.fused_qkv else None
        self.query = None if spec.fused_qkv else linear(d, d, use_bias=bias)
        self.key = None if spec.fused_qkv else linear(d, d, use_bias=bias)
        self.value = None if spec.fused_qkv else linear(d, d, use_bias=bias)
        self.out = linear(d, d)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:  # [n, t, d]; mask: see attention
        n, t, d = x.shape
        if self.qkv is not None:
            q, k, v = jnp.moveaxis(self.qkv(x).reshape(n, t, 3, self.heads, d // self.heads), 2, 0)
        else:
            q, k, v = (f(x).reshape(n, t, self.heads, d // self.heads) for f in (self.query, self.key, self.value))
        y = attention(q, k, v, mask)  # [n, t, heads, head_dim]
        return self.out(y.reshape(n, t, d))


class Mlp(nnx.Module):
    def __init__(self, spec: TransformerSpec, *, dtype, param_dtype, rngs: nnx.Rngs):
        linear = partial(nnx.Linear, dtype=dtype, param_dtype=param_dtype, dot_general=dot_general, rngs=rngs)
        self.gated = spec.gated_mlp
        self.act = activation("silu" if spec.gated_mlp else spec.act)
        self.fc1 = linear(spec.dim, spec.mlp_dim * (2 if spec.gated_mlp else 1))
        self.fc2 = linear(spec.mlp_dim, spec.dim)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.fc1(x)
        if self.gated:
            gate, up = jnp.split(h, 2, axis=-1)
            return self.fc2(self.act(gate) * up)
        return self.fc2(self.act(h))


class AttentionPool(nnx.Module):
    """Multi-head attention pooling (SigLIP's head: torch `nn.MultiheadAttention` with a learned probe as the one
    query), then x + mlp(norm(x)). `in_proj` holds query, key and value stacked, as the checkpoint does."""

    def __init__(self, spec: TransformerSpec, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.heads, self.dtype = spec.heads, dtype
        self.probe = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (1, 1, spec.dim), param_dtype))
        self.in_proj = nnx.Linear(spec.dim, 3 * spec.dim, **kw)
        self.out = nnx.Linear(spec.dim, spec.dim, **kw)
        self.norm = layer_norm(spec, **kw)
        self.mlp = Mlp(spec, **kw)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:  # [n, t, d] → [n, d]
        """`mask` [n, t] (bool): the tokens the probe may attend to; None: all."""
        n, t, d = x.shape
        w = self.in_proj.kernel[...].astype(self.dtype)  # [d, 3d]: query | key | value
        b = self.in_proj.bias[...].astype(self.dtype)
        q = self.probe[...].astype(self.dtype) @ w[:, :d] + b[:d]  # [1, 1, d]
        kv = x.astype(self.dtype) @ w[:, d:] + b[d:]  # [n, t, 2d]
        k, v = jnp.split(kv.reshape(n, t, 2, self.heads, d // self.heads), 2, axis=2)
        q = jnp.broadcast_to(q.reshape(1, 1, self.heads, d // self.heads), (n, 1, self.heads, d // self.heads))
        keys = None if mask is None else mask.astype(bool)[:, None, None, :]
        y = self.out(jax.nn.dot_product_attention(q, k[:, :, 0], v[:, :, 0], mask=keys).reshape(n, 1, d))
        return (y + self.mlp(self.norm(y)))[:, 0]


class Block(nnx.Module):
    """Pre-LN encoder block: x + ls1 * attn(norm1(x)), then x + ls2 * mlp(norm2(x)), ls: LayerScale (none when
    spec.layer_scale is None). A family with other attention or MLP maths (EVA-02's and DINOv3's rotary attention)
    passes its own; the block's keyword inputs (a key mask, rotary tables) go to the attention."""

    def __init__(
        self, spec: TransformerSpec, *, attn: nnx.Module | None = None, mlp: nnx.Module | None = None, dtype,
        param_dtype, rngs: nnx.Rngs,
    ):  # fmt: skip
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = layer_norm(spec, **kw)
        self.attn = attn if attn is not None else Attention(spec, **kw)
        self.norm2 = layer_norm(spec, **kw)
        self.mlp = mlp if mlp is not None else Mlp(spec, **kw)
        scaled = spec.layer_scale is not None
        self.ls1 = nnx.Param(jnp.full((spec.dim,), spec.layer_scale, param_dtype)) if scaled else None
        self.ls2 = nnx.Param(jnp.full((spec.dim,), spec.layer_scale, param_dtype)) if scaled else None

    def __call__(self, x: jax.Array, **inputs) -> jax.Array:  # [n, t, d]
        y = self.attn(self.norm1(x), **inputs)
        if self.ls1 is not None:
            y = y * self.ls1[...].astype(y.dtype)
        x = x + y
        y = self.mlp(self.norm2(x))
        if self.ls2 is not None:
            y = y * self.ls2[...].astype(y.dtype)
        return x + y


def pool_tokens(tokens: jax.Array, prefix: int, pool: str) -> jax.Array:
    """timm's `global_pool_nlc`: [n, t, d] → [n, d] by the CLS token ("token") or over the patch tokens (the
    `prefix` tokens before them excluded): "avg", "max", "avgmax" (the mean of both)."""
    if pool == "token":
        return tokens[:, 0]
    patches = tokens[:, prefix:]
    if pool == "avg":
        return jnp.mean(patches, axis=1)
    if pool == "max":
        return jnp.max(patches, axis=1)
    if pool == "avgmax":
        return 0.5 * (jnp.max(patches, axis=1) + jnp.mean(patches, axis=1))
    raise ValueError(f"unknown pooling {pool!r}; use token, avg, max or avgmax")


class VisionTransformer(nnx.Module):
    """Embeddings → blocks → final norm; `finish` (the family's) turns the last block's output into
    `last_hidden_state`, the final-normed tokens and `pooled`. Stages: embeddings, each block, final."""

    def __init__(self, spec: TransformerSpec, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.spec = spec
        self.embeddings = self.make_embeddings(spec, **kw)
        self.blocks = nnx.List([self.make_block(spec, **kw) for _ in range(spec.depth)])
        self.norm = layer_norm(spec, **kw) if spec.final_norm else None

    def make_embeddings(self, spec: TransformerSpec, **kw) -> nnx.Module:
        """The embeddings; a family with other inputs (SigLIP2's patchified NaFlex batches) overrides it."""
        return Embeddings(spec, **kw)

    def make_block(self, spec: TransformerSpec, **kw) -> nnx.Module:
        """One encoder block; a family with other blocks (EVA's) overrides it."""
        return Block(spec, **kw)

    def block_inputs(self, x: jax.Array) -> dict:
        """Extra keyword inputs every block receives, from the image batch x (EVA: its rotary tables)."""
        return {}

    def final_norm(self, x: jax.Array) -> jax.Array:
        """The norm after the blocks, or the identity for a model without one."""
        return self.norm(x) if self.norm is not None else x

    def head_paths(self) -> tuple[str, ...]:
        """Module paths of the family's pooling head, part of the final stage."""
        return ()

    def stage_paths(self) -> list[tuple[str, ...]]:
        """Module-path prefixes of each stage, input to output: embeddings, each block, final norm + head."""
        return [("embeddings",)] + [(f"blocks.{i}",) for i in range(len(self.blocks))] + [("norm", *self.head_paths())]

    def finish(self, x: jax.Array) -> dict:
        """Last block output [n, t, d] → last_hidden_state, normed (final-normed tokens) and pooled.
        The default, ViT's: the final-normed sequence, pooled as its CLS token."""
        normed = self.norm(x)
        return {"last_hidden_state": normed, "normed": normed, "pooled": normed[:, 0]}

    def __call__(self, x: jax.Array) -> dict:
        """x: [n, h, w, 3] normalised → pooled, tokens and every block's output."""
        h = self.embeddings(x)  # [n, tokens, d]
        hidden, extras = [h], self.block_inputs(x)
        for block in self.blocks:
            h = block(h, **extras)
            hidden.append(h)
        out = self.finish(h)
        k = self.spec.prefix_tokens
        # [n, layers, d]; a model without CLS (SigLIP, timm's registers + avg pool) takes the mean patch token
        cls = jnp.stack([y[:, 0] if self.spec.cls_token else jnp.mean(y[:, k:], axis=1) for y in hidden[1:]], axis=1)
        out["patch_tokens"] = out.pop("normed")[:, k:]
        # LayerNorm acts per token: norming the stacked CLS tokens = norming each block's output, then its CLS.
        return out | {"hidden_states": tuple(hidden), "block_cls": cls, "block_cls_normed": self.final_norm(cls)}


class PooledVisionTransformer(VisionTransformer):
    """The trunk with SigLIP's attention-pool (MAP) head, or none (`use_head=False`: mean of the tokens)."""

    def __init__(
        self, spec: TransformerSpec, use_head: bool = True, *, dtype=jnp.float32, param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):  # fmt: skip
        super().__init__(spec, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.head = AttentionPool(spec, dtype=dtype, param_dtype=param_dtype, rngs=rngs) if use_head else None

    def head_paths(self) -> tuple[str, ...]:
        return ("head",) if self.head is not None else ()


# ---- conversion helpers: each accepts the PyTorch name (`weight`, transposed) and the HF Flax one (`kernel`,
# `scale`, `embedding`: already in Flax layout). Patterns are regexes; targets may use their groups (\1).


def linear_rules(src: str, dst: str) -> list[Rule]:
    return [
        Rule(rf"{src}\.weight", f"{dst}.kernel", "dense"),
        Rule(rf"{src}\.kernel", f"{dst}.kernel"),
        Rule(rf"{src}\.bias", f"{dst}.bias"),
    ]


def norm_rules(src: str, dst: str) -> list[Rule]:
    return [Rule(rf"{src}\.(?:weight|scale)", f"{dst}.scale"), Rule(rf"{src}\.bias", f"{dst}.bias")]


def patch_rules(src: str) -> list[Rule]:
    dst = "embeddings.patch_embed"
    return [
        Rule(rf"{src}\.weight", f"{dst}.kernel", "conv"),
        Rule(rf"{src}\.kernel", f"{dst}.kernel"),
        Rule(rf"{src}\.bias", f"{dst}.bias"),
    ]


def block_rules(src: str, names: dict[str, str]) -> list[Rule]:
    """Rules for every block; `src` matches the block prefix with the index as group 1 (e.g.
    `encoder\\.layer\\.(\\d+)`), `names` maps the checkpoint's sub-module names to ours (norm1,
    attn.query, ..., mlp.fc1; `ls1`/`ls2` for LayerScale parameters)."""
    rules = []
    for theirs, ours in names.items():
        dst = rf"blocks.\1.{ours}"
        if ours.startswith("norm"):
            rules += norm_rules(rf"{src}\.{theirs}", dst)
        elif ours.startswith("ls"):
            rules.append(Rule(rf"{src}\.{theirs}", dst))
        else:
            rules += linear_rules(rf"{src}\.{theirs}", dst)
    return rules
