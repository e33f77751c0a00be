"""open_clip checkpoints (`open_clip_config.json` + weights, as `push_to_hf_hub` writes them): the vision
backbone, the text tower, the tokenizers and the eval preprocessing against open_clip itself, on tiny random
models registered as custom model configs."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

import fxjax
from fxjax.backbones.text import load_text_tower
from fxjax.backbones.text_tokenizers import ClipBpe
from fxjax.data.preprocess import preprocess_image

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")
from open_clip.push_to_hf_hub import save_config_for_hf  # noqa: E402
from open_clip.tokenizer import default_bpe  # noqa: E402

TINY = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
# SigLIP-like options: text under `text.`, bidirectional, last-token pooling, biased projection, an HF tokenizer;
# layer scale, quick GELU and another LayerNorm eps in both towers.
TINY_CUSTOM = {
    "embed_dim": 16,
    "quick_gelu": True,
    "custom_text": True,
    "vision_cfg": {**TINY["vision_cfg"], "ls_init_value": 0.5, "norm_kwargs": {"eps": 1e-6}},
    "text_cfg": {
        "context_length": 16,
        "width": 32,
        "heads": 2,
        "layers": 2,
        "ls_init_value": 0.5,
        "no_causal_mask": True,
        "pool_type": "last",
        "proj_bias": True,
        "norm_kwargs": {"eps": 1e-6},
    },
}
PROMPTS = ["a photo of a cat.", "A  Photo of the DOG!", "caf\u00e9 &amp; 3 bikes", "x", "a very long prompt " * 6]


def _save(model, config: dict, folder: Path, weights: str = "safetensors") -> Path:
    """What `open_clip.push_to_hf_hub.save_for_hf` writes (its tokenizer save aside)."""
    import safetensors.torch

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    if weights == "safetensors":
        safetensors.torch.save_file(tensors, folder / "open_clip_model.safetensors")
    else:
        torch.save(tensors, folder / "open_clip_pytorch_model.bin")
    save_config_for_hf(model, folder / "open_clip_config.json", model_config=config)
    return folder


def _model(name: str, config: dict):
    open_clip.factory._MODEL_CONFIGS[name] = copy.deepcopy(config)
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    model.eval()
    with torch.no_grad():  # move every weight off its init so that no mapping hides
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model, preprocess


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model, preprocess = _model("fxjax-tiny", TINY)
    return model, preprocess, _save(model, TINY, tmp_path_factory.mktemp("open_clip"))


@pytest.fixture(scope="module")
def tiny_custom(tmp_path_factory):
    from tests.backbones.test_text_towers import tiny_clip_tokenizer

    tok = tiny_clip_tokenizer()
    folder = tmp_path_factory.mktemp("open_clip_custom")
    tok.save_pretrained(folder)  # as save_for_hf saves an HF tokenizer beside the weights
    config = copy.deepcopy(TINY_CUSTOM)
    config["text_cfg"] |= {"vocab_size": len(tok), "hf_tokenizer_name": str(folder)}
    model, preprocess = _model("fxjax-tiny-custom", config)
    return model, preprocess, _save(model, config, folder), open_clip.get_tokenizer("fxjax-tiny-custom")


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def _first_block(module):
    """The output of the first residual block, caught by a hook ([n, t, d]: open_clip runs batch-first)."""
    caught = []
    module.transformer.resblocks[0].register_forward_hook(lambda _m, _i, out: caught.append(out))
    return caught


def _images(n=3) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, 32, 32, 3)).astype(np.float32)


def _check_vision(model, folder: Path) -> None:
    bb = fxjax.load_backbone(str(folder))
    assert bb.info["model_type"] == "open_clip"
    x = _images()
    visual = copy.deepcopy(model.visual)
    caught = _first_block(visual)
    with torch.no_grad():
        embedding = visual(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
        visual.proj = None  # the tower's pooled output before the projection
        pooled = visual(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
    out = bb.outputs(x)
    assert _max_diff(out["pooled"], pooled) <= 1e-4
    assert _max_diff(out["embedding"], embedding) <= 1e-4
    assert _max_diff(out["hidden_states"][1], caught[0]) <= 1e-4
    assert _max_diff(bb.features(x), pooled) <= 1e-4


def _check_text(model, tower, tokenizer) -> None:
    ids = tower.tokenize(PROMPTS)
    np.testing.assert_array_equal(ids, tokenizer(PROMPTS).numpy())
    text = model.text if hasattr(model, "text") else model
    caught = _first_block(text)
    with torch.no_grad():
        ref = model.encode_text(torch.from_numpy(ids.astype(np.int64)))
    out = tower.outputs(ids)
    assert _max_diff(out["hidden_states"][1], caught[0]) <= 1e-4
    assert _max_diff(out["embedding"], ref) <= 1e-4
    assert _max_diff(tower.encode(PROMPTS, batch_size=2), ref) <= 1e-4
    assert tower.info["logit_scale"] == pytest.approx(float(model.logit_scale.detach().exp()), rel=1e-6)


def test_vision_tower_matches_open_clip(tiny):
    model, _, folder = tiny
    _check_vision(model, folder)


def test_custom_options_match_open_clip(tiny_custom):
    model, _, folder, tokenizer = tiny_custom
    _check_vision(model, folder)
    _check_text(model, load_text_tower(str(folder)), tokenizer)


def test_text_tower_with_clip_bpe_matches_open_clip(tiny):
    model, _, folder = tiny
    tower = load_text_tower(str(folder), bpe_vocab=default_bpe())
    _check_text(model, tower, open_clip.get_tokenizer("fxjax-tiny"))


def test_clip_bpe_tokenizer_equals_open_clips():
    ours = ClipBpe(default_bpe(), context_length=77)
    texts = [*PROMPTS, "don't stop 123 ünïcödé", "<start_of_text> emoji 🐱", "x" * 200, ""]
    np.testing.assert_array_equal(ours(texts), open_clip.tokenizer.SimpleTokenizer(context_length=77)(texts).numpy())


def test_clip_bpe_tokenizer_needs_its_vocabulary(tiny):
    with pytest.raises(ValueError, match="pass bpe_vocab="):
        load_text_tower(str(tiny[2]))


def test_pytorch_bin_and_weight_file_path(tiny, tmp_path):
    model, _, _ = tiny
    folder = _save(model, TINY, tmp_path / "bin", weights="bin")
    bb = fxjax.load_backbone(str(folder / "open_clip_pytorch_model.bin"))  # a weight file, its config beside it
    assert bb.info["weight_files"] == [str(folder / "open_clip_pytorch_model.bin")]
    x = _images()
    with torch.no_grad():
        ref = model.visual(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
    assert _max_diff(bb.outputs(x)["embedding"], ref) <= 1e-4


def _photos() -> list[np.ndarray]:
    """Real photos (scikit-learn's, 427x640) and crops of other aspect ratios, odd sizes included."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    return [*photos, photos[0][:301, :200], photos[1][5:400, 7:120], photos[0][:45, :333]]


@pytest.mark.parametrize(
    "preprocess_cfg",
    [
        {},
        {"interpolation": "bilinear", "resize_mode": "squash"},
        {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic", "resize_mode": "shortest"},
    ],
)
def test_preprocessing_equals_open_clips_eval_transform(tiny, tmp_path, preprocess_cfg):
    from PIL import Image

    model, _, folder = tiny
    config = json.loads((folder / "open_clip_config.json").read_text())
    config["preprocess_cfg"] = preprocess_cfg  # as published; absent keys take open_clip's defaults
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
    (tmp_path / "open_clip_model.safetensors").symlink_to(folder / "open_clip_model.safetensors")
    spec = fxjax.load_backbone(str(tmp_path)).preprocess
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in preprocess_cfg.items()}
    transform = open_clip.image_transform(32, is_train=False, **cfg)
    for photo in _photos():
        ref = transform(Image.fromarray(photo)).numpy().transpose(1, 2, 0)
        assert _max_diff(preprocess_image(photo, spec), ref) <= 1e-5, photo.shape


def test_unsupported_options_are_named(tmp_path):
    config = copy.deepcopy(TINY)
    config["vision_cfg"] |= {"timm_model_name": "vit_base_patch16_siglip_224", "attentional_pool": True}
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": config}))
    (tmp_path / "open_clip_model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="timm_model_name.*attentional_pool"):
        fxjax.load_backbone(str(tmp_path))


def test_saved_preprocessing_equals_create_model_and_transforms(tiny):
    from PIL import Image

    _, transform, folder = tiny  # create_model_and_transforms(...)[2], and the preprocess_cfg it saved
    spec = fxjax.load_backbone(str(folder)).preprocess
    for photo in _photos():
        ref = transform(Image.fromarray(photo)).numpy().transpose(1, 2, 0)
        assert _max_diff(preprocess_image(photo, spec), ref) <= 1e-5, photo.shape
