"""DINOv2-S/14 features → logistic-regression and kNN probes plus a linear head on Oxford Flowers-102.

    python -m launch.train --config configs/dinov2_flowers102.py --workdir runs/dinov2_flowers \
        --config.data.data_dir=~/tensorflow_datasets
"""

from fxjax.config import default_config


def get_config():
    config = default_config()
    config.backbone = "facebook/dinov2-small"
    config.data.source = "tfds:oxford_flowers102"
    config.batch_size = 256
    config.num_epochs = 30
    config.optimizer.learning_rate = 1e-3
    config.probes = ("ridge", "logistic", "knn")
    config.fewshot.ks = (1, 5, 10)
    return config
