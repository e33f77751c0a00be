"""Checkpoint layouts other than transformers': one module per layout that researchers download (timm's Hub
folders, open_clip's, DINOv2's torch-hub files, big_vision's .npz). Each module exposes

    matches(path: Path) -> bool
    load(path: Path, *, name: str, revision: str | None, dtype, param_dtype) -> Backbone

`fxjax.backbones.hub` asks them in `LAYOUTS` order; a path no layout claims is read as a transformers folder.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

# Module names under fxjax.backbones.checkpoints, asked in this order.
# open_clip first: LAION-style folders carry a config.json beside open_clip_config.json.
LAYOUTS: list[str] = ["open_clip", "timm", "dinov2_hub", "big_vision"]


def find_layout(path: Path) -> ModuleType | None:
    """The layout module that claims `path` (a folder or a file), or None (a transformers folder)."""
    for name in LAYOUTS:
        layout = importlib.import_module(f"{__name__}.{name}")
        if layout.matches(path):
            return layout
    return None
