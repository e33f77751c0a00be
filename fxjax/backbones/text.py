"""A text tower with its tokenizer: what zero-shot classification and text-initialised heads need from a
CLIP-family checkpoint besides its image backbone.

`load_text_tower(name)` reads HF CLIP / SigLIP checkpoints (full or text-only, with the tokenizer saved beside
them; transformers' AutoTokenizer, no torch) and open_clip checkpoints (`open_clip_config.json`; see
`fxjax.backbones.checkpoints.open_clip.load_text` for its tokenizer).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fxjax.backbones import formats
from fxjax.backbones.convert import load_state
from fxjax.backbones.families import clip_text
from fxjax.backbones.text_tokenizers import HFTokens


@dataclass(eq=False)  # identity semantics: each instance owns its jitted functions
class TextTower:
    module: nnx.Module  # clip_text.TextTransformer
    tokenize: Callable[[Sequence[str]], np.ndarray]  # texts → [n, context] int32
    info: dict = field(default_factory=dict)  # name, model_type, revision, weight files + hash, logit_scale / bias

    def __post_init__(self):
        self.graphdef, self.state = nnx.split(self.module)
        self._embed = jax.jit(lambda state, ids: nnx.merge(self.graphdef, state)(ids)["embedding"])
        self._outputs = jax.jit(lambda state, ids: nnx.merge(self.graphdef, state)(ids))

    def encode(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """texts → [n, e] text embeddings in the joint image-text space (not normalised), as the reference's
        `get_text_features` / `encode_text`. With several batches, the last is padded (one compiled shape)."""
        if isinstance(texts, str):
            raise ValueError(f"encode takes a list of texts, got the single string {texts!r}: wrap it in a list")
        chunks = []
        for start in range(0, len(texts), batch_size):
            ids = self.tokenize(list(texts[start : start + batch_size]))  # [b, context]
            pad = batch_size - ids.shape[0] if len(texts) > batch_size else 0
            ids = np.pad(ids, ((0, pad), (0, 0)))
            chunks.append(np.asarray(self._embed(self.state, jnp.asarray(ids)))[: ids.shape[0] - pad])
        return np.concatenate(chunks) if chunks else np.zeros((0, self.embed_dim), np.float32)

    def outputs(self, ids) -> dict:
        """Every output of the tower (pooled, embedding, hidden states) for token ids [n, t]."""
        return self._outputs(self.state, jnp.asarray(ids))

    @property
    def embed_dim(self) -> int:
        spec = self.module.spec
        return spec.embed_dim or spec.trunk.dim


def logit_info(tensors: dict) -> dict:
    """What the checkpoint multiplies (exp(logit_scale)) and adds (logit_bias: SigLIP) to cosine similarities,
    as the zero-shot classifier needs them; absent from a tower-only checkpoint."""
    out = {}
    if "logit_scale" in tensors:
        out["logit_scale"] = float(np.exp(np.asarray(tensors["logit_scale"], np.float64).reshape(())))
    if "logit_bias" in tensors:
        out["logit_bias"] = float(np.asarray(tensors["logit_bias"], np.float64).reshape(()))
    return out


def load_text_tower(
    name: str,
    *,
    revision: str | None = None,
    dtype="float32",
    param_dtype="float32",
    bpe_vocab: str | Path | None = None,
) -> TextTower:
    """The text tower of a CLIP-family checkpoint: a local folder or Hub id, as `load_backbone` takes them.
    `bpe_vocab`: open_clip's `bpe_simple_vocab_16e6.txt.gz`, for open_clip models without an HF tokenizer."""
    from fxjax.backbones import hub
    from fxjax.backbones.checkpoints import open_clip

    dtype, param_dtype = jnp.dtype(dtype), jnp.dtype(param_dtype)
    path, revision = hub.resolve(name, revision)
    if open_clip.matches(path):
        return open_clip.load_text(
            path, name=name, revision=revision, dtype=dtype, param_dtype=param_dtype, bpe_vocab=bpe_vocab
        )
    return load_hf_text(path, name=name, revision=revision, dtype=dtype, param_dtype=param_dtype)


def load_hf_text(folder: Path, *, name: str, revision: str | None, dtype, param_dtype) -> TextTower:
    """An HF CLIP / SigLIP folder's text tower and its tokenizer (AutoTokenizer on the same folder)."""
    from transformers import AutoConfig, AutoTokenizer

    from fxjax.backbones import hub

    config = AutoConfig.from_pretrained(folder)
    if config.model_type not in clip_text.MODEL_TYPES:
        raise ValueError(
            f"{folder}: model_type {config.model_type!r} has no text tower fxjax reads; "
            f"supported: {', '.join(clip_text.MODEL_TYPES)}"
        )
    weight_file = hub.weight_files(folder)
    tensors = formats.read_checkpoint(weight_file)
    module = load_state(
        lambda: clip_text.build(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)),
        tensors,
        clip_text.conversion_rules(config),
        source=str(weight_file),
        param_dtype=param_dtype,
    )
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(
            f"{folder}: no tokenizer files beside the checkpoint; save the model's tokenizer there "
            "(tokenizer.save_pretrained(folder))"
        ) from err
    shards = hub._shards(weight_file)
    info = {
        "name": name,
        "model_type": config.model_type,
        "revision": revision,
        "weight_files": [str(p) for p in shards],
        "weight_sha256": formats.sha256_files(shards),
    } | logit_info(tensors)
    return TextTower(module, HFTokens(tokenizer, module.spec.context_length), info)
