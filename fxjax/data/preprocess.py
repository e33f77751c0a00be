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
    # With resize_shortest: "shortest" keeps the aspect ratio; "squash" resizes both sides to resize_shortest
    # (timm's crop_mode="squash"). "naflex" (SigLIP2's NaFlex processor): each image gets its own size, the
    # largest multiple of patch_size per side, aspect ratio kept, with at most max_patches patches (`size` is
    # then unused; images of one batch differ in shape: batch them with the family's `naflex_inputs`).
    resize_mode: str = "shortest"
    # Centre-crop offset: "floor" = (H - h) // 2 as HF processors; "round" = round((H - h) / 2) as torchvision's
    # CenterCrop (timm's eval transform), which differs by a pixel when H - h is odd.
    crop_rounding: str = "floor"
    # A NaFlex checkpoint's patch size and patch budget (its processor's `patch_size`, `max_num_patches`).
    patch_size: int | None = None
    max_patches: int | None = None

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
        if self.resize_mode not in ("shortest", "squash", "naflex"):
            raise ValueError(f"resize_mode must be 'shortest', 'squash' or 'naflex', got {self.resize_mode!r}")
        if self.resize_mode == "naflex" and not (self.patch_size and self.max_patches):
            raise ValueError(
                f"resize_mode='naflex' needs patch_size and max_patches > 0, got {self.patch_size}, {self.max_patches}"
            )
        if self.crop_rounding not in ("floor", "round"):
            raise ValueError(f"crop_rounding must be 'floor' or 'round', got {self.crop_rounding!r}")
        if self.resize_shortest is not None and self.resize_shortest < max(self.size):
            raise ValueError(f"resize_shortest={self.resize_shortest} is smaller than the crop {self.size}")

    def at_size(self, size: int) -> PreprocessSpec:
        """The same preprocessing at another square resolution (a resize-then-crop keeps its crop ratio)."""
        shortest = None
        if self.resize_shortest is not None:
            shortest = max(size, round(self.resize_shortest * size / max(self.size)))
        budget = self.max_patches if self.patch_size is None else (size // self.patch_size) ** 2
        return dataclasses.replace(self, size=(size, size), resize_shortest=shortest, max_patches=budget)

    def to_dict(self) -> dict:
        """JSON-able form, used in feature-cache fingerprints and environment.json. The geometry options at their
        defaults are left out, so that fingerprints made before they existed still match."""
        out = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
        for key, default in (
            ("resize_mode", "shortest"),
            ("crop_rounding", "floor"),
            ("patch_size", None),
            ("max_patches", None),
        ):
            if out[key] == default:
                del out[key]
        return out


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


def naflex_size(height: int, width: int, patch: int, max_patches: int) -> tuple[int, int]:
    """SigLIP2's NaFlex target size of a [height, width] image: each side scaled by one factor and rounded up to
    a multiple of `patch` (at least one patch), the factor the largest with at most `max_patches` patches.
    The processor's bisection (`get_image_size_for_max_num_patches`), step for step, so that sizes agree."""

    def scaled(scale: float, side: int) -> int:
        return max(patch, math.ceil(side * scale / patch) * patch)

    eps = 1e-5
    low, high = eps / 10, 100.0
    while high - low >= eps:
        scale = (low + high) / 2
        if (scaled(scale, height) / patch) * (scaled(scale, width) / patch) <= max_patches:
            low = scale
        else:
            high = scale
    return scaled(low, height), scaled(low, width)


def resize_and_crop(image: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """uint8 [H, W, 3] → uint8 [h, w, 3]: the deterministic (eval-time) geometry of `spec`."""
    height, width = spec.size
    pil = Image.fromarray(image)
    if spec.resize_mode == "naflex":
        height, width = naflex_size(image.shape[0], image.shape[1], spec.patch_size, spec.max_patches)
        return np.asarray(pil.resize((width, height), _RESAMPLE[spec.resample]))
    if spec.resize_shortest is None:
        return np.asarray(pil.resize((width, height), _RESAMPLE[spec.resample]))
    # torchvision Resize(int): the shorter side becomes exactly `resize_shortest`, the longer is truncated.
    w, h = pil.size
    s = spec.resize_shortest
    if spec.resize_mode == "squash":
        new_w, new_h = s, s
    else:
        new_w, new_h = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
    if spec.crop_rounding == "round":
        top, left = int(round((new_h - height) / 2.0)), int(round((new_w - width) / 2.0))
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
