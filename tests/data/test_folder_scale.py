"""Image folders at ImageNet size: listing without decoding, unreadable files met mid-epoch (never a crash,
the same skips after a resume and on every host), and launch.verify's index used by a later load."""

import io
import itertools
import json

import numpy as np
import pytest
from PIL import Image

from fxjax.data import sources
from fxjax.data.images import eval_batches, train_loader
from fxjax.data.preprocess import PreprocessSpec
from fxjax.data.sources import folder_index_path, load_dataset
from launch import verify

SPEC = PreprocessSpec(size=(4, 4), rescale=1.0)
BAD = {"cat/03.png", "cat/99.jpg", "dog/07.png"}  # not an image, a truncated JPEG, an empty file


def _folder(root, per_class: int = 16) -> None:
    """cat/ and dog/ of 16 small PNGs each (pixel value = 100 * class + index), the BAD files broken: 33 files."""
    for c, cls in enumerate(("cat", "dog")):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            name = f"{cls}/{i:02d}.png"
            Image.fromarray(np.full((5, 5, 3), 100 * c + i, np.uint8)).save(root / name)
    (root / "cat/03.png").write_bytes(b"not an image at all")
    jpeg = io.BytesIO()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(jpeg, format="JPEG")
    (root / "cat/99.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (root / "dog/07.png").write_bytes(b"")


def _good_count(ds) -> int:
    return sum(1 for split in ds.splits.values() for i in range(len(split)) if split[i]["readable"])


def test_listing_decodes_nothing(tmp_path, monkeypatch):
    """2,000 empty .jpg files list as a dataset: no file is opened until a record is read."""
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(1000):
            (tmp_path / cls / f"{i:04d}.jpg").touch()
    opened = []
    monkeypatch.setattr(sources.Image, "open", lambda *a, **k: opened.append(a) or pytest.fail("decoded"))
    ds = load_dataset(f"folder:{tmp_path}", val_fraction=0.1, test_fraction=0.1)
    assert sum(len(s) for s in ds.splits.values()) == 2000 and opened == []


def test_unreadable_mid_epoch_never_crashes_and_resumes_the_same(tmp_path):
    _folder(tmp_path)
    ds = load_dataset(f"folder:{tmp_path}", val_fraction=0.25, test_fraction=0.25)
    train = ds.splits["train"]
    bad_train = {i for i in range(len(train)) if train.parent.paths[int(train.indices[i])] in BAD}

    def stream(n):
        loader = train_loader(train, SPEC, batch_size=4, seed=3, num_epochs=2)
        it = iter(loader)
        return it, list(itertools.islice(it, n))

    it, first = stream(3)
    state = it.get_state()
    rest = list(it)
    _, whole = stream(10**6)  # two epochs straight through: every bad train file met, twice
    resumed = iter(train_loader(train, SPEC, batch_size=4, seed=3, num_epochs=2))
    resumed.set_state(state)
    again = list(resumed)
    assert len(whole) == len(first) + len(rest) == len(first) + len(again) == 2 * len(train) // 4
    for a, b in zip(whole, first + again, strict=True):
        np.testing.assert_array_equal(a["x"], b["x"])
        np.testing.assert_array_equal(a["label"], b["label"])
    images = np.concatenate([b["x"] for b in whole])  # [n, 4, 4, 3]; pixel = 100 * class + index
    labels = np.concatenate([b["label"] for b in whole])
    np.testing.assert_array_equal(images[:, 0, 0, 0] // 100, labels)  # a substitute keeps its class
    assert bad_train and train.parent.unreadable >= {int(train.indices[i]) for i in bad_train}

    # Evaluation counts every good image once, on one host or two, on every pass.
    for split in ("val", "test"):
        source = ds.splits[split]
        good = sum(source.parent.paths[int(i)] not in BAD for i in source.indices)
        for hosts in (1, 2):
            masks = [
                b["mask"]
                for h in range(hosts)
                for _ in range(2)
                for b in eval_batches(source, SPEC, batch_size=4, shard_index=h, shard_count=hosts)
            ]
            assert int(np.concatenate(masks).sum()) == 2 * good


def test_verify_index_is_used_by_a_later_load(tmp_path, monkeypatch, capsys):
    data, cache = tmp_path / "data", tmp_path / "cache"
    _folder(data)
    assert verify.main(["--folder", str(data), "--cache_dir", str(cache), "--workers", "2"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert set(summary["unreadable"]) == BAD and summary["files"] == 33
    assert summary["index"] == folder_index_path(str(data), str(cache))

    (data / "dog/07.png").unlink()  # repaired since verify: a new file, read again
    Image.fromarray(np.full((5, 5, 3), 107, np.uint8)).save(data / "dog/07.png")
    ds = load_dataset(f"folder:{data}", cache_dir=str(cache))
    base = ds.splits["train"].parent
    known = {base.paths[i] for i in base.known_bad}
    assert known == BAD - {"dog/07.png"}

    decoded = []
    real = sources.decode_rgb
    monkeypatch.setattr(sources, "decode_rgb", lambda path: decoded.append(path) or real(path))
    for i in range(len(base)):
        assert bool(base[i]["readable"]) == (base.paths[i] not in known)
    assert not any(p.endswith(tuple(known)) for p in decoded)  # known-bad files are never opened
    assert len(decoded) == 33 - len(known)
    assert _good_count(ds) == 31

    without = load_dataset(f"folder:{data}", cache_dir=str(tmp_path / "elsewhere"))  # no index there
    assert without.fingerprint == ds.fingerprint and _good_count(without) == 31


def test_verify_from_a_config_and_bad_input(tmp_path, capsys):
    _folder(tmp_path / "data")
    config = tmp_path / "config.py"
    config.write_text(
        "from fxjax.config import default_config\n\n\ndef get_config():\n    c = default_config()\n"
        f"    c.data.source = 'folder:{tmp_path / 'data'}'\n    c.cache_dir = '{tmp_path / 'cache'}'\n    return c\n"
    )
    assert verify.main(["--config", str(config)]) == 0
    assert json.loads(capsys.readouterr().out)["unreadable_count"] == 3
    assert (tmp_path / "cache" / "folders").is_dir()
    assert verify.main(["--config", str(config), "--config.data.source=digits"]) == 2
    assert "is not a folder:<path> dataset" in capsys.readouterr().err
    assert verify.main(["--folder", str(tmp_path / "missing")]) == 2


def test_cached_features_drop_unreadable_rows_and_their_labels(tmp_path):
    """Features of a split with unreadable files: the masked rows leave the features and the labels alike."""
    from fxjax.backbones.hub import load_backbone
    from fxjax.features.extract import cached_features
    from fxjax.parallel import make_mesh

    _folder(tmp_path / "data")
    ds = load_dataset(f"folder:{tmp_path / 'data'}", val_fraction=0.25, test_fraction=0.25)
    backbone = load_backbone("pixels")  # 8x8 raw pixels: the features are the images themselves
    feats, labels, _ = cached_features(
        backbone, ds, mesh=make_mesh(), batch_size=8, cache_dir=str(tmp_path / "cache"), dtype="float32",
        param_dtype="float32",
    )  # fmt: skip
    for split, source in ds.splits.items():
        good = [int(i) for i in source.indices if source.parent.paths[int(i)] not in BAD]
        assert feats[split]["pooled"].shape[0] == len(labels[split]) == len(good)
        np.testing.assert_array_equal(labels[split], source.parent.labels[good])
