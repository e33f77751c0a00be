"""Sources and splits: digits, IDX files, image folders, prepared TFDS datasets, few-shot selection."""

import gzip
import io
import json
import os
import pickle

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from fxjax.data.sources import load_dataset, read_idx
from tests.support.encoded import png_bytes

# ---------------------------------------------------------------------------------------------------- helpers


def _items(source) -> list[tuple[bytes, int]]:
    return [(source[i]["image"].tobytes(), int(source[i]["label"])) for i in range(len(source))]


def _global_indices(split) -> np.ndarray:
    return split.indices  # carved splits are Subsets of the one base source


# ---------------------------------------------------------------------------------------------------- digits


def test_digits_splits_are_disjoint_complete_and_deterministic():
    ds = load_dataset("digits", seed=3)
    sizes = {k: len(v) for k, v in ds.splits.items()}
    assert sum(sizes.values()) == 1797
    assert sizes["test"] == pytest.approx(0.2 * 1797, abs=10) and sizes["val"] == pytest.approx(180, abs=10)
    parts = [set(_global_indices(ds.splits[s]).tolist()) for s in ("train", "val", "test")]
    assert set().union(*parts) == set(range(1797)) and sum(map(len, parts)) == 1797
    assert ds.class_names == [str(i) for i in range(10)] and ds.num_classes == 10

    again = load_dataset("digits", seed=3)
    assert again.fingerprint == ds.fingerprint
    np.testing.assert_array_equal(_global_indices(again.splits["val"]), _global_indices(ds.splits["val"]))
    other = load_dataset("digits", seed=4)
    assert other.fingerprint["val"] != ds.fingerprint["val"]
    assert len(set(ds.fingerprint.values())) == 3

    example = ds.splits["val"][0]
    assert example["image"].shape == (8, 8, 1) and example["image"].dtype == np.uint8
    assert example["label"].dtype == np.int32
    assert max(ds.splits["train"][i]["image"].max() for i in range(50)) == 255
    # Stratified: every class reaches every split.
    for split in ds.splits.values():
        assert {split.label(i) for i in range(len(split))} == set(range(10))


def test_unknown_source_and_bad_fractions():
    with pytest.raises(ValueError, match="accepted forms: 'digits'.*folder:<path>.*tfds:<name>"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="sum < 1"):
        load_dataset("digits", val_fraction=0.5, test_fraction=0.5)


def test_few_shot_keeps_k_per_class_and_leaves_eval_splits_alone():
    full = load_dataset("digits")
    ds = load_dataset("digits", few_shot_k=5, few_shot_seed=1)
    train = ds.splits["train"]
    labels = [train.label(i) for i in range(len(train))]
    assert len(train) == 50 and np.bincount(labels).tolist() == [5] * 10
    assert ds.fingerprint["val"] == full.fingerprint["val"] and ds.fingerprint["test"] == full.fingerprint["test"]
    assert ds.fingerprint["train"] != full.fingerprint["train"]
    assert _items(load_dataset("digits", few_shot_k=5, few_shot_seed=1).splits["train"]) == _items(train)
    other = load_dataset("digits", few_shot_k=5, few_shot_seed=2)
    assert other.fingerprint["train"] != ds.fingerprint["train"]
    with pytest.raises(ValueError, match=r"few_shot_k=500 but class '\d' has only \d+ training example"):
        load_dataset("digits", few_shot_k=500)


# ---------------------------------------------------------------------------------------------------- IDX


def _write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if str(path).endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


@pytest.fixture
def idx_dir(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (40, 5, 4)),
        "train-labels-idx1-ubyte.gz": np.arange(40) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (12, 5, 4)),
        "t10k-labels-idx1-ubyte": np.arange(12) % 10,
    }
    for name, array in arrays.items():
        _write_idx(tmp_path / name, array)
    return tmp_path, arrays


