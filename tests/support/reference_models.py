"""Shared by the parity tests of the model families: reference models with no weight at its init value, and
random normalised image batches."""

from __future__ import annotations

import numpy as np
import torch


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """`model` in eval mode with every weight moved off its init (ones, zeros), so that no mapping hides."""
    model.eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def random_images(n: int = 2, h: int = 32, w: int = 32, seed: int = 0) -> np.ndarray:
    """[n, h, w, 3] float32 standard-normal pixels (already "normalised")."""
    return np.random.default_rng(seed).standard_normal((n, h, w, 3)).astype(np.float32)
