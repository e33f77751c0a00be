"""Original-format weight files loaded by path: DINOv2's torch-hub `.pth` (reference: DINOv2's own
`DinoVisionTransformer`; for registers, which the installed dinov2 predates, timm's DINOv2-registers ViT fed by
timm's own converter) and Google's ViT / SigLIP `.npz` (reference: timm's `_load_weights`, the npz loader timm
users rely on). Tiny random models; features and one block's output must agree to 1e-4."""

from __future__ import annotations

import inspect
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from dinov2.data.transforms import make_classification_eval_transform
from dinov2.layers import MemEffAttention, NestedTensorBlock as DinoBlock
from dinov2.models.vision_transformer import DinoVisionTransformer
from timm.models.vision_transformer import _load_weights, checkpoint_filter_fn

import fxjax
from fxjax.backbones import checkpoints
from fxjax.backbones.checkpoints import big_vision, dinov2_hub
from fxjax.backbones.formats import CheckpointError, read_checkpoint

TOL = 1e-4


def _perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random values everywhere (inits leave LayerNorms at 1 / 0 and LayerScale constant)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _images(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, h, w, 3)).astype(np.float32)  # [n, h, w, 3]


def _block0(model: torch.nn.Module, x: np.ndarray, run) -> tuple[dict, np.ndarray]:
    """The reference's outputs and the first block's output, [n, tokens, d]."""
    seen = []
    hook = model.blocks[0].register_forward_hook(lambda module, args, out: seen.append(out.detach().numpy()))
    with torch.no_grad():
        out = run(torch.from_numpy(x).permute(0, 3, 1, 2))
    hook.remove()
    return out, seen[0]


def _close(ours, theirs) -> None:
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), atol=TOL, rtol=0)


# ---- DINOv2 torch-hub files


def _dinov2(dim: int, heads: int, ffn_layer: str = "mlp", seed: int = 0) -> DinoVisionTransformer:
    torch.manual_seed(seed)
    model = DinoVisionTransformer(  # the hub's construction (init_values=1, block_chunks=0), tiny: 56 px, 4x4 grid
        img_size=56,
        patch_size=14,
        embed_dim=dim,
        depth=2,
        num_heads=heads,
        mlp_ratio=4,
        init_values=1.0,
        ffn_layer=ffn_layer,
        block_chunks=0,
        block_fn=partial(DinoBlock, attn_class=MemEffAttention),
    )
    return _perturb(model, seed)


@pytest.mark.parametrize(
    "file_name, dim, heads, ffn_layer, sizes",
    [
        # A ViT-S name: the tensors' architecture wins. The stored 4x4 grid, then a non-square one.
        ("dinov2_vits14_pretrain.pth", 128, 2, "mlp", ((56, 56), (42, 98))),
        # ViT-g's SwiGLU, the head count from the name; a larger grid.
        ("dinov2_vitg14_heads4_pretrain.pth", 64, 4, "swiglufused", ((84, 84),)),
    ],
)
def test_dinov2_hub_file_matches_dinov2(tmp_path: Path, file_name: str, dim: int, heads: int, ffn_layer: str, sizes):
    model = _dinov2(dim, heads, ffn_layer)
    path = tmp_path / file_name
    torch.save(model.state_dict(), path)
    bb = fxjax.load_backbone(str(path))
    assert bb.info["model_type"] == "dinov2" and bb.info["weight_files"] == [str(path)]
    for h, w in sizes:  # other grids than the stored one: DINOv2 resizes its positions by (grid + 0.1) / 4
        x = _images(h, w)
        ref, block0 = _block0(model, x, model.forward_features)
        out = bb.outputs(x)
        _close(out["pooled"], ref["x_norm_clstoken"])
        _close(out["patch_tokens"], ref["x_norm_patchtokens"])
        _close(out["hidden_states"][1], block0)


def test_dinov2_hub_registers_match_timm(tmp_path: Path):
    # The hub's `_reg4` files: dinov2's naming plus `register_tokens`; positions resized with antialiasing.
    dim, heads = 128, 2
    state = {k: v.clone() for k, v in _dinov2(dim, heads, seed=1).state_dict().items()}
    state["register_tokens"] = 0.5 * torch.randn(1, 4, dim, generator=torch.Generator().manual_seed(2))
    path = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(state, path)
    ref_model = timm.create_model(
        "vit_small_patch14_reg4_dinov2", img_size=56, embed_dim=dim, depth=2, num_heads=heads, dynamic_img_size=True
    ).eval()
    ref_model.load_state_dict(checkpoint_filter_fn(dict(state), ref_model))
    bb = fxjax.load_backbone(str(path))
    assert bb.info["model_type"] == "dinov2_with_registers"
    for h, w in ((84, 70),):  # a non-square grid
        x = _images(h, w, seed=3)
        tokens, block0 = _block0(ref_model, x, ref_model.forward_features)  # [n, 1 + 4 + patches, d]
        out = bb.outputs(x)
        _close(out["pooled"], tokens[:, 0])
        _close(out["patch_tokens"], tokens[:, 5:])
        _close(out["hidden_states"][1], block0)


