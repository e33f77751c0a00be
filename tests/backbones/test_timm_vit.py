"""timm transformer checkpoints (vit_*, deit3_*, eva02_*) in timm's Hub layout: tiny random timm models written by
timm's own `save_for_hf`, loaded with `fxjax.load_backbone`, compared to timm (pooled = `forward_head(...,
pre_logits=True)`, the first block's output, `forward_features`); the architecture table against timm's registry;
the preprocessing against timm's eval transform."""

from __future__ import annotations

import functools
import json

import jax
import numpy as np
import pytest
from PIL import Image

import fxjax
from fxjax.backbones.checkpoints import timm as timm_layout, timm_archs
from fxjax.backbones.convert import WeightMismatchError
from fxjax.backbones.families import eva, timm_vit
from fxjax.data.preprocess import PreprocessSpec, preprocess_image

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
from timm.models._hub import save_for_hf  # noqa: E402

TINY = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2, num_classes=0)
TOL = 1e-4

# case → (architecture, extra timm arguments); what each case exercises is in its name
CASES = {
    "vit_cls_token": ("vit_base_patch16_224.augreg2_in21k_ft_in1k", {}),
    "vit_reg4_gap_fc_norm_with_head": ("vit_medium_patch16_reg4_gap_256", {"num_classes": 5}),
    "vit_gap_final_norm": ("vit_medium_patch16_gap_256", {}),
    "vit_clip_pre_norm_quickgelu": ("vit_base_patch16_clip_quickgelu_224", {}),
    "vit_siglip_map_pool": ("vit_base_patch16_siglip_224", {}),
    "vit_dinov2_swiglu_packed": ("vit_giant_patch14_dinov2", {"embed_dim": 48, "mlp_ratio": 2.66667 * 2}),
    "deit3_layer_scale": ("deit3_small_patch16_224", {}),
    "eva02_rope_swiglu_packed": ("eva02_tiny_patch14_224.mim_in22k", {}),
    "eva02_separate_qkv_swiglu_norm": ("eva02_base_patch14_224.mim_in22k", {}),
    "eva02_clip_attn_norm_token_pool": ("eva02_large_patch14_clip_224", {}),
}


def _tiny_timm(arch: str, **kw):
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, **{**TINY, **kw}).eval()
    with torch.no_grad():  # timm initialises biases, LayerScale and tokens to constants: perturb them all
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def _save(model, folder, safe: bool = True):
    save_for_hf(model, folder, safe_serialization=safe)
    return folder


def _reference(model, x: np.ndarray) -> dict:
    """timm's pooled features, first block output and forward_features for NHWC x."""
    seen = {}
    hook = model.blocks[0].register_forward_hook(lambda mod, args, out: seen.setdefault("block0", out))
    with torch.no_grad():
        features = model.forward_features(torch.from_numpy(x).permute(0, 3, 1, 2))
        pooled = model.forward_head(features, pre_logits=True)
    hook.remove()
    return {"pooled": pooled.numpy(), "block0": seen["block0"].numpy(), "features": features.numpy()}


def _max_diffs(backbone, model, x) -> dict[str, float]:
    ref, outs = _reference(model, x), backbone.outputs(x)
    ours = {"pooled": outs["pooled"], "block0": outs["hidden_states"][1], "features": outs["last_hidden_state"]}
    return {k: float(np.abs(np.asarray(ours[k]) - ref[k]).max()) for k in ref}


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)


@pytest.mark.parametrize("case", CASES)
def test_parity_with_timm(case, tmp_path, images):
    arch, kw = CASES[case]
    model = _tiny_timm(arch, **kw)
    folder = _save(model, tmp_path)
    backbone = fxjax.load_backbone(str(folder))
    diffs = _max_diffs(backbone, model, images)
    assert max(diffs.values()) <= TOL, diffs
    assert backbone.info["model_type"] == f"timm:{arch.split('.')[0]}"
    _, pretrained_cfg, _ = timm_layout.read_config(folder)
    assert backbone.preprocess == timm_layout.preprocess_spec(pretrained_cfg)
    assert backbone.preprocess.size == (32, 32)