def test_idx_files_raw_and_gz(idx_dir):
    directory, arrays = idx_dir
    ds = load_dataset("fashion_mnist", data_dir=str(directory), val_fraction=0.25)
    assert ds.class_names[:2] == ["T-shirt/top", "Trouser"] and ds.class_names[-1] == "Ankle boot"
    assert (len(ds.splits["train"]), len(ds.splits["val"]), len(ds.splits["test"])) == (30, 10, 12)
    test = ds.splits["test"]
    np.testing.assert_array_equal(test[3]["image"][..., 0], arrays["t10k-images-idx3-ubyte"][3])
    assert test[3]["label"] == 3
    val = ds.splits["val"]
    j = int(val.indices[0])
    np.testing.assert_array_equal(val[0]["image"][..., 0], arrays["train-images-idx3-ubyte.gz"][j])
    np.testing.assert_array_equal(read_idx(str(directory / "t10k-labels-idx1-ubyte")), np.arange(12) % 10)


def test_idx_from_env_dir(idx_dir, tmp_path_factory, monkeypatch):
    directory, _ = idx_dir
    root = tmp_path_factory.mktemp("data")
    os.symlink(directory, root / "mnist")
    monkeypatch.setenv("FXJAX_DATA_DIR", str(root))
    ds = load_dataset("mnist")
    assert ds.class_names == [str(i) for i in range(10)] and len(ds.splits["test"]) == 12


def test_idx_missing_files_says_how_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist.*train-images-idx3-ubyte"):
        load_dataset("fashion_mnist", data_dir=str(tmp_path))


@pytest.mark.skipif(not os.path.isdir("/usr/share/datasets/fashion-mnist"), reason="dataset-fashion-mnist absent")
def test_debian_fashion_mnist_when_installed(monkeypatch):
    monkeypatch.delenv("FXJAX_DATA_DIR", raising=False)
    ds = load_dataset("fashion_mnist")
    assert len(ds.splits["train"]) + len(ds.splits["val"]) == 60000 and len(ds.splits["test"]) == 10000
    assert ds.splits["test"][0]["image"].shape == (28, 28, 1)


# ---------------------------------------------------------------------------------------------------- folders


