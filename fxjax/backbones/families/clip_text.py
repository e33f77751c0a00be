"""The text towers of CLIP and SigLIP (HF `clip` / `clip_text_model`, `siglip` / `siglip_text_model`) and of
open_clip's own `TextTransformer`: one module, since the maths differs only in the attention mask, the pooled
token and the projection.

Token embeddings + learned positions → pre-LN blocks (causal for CLIP, bidirectional for SigLIP) → final norm →
one token pooled → projection into the joint image-text space. Outputs of `TextTransformer.__call__(ids)`:
  pooled             [n, d]        the final-normed pooled token (HF CLIP's `pooler_output`)
  embedding          [n, e]        the projected pooled token: HF `get_text_features`, open_clip `encode_text`
  last_hidden_state  [n, t, d]     final-normed tokens, as HF's
  hidden_states      tuple of [n, t, d]: embeddings output, then each block's output (HF `output_hidden_states`)
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from fxjax.backbones.convert import Rule
from fxjax.backbones.hf_names import LAYER_NAMES
from fxjax.backbones.transformer import Attention, Block, TransformerSpec, block_rules, layer_norm, linear_rules

MODEL_TYPES = ("clip", "clip_text_model", "siglip", "siglip_text_model")

# The pooled token: the first maximal id (OpenAI's EOT has the largest id), the first `eos_id`, the last, the first.
POOLS = ("argmax", "eos", "last", "first")


@dataclass(frozen=True)
class TextSpec:
    trunk: TransformerSpec  # the blocks (no patches: its image fields are unused)
    vocab_size: int
    context_length: int
    embed_dim: int | None  # projection output; None: no projection (embedding = pooled)
    causal: bool = True
    pool: str = "argmax"
    eos_id: int | None = None  # for pool="eos"
    proj_bias: bool = False  # SigLIP's head and open_clip's `proj_bias` are biased linears

    def __post_init__(self) -> None:
        if self.pool not in POOLS:
            raise ValueError(f"unsupported text pooling {self.pool!r}; supported: {', '.join(POOLS)}")
        if self.pool == "eos" and self.eos_id is None:
            raise ValueError("text pooling 'eos' needs eos_id: set the tokenizer's end-of-text id")


def spec(config) -> TextSpec:
    """From a transformers CLIP / SigLIP config (full or text-only)."""
    text = getattr(config, "text_config", None) or config
    siglip = config.model_type.startswith("siglip")
    if siglip:
        embed_dim = text.projection_size
    else:
        embed_dim = config.projection_dim if config.model_type == "clip" else None
    # HF CLIP: a legacy eos_token_id of 2 means "the largest id", the first eos token otherwise.
    pool = "last" if siglip else ("argmax" if text.eos_token_id == 2 else "eos")
    return TextSpec(
        TransformerSpec.from_hf(text, image_size=1, patch_size=1),  # no patches
        vocab_size=text.vocab_size,
        context_length=text.max_position_embeddings,
        embed_dim=embed_dim,
        causal=not siglip,
        pool=pool,
        eos_id=None if pool != "eos" else text.eos_token_id,
        proj_bias=siglip,
    )


class TextAttention(Attention):
    """The trunk's attention, causal (CLIP) or bidirectional (SigLIP). No padding mask: with a causal mask the
    padding after the pooled token cannot reach it, and SigLIP was trained attending to its padding."""

    def __init__(self, spec: TransformerSpec, causal: bool, *, dtype, param_dtype, rngs: nnx.Rngs):
        super().__init__(spec, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.causal = causal

    def __call__(self, x: jax.Array) -> jax.Array:  # [n, t, d]
        n, t, d = x.shape
        if self.qkv is not None:
            q, k, v = jnp.moveaxis(self.qkv(x).reshape(n, t, 3, self.heads, d // self.heads), 2, 0)
        else:
            q, k, v = (f(x).reshape(n, t, self.heads, d // self.heads) for f in (self.query, self.key, self.value))
        y = jax.nn.dot_product_attention(q, k, v, is_causal=self.causal)  # [n, t, heads, head_dim]
        return self.out(y.reshape(n, t, d))


class TextBlock(Block):
    def __init__(self, spec: TransformerSpec, causal: bool, *, dtype, param_dtype, rngs: nnx.Rngs):
        super().__init__(spec, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attn = TextAttention(spec, causal, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class TextTransformer(nnx.Module):
    def __init__(self, spec: TextSpec, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        trunk = spec.trunk
        self.spec, self.dtype = spec, dtype
        init = nnx.initializers.normal(0.02)
        self.token_embedding = nnx.Param(init(rngs.params(), (spec.vocab_size, trunk.dim), param_dtype))
        self.position = nnx.Param(init(rngs.params(), (spec.context_length, trunk.dim), param_dtype))
        self.blocks = nnx.List([TextBlock(trunk, spec.causal, **kw) for _ in range(trunk.depth)])
        self.norm = layer_norm(trunk, **kw)
        self.projection = (
            nnx.Linear(trunk.dim, spec.embed_dim, use_bias=spec.proj_bias, **kw) if spec.embed_dim else None
        )

    def pooled_index(self, ids: jax.Array) -> jax.Array:
        """[n, t] token ids → [n] position of the pooled token."""
        n, t = ids.shape
        if self.spec.pool == "argmax":
            return jnp.argmax(ids, axis=-1)
        if self.spec.pool == "eos":
            return jnp.argmax(ids == self.spec.eos_id, axis=-1)
        return jnp.full((n,), t - 1 if self.spec.pool == "last" else 0)

    def __call__(self, ids: jax.Array) -> dict:
        """ids: [n, t] int token ids, t <= context_length (padded as the checkpoint's tokenizer pads)."""
        t = ids.shape[1]
        if t > self.spec.context_length:
            raise ValueError(f"{t} tokens exceed the text tower's context length {self.spec.context_length}")
        h = jnp.take(self.token_embedding[...], ids, axis=0) + self.position[...][:t]  # [n, t, d]
        h = h.astype(self.dtype)
        hidden = [h]
        for block in self.blocks:
            h = block(h)
            hidden.append(h)
        normed = self.norm(h)
        pooled = jnp.take_along_axis(normed, self.pooled_index(ids)[:, None, None], axis=1)[:, 0]  # [n, d]
        embedding = self.projection(pooled) if self.projection is not None else pooled
        return {"pooled": pooled, "embedding": embedding, "last_hidden_state": normed, "hidden_states": tuple(hidden)}


def build(config, *, dtype, param_dtype, rngs: nnx.Rngs) -> TextTransformer:
    return TextTransformer(spec(config), dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def conversion_rules(config) -> list[Rule]:
    """HF names: `text_model.*` (+ `text_projection` for CLIP; SigLIP's projection is `text_model.head`)."""
    full = config.model_type in ("clip", "siglip")
    prefix = r"text_model\." if full else r"(?:text_model\.)?"
    rules = [
        Rule(rf"{prefix}embeddings\.token_embedding\.(?:weight|embedding)", "token_embedding"),
        Rule(rf"{prefix}embeddings\.position_embedding\.(?:weight|embedding)", "position"),
        *block_rules(rf"{prefix}encoder\.layers\.(\d+)", LAYER_NAMES),
        Rule(rf"{prefix}final_layer_norm\.(?:weight|scale)", "norm.scale"),
        Rule(rf"{prefix}final_layer_norm\.bias", "norm.bias"),
        *linear_rules(rf"{prefix}head", "projection"),
        Rule(r".*position_ids", None),  # a buffer that older checkpoints saved
    ]
    if full:  # the vision half and the logit scale belong to the image backbone and the zero-shot head
        return rules + [
            *linear_rules(r"text_projection", "projection"),
            Rule(r"(?:vision_model\..*|visual_projection\..*|logit_scale|logit_bias)", None),
        ]
    return rules + [Rule(r"text_projection\..*", None)]  # a CLIPTextModelWithProjection's projection
