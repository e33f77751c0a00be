"""VTAB-1k tasks as a data source (`vtab:<task>`): each task's TFDS dataset with task_adaptation's splits.

VTAB-1k trains on the first 800 examples of a task's train split (train800), selects on the first 200 of its
val split (val200) and reports on the full test split (Zhai et al. 2019, arXiv 1910.04867; task_adaptation's
`train800` / `val200` / `test`). The split strings are TFDS slices ("train[:90%]"), which array_record data
sources read directly; the first 800 / 200 of a slice are then a fixed index range, so nothing is random.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fxjax.data.sources import Subset, TfdsSource, _Resolved, open_tfds_builder, pinned_tfds_name

TRAIN_EXAMPLES = 800
VAL_EXAMPLES = 200


@dataclasses.dataclass(frozen=True)
class VtabTask:
    """One VTAB task: TFDS name, label, and the train / val / test splits task_adaptation defines for it.

    VTAB-1k takes the first 800 examples of `train` (train800) and the first 200 of `val` (val200).
    """

    name: str
    tfds: str
    label: str
    train: str
    val: str
    test: str
    group: str


def _task(name: str, tfds: str, train: str, val: str, test: str, group: str, label: str = "label") -> VtabTask:
    return VtabTask(name, tfds, label, train, val, test, group)


# google-research/task_adaptation, task_adaptation/data/<dataset>.py `tfds_splits`.
VTAB_TASKS = (
    _task("caltech101", "caltech101:3.*.*", "train[:90%]", "train[90%:]", "test", "natural"),
    _task("cifar100", "cifar100:3.*.*", "train[:90%]", "train[90%:]", "test", "natural"),
    _task("dtd", "dtd:3.*.*", "train", "validation", "test", "natural"),
    _task("oxford_flowers102", "oxford_flowers102:2.*.*", "train", "validation", "test", "natural"),
    _task("oxford_iiit_pet", "oxford_iiit_pet:3.*.*", "train[:80%]", "train[80%:]", "test", "natural"),
    _task("svhn", "svhn_cropped:3.*.*", "train[:90%]", "train[90%:]", "test", "natural"),
    _task("sun397", "sun397/tfds:4.*.*", "train", "validation", "test", "natural"),
    _task("patch_camelyon", "patch_camelyon:2.*.*", "train", "validation", "test", "specialized"),
    _task("eurosat", "eurosat/rgb:2.*.*", "train[:60%]", "train[60%:80%]", "train[80%:]", "specialized"),
    _task("resisc45", "resisc45:3.*.*", "train[:60%]", "train[60%:80%]", "train[80%:]", "specialized"),
    _task(
        "diabetic_retinopathy",
        "diabetic_retinopathy_detection/btgraham-300:3.*.*",
        "train",
        "validation",
        "test",
        "specialized",
    ),
    _task("clevr_count", "clevr:3.*.*", "train[:90%]", "train[90%:]", "validation", "structured", "count_all"),
    _task(
        "clevr_distance",
        "clevr:3.*.*",
        "train[:90%]",
        "train[90%:]",
        "validation",
        "structured",
        "closest_object_distance",
    ),
    _task("dmlab", "dmlab:2.0.0", "train", "validation", "test", "structured"),
    _task("kitti_distance", "kitti:3.1.0", "train", "validation", "test", "structured", "closest_vehicle_distance"),
    _task(
        "dsprites_location",
        "dsprites:2.*.*",
        "train[:80%]",
        "train[80%:90%]",
        "train[90%:]",
        "structured",
        "label_x_position/16",
    ),
    _task(
        "dsprites_orientation",
        "dsprites:2.*.*",
        "train[:80%]",
        "train[80%:90%]",
        "train[90%:]",
        "structured",
        "label_orientation/16",
    ),
    _task("smallnorb_azimuth", "smallnorb:2.*.*", "train", "test[:50%]", "test[50%:]", "structured", "label_azimuth"),
    _task(
        "smallnorb_elevation", "smallnorb:2.*.*", "train", "test[:50%]", "test[50%:]", "structured", "label_elevation"
    ),
)

TASKS_BY_NAME = {t.name: t for t in VTAB_TASKS}

# Labels task_adaptation derives from other features (clevr object counts and distances, kitti vehicle distance,
# dSprites' "/16" binning): not computed yet, so their tasks are refused rather than run on another label.
DERIVED_LABELS = frozenset(
    {"count_all", "closest_object_distance", "closest_vehicle_distance", "label_x_position/16", "label_orientation/16"}
)


SUPPORTED_TASKS = tuple(t.name for t in VTAB_TASKS if t.label not in DERIVED_LABELS)


def vtab_task(name: str) -> VtabTask:
    """The task `vtab:<name>` names; an unknown task or one with a derived label is an error."""
    task = TASKS_BY_NAME.get(name)
    if task is None:
        raise ValueError(f"unknown VTAB task 'vtab:{name}'; known: {', '.join(TASKS_BY_NAME)}")
    if task.label in DERIVED_LABELS:
        raise ValueError(
            f"VTAB task 'vtab:{name}' (label {task.label!r}, derived by task_adaptation) is not supported yet; "
            f"supported: {', '.join(SUPPORTED_TASKS)}"
        )
    return task


def load_vtab(name: str, data_dir: str | None) -> _Resolved:
    """Task `name` of VTAB_TASKS as train800 / val200 / test sources of its prepared TFDS dataset."""
    task = vtab_task(name)
    import tensorflow_datasets as tfds

    info = open_tfds_builder(task.tfds, data_dir).info
    feature = info.features[task.label] if task.label in info.features else None
    if "image" not in info.features or not isinstance(feature, tfds.features.ClassLabel):
        raise ValueError(
            f"TFDS dataset {info.full_name!r} (vtab:{name}) needs an 'image' feature and a ClassLabel "
            f"{task.label!r}, has {list(info.features)}"
        )
    pinned = pinned_tfds_name(info)  # keeps the config ("sun397/tfds"), the default one included

    layout = (("train", task.train, TRAIN_EXAMPLES), ("val", task.val, VAL_EXAMPLES), ("test", task.test, None))
    splits, identity = {}, {}
    for ours, split, take in layout:
        n = info.splits[split].num_examples
        source = TfdsSource(pinned, split, data_dir, n, label_key=task.label)
        identity[ours] = {
            "source": "vtab", "task": name, "dataset": info.full_name, "split": split, "n": n, "label": task.label,
            "take": take,
        }  # fmt: skip
        if take is None:
            splits[ours] = source
        elif n < take:
            raise ValueError(f"vtab:{name}: split {split!r} of {info.full_name} has {n} examples; VTAB-1k takes {take}")
        else:
            splits[ours] = Subset(source, np.arange(take))  # the slice's first `take`, as task_adaptation's train800
    return _Resolved(f"vtab:{name}", list(feature.names), splits, identity)
