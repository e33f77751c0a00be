"""`vtab:<task>`: a task's prepared TFDS dataset read with VTAB-1k's train800 / val200 / test splits."""

import pickle

import numpy as np
import pytest
import tensorflow_datasets as tfds

from fxjax.data import vtab
from fxjax.data.sources import load_dataset
from fxjax.runs.suite import resolve_suite
from tests.support.encoded import png_bytes


class TinyNorb(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A real array_record TFDS dataset with smallnorb's label key; pixel (0, 0) encodes the record's id."""

    VERSION = tfds.core.Version("2.0.0")
    SIZES = {"train": 1000, "test": 30}

    def _info(self):
        features = tfds.features.FeaturesDict(
            {
                "image": tfds.features.Image(shape=(4, 4, 3)),
                "label_azimuth": tfds.features.ClassLabel(names=["a0", "a1", "a2"]),
                "label_elevation": tfds.features.ClassLabel(num_classes=2),
            }
        )
        return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split, n) for split, n in self.SIZES.items()}

    def _generate_examples(self, split, n):
        offset = 0 if split == "train" else 2000
        for i in range(offset, offset + n):
            image = np.zeros((4, 4, 3), np.uint8)
            image[0, 0] = (i // 256, i % 256, 7)
            yield i, {"image": png_bytes(image), "label_azimuth": i % 3, "label_elevation": i % 2}


def _ids(source) -> list[int]:
    return [int(source[i]["image"][0, 0, 0]) * 256 + int(source[i]["image"][0, 0, 1]) for i in range(len(source))]


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds")
    tfds.disable_progress_bar()
    TinyNorb(data_dir=str(root), file_format="array_record").download_and_prepare()
    return str(root)


@pytest.fixture
def tiny_tasks(monkeypatch):
    """Two VTAB-style tasks on the tiny dataset: pet-like slices of train, and smallnorb's own layout."""
    tasks = {
        "tiny_slices": vtab.VtabTask(
            "tiny_slices", "tiny_norb:2.*.*", "label_azimuth", "train[:80%]", "train[80%:]", "test", "natural"
        ),
        "tiny_elevation": vtab.VtabTask(
            "tiny_elevation", "tiny_norb:2.*.*", "label_elevation", "train", "train[50%:]", "test", "structured"
        ),
    }
    monkeypatch.setattr(vtab, "TASKS_BY_NAME", {**vtab.TASKS_BY_NAME, **tasks})
    return tasks


def test_vtab_task_reads_train800_val200_and_the_full_test(tfds_dir, tiny_tasks):
    ds = load_dataset("vtab:tiny_slices", data_dir=tfds_dir)
    assert ds.name == "vtab:tiny_slices" and ds.class_names == ["a0", "a1", "a2"]
    train, val, test = (ds.splits[s] for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (800, 200, 30)
    # The same records, in the same order, as TFDS's own slices of the task's split strings.
    builder = tfds.builder("tiny_norb:2.*.*", data_dir=tfds_dir)
    train_slice, val_slice = builder.as_data_source("train[:80%]"), builder.as_data_source("train[80%:]")
    train_ids, val_ids = _ids(train), _ids(val)
    assert train_ids == _ids(train_slice) and val_ids == _ids(val_slice)  # both slices hold exactly 800 / 200
    assert sorted(train_ids + val_ids) == list(range(1000))  # train800 + val200 is the whole 1000, no overlap
    assert sorted(_ids(test)) == list(range(2000, 2030))
    # Labels come from the task's label key, as the record's own label and through the cheap lookup.
    assert all(int(train[i]["label"]) == train_ids[i] % 3 == train.label(i) for i in range(0, 800, 37))
    assert repr(pickle.loads(pickle.dumps(val))) == repr(val) and "label='label_azimuth'" in repr(val)
    assert _ids(pickle.loads(pickle.dumps(val)))[:5] == val_ids[:5]


def test_fingerprints_name_the_task_and_its_splits(tfds_dir, tiny_tasks):
    slices = load_dataset("vtab:tiny_slices", data_dir=tfds_dir)
    assert load_dataset("vtab:tiny_slices", data_dir=tfds_dir).fingerprint == slices.fingerprint
    assert len(set(slices.fingerprint.values())) == 3
    other = load_dataset("vtab:tiny_elevation", data_dir=tfds_dir)
    assert other.class_names == ["0", "1"] and other.fingerprint["test"] != slices.fingerprint["test"]
    assert other.fingerprint["train"] != slices.fingerprint["train"]  # "train" vs "train[:80%]", another label
    whole_train = tfds.builder("tiny_norb:2.*.*", data_dir=tfds_dir).as_data_source("train")
    assert _ids(other.splits["train"]) == _ids(whole_train)[:800]
    assert int(other.splits["val"][0]["label"]) == _ids(other.splits["val"])[0] % 2


def test_too_short_split_and_missing_label_are_one_line_errors(tfds_dir, tiny_tasks, monkeypatch):
    short = vtab.VtabTask("short", "tiny_norb:2.*.*", "label_azimuth", "train", "train[90%:]", "test", "natural")
    no_label = vtab.VtabTask("no_label", "tiny_norb:2.*.*", "label", "train", "train", "test", "natural")
    monkeypatch.setattr(vtab, "TASKS_BY_NAME", {**vtab.TASKS_BY_NAME, "short": short, "no_label": no_label})
    with pytest.raises(ValueError, match=r"vtab:short: split 'train\[90%:\]' of tiny_norb/2.0.0 has 100 examples"):
        load_dataset("vtab:short", data_dir=tfds_dir)
    with pytest.raises(ValueError, match=r"needs an 'image' feature and a ClassLabel 'label'"):
        load_dataset("vtab:no_label", data_dir=tfds_dir)


@pytest.mark.parametrize("task", ["clevr_count", "clevr_distance", "kitti_distance", "dsprites_location"])
def test_tasks_with_derived_labels_are_refused(task, tmp_path):
    with pytest.raises(ValueError, match=rf"'vtab:{task}' .* derived by task_adaptation\) is not supported yet"):
        load_dataset(f"vtab:{task}", data_dir=str(tmp_path))


def test_unknown_and_unprepared_tasks(tmp_path):
    with pytest.raises(ValueError, match="unknown VTAB task 'vtab:nope'; known: caltech101, cifar100"):
        load_dataset("vtab:nope")
    with pytest.raises(FileNotFoundError, match=r"tfds build dtd:3\.\*\.\* --data_dir .* --file_format array_record"):
        load_dataset("vtab:dtd", data_dir=str(tmp_path))


def test_the_shipped_vtab1k_suite_resolves_with_every_supported_task():
    from configs.suites import vtab1k

    suite = resolve_suite(vtab1k.get_config())
    assert suite.datasets == tuple(f"vtab:{n}" for n in vtab.SUPPORTED_TASKS) and len(suite.datasets) == 14
    assert {vtab.TASKS_BY_NAME[n].label for n in vtab.SUPPORTED_TASKS} == {"label", "label_azimuth", "label_elevation"}
