"""VTAB-1k: 14 of its 19 tasks (fxjax.data.vtab.SUPPORTED_TASKS), 1000 training examples each; hyper-parameters
on train800 -> val200, final heads on all 1000, reported on the full test split (fxjax.evaluate.linear_specs.VTAB1K;
docs/protocols.md). The 5 tasks whose labels task_adaptation derives (clevr, kitti, dsprites) are not read yet.

Prepare the TFDS datasets once (needs TensorFlow and network; array_record so fxjax reads them without TF):

    for d in $(python -c "from fxjax.data.vtab import TASKS_BY_NAME, SUPPORTED_TASKS
    print(*sorted({TASKS_BY_NAME[n].tfds.split(':')[0] for n in SUPPORTED_TASKS}))"); do
        tfds build "$d" --data_dir ~/tensorflow_datasets --file_format array_record
    done

resisc45, sun397 and diabetic_retinopathy_detection need a manual download into
~/tensorflow_datasets/downloads/manual (see each dataset's TFDS page). The loop builds each dataset's latest
version; VTAB_TASKS names the versions task_adaptation asked for (`name:3.*.*` accepts any 3.x; dmlab:2.0.0 is
exact: build it as `dmlab:2.0.0`).

    python -m launch.suite --config configs/suites/vtab1k.py --workdir runs/suite_vtab1k \
        --config.data_dir=~/tensorflow_datasets
"""

import ml_collections

from fxjax.data.vtab import SUPPORTED_TASKS


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.backbones = ("facebook/dinov2-small", "google/vit-base-patch16-224-in21k", "openai/clip-vit-base-patch16")
    # Each: tfds name, label, splits in fxjax.data.vtab.VTAB_TASKS (train800 / val200 / test as the data source).
    config.datasets = tuple(f"vtab:{name}" for name in SUPPORTED_TASKS)
    config.protocols = ("vtab1k",)  # linear heads by the head engine (LINEAR_SPECS["vtab1k"])
    config.overrides = ml_collections.ConfigDict()
    config.data_dir = "~/tensorflow_datasets"
    config.image_size = 224
    config.seed = 0
    return config
