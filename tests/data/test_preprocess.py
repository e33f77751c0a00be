"""Preprocessing equals the hand computation a reference pipeline (PIL + numpy) would do."""

import json

import numpy as np
import pytest
from PIL import Image

from fxjax.data.preprocess import PreprocessSpec, augment_image, preprocess_image

IMAGENET = PreprocessSpec(
    size=(8, 8), resize_shortest=10, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), resample="bicubic"
)


def _image(h: int, w: int, c: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, c), dtype=np.uint8)


def test_resize_shortest_crop_normalise_matches_hand_computation():
    image = _image(20, 30)
    # Shorter side 20 → 10, so 30 → 15; centre crop 8x8 starts at top (10-8)//2 = 1, left (15-8)//2 = 3.
    resized = np.asarray(Image.fromarray(image).resize((15, 10), Image.Resampling.BICUBIC))
    crop = resized[1:9, 3:11].astype(np.float32)
    expected = (crop / 255.0 - np.array(IMAGENET.mean)) / np.array(IMAGENET.std)
    out = preprocess_image(image, IMAGENET)
    assert out.shape == (8, 8, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_portrait_and_direct_resize():
    image = _image(30, 20)  # portrait: width is the shorter side
    resized = np.asarray(Image.fromarray(image).resize((10, 15), Image.Resampling.BICUBIC))
    expected = (resized[3:11, 1:9] / 255.0 - np.array(IMAGENET.mean)) / np.array(IMAGENET.std)
    np.testing.assert_allclose(preprocess_image(image, IMAGENET), expected, rtol=1e-5, atol=1e-5)

    lite = PreprocessSpec(size=(6, 9), mean=(127, 127, 127), std=(128, 128, 128), rescale=1.0)
    direct = np.asarray(Image.fromarray(image).resize((9, 6), Image.Resampling.BILINEAR)).astype(np.float32)
    np.testing.assert_allclose(preprocess_image(image, lite), (direct - 127) / 128, atol=1e-6)


@pytest.mark.parametrize("shape", [(12, 14), (12, 14, 1)])
def test_grayscale_becomes_three_equal_channels(shape):
    grey = _image(12, 14, 1)[..., 0].reshape(shape)
    rgb = np.repeat(grey.reshape(12, 14, 1), 3, axis=2)
    out = preprocess_image(grey, IMAGENET)
    assert out.shape == (8, 8, 3)
    np.testing.assert_array_equal(out, preprocess_image(rgb, IMAGENET))


def test_rgba_drops_alpha():
    rgba = _image(12, 14, 4)
    np.testing.assert_array_equal(preprocess_image(rgba, IMAGENET), preprocess_image(rgba[..., :3], IMAGENET))


def test_spec_validation_and_json_round_trip():
    with pytest.raises(ValueError, match="resample"):
        PreprocessSpec(size=(8, 8), resample="lanczos")
    with pytest.raises(ValueError, match="smaller than the crop"):
        PreprocessSpec(size=(8, 8), resize_shortest=6)
    d = json.loads(json.dumps(IMAGENET.to_dict()))
    assert PreprocessSpec(**d) == IMAGENET


def test_augment_is_seeded_and_well_formed():
    image = _image(40, 24)
    spec = PreprocessSpec(size=(8, 8))
    a = augment_image(image, spec, np.random.default_rng(1))
    b = augment_image(image, spec, np.random.default_rng(1))
    c = augment_image(image, spec, np.random.default_rng(2))
    assert a.shape == (8, 8, 3) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_augment_crops_stay_inside_the_image():
    # A flat image stays flat under any in-bounds crop; an out-of-bounds box would pull in black.
    flat = np.full((5, 300, 1), 200, np.uint8)  # extreme aspect ratio exercises the fallback crop
    spec = PreprocessSpec(size=(4, 4), rescale=1.0)
    rng = np.random.default_rng(0)
    for _ in range(20):
        np.testing.assert_allclose(augment_image(flat, spec, rng), 200.0)


def test_augment_flips_half_the_time():
    ramp = np.tile(np.arange(16, dtype=np.uint8)[None, :, None] * 16, (16, 1, 3))  # brighter to the right
    spec = PreprocessSpec(size=(16, 16))
    rng = np.random.default_rng(0)
    views = [augment_image(ramp, spec, rng) for _ in range(40)]
    left_to_right = sum(v[:, 0].mean() < v[:, -1].mean() for v in views)
    assert 5 < left_to_right < 35
