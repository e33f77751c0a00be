"""Zero-shot classification with a CLIP-family text tower, scored beside the probes of `probes.py`.

Class names x prompt templates → text embeddings, each L2-normalised, averaged per class, normalised again
(CLIP's prompt ensembling, open_clip's `build_zero_shot_classifier`) → logits = scale * image @ class.T + bias on
L2-normalised image embeddings (the backbone's projected output: open_clip's `embedding`, HF CLIP's
`image_embeds`, SigLIP's pooled), as `logits_per_image`. No training, so no hyper-parameter to sweep.

In a run (`config.probes` "zeroshot", `config.head.init="text"`): `check_text_tower` refuses a backbone without a
text tower before anything loads, `zero_shot_classifier` loads the tower of the backbone's checkpoint and embeds
the dataset's class names.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fxjax.evaluate.probes import ProbeResult, _accuracy, _check_xy

DEFAULT_TEMPLATES = ("a photo of a {}.",)


def _normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def class_embeddings(
    encode: Callable[[list[str]], np.ndarray],
    classnames: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
) -> np.ndarray:
    """[c, e] unit-norm class embeddings: the mean of each class's normalised prompt embeddings, normalised.
    `encode`: texts → [n, e] (e.g. `TextTower.encode`); templates hold one `{}` for the class name."""
    if not classnames or not templates:
        raise ValueError(f"zero-shot needs class names and templates, got {len(classnames)} and {len(templates)}")
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise ValueError(f"prompt template {bad[0]!r} must contain exactly one '{{}}' for the class name")
    texts = [t.format(name) for name in classnames for t in templates]
    emb = _normalize(encode(texts)).reshape(len(classnames), len(templates), -1)  # [c, templates, e]
    return _normalize(emb.mean(axis=1))


def zero_shot_logits(image_embeddings: Any, class_emb: np.ndarray, scale: float = 100.0, bias: float = 0.0):
    """[n, e] image embeddings (any norm) → [n, c] logits, as the reference's `logits_per_image`."""
    return scale * _normalize(image_embeddings) @ np.asarray(class_emb, np.float32).T + bias


def zero_shot_probe(
    val: tuple[Any, Any],
    test: tuple[Any, Any],
    class_emb: np.ndarray,
    scale: float = 100.0,
    bias: float = 0.0,
) -> ProbeResult:
    """Accuracy of the zero-shot classifier on (image embeddings [n, e], labels [n]) for val and test.
    A probe result with a one-row table (`param` "scale": the fixed logit scale, nothing is selected)."""
    num_classes = len(class_emb)
    acc = {}
    for name, (x, y) in {"val": val, "test": test}.items():
        x, y = _check_xy(x, y, num_classes, name)
        if x.shape[1] != np.shape(class_emb)[1]:
            raise ValueError(
                f"{name}: image embeddings are {x.shape[1]}-d but class embeddings {np.shape(class_emb)[1]}-d; "
                "use the backbone's projected output (open_clip 'embedding', HF CLIP 'image_embeds')"
            )
        acc[name] = _accuracy(np.argmax(zero_shot_logits(x, class_emb, scale, bias), axis=-1), y)
    row = {"scale": float(scale), "val_accuracy": acc["val"], "test_accuracy": acc["test"]}
    return ProbeResult("zero_shot", "scale", float(scale), acc["val"], acc["test"], [row])


def text_init_head(class_emb: np.ndarray, scale: float = 100.0, bias: float = 0.0) -> dict[str, np.ndarray]:
    """A linear head {"kernel": [e, c], "bias": [c]} that starts as the zero-shot classifier: on L2-normalised
    image embeddings its logits are `zero_shot_logits`. Fine-tuning from it starts at zero-shot accuracy."""
    class_emb = np.asarray(class_emb, np.float32)  # [c, e]
    return {"kernel": scale * class_emb.T, "bias": np.full((class_emb.shape[0],), bias, np.float32)}


# Checkpoints with both towers: HF model types (a *_vision_model has no text tower), and open_clip's layout.
TEXT_MODEL_TYPES = ("clip", "siglip")


@dataclass(frozen=True)
class ZeroShotClassifier:
    """The class text embeddings of one dataset with the checkpoint's logit scale and bias: what the "zeroshot"
    probe scores and a text-initialised head starts from."""

    class_emb: np.ndarray  # [c, e], unit norm
    scale: float
    bias: float = 0.0

    def probe(self, val: tuple[Any, Any], test: tuple[Any, Any]) -> ProbeResult:
        return zero_shot_probe(val, test, self.class_emb, self.scale, self.bias)

    def head(self) -> dict[str, np.ndarray]:
        return text_init_head(self.class_emb, self.scale, self.bias)


def text_keys(config) -> list[str]:
    """The options of a resolved run config that need the backbone's text tower."""
    keys = ["config.probes 'zeroshot'"] if "zeroshot" in config.probes else []
    return keys + (["config.head.init='text'"] if config.head.init == "text" else [])


def check_text_tower(config) -> None:
    """Refuses a run whose options need a text tower (`text_keys`) on a backbone without one, from the checkpoint's
    config file alone: before any weights load or anything compiles."""
    from fxjax.backbones import hub
    from fxjax.backbones.checkpoints import open_clip

    keys = text_keys(config)
    if not keys:
        return
    if config.backbone not in hub.BUILTINS:
        path, _ = hub.resolve(config.backbone, config.revision)
        file = path / "config.json"
        if open_clip.matches(path) or (
            path.is_dir() and file.is_file() and json.loads(file.read_text()).get("model_type") in TEXT_MODEL_TYPES
        ):
            return
    raise ValueError(
        f"{keys[0]} needs a CLIP-family backbone with its text tower (HF {' / '.join(TEXT_MODEL_TYPES)}, open_clip); "
        f"config.backbone={config.backbone!r} has none: choose one, or drop the option"
    )


def zero_shot_classifier(
    backbone: str,
    classnames: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    *,
    revision: str | None = None,
    bpe_vocab: str | None = None,
    dtype="float32",
    param_dtype="float32",
) -> ZeroShotClassifier:
    """The zero-shot classifier of `backbone`'s text tower (same checkpoint, same revision) for `classnames`."""
    from fxjax.backbones.text import load_text_tower

    tower = load_text_tower(backbone, revision=revision, dtype=dtype, param_dtype=param_dtype, bpe_vocab=bpe_vocab)
    class_emb = class_embeddings(tower.encode, list(classnames), list(templates))
    return ZeroShotClassifier(class_emb, tower.info.get("logit_scale", 100.0), tower.info.get("logit_bias", 0.0))