def _assert_same_weights(a, b) -> None:
    """Two loaded backbones hold equal parameters (forward parity is the parity cases' job)."""
    leaves = jax.tree.leaves(jax.tree.map(lambda x, y: bool(np.array_equal(x, y)), a.state, b.state))
    assert leaves and all(leaves)


@pytest.mark.parametrize(
    ("arch", "size"), [("vit_medium_patch16_reg4_gap_256", 48), ("eva02_tiny_patch14_224.mim_in22k", 24)]
)
def test_other_input_sizes_as_timms_dynamic_img_size(arch, size, tmp_path):
    # positions resized as timm does (bicubic, antialiased); EVA's RoPE on the new grid, rescaled to its reference
    model = _tiny_timm(arch, dynamic_img_size=True)
    backbone = fxjax.load_backbone(str(_save(model, tmp_path)))
    x = np.random.default_rng(1).normal(size=(2, size, size, 3)).astype(np.float32)
    diffs = _max_diffs(backbone, model, x)
    assert max(diffs.values()) <= TOL, diffs


def test_pytorch_bin_instead_of_safetensors(tmp_path):
    model = _tiny_timm("deit3_small_patch16_224")
    folder = _save(model, tmp_path / "bin", safe=False)
    assert not (folder / "model.safetensors").exists()
    backbone = fxjax.load_backbone(str(folder))
    assert backbone.info["weight_files"] == [str(folder / "pytorch_model.bin")]
    _assert_same_weights(backbone, fxjax.load_backbone(str(_save(model, tmp_path / "safetensors"))))


def test_model_args_override_the_architecture_defaults(tmp_path, images):
    # vit_base_* has a class token, qkv biases and no LayerScale; the checkpoint's model_args say otherwise.
    model = _tiny_timm("vit_base_patch16_224", class_token=False, global_pool="avg", qkv_bias=False, init_values=0.1)
    folder = _save(model, tmp_path)
    assert json.loads((folder / "config.json").read_text())["model_args"]["qkv_bias"] is False
    assert max(_max_diffs(fxjax.load_backbone(str(folder)), model, images).values()) <= TOL

    config = json.loads((folder / "config.json").read_text())
    config["model_args"] = {k: v for k, v in config["model_args"].items() if k not in ("qkv_bias", "init_values")}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightMismatchError, match=r"missing: blocks\.0\.attn\.qkv\.bias"):
        fxjax.load_backbone(str(folder))


def test_a_cached_timm_hub_id_loads_offline(tmp_path, monkeypatch):
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--timm--vit_base_patch16_224.augreg2_in21k_ft_in1k"
    model = _tiny_timm("vit_base_patch16_224.augreg2_in21k_ft_in1k")
    _save(model, repo / "snapshots" / sha)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    backbone = fxjax.load_backbone("timm/vit_base_patch16_224.augreg2_in21k_ft_in1k")
    assert backbone.info["revision"] == sha
    assert backbone.info["weight_files"] == [str(repo / "snapshots" / sha / "model.safetensors")]
    _assert_same_weights(backbone, fxjax.load_backbone(str(repo / "snapshots" / sha)))


def _write_config(folder, architecture: str) -> str:
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"architecture": architecture, "pretrained_cfg": {}}))
    return str(folder)


def test_unsupported_architectures_say_what_is_supported(tmp_path):
    with pytest.raises(
        ValueError, match=r"unsupported timm architecture 'swin_tiny_patch4_window7_224'; supported: .*vit_\*"
    ):
        fxjax.load_backbone(_write_config(tmp_path / "swin", "swin_tiny_patch4_window7_224"))
    with pytest.raises(ValueError, match=r"'vit_small_patch16_18x2_224': unknown variant '18x2'"):
        fxjax.load_backbone(_write_config(tmp_path / "parallel", "vit_small_patch16_18x2_224"))
    with pytest.raises(ValueError, match=r"fxjax does not implement qk_norm=True"):
        timm_vit.from_args("vit_base_patch16_224", {"qk_norm": True})


# ---- the architecture table against timm's registry -------------------------------------------------------------


