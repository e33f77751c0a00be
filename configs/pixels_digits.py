"""Baseline: the quickstart's data, head and schedule on raw 8x8 pixels instead of pre-trained features.

python -m launch.train --config configs/pixels_digits.py --workdir runs/pixels_digits
"""

from configs import quickstart


def get_config():
    config = quickstart.get_config()
    config.backbone = "pixels"
    return config
