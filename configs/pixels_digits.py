"""Baseline: the same head and data as the quickstart, on raw 8x8 pixels instead of pre-trained features.

    python -m launch.train --config configs/pixels_digits.py --workdir runs/pixels_digits
"""

from fxjax.config import default_config


def get_config():
    config = default_config()
    config.backbone = "pixels"
    config.data.source = "digits"
    config.freeze = "all"
    config.batch_size = 64
    config.num_epochs = 30
    config.optimizer.learning_rate = 3e-3
    config.optimizer.warmup_steps = 20
    return config
