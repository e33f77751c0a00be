"""ViT-B/16 (ImageNet-21k) features → linear head on CIFAR-10, with a sweep of 16 heads on cached features.

Needs the Hub once (weights) and a prepared TFDS dataset (README: "Preparing a TFDS dataset"):
    python -m launch.train --config configs/vit_b16_cifar10.py --workdir runs/vit_cifar10 \
        --config.data.data_dir=~/tensorflow_datasets
"""

from fxjax.config import default_config


def get_config():
    config = default_config()
    config.backbone = "google/vit-base-patch16-224-in21k"
    config.data.source = "tfds:cifar10"
    config.batch_size = 512
    config.eval_batch_size = 512
    config.num_epochs = 10
    config.sweep.learning_rates = (1e-4, 3e-4, 1e-3, 3e-3)
    config.sweep.weight_decays = (0.0, 1e-5, 1e-4, 1e-3)
    config.probes = ("logistic", "knn")
    return config
