"""timm's `VisionTransformer` (`vit_*`, `deit3_*`), from its native state dict (the layout timm pushes to the Hub).

The maths is the shared trunk's; what timm adds is configuration: a class token or not, register tokens with or
without position embeddings (`no_embed_class`), CLIP's norm before the blocks, LayerScale, fused qkv, and the
pooling of `forward_head(x, pre_logits=True)`: `token` (CLS), `avg` / `max` / `avgmax` over the patch tokens
(registers excluded), `map` (attention pooling with a learned latent query), then `fc_norm` where timm puts the
final norm after pooling. Pooled features are exactly that; `last_hidden_state` is `forward_features`' output.
Other outputs: see `transformer`.

`TimmViTArgs` holds the constructor arguments of timm's class that fxjax reads (same names, same defaults), so a
checkpoint's `model_args` apply as they are; `from_args` rejects every argument whose value needs a layer fxjax
does not have, naming it.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from fxjax.backbones.activations import ACTIVATIONS
from fxjax.backbones.convert import Rule
from fxjax.backbones.layers import dot_general
from fxjax.backbones.timm_args import TimmTransformerArgs, pool_problems, sort_args
from fxjax.backbones.transformer import (
    Mlp,
    TransformerSpec,
    VisionTransformer,
    block_rules,
    layer_norm,
    linear_rules,
    norm_rules,
    patch_rules,
    pool_tokens,
)

POOLS = ("token", "avg", "max", "avgmax", "map")


@dataclass(frozen=True)
class TimmViTArgs(TimmTransformerArgs):
    """timm `VisionTransformer.__init__` arguments fxjax reads beyond the shared ones (names and defaults as
    timm's)."""

    reg_tokens: int = 0
    pre_norm: bool = False
    final_norm: bool = True
    fc_norm: bool | None = None
    global_pool: str = "token"
    mlp_layer: str = "mlp"  # or "swiglu_packed" (timm's SwiGLUPacked: fc1 → [gate, up], act(gate) * up)

    @property
    def use_fc_norm(self) -> bool:
        return self.global_pool in ("avg", "avgmax", "max") if self.fc_norm is None else self.fc_norm

    @property
    def prefix_tokens(self) -> int:
        return int(self.class_token) + self.reg_tokens

    @property
    def gated(self) -> bool:
        return self.mlp_layer == "swiglu_packed"

    def spec(self) -> TransformerSpec:
        return TransformerSpec(
            **self.trunk_fields(self.prefix_tokens),
            mlp_dim=int(self.embed_dim * self.mlp_ratio) // (2 if self.gated else 1),
            act=self.act_layer,
            qkv_bias=self.qkv_bias,
            fused_qkv=True,
            gated_mlp=self.gated,
            register_tokens=self.reg_tokens,
            patch_bias=not self.pre_norm,
            pre_norm=self.pre_norm,
            final_norm=self.final_norm and not self.use_fc_norm,
        )


# timm arguments whose default is the only value fxjax implements (other values need layers it lacks).
_FIXED = {
    "in_chans": 3, "qk_norm": False, "scale_attn_norm": False, "scale_mlp_norm": False, "proj_bias": True,
    "pos_embed": "learn", "pool_include_prefix": False, "dynamic_img_pad": False, "embed_norm_layer": None,
    "block_fn": None, "attn_layer": None,
}  # fmt: skip
# Init and input-check arguments (beside timm_args.TRAINING_ONLY_ARGS): no effect on the inference maths.
_IGNORED = {"weight_init", "fix_init", "strict_img_size", "class_token_init"}


def from_args(architecture: str, args: dict) -> TimmViTArgs:
    """timm constructor arguments → `TimmViTArgs`; one error names every argument fxjax cannot honour."""
    known, problems = sort_args(args, TimmViTArgs, _FIXED, _IGNORED, square=("img_size", "patch_size"))
    vit = TimmViTArgs(**known)
    problems += pool_problems(vit.global_pool, vit.class_token, POOLS)
    if vit.act_layer not in ACTIVATIONS:
        problems.append(f"act_layer={vit.act_layer!r} (supported: {', '.join(sorted(ACTIVATIONS))})")
    if vit.mlp_layer not in ("mlp", "swiglu_packed"):
        problems.append(f"mlp_layer={vit.mlp_layer!r}")
    if vit.gated and vit.act_layer != "silu":
        problems.append(f"mlp_layer='swiglu_packed' with act_layer={vit.act_layer!r} (silu only)")
    if problems:
        raise ValueError(f"timm architecture {architecture!r}: fxjax does not implement {'; '.join(problems)}")
    return vit


class AttentionPoolLatent(nnx.Module):
    """timm's `AttentionPoolLatent` (`global_pool='map'`): one learned latent query attends over the patch tokens,
    then a projection and x + mlp(norm(x)); the pooled vector is the latent's output."""

    def __init__(self, spec: TransformerSpec, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        linear = dict(kw, dot_general=dot_general)
        self.heads, self.dtype = spec.heads, dtype
        self.latent = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (1, 1, spec.dim), param_dtype))
        self.q = nnx.Linear(spec.dim, spec.dim, **linear)
        self.kv = nnx.Linear(spec.dim, 2 * spec.dim, **linear)
        self.proj = nnx.Linear(spec.dim, spec.dim, **linear)
        self.norm = layer_norm(spec, **kw)
        self.mlp = Mlp(spec, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:  # [n, t, d] → [n, d]
        n, t, d = x.shape
        h = self.heads
        q = self.q(self.latent[...].astype(self.dtype)).reshape(1, 1, h, d // h)
        q = jnp.broadcast_to(q, (n, 1, h, d // h))
        k, v = jnp.moveaxis(self.kv(x).reshape(n, t, 2, h, d // h), 2, 0)  # [n, t, h, d/h] each
        y = self.proj(jax.nn.dot_product_attention(q, k, v).reshape(n, 1, d))
        return (y + self.mlp(self.norm(y)))[:, 0]


class TimmViT(VisionTransformer):
    def __init__(self, args: TimmViTArgs, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        spec = args.spec()
        super().__init__(spec, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.global_pool = args.global_pool
        self.attn_pool = AttentionPoolLatent(spec, **kw) if args.global_pool == "map" else None
        self.fc_norm = layer_norm(spec, **kw) if args.final_norm and args.use_fc_norm else None

    def head_paths(self) -> tuple[str, ...]:
        return tuple(p for p in ("attn_pool", "fc_norm") if getattr(self, p) is not None)

    def finish(self, x: jax.Array) -> dict:
        normed = self.final_norm(x)  # [n, t, d]: forward_features' output
        k = self.spec.prefix_tokens
        if self.attn_pool is not None:
            pooled = self.attn_pool(normed[:, k:])
        else:
            pooled = pool_tokens(normed, k, self.global_pool)
        if self.fc_norm is not None:
            pooled = self.fc_norm(pooled)
        return {"last_hidden_state": normed, "normed": normed, "pooled": pooled}


def build(args: TimmViTArgs, *, dtype, param_dtype, rngs: nnx.Rngs) -> TimmViT:
    return TimmViT(args, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


BLOCK_NAMES = {
    "norm1": "norm1",
    r"attn\.qkv": "attn.qkv",
    r"attn\.proj": "attn.out",
    "norm2": "norm2",
    r"mlp\.fc1": "mlp.fc1",
    r"mlp\.fc2": "mlp.fc2",
    r"ls1\.gamma": "ls1",
    r"ls2\.gamma": "ls2",
}


def conversion_rules() -> list[Rule]:
    """timm's native names → ours; the classifier (`head.*`) is not part of the backbone."""
    return [
        Rule(r"cls_token", "embeddings.cls_token"),
        Rule(r"reg_token", "embeddings.register_tokens"),
        Rule(r"pos_embed", "embeddings.position"),
        *patch_rules(r"patch_embed\.proj"),
        *norm_rules(r"norm_pre", "embeddings.pre_norm"),
        *block_rules(r"blocks\.(\d+)", BLOCK_NAMES),
        *norm_rules(r"norm", "norm"),
        *norm_rules(r"fc_norm", "fc_norm"),
        Rule(r"attn_pool\.latent", "attn_pool.latent"),
        *linear_rules(r"attn_pool\.(q|kv|proj)", r"attn_pool.\1"),
        *norm_rules(r"attn_pool\.norm", "attn_pool.norm"),
        *linear_rules(r"attn_pool\.mlp\.(fc1|fc2)", r"attn_pool.mlp.\1"),
        Rule(r"head\..*", None),
    ]
