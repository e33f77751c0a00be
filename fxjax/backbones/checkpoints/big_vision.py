"""JAX/Flax `.npz` checkpoints of Google's ViTs: google-research/vision_transformer (`ViT-B_16.npz`, the AugReg
files) and big_vision (ViTs, SigLIP image towers), loaded into the shared ViT trunk.

A file is claimed when it is an `.npz` archive holding an `embedding/kernel` array (under no prefix, `params/`,
`params/img/` for a two-tower SigLIP file, or `opt/target/`; the text tower and the rest are ignored). Both
namings load: vision_transformer's (`Transformer/posembed_input/pos_embedding`, `MultiHeadDotProductAttention_1`,
`LayerNorm_2`, `MlpBlock_3`) and big_vision's (`pos_embedding`, `MultiHeadDotProductAttention_0`, `LayerNorm_1`,
`MlpBlock_0`), with blocks stored one by one (`encoderblock_N`) or scanned (`encoderblock`, a leading depth axis).

The architecture comes from the tensors: width and patch size from `embedding/kernel`, heads from the attention
kernels ([width, heads, head_dim]), depth from the blocks, the input size from the position grid (224 or 384 for
AugReg). Pooling follows the file: `MAPHead_0` → SigLIP's attention-pooling head (pooled = its output, as HF's
`pooler_output`); a `cls` token → the final-normed CLS token; neither (big_vision's "gap") → the mean of the
final-normed tokens. big_vision adds its position embeddings before prepending `cls`, so the CLS token gets a zero
position here. The MLPs use the tanh-approximated GELU that these Flax models compute (`nn.gelu`'s default;
timm and transformers load AugReg ViTs with the exact GELU instead, a difference near 1e-3 in the features).

Preprocessing: resize to the model's size (bilinear, as big_vision's `resize`), then mean = std = 0.5. The size is
the position grid times the patch: SigLIP So400m/14 "384" stores 27x27 positions, so it is fed 378 px (big_vision
resizes to 384 and its stride-14 convolution ignores the last 6 pixels).
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import numpy as np
from flax import nnx

from fxjax.backbones import formats
from fxjax.backbones.backbone import Backbone
from fxjax.backbones.convert import Rule, load_state
from fxjax.backbones.families.siglip import SiglipVision
from fxjax.backbones.transformer import TransformerSpec, VisionTransformer
from fxjax.data.preprocess import PreprocessSpec

# Where the image model's parameters sit in the archive, tried in order (timm's `_load_weights` reads the same).
PREFIXES = ("", "opt/target/", "params/", "params/img/")
_ANCHOR = "embedding/kernel"
_BLOCK = r"Transformer/encoderblock_(\d+)"
_MHA = r"MultiHeadDotProductAttention_[01]"
_MAP = "MAPHead_0/MultiHeadDotProductAttention_0"


def _dense(src: str, dst: str) -> list[Rule]:
    """A Flax Dense (kernel [in, out], already in our layout) or LayerNorm (`scale`)."""
    return [Rule(rf"{src}/{kind}", f"{dst}.{kind}") for kind in ("kernel", "scale", "bias")]


RULES = [
    *_dense("embedding", "embeddings.patch_embed"),
    Rule(r"cls", "embeddings.cls_token"),
    Rule(r"(?:Transformer/posembed_input/)?pos_embedding", "embeddings.position"),
    *_dense(rf"{_BLOCK}/LayerNorm_0", r"blocks.\1.norm1"),
    *_dense(rf"{_BLOCK}/LayerNorm_[12]", r"blocks.\1.norm2"),
    *_dense(rf"{_BLOCK}/{_MHA}/(query|key|value)", r"blocks.\1.attn.\2"),
    *_dense(rf"{_BLOCK}/{_MHA}/out", r"blocks.\1.attn.out"),
    *_dense(rf"{_BLOCK}/MlpBlock_[03]/Dense_0", r"blocks.\1.mlp.fc1"),
    *_dense(rf"{_BLOCK}/MlpBlock_[03]/Dense_1", r"blocks.\1.mlp.fc2"),
    *_dense("Transformer/encoder_norm", "norm"),
    Rule(r"MAPHead_0/probe", "head.probe"),
    *_dense(rf"{_MAP}/in_proj", "head.in_proj"),
    *_dense(rf"{_MAP}/out", "head.out"),
    *_dense(r"MAPHead_0/LayerNorm_0", "head.norm"),
    *_dense(r"MAPHead_0/MlpBlock_0/Dense_0", "head.mlp.fc1"),
    *_dense(r"MAPHead_0/MlpBlock_0/Dense_1", "head.mlp.fc2"),
    Rule(r"(?:head|pre_logits)/.*", None),  # the classifier (and old representation layer) of a trained ViT
]


def matches(path: Path) -> bool:
    if not (path.is_file() and path.suffix.lower() == ".npz"):
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
    except (OSError, zipfile.BadZipFile):
        return False
    return any(f"{prefix}{_ANCHOR}.npy" in names for prefix in PREFIXES)


def image_tensors(tensors: dict[str, np.ndarray], path: Path) -> dict[str, np.ndarray]:
    """The image model's arrays, prefix removed, in per-block names (a scanned file's blocks unstacked)."""
    prefix = next((p for p in PREFIXES if f"{p}{_ANCHOR}" in tensors), None)
    if prefix is None:
        raise ValueError(f"{path}: no '{_ANCHOR}' under any of the prefixes {PREFIXES}; not a ViT .npz checkpoint")
    out = {}
    for name, array in tensors.items():
        if not name.startswith(prefix) or (prefix == "params/" and name.startswith("params/img/")):
            continue
        name = name[len(prefix) :]
        if name.startswith("Transformer/encoderblock/"):  # scanned: [depth, ...] per parameter
            rest = name.removeprefix("Transformer/encoderblock/")
            out.update({f"Transformer/encoderblock_{i}/{rest}": a for i, a in enumerate(array)})
        else:
            out[name] = array
    return out


def spec(tensors: dict[str, np.ndarray], path: Path) -> TransformerSpec:
    """The architecture that `image_tensors` hold (see the module docstring)."""
    pos = next((n for n in ("pos_embedding", "Transformer/posembed_input/pos_embedding") if n in tensors), None)
    if pos is None:
        raise ValueError(
            f"{path}: no stored position embedding (a big_vision 'sincos2d' model?); fxjax reads learned ones only"
        )
    patch, _, _, dim = tensors["embedding/kernel"].shape  # [p, p, 3, d]
    query = next(a for n, a in tensors.items() if re.fullmatch(rf"{_BLOCK}/{_MHA}/query/kernel", n))
    mlp = next(a for n, a in tensors.items() if re.fullmatch(rf"{_BLOCK}/MlpBlock_[03]/Dense_0/kernel", n))
    depth = 1 + max(int(m.group(1)) for n in tensors if (m := re.match(rf"{_BLOCK}/", n)))
    cls = "cls" in tensors
    # vision_transformer stores a position for `cls`, big_vision does not.
    grid = int(round(np.sqrt(tensors[pos].shape[1] - int(cls and pos != "pos_embedding"))))
    return TransformerSpec(
        dim=dim,
        depth=depth,
        heads=query.shape[1],  # [d, heads, head_dim]
        mlp_dim=mlp.shape[1],
        image_size=grid * patch,
        patch_size=patch,
        act="gelu_pytorch_tanh",
        eps=1e-6,
        cls_token=cls,
    )


def trunk_tensors(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`image_tensors` in the trunk's layout: attention kernels as [in, out] matrices, the MAP head's query,
    key and value stacked into one `in_proj`, and a zero position for a big_vision `cls` token."""
    out = dict(tensors)
    for name, array in tensors.items():
        if re.fullmatch(rf"(?:{_BLOCK}/{_MHA}|{_MAP})/(?:query|key|value)/kernel", name):  # [d, heads, head_dim]
            out[name] = array.reshape(array.shape[0], -1)
        elif re.fullmatch(rf"(?:{_BLOCK}/{_MHA}|{_MAP})/(?:query|key|value)/bias", name):  # [heads, head_dim]
            out[name] = array.reshape(-1)
        elif re.fullmatch(rf"(?:{_BLOCK}/{_MHA}|{_MAP})/out/kernel", name):  # [heads, head_dim, d]
            out[name] = array.reshape(-1, array.shape[-1])
    if f"{_MAP}/query/kernel" in out:
        for kind, axis in (("kernel", 1), ("bias", 0)):
            parts = [out.pop(f"{_MAP}/{p}/{kind}") for p in ("query", "key", "value")]
            out[f"{_MAP}/in_proj/{kind}"] = np.concatenate(parts, axis=axis)  # [d, 3d] / [3d]
    if "pos_embedding" in out and "cls" in out:
        pos = out["pos_embedding"]  # [1, g*g, d]
        out["pos_embedding"] = np.concatenate([np.zeros_like(pos[:, :1]), pos], axis=1)
    return out


def load(path: Path, *, name: str, revision: str | None, dtype, param_dtype) -> Backbone:
    tensors = image_tensors(formats.read_checkpoint(path), path)
    arch = spec(tensors, path)
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    if "MAPHead_0/probe" in tensors:
        build, model_type = (lambda: SiglipVision(arch, True, **kw, rngs=nnx.Rngs(0))), "siglip"
    elif arch.cls_token:
        build, model_type = (lambda: VisionTransformer(arch, **kw, rngs=nnx.Rngs(0))), "vit"
    else:  # "gap": the mean of the final-normed tokens
        build, model_type = (lambda: SiglipVision(arch, False, **kw, rngs=nnx.Rngs(0))), "vit"
    module = load_state(build, trunk_tensors(tensors), RULES, source=str(path), param_dtype=param_dtype)
    info = {
        "name": name,
        "model_type": model_type,
        "revision": revision,
        "weight_files": [str(path)],
        "weight_sha256": formats.sha256_files([path]),
    }
    size = (arch.image_size, arch.image_size)
    preprocess = PreprocessSpec(size=size, mean=(0.5,) * 3, std=(0.5,) * 3, resample="bilinear")
    return Backbone(module, preprocess, info, dtype)
