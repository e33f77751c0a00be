"""Zero-shot classification and the text-initialised head against the references' own logits
(transformers' `logits_per_image`, open_clip's `build_zero_shot_classifier` and forward), on tiny models."""

from __future__ import annotations

import numpy as np
import pytest

import fxjax
from fxjax.backbones.text import load_text_tower
from fxjax.evaluate.zeroshot import class_embeddings, text_init_head, zero_shot_logits, zero_shot_probe

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

CLASSES = ["cat", "dog", "origami fish", "bird"]
TEMPLATES = ["a photo of a {}.", "a drawing of the {}", "{}"]


def _images(n=12) -> np.ndarray:
    return np.random.default_rng(1).standard_normal((n, 32, 32, 3)).astype(np.float32)


def _pixels(x: np.ndarray):
    return torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def _check_scores(logits: np.ndarray, ref: np.ndarray, image_emb: np.ndarray, class_emb, scale, bias) -> None:
    """The classifier's logits, the probe's accuracy and the text-initialised head all equal the reference."""
    assert _max_diff(logits, ref) <= 1e-4
    labels = np.random.default_rng(2).integers(0, len(CLASSES), len(ref))
    result = zero_shot_probe((image_emb[:6], labels[:6]), (image_emb[6:], labels[6:]), class_emb, scale, bias)
    assert result.name == "zero_shot"
    assert result.val_accuracy == np.mean(ref[:6].argmax(-1) == labels[:6])
    assert result.test_accuracy == np.mean(ref[6:].argmax(-1) == labels[6:])
    head = text_init_head(class_emb, scale, bias)
    assert head["kernel"].shape == (image_emb.shape[1], len(CLASSES)) and head["bias"].shape == (len(CLASSES),)
    normed = image_emb / np.linalg.norm(image_emb, axis=-1, keepdims=True)
    assert _max_diff(normed @ head["kernel"] + head["bias"], ref) <= 1e-4


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_zero_shot_equals_transformers_logits_per_image(tmp_path, kind):
    from tests.backbones.test_text_towers import tiny_hf_model

    model, tok = tiny_hf_model(kind)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    tower = load_text_tower(str(tmp_path))
    x = _images()
    outputs = fxjax.load_backbone(str(tmp_path)).outputs(x)
    image_emb = np.asarray(outputs["image_embeds" if kind == "clip" else "pooled"])  # the projected image side
    class_emb = class_embeddings(tower.encode, CLASSES)  # one template: each class's normalised embedding
    scale, bias = tower.info["logit_scale"], tower.info.get("logit_bias", 0.0)
    ids = torch.from_numpy(tower.tokenize([f"a photo of a {c}." for c in CLASSES]).astype(np.int64))
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=_pixels(x)).logits_per_image.numpy()
    _check_scores(zero_shot_logits(image_emb, class_emb, scale, bias), ref, image_emb, class_emb, scale, bias)


def test_zero_shot_equals_open_clips_classifier(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    from open_clip.tokenizer import default_bpe
    from open_clip.zero_shot_classifier import build_zero_shot_classifier

    from tests.backbones.test_open_clip import TINY, _model, _save

    model, _ = _model("fxjax-tiny-zeroshot", TINY)
    _save(model, TINY, tmp_path)
    tower = load_text_tower(str(tmp_path), bpe_vocab=default_bpe())
    class_emb = class_embeddings(tower.encode, CLASSES, TEMPLATES)  # prompt ensembling over 3 templates
    tokenizer = open_clip.get_tokenizer("fxjax-tiny-zeroshot")
    with torch.no_grad():
        ref_classifier = build_zero_shot_classifier(
            model, tokenizer, CLASSES, TEMPLATES, device="cpu", use_tqdm=False
        ).numpy()  # [e, c]
    assert _max_diff(class_emb, ref_classifier.T) <= 1e-5
    x = _images()
    image_emb = np.asarray(fxjax.load_backbone(str(tmp_path)).outputs(x)["embedding"])
    with torch.no_grad():
        ref = (model.logit_scale.exp() * model.encode_image(_pixels(x), normalize=True)).numpy() @ ref_classifier
    scale = tower.info["logit_scale"]
    _check_scores(zero_shot_logits(image_emb, class_emb, scale), ref, image_emb, class_emb, scale, 0.0)


def test_bad_templates_and_dimensions_are_named():
    def encode(texts):
        return np.ones((len(texts), 4), np.float32)

    with pytest.raises(ValueError, match="'a photo' must contain exactly one"):
        class_embeddings(encode, CLASSES, ["a photo"])
    class_emb = class_embeddings(encode, CLASSES)
    x, y = np.ones((2, 8), np.float32), np.zeros(2, np.int64)
    with pytest.raises(ValueError, match="image embeddings are 8-d but class embeddings 4-d"):
        zero_shot_probe((x, y), (x, y), class_emb)