def _timm_kwargs(name: str, monkeypatch) -> tuple[str, dict]:
    """(module, kwargs) that timm's entry point for `name` passes to its model factory, with timm's layer
    arguments turned into the names the table uses."""
    from timm.models import deit, vision_transformer

    captured = {}
    for module, factory in ((vision_transformer, "_create_vision_transformer"), (deit, "_create_deit")):
        monkeypatch.setattr(module, factory, lambda variant, pretrained=False, **kw: captured.update(kw))
    monkeypatch.setattr(timm.models.eva, "_create_eva", lambda variant, pretrained=False, **kw: captured.update(kw))
    entry = timm.models.model_entrypoint(name)
    entry()
    kwargs = dict(captured)
    norm = kwargs.pop("norm_layer", None)
    if isinstance(norm, functools.partial) and norm.func is timm.layers.LayerNorm and set(norm.keywords) == {"eps"}:
        kwargs["norm_eps"] = norm.keywords["eps"]
    elif norm is not None:
        kwargs["norm_layer"] = norm
    mlp = kwargs.pop("mlp_layer", None)
    if mlp is not None:
        kwargs["mlp_layer"] = "swiglu_packed" if mlp is timm.layers.SwiGLUPacked else mlp
    act = kwargs.get("act_layer")
    if act is torch.nn.SiLU:
        kwargs["act_layer"] = "silu"
    return entry.__module__, kwargs


def test_architecture_table_matches_timms_registry(monkeypatch):
    accepted = {"vit": 0, "eva": 0}
    for name in timm.list_models(["vit_*", "deit3_*", "eva02_*"]):
        is_eva = name.startswith("eva02_")
        try:
            ours = (timm_archs.eva02_args if is_eva else timm_archs.vit_args)(name)
        except ValueError:
            continue  # not claimed: loading it fails with this error
        module, theirs = _timm_kwargs(name, monkeypatch)
        family = eva if is_eva else timm_vit
        assert module.endswith(".eva" if is_eva else (".vision_transformer", ".deit")), (name, module)
        assert family.from_args(name, ours) == family.from_args(name, theirs), name
        accepted["eva" if is_eva else "vit"] += 1
    assert accepted["vit"] >= 100 and accepted["eva"] >= 10, accepted


# ---- preprocessing against timm's eval transform ----------------------------------------------------------------

PRETRAINED_CFGS = {
    "augreg_bicubic_0.9": dict(input_size=(3, 224, 224), crop_pct=0.9, interpolation="bicubic", mean=(0.5,) * 3),
    "imagenet_defaults": dict(input_size=(3, 224, 224)),
    "crop_pct_1_bilinear": dict(input_size=(3, 256, 256), crop_pct=1.0, interpolation="bilinear"),
    "squash": dict(input_size=(3, 224, 224), crop_pct=0.95, crop_mode="squash", interpolation="bicubic"),
    "small_odd_offsets": dict(input_size=(3, 77, 77), crop_pct=0.875, interpolation="bicubic"),
}


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    """scikit-learn's two photos, and non-square crops of them (tall, wide, odd sizes)."""
    from sklearn.datasets import load_sample_images

    full = [np.asarray(i) for i in load_sample_images().images]  # 427 x 640
    boxes = [(0, 0, 301, 427), (13, 40, 640, 241), (100, 7, 433, 258)]  # (left, top, right, bottom)
    crops = [np.asarray(Image.fromarray(full[0]).crop(b)) for b in boxes]
    return full + crops


@pytest.mark.parametrize("cfg_name", PRETRAINED_CFGS)
def test_preprocessing_equals_timms_eval_transform(cfg_name, photos):
    from timm.data import create_transform, resolve_data_config

    cfg = PRETRAINED_CFGS[cfg_name]
    transform = create_transform(**resolve_data_config(pretrained_cfg=cfg))
    spec = timm_layout.preprocess_spec(cfg)
    assert PreprocessSpec(**json.loads(json.dumps(spec.to_dict()))) == spec  # survives the run files
    for photo in photos:
        theirs = transform(Image.fromarray(photo)).permute(1, 2, 0).numpy()
        ours = preprocess_image(photo, spec)
        assert ours.shape == theirs.shape
        assert np.abs(ours - theirs).max() <= 1e-5, (cfg_name, photo.shape)