def _save(path, array: np.ndarray, mode: str | None = None, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    if mode == "P":
        image = image.convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
        kwargs["transparency"] = 0
    image.save(path, **kwargs)


def _make_folder(root, per_class: int = 6, classes=("cat", "dog")) -> None:
    rng = np.random.default_rng(0)
    for cls in classes:
        for i in range(per_class):
            _save(root / cls / f"{i}.png", rng.integers(0, 256, (9, 7, 3), dtype=np.uint8))


def test_folder_modes_corrupt_files_and_splits(tmp_path):
    rng = np.random.default_rng(1)
    _make_folder(tmp_path)
    _save(tmp_path / "cat" / "photo.JPG", rng.integers(0, 256, (10, 12, 3), dtype=np.uint8), format="JPEG")
    _save(tmp_path / "cat" / "grey.png", rng.integers(0, 256, (8, 8), dtype=np.uint8))
    _save(tmp_path / "dog" / "alpha.png", rng.integers(0, 256, (8, 8, 4), dtype=np.uint8))
    _save(tmp_path / "dog" / "palette.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), mode="P")
    (tmp_path / "dog" / "broken.png").write_bytes(b"not an image at all")
    jpeg = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(jpeg, format="JPEG")
    (tmp_path / "dog" / "truncated.jpeg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (tmp_path / "dog" / "notes.txt").write_text("ignored")
    (tmp_path / ".cache").mkdir()  # hidden folders are not classes

    ds = load_dataset(f"folder:{tmp_path}", val_fraction=0.2, test_fraction=0.2)  # lists; decodes nothing
    assert ds.class_names == ["cat", "dog"] and ds.name == f"folder:{tmp_path}"
    assert sum(len(s) for s in ds.splits.values()) == 18
    paths, unreadable = [], []
    for split in ds.splits.values():
        for i in range(len(split)):
            example = split[i]
            assert example["image"].dtype == np.uint8 and example["image"].ndim == 3
            assert example["image"].shape[2] == 3
            path = split.parent.paths[int(split.indices[i])]
            (paths if example["readable"] else unreadable).append(path)
    assert sorted(unreadable) == ["dog/broken.png", "dog/truncated.jpeg"]  # found when read, flagged
    assert sorted(paths) == sorted(
        [f"{c}/{i}.png" for c in ("cat", "dog") for i in range(6)]
        + ["cat/photo.JPG", "cat/grey.png", "dog/alpha.png", "dog/palette.png"]
    )
    grey = ds.splits["train"].parent[ds.splits["train"].parent.paths.index("cat/grey.png")]["image"]
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()

    restored = pickle.loads(pickle.dumps(ds.splits["train"]))
    assert _items(restored) == _items(ds.splits["train"]) and repr(restored) == repr(ds.splits["train"])


def test_folder_fingerprint_tracks_file_changes(tmp_path):
    _make_folder(tmp_path)
    before = load_dataset(f"folder:{tmp_path}")
    assert load_dataset(f"folder:{tmp_path}").fingerprint == before.fingerprint
    os.utime(tmp_path / "cat" / "0.png", ns=(1, 1))
    after = load_dataset(f"folder:{tmp_path}")
    assert after.fingerprint != before.fingerprint


def test_folder_empty_class_and_single_class(tmp_path):
    _make_folder(tmp_path / "a")
    (tmp_path / "a" / "empty_class").mkdir()
    with pytest.raises(ValueError, match="empty_class"):
        load_dataset(f"folder:{tmp_path / 'a'}")
    _make_folder(tmp_path / "b", classes=("only",))
    with pytest.raises(ValueError, match="need at least 2 classes"):
        load_dataset(f"folder:{tmp_path / 'b'}")


def test_folder_split_layout(tmp_path):
    _make_folder(tmp_path / "train", per_class=10)
    _make_folder(tmp_path / "test", per_class=3)
    ds = load_dataset(f"folder:{tmp_path}", val_fraction=0.2)
    assert ds.class_names == ["cat", "dog"]
    assert (len(ds.splits["train"]), len(ds.splits["val"]), len(ds.splits["test"])) == (16, 4, 6)
    assert ds.splits["test"].paths[0] == "test/cat/0.png"


# ---------------------------------------------------------------------------------------------------- TFDS


class TinyShapes(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A real array_record TFDS dataset, prepared without TensorFlow (images handed over already encoded)."""

    VERSION = tfds.core.Version("1.0.0")
    SIZES = {"train": 30, "test": 8}

    def _info(self):
        features = tfds.features.FeaturesDict(
            {
                "image": tfds.features.Image(shape=(None, None, 3)),
                "label": tfds.features.ClassLabel(names=["a", "b", "c"]),
            }
        )
        return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split, n) for split, n in self.SIZES.items()}

    def _generate_examples(self, split, n):
        rng = np.random.default_rng(len(split))
        for i in range(n):
            yield i, {"image": png_bytes(rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)), "label": i % 3}


class TinyShapesWithVal(TinyShapes, skip_registration=True):
    SIZES = {"train": 12, "validation": 6, "test": 3}


class TwoBands(TinyShapes, skip_registration=True):
    """Two builder configs of one dataset, as eurosat/rgb and eurosat/all: same name and version, other images."""

    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="bright"), tfds.core.BuilderConfig(name="dark")]
    SIZES = {"train": 24, "test": 8}

    def _generate_examples(self, split, n):
        value = 250 if self.builder_config.name == "bright" else 5
        for i in range(n):
            yield i, {"image": png_bytes(np.full((16, 16, 3), value - i % 3, np.uint8)), "label": i % 3}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds")
    tfds.disable_progress_bar()
    for builder in (TinyShapes, TinyShapesWithVal):
        builder(data_dir=str(root), file_format="array_record").download_and_prepare()
    for config in ("dark", "bright"):  # dark first: the default config is the first listed, not the first built
        TwoBands(config=config, data_dir=str(root), file_format="array_record").download_and_prepare()
    return str(root)


def test_tfds_prepared_dataset_carves_val(tfds_dir):
    ds = load_dataset("tfds:tiny_shapes", data_dir=tfds_dir, val_fraction=0.2)
    assert ds.name == "tfds:tiny_shapes:1.0.0" and ds.class_names == ["a", "b", "c"]
    assert (len(ds.splits["train"]), len(ds.splits["val"]), len(ds.splits["test"])) == (24, 6, 8)
    assert not set(ds.splits["train"].indices) & set(ds.splits["val"].indices)
    example = ds.splits["test"][2]
    assert example["image"].shape == (6, 5, 3) and example["image"].dtype == np.uint8
    test_labels = sorted(int(ds.splits["test"][i]["label"]) for i in range(8))  # TFDS shuffles when preparing
    assert test_labels == [0, 0, 0, 1, 1, 1, 2, 2]
    restored = pickle.loads(pickle.dumps(ds.splits["val"]))
    assert _items(restored) == _items(ds.splits["val"])
    pinned = load_dataset("tfds:tiny_shapes:1.0.0", data_dir=tfds_dir, val_fraction=0.2)
    assert pinned.fingerprint == ds.fingerprint


def test_tfds_own_validation_split_and_few_shot(tfds_dir):
    ds = load_dataset("tfds:tiny_shapes_with_val", data_dir=tfds_dir, few_shot_k=2)
    assert (len(ds.splits["train"]), len(ds.splits["val"]), len(ds.splits["test"])) == (6, 6, 3)
    assert repr(ds.splits["val"]).startswith("TfdsSource('tiny_shapes_with_val:1.0.0', split='validation'")
    train = ds.splits["train"]
    assert sorted(int(train[i]["label"]) for i in range(len(train))) == [0, 0, 1, 1, 2, 2]


def _bright(source) -> bool:
    return bool(source[0]["image"][0, 0, 0] > 127)  # 250 - label in bright, 5 - label in dark


def test_tfds_builder_config_is_pinned_and_read(tfds_dir):
    dark = load_dataset("tfds:two_bands/dark", data_dir=tfds_dir)
    bright = load_dataset("tfds:two_bands/bright:1.0.0", data_dir=tfds_dir)
    default = load_dataset("tfds:two_bands", data_dir=tfds_dir)
    assert (dark.name, bright.name, default.name) == (
        "tfds:two_bands/dark:1.0.0",
        "tfds:two_bands/bright:1.0.0",
        "tfds:two_bands/bright:1.0.0",  # the default config, named: a later default can not change the run
    )
    for split in ("train", "val", "test"):  # every split, pickled to a worker too, reads its own config's images
        assert not _bright(dark.splits[split]) and not _bright(pickle.loads(pickle.dumps(dark.splits[split])))
        assert _bright(bright.splits[split])
        assert dark.fingerprint[split] != bright.fingerprint[split]
    assert default.fingerprint == bright.fingerprint
    assert load_dataset(dark.name, data_dir=tfds_dir).fingerprint == dark.fingerprint  # the pinned name reloads it


def test_a_run_records_its_tfds_config_and_refuses_the_other(tfds_dir, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from fxjax import config as config_lib
    from fxjax.runs import experiment

    torch.manual_seed(0)
    vit = transformers.ViTConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=16, patch_size=8
    )
    transformers.ViTModel(vit, add_pooling_layer=False).save_pretrained(tmp_path / "vit")

    def config(source: str):
        config = config_lib.load_config_file("configs/quickstart.py")
        config.backbone, config.image_size, config.num_epochs, config.batch_size = str(tmp_path / "vit"), 16, 1, 8
        config.cache_dir = str(tmp_path / "cache")
        config.data.source, config.data.data_dir = source, tfds_dir
        return config

    dark = experiment.run(config("tfds:two_bands/dark"), tmp_path / "dark")
    env = json.loads((tmp_path / "dark" / "environment.json").read_text())
    assert env["dataset"] == dark["dataset"] == "tfds:two_bands/dark:1.0.0"
    assert env["dataset_fingerprint"] == load_dataset("tfds:two_bands/dark:1.0.0", data_dir=tfds_dir).fingerprint
    with pytest.raises(ValueError, match=r"data.source \('tfds:two_bands/dark' → 'tfds:two_bands/bright'\) changed"):
        experiment.run(config("tfds:two_bands/bright"), tmp_path / "dark")
    bright = experiment.run(config("tfds:two_bands/bright"), tmp_path / "bright")
    assert bright["dataset"] == "tfds:two_bands/bright:1.0.0"
    assert not any(bright["feature_cache_hits"].values())  # the dark run's cached features are not reused


def test_tfds_missing_dataset_explains_how_to_prepare(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"tfds build mnist --data_dir .* --file_format array_record"):
        load_dataset("tfds:mnist", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="neither registered nor prepared"):
        load_dataset("tfds:no_such_dataset_xyz", data_dir=str(tmp_path))
