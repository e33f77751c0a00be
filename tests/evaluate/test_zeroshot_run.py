"""Zero-shot as a probe in a run and the text-initialised head (config.probes "zeroshot", config.head.init="text"),
against transformers' `logits_per_image` on the same tiny CLIP and the same preprocessed test images."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from fxjax import config as config_lib
from fxjax.data.images import eval_batches
from fxjax.runs import experiment
from fxjax.runs.rundir import RunDir
from fxjax.runs.setup import Setup

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """(HF CLIPModel, tokenizer, folder): a full tiny random CLIP with its tokenizer saved beside it."""
    from tests.backbones.test_text_towers import tiny_hf_model

    model, tok = tiny_hf_model("clip")
    folder = tmp_path_factory.mktemp("tiny_clip")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model, tok, folder


@pytest.fixture(scope="module")
def colours(tmp_path_factory) -> Path:
    """An easy task: noisy solid-colour images, one folder per colour name (the class names zero-shot reads)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    for name, rgb in COLOURS.items():
        (root / name).mkdir()
        for i in range(20):
            pixels = np.clip(np.asarray(rgb) + rng.normal(0, 25, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def _config(folder: Path, data: Path, cache: Path, **head):
    c = config_lib.default_config()
    c.backbone = str(folder)
    c.image_size = 32  # the checkpoint has no preprocessor config (default 224)
    c.data.source = f"folder:{data}"
    c.data.val_fraction = c.data.test_fraction = 0.25
    c.cache_dir = str(cache)
    c.batch_size, c.eval_batch_size, c.num_epochs = 8, 16, 15
    c.optimizer.learning_rate = 0.1  # unit-norm features of a random tower: near each other
    c.probes = ("zeroshot", "ridge")
    c.head.update(head)
    return c


def _reference_logits(model, tok, setup: Setup, split: str) -> tuple[np.ndarray, np.ndarray]:
    """transformers' logits_per_image on the split's images as the run preprocesses them → (logits, labels)."""
    texts = tok([f"a photo of a {c}." for c in setup.data.class_names], padding=True, return_tensors="pt")
    logits, labels = [], []
    for batch in eval_batches(setup.data.splits[split], setup.backbone.preprocess, batch_size=16):
        pixels = torch.from_numpy(np.asarray(batch["x"]).transpose(0, 3, 1, 2).copy())
        with torch.no_grad():
            out = model(input_ids=texts["input_ids"], attention_mask=texts["attention_mask"], pixel_values=pixels)
        logits.append(out.logits_per_image.numpy()[batch["mask"]])
        labels.append(np.asarray(batch["label"])[batch["mask"]])
    return np.concatenate(logits), np.concatenate(labels)


def test_zeroshot_probe_in_a_run_equals_transformers(tiny_clip, colours, tmp_path):
    model, tok, folder = tiny_clip
    config = _config(folder, colours, tmp_path / "cache")
    summary = experiment.run(config, tmp_path / "run")
    setup = Setup.from_config(config)
    accuracy = {}
    for split in ("val", "test"):
        ref, labels = _reference_logits(model, tok, setup, split)
        accuracy[split] = float(np.mean(ref.argmax(-1) == labels))
    zero_shot = summary["probes"]["zero_shot"]
    assert zero_shot["val_accuracy"] == accuracy["val"] and zero_shot["test_accuracy"] == accuracy["test"]
    assert zero_shot["best"] == pytest.approx(float(model.logit_scale.detach().exp()), rel=1e-6)
    run = RunDir(tmp_path / "run")
    assert [p["name"] for p in run.read(RunDir.PROBES)["probes"]] == ["zero_shot", "ridge"]
    assert "| zero_shot |" in (tmp_path / "run" / RunDir.PROBES_TABLE).read_text()
    assert "zero_shot" in (tmp_path / "run" / RunDir.REPORT).read_text()
    assert summary["head"]["variant"] == "pooled"  # the run's own head is untouched by the probe


def test_text_head_starts_as_zero_shot_then_trains_beyond_it(tiny_clip, colours, tmp_path):
    from fxjax.runs.export import export, load_classifier

    model, tok, folder = tiny_clip
    config = _config(folder, colours, tmp_path / "cache", init="text")
    setup = Setup.from_config(config)
    # Step 0: the run's head on the cached "embedding" features gives transformers' logits_per_image.
    inputs = experiment._cached_inputs(setup, RunDir(tmp_path / "step0").prepare())
    head = inputs.models["embedding"]
    logits = [np.asarray(head(b["x"]["embedding"]))[b["mask"]] for b in inputs.eval("test")]
    ref, labels = _reference_logits(model, tok, setup, "test")
    np.testing.assert_allclose(np.concatenate(logits), ref, atol=1e-4)
    assert set(inputs.models) == {"embedding"}

    summary = experiment.run(config, tmp_path / "run")
    zero_shot = summary["probes"]["zero_shot"]
    assert summary["head"]["variant"] == "embedding"
    assert summary["val_accuracy"] >= zero_shot["val_accuracy"] and summary["val_accuracy"] >= 0.9
    assert zero_shot["test_accuracy"] == float(np.mean(ref.argmax(-1) == labels))
    recorded = json.loads((tmp_path / "run" / RunDir.CONFIG).read_text())
    assert recorded["head"]["init"] == "text"

    out = export(tmp_path / "run", tmp_path / "exported")
    spec = json.loads((out / "classifier.json").read_text())
    assert spec["head"]["init"] == "text" and spec["variant"] == "embedding"
    test = setup.data.splits["test"]
    probabilities = load_classifier(out).predict([test[i]["image"] for i in range(len(test))])
    predictions = np.load(tmp_path / "run" / RunDir.PREDICTIONS)
    np.testing.assert_array_equal(probabilities.argmax(-1), predictions)


def test_a_backbone_without_text_tower_is_refused_from_its_config_alone(tmp_path, monkeypatch):
    import transformers

    from fxjax.backbones import hub

    vision_only = tmp_path / "vision_only"  # a config and no weights: the check must not need them
    transformers.CLIPVisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(
        vision_only
    )
    monkeypatch.setattr(hub, "load_backbone", lambda *a, **k: pytest.fail("the backbone was loaded"))
    for backbone, head, probes, key in [
        (str(vision_only), "random", ("zeroshot",), "config.probes 'zeroshot'"),
        ("pixels", "text", (), "config.head.init='text'"),
    ]:
        c = config_lib.default_config()
        c.backbone, c.head.init, c.probes = backbone, head, probes
        with pytest.raises(ValueError, match=rf"^{key} needs a CLIP-family backbone .*{backbone!r} has none"):
            Setup.from_config(c)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("head.init", "zeros", "config.head.init='zeros': use 'random' or 'text'"),
        ("zeroshot.templates", ("a photo",), "config.zeroshot.templates=('a photo',): each needs exactly one"),
        ("zeroshot.templates", (), "config.zeroshot.templates=()"),
        ("head.kind", "mlp", "config.head.init='text' starts a linear head on cached features"),
        ("data.augment", True, "config.head.init='text' starts a linear head on cached features"),
    ],
)
def test_bad_text_options_are_named(key, value, message):
    c = config_lib.default_config()
    if key != "head.init":
        c.head.init = "text"
    group, name = key.split(".")
    c[group][name] = value
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        config_lib.resolve(c)


def test_class_names_must_match_the_classes(tiny_clip, colours, tmp_path):
    _, _, folder = tiny_clip
    config = _config(folder, colours, tmp_path / "cache")
    config.zeroshot.classnames = ("red", "green")
    setup = Setup.from_config(config)
    with pytest.raises(ValueError, match="config.zeroshot.classnames has 2 names but .* has 3 classes"):
        _ = setup.zero_shot
