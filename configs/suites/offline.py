"""Offline suite: every backbone that loads without a network on every dataset that ships with a package,
through every feature protocol. The smoke test of the suite runner, and a CPU-sized table.

    python -m launch.suite --config configs/suites/offline.py --workdir runs/suite_offline

Datasets: scikit-learn's digits; Fashion-MNIST from Debian's dataset-fashion-mnist or IDX files in
$FXJAX_DATA_DIR/fashion_mnist. No preparation step.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.backbones = ("efficientnet-lite0", "pixels")
    config.datasets = ("digits", "fashion_mnist")
    # Names in fxjax.evaluate.recipes.PROTOCOLS; each runs with its reference defaults unless overridden below.
    config.protocols = ("dinov2_knn", "dinov2_logreg", "clip_linear_probe", "bigvision_fewshot")
    # Per-protocol overrides (keys are the protocol's settings; unknown ones are an error).
    config.overrides = ml_collections.ConfigDict({"bigvision_fewshot": {"select": "fixed"}})
    config.image_size = 96  # 8x8 digits and 28x28 Fashion-MNIST: 96 px keeps this CPU-sized
    config.seed = 0
    return config
