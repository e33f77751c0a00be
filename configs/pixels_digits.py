"""Baseline: the quickstart's data, head and schedule on raw 8x8 pixels instead of pre-trained features.

python -m launch.train --config configs/pixels_digits.py --workdir runs/pixels_digits
"""

from fxjax.config import load_config_file


def get_config():
    config = load_config_file("quickstart")
    config.backbone = "pixels"
    return config
