"""EVA-02 (timm's `Eva`, `eva02_*`): a ViT whose blocks add 2D rotary position embeddings (RoPE) to the queries
and keys of the patch tokens, a SwiGLU MLP (packed, or with separate gate / value projections and a LayerNorm
inside: `scale_mlp`), optionally a LayerNorm on the attention output (`scale_attn_inner`), and a query / value
bias without a key bias.

Embeddings, the outputs and the stages are the shared trunk's; pooled features follow timm's
`forward_head(x, pre_logits=True)`: `avg` (the default: mean patch token, then `fc_norm`) or `token`.
RoPE tables are numpy constants for the input's patch grid, on EVA's coordinates (positions rescaled onto
`ref_feat_shape`, the pre-training grid), so other input sizes get what timm's `dynamic_img_size` gives them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fxjax.backbones.activations import ACTIVATIONS
from fxjax.backbones.convert import Rule
from fxjax.backbones.layers import dot_general
from fxjax.backbones.timm_args import TimmTransformerArgs, pool_problems, sort_args
from fxjax.backbones.transformer import (
    Block,
    Mlp,
    TransformerSpec,
    VisionTransformer,
    attention,
    layer_norm,
    linear_rules,
    norm_rules,
    patch_rules,
    pool_tokens,
)

POOLS = ("token", "avg", "max", "avgmax")


@dataclass(frozen=True)
class EvaArgs(TimmTransformerArgs):
    """timm `Eva.__init__` arguments fxjax reads beyond the shared ones (names and defaults as timm's)."""

    qkv_fused: bool = True
    swiglu_mlp: bool = False
    scale_mlp: bool = False
    scale_attn_inner: bool = False
    num_reg_tokens: int = 0
    use_rot_pos_emb: bool = False
    rope_temperature: float = 10000.0
    rope_grid_offset: float = 0.0
    rope_grid_indexing: str = "ij"
    ref_feat_shape: tuple[int, int] | None = None
    use_pre_transformer_norm: bool = False
    use_post_transformer_norm: bool | None = None
    use_fc_norm: bool | None = None
    global_pool: str = "avg"

    @property
    def fc_norm(self) -> bool:
        return self.global_pool == "avg" if self.use_fc_norm is None else self.use_fc_norm

    @property
    def post_norm(self) -> bool:
        return not self.fc_norm if self.use_post_transformer_norm is None else self.use_post_transformer_norm

    @property
    def hidden(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    def spec(self) -> TransformerSpec:
        return TransformerSpec(
            **self.trunk_fields(prefix_tokens=int(self.class_token) + self.num_reg_tokens),
            mlp_dim=self.hidden,
            act="silu" if self.swiglu_mlp else self.act_layer,
            gated_mlp=self.swiglu_mlp,
            register_tokens=self.num_reg_tokens,
            patch_bias=not self.use_pre_transformer_norm,
            pre_norm=self.use_pre_transformer_norm,
            final_norm=self.post_norm,
        )


# timm arguments whose default is the only value fxjax implements.
_FIXED = {
    "in_chans": 3, "num_kv_heads": None, "qk_norm": False, "swiglu_align_to": 0, "attn_type": "eva",
    "attn_only_layer_scale": False, "use_abs_pos_emb": True, "rope_type": "cat", "rope_rotate_half": False,
    "rope_mrope_section": None, "use_post_norm": False, "dynamic_img_pad": False, "norm_layer": None,
}  # fmt: skip
# Head-only and training-time RoPE arguments (beside timm_args.TRAINING_ONLY_ARGS): no effect on the features.
_IGNORED = {"head_init_scale", "rope_shift_coords", "rope_jitter_coords", "rope_rescale_coords"}


def from_args(architecture: str, args: dict) -> EvaArgs:
    """timm constructor arguments → `EvaArgs`; one error names every argument fxjax cannot honour."""
    known, problems = sort_args(args, EvaArgs, _FIXED, _IGNORED, square=("img_size", "patch_size"))
    if known.get("ref_feat_shape") is not None:
        shape = known["ref_feat_shape"]
        known["ref_feat_shape"] = tuple(shape) if isinstance(shape, (list, tuple)) else (shape, shape)
    eva = EvaArgs(**known)
    problems += pool_problems(eva.global_pool, eva.class_token, POOLS)
    if eva.rope_grid_indexing not in ("ij", "xy"):
        problems.append(f"rope_grid_indexing={eva.rope_grid_indexing!r}")
    if eva.scale_mlp and not eva.swiglu_mlp:
        problems.append("scale_mlp=True without swiglu_mlp")
    if not eva.swiglu_mlp and eva.act_layer not in ACTIVATIONS:
        problems.append(f"act_layer={eva.act_layer!r}")
    if problems:
        raise ValueError(f"timm architecture {architecture!r}: fxjax does not implement {'; '.join(problems)}")
    return eva


def rope_tables(args: EvaArgs, grid: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """timm's `RotaryEmbeddingCat` (in_pixels=False) for a patch grid → (sin, cos), each [gh*gw, head_dim] in
    the interleaved layout [f0, f0, f1, f1, ...]: per axis head_dim/4 inverse frequencies
    temperature^(-i / (head_dim/4)), on index coordinates (+ offset) rescaled onto `ref_feat_shape`."""
    head_dim = args.embed_dim // args.num_heads
    bands = head_dim // 4
    freqs = (1.0 / args.rope_temperature ** (np.arange(bands, dtype=np.float32) / bands)).astype(np.float32)
    shape, ref = list(grid), list(args.ref_feat_shape) if args.ref_feat_shape is not None else None
    if args.rope_grid_indexing == "xy":
        shape = shape[::-1]
        ref = ref[::-1] if ref is not None else None
    axes = [np.arange(s, dtype=np.float32) + np.float32(args.rope_grid_offset) for s in shape]
    if ref is not None:
        axes = [(t / np.float32(s) * np.float32(r)).astype(np.float32) for t, s, r in zip(axes, shape, ref)]
    coords = np.stack(np.meshgrid(*axes, indexing=args.rope_grid_indexing), axis=-1)  # [gh, gw, 2]
    angles = (coords[..., None] * freqs).reshape(grid[0] * grid[1], 2 * bands)  # [tokens, head_dim / 2]
    return np.repeat(np.sin(angles), 2, axis=-1), np.repeat(np.cos(angles), 2, axis=-1)


def apply_rope(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
    """x: [n, patches, heads, head_dim]; timm's `apply_rot_embed` (interleaved pairs rotated)."""
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    return x * cos[None, :, None] + rotated * sin[None, :, None]


class EvaAttention(nnx.Module):
    """timm's `EvaAttention`: fused qkv with separate query / value biases (the key has none), or three
    projections; RoPE on the patch tokens' queries and keys; an optional LayerNorm before the projection."""

    def __init__(self, args: EvaArgs, spec: TransformerSpec, *, dtype, param_dtype, rngs: nnx.Rngs):
        linear = partial(nnx.Linear, dtype=dtype, param_dtype=param_dtype, dot_general=dot_general, rngs=rngs)
        d, bias = spec.dim, args.qkv_bias
        self.heads, self.prefix, self.dtype = spec.heads, spec.prefix_tokens, dtype
        self.qkv = linear(d, 3 * d, use_bias=False) if args.qkv_fused else None
        fused_bias = args.qkv_fused and bias
        self.q_bias = nnx.Param(jnp.zeros((d,), param_dtype)) if fused_bias else None
        self.v_bias = nnx.Param(jnp.zeros((d,), param_dtype)) if fused_bias else None
        self.q_proj = None if args.qkv_fused else linear(d, d, use_bias=bias)
        self.k_proj = None if args.qkv_fused else linear(d, d, use_bias=False)
        self.v_proj = None if args.qkv_fused else linear(d, d, use_bias=bias)
        self.norm = layer_norm(spec, dtype=dtype, param_dtype=param_dtype, rngs=rngs) if args.scale_attn_inner else None
        self.proj = linear(d, d)

    def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array] | None) -> jax.Array:  # [n, t, d]
        n, t, d = x.shape
        shape = (n, t, self.heads, d // self.heads)
        if self.qkv is not None:
            qkv = self.qkv(x)
            if self.q_bias is not None:
                q_bias, v_bias = (b[...].astype(self.dtype) for b in (self.q_bias, self.v_bias))
                qkv = qkv + jnp.concatenate([q_bias, jnp.zeros((d,), self.dtype), v_bias])
            q, k, v = jnp.moveaxis(qkv.reshape(n, t, 3, *shape[2:]), 2, 0)
        else:
            q, k, v = (f(x).reshape(shape) for f in (self.q_proj, self.k_proj, self.v_proj))
        if rope is not None:
            sin, cos = (jnp.asarray(r, self.dtype) for r in rope)
            m = self.prefix
            q = jnp.concatenate([q[:, :m], apply_rope(q[:, m:], sin, cos)], axis=1)
            k = jnp.concatenate([k[:, :m], apply_rope(k[:, m:], sin, cos)], axis=1)
        y = attention(q, k, v).reshape(n, t, d)
        return self.proj(self.norm(y) if self.norm is not None else y)


class SwiGLU(nnx.Module):
    """timm's `SwiGLU` (EVA-02 base and up: `scale_mlp`): silu(fc1_g x) * fc1_x x, LayerNorm, fc2."""

    def __init__(self, spec: TransformerSpec, *, dtype, param_dtype, rngs: nnx.Rngs):
        linear = partial(nnx.Linear, dtype=dtype, param_dtype=param_dtype, dot_general=dot_general, rngs=rngs)
        self.fc1_g = linear(spec.dim, spec.mlp_dim)
        self.fc1_x = linear(spec.dim, spec.mlp_dim)
        self.norm = nnx.LayerNorm(spec.mlp_dim, epsilon=spec.eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc2 = linear(spec.mlp_dim, spec.dim)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.norm(jax.nn.silu(self.fc1_g(x)) * self.fc1_x(x)))


class EvaViT(VisionTransformer):
    def __init__(self, args: EvaArgs, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.args = args  # before the trunk builds the blocks (make_block reads it)
        spec = args.spec()
        super().__init__(spec, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc_norm = layer_norm(spec, dtype=dtype, param_dtype=param_dtype, rngs=rngs) if args.fc_norm else None

    def make_block(self, spec: TransformerSpec, **kw) -> Block:
        mlp = SwiGLU(spec, **kw) if self.args.swiglu_mlp and self.args.scale_mlp else Mlp(spec, **kw)
        return Block(spec, attn=EvaAttention(self.args, spec, **kw), mlp=mlp, **kw)

    def block_inputs(self, x: jax.Array) -> dict:
        if not self.args.use_rot_pos_emb:
            return {"rope": None}
        p = self.spec.patch_size
        return {"rope": rope_tables(self.args, (x.shape[1] // p, x.shape[2] // p))}

    def head_paths(self) -> tuple[str, ...]:
        return ("fc_norm",) if self.fc_norm is not None else ()

    def finish(self, x: jax.Array) -> dict:
        normed = self.final_norm(x)  # [n, t, d]: forward_features' output
        pooled = pool_tokens(normed, self.spec.prefix_tokens, self.args.global_pool)
        if self.fc_norm is not None:
            pooled = self.fc_norm(pooled)
        return {"last_hidden_state": normed, "normed": normed, "pooled": pooled}


def build(args: EvaArgs, *, dtype, param_dtype, rngs: nnx.Rngs) -> EvaViT:
    return EvaViT(args, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def conversion_rules() -> list[Rule]:
    """timm's native `Eva` names → ours (RoPE tables and the zero key bias are buffers, not in the state dict)."""
    block = r"blocks\.(\d+)"
    return [
        Rule(r"cls_token", "embeddings.cls_token"),
        Rule(r"reg_token", "embeddings.register_tokens"),
        Rule(r"pos_embed", "embeddings.position"),
        *patch_rules(r"patch_embed\.proj"),
        *norm_rules(r"norm_pre", "embeddings.pre_norm"),
        *norm_rules(rf"{block}\.(norm1|norm2|attn\.norm|mlp\.norm)", r"blocks.\1.\2"),
        Rule(rf"{block}\.attn\.(q_bias|v_bias)", r"blocks.\1.attn.\2"),
        *linear_rules(rf"{block}\.(attn\.(?:qkv|q_proj|k_proj|v_proj|proj))", r"blocks.\1.\2"),
        *linear_rules(rf"{block}\.(mlp\.(?:fc1_g|fc1_x|fc1|fc2))", r"blocks.\1.\2"),
        Rule(rf"{block}\.gamma_1", r"blocks.\1.ls1"),
        Rule(rf"{block}\.gamma_2", r"blocks.\1.ls2"),
        *norm_rules(r"norm", "norm"),
        *norm_rules(r"fc_norm", "fc_norm"),
        Rule(r"head\..*", None),
    ]