def test_dinov2_hub_preprocessing_is_dinov2_eval_transform():
    defaults = {k: p.default for k, p in inspect.signature(make_classification_eval_transform).parameters.items()}
    spec = dinov2_hub.PREPROCESS
    assert spec.resize_shortest == defaults["resize_size"] and spec.size == (defaults["crop_size"],) * 2
    assert spec.resample == defaults["interpolation"].value  # "bicubic"
    assert spec.mean == tuple(defaults["mean"]) and spec.std == tuple(defaults["std"])


def test_dinov2_hub_width_without_head_count_is_refused():
    arrays = {
        "cls_token": np.zeros((1, 1, 32)),
        "pos_embed": np.zeros((1, 17, 32)),
        "patch_embed.proj.weight": np.zeros((32, 3, 14, 14)),
        "blocks.0.attn.qkv.weight": np.zeros((96, 32)),
        "blocks.0.mlp.fc2.weight": np.zeros((32, 128)),
    }
    with pytest.raises(ValueError, match="dinov2_tiny_heads8.pth"):
        dinov2_hub.spec(arrays, Path("dinov2_tiny.pth"))


# ---- Google ViT / SigLIP .npz files


def _npz_arrays(model, *, big_vision_names: bool) -> tuple[dict, list[dict]]:
    """A timm ViT's weights in Google's Flax naming: the inverse of timm's `_load_weights` → (top-level arrays,
    one dict per block)."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    d = model.embed_dim
    h = model.blocks[0].attn.num_heads
    mha, ln2, mlp = ("MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0")
    if not big_vision_names:
        mha, ln2, mlp = ("MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3")

    def attention(q_w, q_b, kv_w, kv_b, out_w, out_b, prefix):  # torch [out, in] → kernel [in, heads, head_dim]
        arrays = {}
        for name, w, b in (("query", q_w, q_b), ("key", kv_w[:d], kv_b[:d]), ("value", kv_w[d:], kv_b[d:])):
            arrays[f"{prefix}/{name}/kernel"] = w.T.reshape(d, h, d // h)
            arrays[f"{prefix}/{name}/bias"] = b.reshape(h, d // h)
        arrays[f"{prefix}/out/kernel"] = out_w.reshape(d, h, d // h).transpose(1, 2, 0)  # [heads, head_dim, d]
        arrays[f"{prefix}/out/bias"] = out_b
        return arrays

    def dense(prefix, src):
        return {f"{prefix}/kernel": sd[f"{src}.weight"].T, f"{prefix}/bias": sd[f"{src}.bias"]}

    def norm(prefix, src):
        return {f"{prefix}/scale": sd[f"{src}.weight"], f"{prefix}/bias": sd[f"{src}.bias"]}

    top = {
        "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),  # [p, p, 3, d]
        "embedding/bias": sd["patch_embed.proj.bias"],
        "pos_embedding" if big_vision_names else "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
        **norm("Transformer/encoder_norm", "norm"),
    }
    if model.cls_token is not None:
        top["cls"] = sd["cls_token"]
    if model.attn_pool is not None:
        top["MAPHead_0/probe"] = sd["attn_pool.latent"]
        names = ("q.weight", "q.bias", "kv.weight", "kv.bias", "proj.weight", "proj.bias")
        top |= attention(*(sd[f"attn_pool.{n}"] for n in names), "MAPHead_0/MultiHeadDotProductAttention_0")
        top |= norm("MAPHead_0/LayerNorm_0", "attn_pool.norm")
        top |= dense("MAPHead_0/MlpBlock_0/Dense_0", "attn_pool.mlp.fc1")
        top |= dense("MAPHead_0/MlpBlock_0/Dense_1", "attn_pool.mlp.fc2")
    elif "head.weight" in sd:
        top |= dense("head", "head")
    blocks = []
    for i in range(len(model.blocks)):
        b = f"blocks.{i}"
        qkv_w, qkv_b = sd[f"{b}.attn.qkv.weight"], sd[f"{b}.attn.qkv.bias"]
        proj = sd[f"{b}.attn.proj.weight"], sd[f"{b}.attn.proj.bias"]
        blocks.append(
            {
                **norm("LayerNorm_0", f"{b}.norm1"),
                **attention(qkv_w[:d], qkv_b[:d], qkv_w[d:], qkv_b[d:], *proj, mha),
                **norm(ln2, f"{b}.norm2"),
                **dense(f"{mlp}/Dense_0", f"{b}.mlp.fc1"),
                **dense(f"{mlp}/Dense_1", f"{b}.mlp.fc2"),
            }
        )
    return top, blocks


def _write_npz(path: Path, model, *, big_vision_names: bool, scanned: bool = False, prefix: str = "", **extra):
    top, blocks = _npz_arrays(model, big_vision_names=big_vision_names)
    if scanned:  # one array per parameter, blocks stacked on a leading axis
        top |= {f"Transformer/encoderblock/{k}": np.stack([blk[k] for blk in blocks]) for k in blocks[0]}
    else:
        top |= {f"Transformer/encoderblock_{i}/{k}": v for i, blk in enumerate(blocks) for k, v in blk.items()}
    np.savez(path, **{prefix + k: v for k, v in top.items()}, **extra)


def _timm(name: str, **kwargs):
    # Tiny, 48 px / 16 px patches (3x3 grid); the Flax models' tanh GELU.
    model = timm.create_model(
        name, pretrained=False, img_size=48, depth=2, embed_dim=32, num_heads=2, act_layer="gelu_tanh", **kwargs
    )
    return _perturb(model, seed=4)


def _check_against_timm(path: Path, make_reference) -> fxjax.backbones.backbone.Backbone:
    reference = make_reference()
    _load_weights(reference, str(path))  # timm reads the file we wrote into a fresh model
    bb = fxjax.load_backbone(str(path))
    x = _images(48, 48, seed=5)
    pooled, block0 = _block0(reference, x, lambda t: reference.forward_head(reference.forward_features(t), True))
    out = bb.outputs(x)
    _close(out["pooled"], pooled)
    _close(out["hidden_states"][1], block0)
    assert bb.preprocess.size == (48, 48) and bb.preprocess.mean == (0.5,) * 3 and bb.preprocess.std == (0.5,) * 3
    return bb


VIT_NPZ = {
    # vision_transformer (`ViT-B_16.npz`, AugReg) stores a position for `cls`: timm's default ViT.
    "vision_transformer": (False, dict()),
    # big_vision adds positions to the patches only, then prepends `cls`: timm's `no_embed_class`.
    "big_vision": (True, dict(no_embed_class=True)),
    # big_vision's "gap" pooling: the mean of the final-normed tokens, no `cls`.
    "big_vision_gap": (True, dict(class_token=False, global_pool="avg", fc_norm=False)),
}


@pytest.mark.parametrize("variant", list(VIT_NPZ))
def test_vit_npz_matches_timm(tmp_path: Path, variant: str):
    big_vision_names, kwargs = VIT_NPZ[variant]
    model = _timm("vit_tiny_patch16_224", **kwargs)
    path = tmp_path / "ViT-B_16.npz"
    _write_npz(path, model, big_vision_names=big_vision_names)
    bb = _check_against_timm(path, lambda: _timm("vit_tiny_patch16_224", **kwargs))
    assert bb.info["model_type"] == "vit"


def test_siglip_npz_matches_timm(tmp_path: Path):
    # A two-tower big_vision file: the image tower under `params/img/`, scanned blocks, MAP head, no CLS token.
    model = _timm("vit_base_patch16_siglip_224")
    path = tmp_path / "webli_en_b16_224.npz"
    text = {"params/txt/Encoder_0/encoder_norm/scale": np.ones(8, np.float32), "params/t": np.ones(1, np.float32)}
    _write_npz(path, model, big_vision_names=True, scanned=True, prefix="params/img/", **text)
    bb = _check_against_timm(path, lambda: _timm("vit_base_patch16_siglip_224"))
    assert bb.info["model_type"] == "siglip"


def test_layouts_claim_their_files_only(tmp_path: Path):
    npz, other = tmp_path / "ViT-B_16.npz", tmp_path / "arrays.npz"
    np.savez(npz, **{"embedding/kernel": np.zeros((2, 2, 3, 4))})
    np.savez(other, x=np.zeros(3))
    pth = tmp_path / "dinov2_vitb14_pretrain.pth"
    torch.save({"cls_token": torch.zeros(1, 1, 4)}, pth)
    assert checkpoints.find_layout(npz) is big_vision and checkpoints.find_layout(pth) is dinov2_hub
    assert checkpoints.find_layout(other) is None
    with pytest.raises(FileNotFoundError, match="arrays.npz"):
        fxjax.load_backbone(str(other))


def test_npz_reader_refuses_pickled_arrays(tmp_path: Path):
    path = tmp_path / "objects.npz"
    np.savez(path, x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(CheckpointError, match="no pickles"):
        read_checkpoint(path)
