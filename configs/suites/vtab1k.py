"""VTAB-1k: 19 tasks, 1000 training examples each; hyper-parameters on train800 -> val200, final heads on all
1000, reported on the full test split (fxjax.evaluate.linear_specs.VTAB1K; docs/protocols.md).

Prepare the TFDS datasets once (needs TensorFlow and network; array_record so fxjax reads them without TF):

    for d in $(python -c "from fxjax.evaluate.linear_specs import VTAB_TASKS
    print(*sorted({t.tfds.split(':')[0] for t in VTAB_TASKS}))"); do
        tfds build "$d" --data_dir ~/tensorflow_datasets --file_format array_record
    done

resisc45, sun397 and diabetic_retinopathy_detection need a manual download into
~/tensorflow_datasets/downloads/manual (see each dataset's TFDS page). The loop builds each dataset's latest
version; VTAB_TASKS names the versions task_adaptation asked for (`name:3.*.*` accepts any 3.x; kitti:3.1.0 and
dmlab:2.0.0 are exact: build those as `kitti:3.1.0`, `dmlab:2.0.0`).

    python -m launch.suite --config configs/suites/vtab1k.py --workdir runs/suite_vtab1k \
        --config.data_dir=~/tensorflow_datasets
"""

import ml_collections

from fxjax.evaluate.linear_specs import VTAB_TASKS


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.backbones = ("facebook/dinov2-small", "google/vit-base-patch16-224-in21k", "openai/clip-vit-base-patch16")
    config.datasets = tuple(f"vtab:{t.name}" for t in VTAB_TASKS)  # each: tfds name, label, splits in VTAB_TASKS
    config.protocols = ("vtab1k",)  # linear heads by the head engine (LINEAR_SPECS["vtab1k"])
    config.overrides = ml_collections.ConfigDict()
    config.data_dir = "~/tensorflow_datasets"
    config.image_size = 224
    config.seed = 0
    return config
