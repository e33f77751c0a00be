"""Export of a real tiny run: the folder reproduces the run's test predictions, can carry its backbone,
refuses weights with another hash; launch.predict classifies a folder of images line by line or as JSON."""

from __future__ import annotations

import json
import shutil

import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from PIL import Image
from safetensors.numpy import load_file, save_file
from tiny_run import tiny_run

import fxjax
from fxjax.backbones import hub
from fxjax.backbones.convert import path_str
from fxjax.cli import export as export_cli, predict as predict_cli
from fxjax.data.sources import load_dataset
from fxjax.heads import freeze
from fxjax.heads.heads import Classifier, Head
from fxjax.runs import checkpoint
from fxjax.runs.export import WeightHashError, _assign, _copy_backbone, _load_backbone


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return tiny_run(tmp_path_factory)


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "digits"
    assert export_cli.main([str(run), str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def split_images(run):
    data = json.loads((run / "config.json").read_text())["data"]
    split = load_dataset(
        data["source"],
        val_fraction=data["val_fraction"],
        test_fraction=data["test_fraction"],
        seed=data["split_seed"],
    ).splits["test"]
    return [split[i]["image"] for i in range(len(split))]  # uint8 [8, 8, 1] digits


@pytest.fixture(scope="module")
def classifier(exported):
    return fxjax.load_classifier(exported)


@pytest.fixture(scope="module")
def split_probs(classifier, split_images):
    return classifier.predict(split_images, batch_size=64)


def test_folder_records_backbone_classes_preprocessing_and_best_head(run, exported):
    spec = json.loads((exported / "classifier.json").read_text())
    env = json.loads((run / "environment.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    assert spec["backbone"] == {k: env["backbone"][k] for k in ("name", "revision", "model_type", "weight_sha256")}
    assert spec["class_names"] == env["class_names"] and spec["preprocess"] == env["preprocess"]
    assert spec["head"] == {"kind": "linear", "hidden_dims": [], "dropout": 0.0, "init": "random"}
    assert spec["image_size"] == 32 and spec["trained"]["step"] == summary["best_step"]
    assert spec["config"] == json.loads((run / "config.json").read_text())
    tensors = load_file(str(exported / "head.safetensors"))
    saved = ocp.StandardCheckpointer().restore(run / "checkpoints" / str(summary["best_step"]) / "params")
    assert set(tensors) == {"head.out.kernel", "head.out.bias"}
    # The checkpoint holds the run's stacked heads [H, ...] per feature variant; export takes the winning one.
    head = summary["head"]
    stacked = np.asarray(saved[head["variant"]]["head"]["out"]["kernel"]["value"])
    np.testing.assert_array_equal(tensors["head.out.kernel"], stacked[head["index"]])
    assert not list(exported.parent.glob(".*"))  # no temporary folder left behind


def test_loaded_classifier_reproduces_the_runs_test_predictions(run, classifier, split_probs, split_images):
    assert split_probs.shape == (len(split_images), 10)
    np.testing.assert_allclose(split_probs.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(split_probs.argmax(axis=1), np.load(run / "test_predictions.npy"))
    assert classifier.class_names == [str(i) for i in range(10)] and classifier.preprocess.size == (32, 32)


def test_with_backbone_bundles_the_weights_and_a_tampered_weight_hash_errors(
    run, split_probs, split_images, tmp_path, monkeypatch
):
    out = tmp_path / "bundled"
    assert export_cli.main([str(run), str(out), "--with-backbone"]) == 0
    spec = json.loads((out / "classifier.json").read_text())
    assert spec["backbone"]["path"] == "backbone"
    assert [p.name for p in (out / "backbone").iterdir()] == spec["backbone"]["weight_files"]
    from fxjax.backbones import hub

    def no_package():
        raise FileNotFoundError("weights package not installed")

    monkeypatch.setattr(hub, "_efficientnet_lite0_file", no_package)  # self-contained: the package is not needed
    bundled = fxjax.load_classifier(out).predict(split_images[:8], batch_size=64)
    np.testing.assert_allclose(bundled, split_probs[:8], atol=1e-6)

    weight_file = out / "backbone" / spec["backbone"]["weight_files"][0]
    data = bytearray(weight_file.read_bytes())
    data[-1] ^= 0xFF
    weight_file.write_bytes(bytes(data))
    with pytest.raises(WeightHashError, match="weight sha256"):
        fxjax.load_classifier(out)


def test_export_errors_name_what_is_wrong(run, exported, tmp_path, capsys):
    assert export_cli.main([str(run), str(exported)]) == 2  # the output exists already
    assert "already exists" in capsys.readouterr().err
    partial = tmp_path / "partial"
    shutil.copytree(run, partial, ignore=shutil.ignore_patterns("checkpoints"))
    assert export_cli.main([str(partial), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "checkpoints" in err and not (tmp_path / "out").exists()


def test_bundled_hugging_face_backbone_loads_from_the_export_alone(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
    )
    source = tmp_path / "vit"
    transformers.ViTModel(config, add_pooling_layer=False).save_pretrained(source)
    original = hub.load_backbone(str(source))
    (tmp_path / "out").mkdir()
    names = _copy_backbone(original.info["name"], original.info["weight_files"], tmp_path / "out" / "backbone")
    assert {p.name for p in (tmp_path / "out" / "backbone").iterdir()} == {*names, "config.json"}
    shutil.rmtree(source)  # the export must not need the original folder
    entry = {
        **{k: original.info[k] for k in ("name", "revision", "weight_sha256")},
        "path": "backbone",
        "weight_files": names,
    }
    loaded = _load_backbone({"backbone": entry, "dtype": "float32", "param_dtype": "float32"}, tmp_path / "out")
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_array_equal(loaded.features(x), original.features(x))


class _StagedBackbone(nnx.Module):
    """Three linear "stages": enough structure for freezing and naming, cheap to build."""

    def __init__(self, rngs: nnx.Rngs):
        self.stages = nnx.List([nnx.Linear(4, 4, rngs=rngs) for _ in range(3)])

    def stage_paths(self) -> list[tuple[str, ...]]:
        return [(f"stages.{i}",) for i in range(3)]


def test_fine_tuned_backbone_stages_travel_with_the_head(tmp_path):
    """A run with unfrozen stages checkpoints Classifier paths ("backbone.…"); they load into a new model."""

    def classifier(seed):
        return Classifier(_StagedBackbone(nnx.Rngs(seed)), Head(4, 3, rngs=nnx.Rngs(seed)))

    trained = classifier(0)
    frozen = freeze.frozen_patterns("1", trained.backbone.stage_paths())
    _, params, _ = freeze.split_trainable(trained, freeze.trainable(frozen))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "7" / "params", params)
    checkpointer.wait_until_finished()
    flat = checkpoint.read_params(tmp_path, 7)
    assert set(flat) == {
        "head.out.kernel",
        "head.out.bias",
        *(f"backbone.stages.{i}.{p}" for i in (1, 2) for p in ("kernel", "bias")),
    }
    save_file(flat, str(tmp_path / "head.safetensors"))
    fresh = classifier(1)
    _assign(fresh, tmp_path / "head.safetensors")
    after = {path_str(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(fresh))}
    for name, value in flat.items():
        np.testing.assert_array_equal(after[name], value, err_msg=name)
    assert not np.array_equal(after["backbone.stages.0.kernel"], np.asarray(trained.backbone.stages[0].kernel))


def test_predict_prints_a_line_per_image_and_json(exported, tmp_path, capsys):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, (shape, ext) in enumerate(
        [((8, 8), "png"), ((30, 40, 3), "jpg"), ((16, 16, 4), "png"), ((20, 20, 3), "bmp")]
    ):  # grey, RGB, RGBA, in a subfolder
        pixels = rng.integers(0, 256, shape, dtype=np.uint8)
        Image.fromarray(pixels).save(folder / ("sub" if i == 3 else "") / f"img{i}.{ext}")
    (folder / "broken.png").write_bytes(b"not an image")
    expected = sorted(p for p in folder.rglob("*") if p.is_file())

    assert predict_cli.main([str(exported), str(folder), "--top-k", "3", "--batch-size", "2"]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(": ")[0] for line in lines] == [str(p) for p in expected]
    broken = lines[[p.name for p in expected].index("broken.png")]
    assert ": error: " in broken
    good = [line for line in lines if line != broken]
    assert all(len(line.split(": ", 1)[1].split(", ")) == 3 for line in good)

    image = folder / "img0.png"
    argv = [str(exported), str(image), str(folder / "missing.jpg"), "--json", "--batch-size", "2"]
    assert predict_cli.main(argv) == 1
    results = json.loads(capsys.readouterr().out)
    assert [r["path"] for r in results] == [str(image), str(folder / "missing.jpg")]
    top = results[0]["predictions"]
    assert len(top) == 5 and all(a["probability"] >= b["probability"] for a, b in zip(top, top[1:]))
    assert "error" in results[1]
    as_line = ", ".join(f"{p['class']} {p['probability']:.3f}" for p in top[:3])
    assert f"{image}: {as_line}" in lines
