"""Per-image preprocessing on the host: the resize, crop and normalisation a backbone was trained with.

Everything here is numpy + PIL so that it runs inside grain worker processes without touching JAX.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

_RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}

# torchvision's RandomResizedCrop defaults: the standard ImageNet training augmentation.
_CROP_SCALE = (0.08, 1.0)
_CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)


@dataclass(frozen=True)
class PreprocessSpec:
    """How a backbone expects its input: resize, centre crop, then (x * rescale - mean) / std per channel.

    x is in 0..255. Built from a checkpoint's processor config by the model side; data only consumes it.
    """

    size: tuple[int, int]  # final (height, width) after crop
    resize_shortest: int | None = None  # shorter side → this, centre crop to size; None → resize to size
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    rescale: float = 1.0 / 255.0
    resample: str = "bilinear"  # "bilinear" | "bicubic" | "nearest" (PIL filters)
    crop_round: bool = False  # centre-crop offset rounded (torchvision's CenterCrop: timm, open_clip), not floored (HF)

    def __post_init__(self) -> None:
        # Normalise list inputs (e.g. from JSON / ml_collections) so equality and hashing behave.
        object.__setattr__(self, "size", tuple(int(s) for s in self.size))
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if len(self.size) != 2 or min(self.size) <= 0:
            raise ValueError(f"size must be (height, width) > 0, got {self.size}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean and std need 3 values (std > 0), got mean={self.mean} std={self.std}")
        if self.resample not in _RESAMPLE:
            raise ValueError(f"resample must be one of {sorted(_RESAMPLE)}, got {self.resample!r}")
        if self.resize_shortest is not None and self.resize_shortest < max(self.size):
            raise ValueError(f"resize_shortest={self.resize_shortest} is smaller than the crop {self.size}")

    def at_size(self, size: int) -> PreprocessSpec:
        """The same preprocessing at another square resolution (a resize-then-crop keeps its crop ratio)."""
        shortest = None
        if self.resize_shortest is not None:
            shortest = max(size, round(self.resize_shortest * size / max(self.size)))
        return dataclasses.replace(self, size=(size, size), resize_shortest=shortest)

    def to_dict(self) -> dict:
        """JSON-able form, used in feature-cache fingerprints and environment.json."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def to_rgb(image: np.ndarray) -> np.ndarray:
    """uint8 [H, W] or [H, W, C] with C in 1, 3, 4 → uint8 [H, W, 3]; alpha is dropped, grey is replicated."""
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected [H, W, C] with C in 1, 3, 4, got shape {image.shape}")
    if image.shape[2] == 1:
        return np.repeat(image, 3, axis=2)
    return image[:, :, :3]


def normalise(image: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """uint8 [h, w, 3] → float32 [h, w, 3] as (x * rescale - mean) / std, folded into one scale and shift."""
    std = np.asarray(spec.std, np.float64)
    scale = (spec.rescale / std).astype(np.float32)
    shift = (np.asarray(spec.mean, np.float64) / std).astype(np.float32)
    out = image.astype(np.float32)
    out *= scale
    out -= shift
    return out


def resize_and_crop(image: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """uint8 [H, W, 3] → uint8 [h, w, 3]: the deterministic (eval-time) geometry of `spec`."""
    height, width = spec.size
    pil = Image.fromarray(image)
    if spec.resize_shortest is None:
        return np.asarray(pil.resize((width, height), _RESAMPLE[spec.resample]))
    # torchvision Resize(int): the shorter side becomes exactly `resize_shortest`, the longer is truncated.
    w, h = pil.size
    s = spec.resize_shortest
    new_w, new_h = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
    if spec.crop_round:
        top, left = round((new_h - height) / 2), round((new_w - width) / 2)
    else:
        top, left = (new_h - height) // 2, (new_w - width) // 2
    resized = pil.resize((new_w, new_h), _RESAMPLE[spec.resample])
    return np.asarray(resized.crop((left, top, left + width, top + height)))


def preprocess_image(image: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """uint8 [H, W, C] (C in 1, 3, 4) → float32 [h, w, 3] normalised, as the backbone saw at training."""
    return normalise(resize_and_crop(to_rgb(image), spec), spec)


def _random_crop_box(height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(top, left, crop_height, crop_width) as torchvision's RandomResizedCrop.get_params draws them."""
    area = height * width
    log_ratio = (math.log(_CROP_RATIO[0]), math.log(_CROP_RATIO[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*_CROP_SCALE)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    # Fallback: the largest centred crop whose aspect ratio lies in range.
    in_ratio = width / height
    if in_ratio < _CROP_RATIO[0]:
        w, h = width, round(width / _CROP_RATIO[0])
    elif in_ratio > _CROP_RATIO[1]:
        w, h = round(height * _CROP_RATIO[1]), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def augment_image(image: np.ndarray, spec: PreprocessSpec, rng: np.random.Generator) -> np.ndarray:
    """Train-time view: random resized crop to `spec.size` + horizontal flip, then normalise.

    `resize_shortest` is ignored here, as in the standard ImageNet recipe (RandomResizedCrop replaces
    Resize + CenterCrop). All randomness comes from `rng`, so a per-record rng makes epochs reproducible.
    """
    rgb = to_rgb(image)
    top, left, h, w = _random_crop_box(rgb.shape[0], rgb.shape[1], rng)
    out_h, out_w = spec.size
    crop = Image.fromarray(rgb).resize((out_w, out_h), _RESAMPLE[spec.resample], box=(left, top, left + w, top + h))
    pixels = np.asarray(crop)  # [h, w, 3]
    if rng.random() < 0.5:
        pixels = pixels[:, ::-1]
    return normalise(pixels, spec)
