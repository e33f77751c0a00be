"""SigLIP2 (NaFlex) against transformers' Siglip2VisionModel / Siglip2Model and its image processors: tiny random
checkpoints saved as transformers does, real photos (scikit-learn's samples) cropped to several aspect ratios."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

import fxjax
from fxjax.backbones.families.siglip2 import naflex_inputs, resize_positions
from fxjax.data.preprocess import PreprocessSpec, naflex_size, preprocess_image
from tests.support.reference_models import perturbed

torch = pytest.importorskip("torch")
T = pytest.importorskip("transformers")
datasets = pytest.importorskip("sklearn.datasets")

PATCH, GRID = 4, 4  # position grid 4x4 = num_patches 16
MAX_PATCHES = 24  # the processor's budget: more than the grid, so positions are up- and downsampled
VISION = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    patch_size=PATCH,
    num_patches=GRID * GRID,
)
TEXT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=99)


def _vision(**kw):
    torch.manual_seed(0)
    return perturbed(T.Siglip2VisionModel(T.Siglip2VisionConfig(**VISION, **kw)))


def _save(model, folder):
    model.save_pretrained(folder, safe_serialization=True)
    T.Siglip2ImageProcessorPil(patch_size=PATCH, max_num_patches=MAX_PATCHES).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def vision(tmp_path_factory):
    model = _vision()
    return model, _save(model, tmp_path_factory.mktemp("siglip2_vision"))


def _photos() -> list[np.ndarray]:
    """Real photos, cropped: wide, tall, square, a thin strip, one smaller than a patch grid's worth."""
    china, flower = datasets.load_sample_images().images
    return [china[:200, :400], flower[:300, 50:150], china[100:300, 200:400], flower[:40, :400], china[:9, :13]]


def _reference(model, pixel_values, mask, shapes):
    with torch.no_grad():
        return model(
            pixel_values=torch.as_tensor(pixel_values),
            pixel_attention_mask=torch.as_tensor(mask),
            spatial_shapes=torch.as_tensor(shapes),
            output_hidden_states=True,
        )


def _outputs(bb, *inputs) -> dict:
    return jax.jit(lambda state, *a: nnx.merge(bb.graphdef, state)(*a))(bb.state, *inputs)


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def _naflex(spec: PreprocessSpec, photos) -> tuple:
    naflex = dataclasses.replace(spec, resize_mode="naflex")
    return naflex_inputs([preprocess_image(p, naflex) for p in photos], spec.patch_size, spec.max_patches)


def test_preprocessing_equals_the_naflex_processors(vision):
    """resize_mode="naflex" + naflex_inputs = the PIL processor's outputs exactly (padded patches present); the
    torchvision processor gives the same sizes and masks, pixels within its resize's rounding."""
    spec = fxjax.load_backbone(str(vision[1])).preprocess
    assert (spec.patch_size, spec.max_patches, spec.size) == (PATCH, MAX_PATCHES, (16, 16))
    photos = _photos()
    ours = _naflex(spec, photos)
    pil = T.Siglip2ImageProcessorPil(patch_size=PATCH, max_num_patches=MAX_PATCHES)(photos, return_tensors="np")
    np.testing.assert_array_equal(ours[2], pil["spatial_shapes"])
    np.testing.assert_array_equal(ours[1], pil["pixel_attention_mask"])
    assert _max_diff(ours[0], pil["pixel_values"]) <= 1e-6
    assert (ours[1] == 0).any(axis=1).sum() >= 2  # padded patches present
    assert len({tuple(s) for s in ours[2]}) == len(photos)  # every aspect ratio its own grid
    fast = T.Siglip2ImageProcessor(patch_size=PATCH, max_num_patches=MAX_PATCHES)(photos, return_tensors="np")
    np.testing.assert_array_equal(ours[2], fast["spatial_shapes"])
    np.testing.assert_array_equal(ours[1], fast["pixel_attention_mask"])
    assert _max_diff(ours[0], fast["pixel_values"]) <= 1.01 * 2 / 255  # one uint8 level: torch's resize vs PIL's


@pytest.mark.parametrize(("height", "width"), [(427, 640), (9, 13), (1, 500), (64, 64), (3, 3)])
def test_naflex_size_is_the_processors(height, width):
    from transformers.models.siglip2.image_processing_pil_siglip2 import get_image_size_for_max_num_patches

    for patch, budget in ((4, 24), (16, 256)):
        assert naflex_size(height, width, patch, budget) == get_image_size_for_max_num_patches(
            height, width, patch, budget
        )


def test_naflex_forward_matches_reference(vision):
    """The processor's padded NaFlex batch through our module and transformers': pooled (the masked MAP head),
    an intermediate layer and the last hidden state, at every position (padding too)."""
    model, folder = vision
    bb = fxjax.load_backbone(str(folder))
    inputs = T.Siglip2ImageProcessorPil(patch_size=PATCH, max_num_patches=MAX_PATCHES)(_photos(), return_tensors="np")
    args = (inputs["pixel_values"], inputs["pixel_attention_mask"], inputs["spatial_shapes"])
    ref, out = _reference(model, *args), _outputs(bb, *args)
    assert _max_diff(out["pooled"], ref.pooler_output) <= 1e-4
    assert len(out["hidden_states"]) == len(ref.hidden_states) == 3
    assert _max_diff(out["hidden_states"][1], ref.hidden_states[1]) <= 1e-4
    assert _max_diff(out["last_hidden_state"], ref.last_hidden_state) <= 1e-4
    # masking matters: without it the pooled features differ
    unmasked = _outputs(bb, args[0], np.ones_like(args[1]), args[2])["pooled"]
    assert _max_diff(unmasked, ref.pooler_output) > 1e-2


@pytest.mark.parametrize(("height", "width"), [(16, 24), (8, 8)])
def test_dense_path_matches_reference(vision, height, width):
    """Backbone.features on dense [n, h, w, 3] batches = transformers on the same pixels patchified, all valid."""
    model, folder = vision
    bb = fxjax.load_backbone(str(folder))
    x = np.random.default_rng(0).standard_normal((2, height, width, 3)).astype(np.float32)
    pixels, mask, shapes = naflex_inputs(list(x), PATCH, (height // PATCH) * (width // PATCH))
    assert mask.all()
    ref = _reference(model, pixels, mask, shapes)
    assert _max_diff(bb.features(x), ref.pooler_output) <= 1e-4
    out = _outputs(bb, x)
    assert _max_diff(out["hidden_states"][1], ref.hidden_states[1]) <= 1e-4
    assert _max_diff(out["block_cls"][:, 0], ref.hidden_states[1].mean(1)) <= 1e-4
    assert bb.num_stages == 2 + 2  # embeddings, two blocks, final norm + head


def test_bfloat16_naflex_is_close(vision):
    """bfloat16 compute on a padded NaFlex batch stays near the float32 reference (the masks hold in bfloat16)."""
    model, folder = vision
    bb = fxjax.load_backbone(str(folder), dtype="bfloat16")
    inputs = T.Siglip2ImageProcessorPil(patch_size=PATCH, max_num_patches=MAX_PATCHES)(_photos(), return_tensors="np")
    args = (inputs["pixel_values"], inputs["pixel_attention_mask"], inputs["spatial_shapes"])
    ref = _reference(model, *args).pooler_output.numpy()
    half = _outputs(bb, *args)["pooled"]
    assert half.dtype == np.dtype("bfloat16")
    assert _max_diff(half, ref) <= 0.05 * float(np.max(np.abs(ref))) + 0.02


def test_full_checkpoint_and_no_head(tmp_path):
    """A full siglip2 checkpoint's vision tower (text tower dropped); a tower without a head pools by the mean
    of the valid final tokens."""
    torch.manual_seed(0)
    config = T.Siglip2Config(text_config=TEXT, vision_config=VISION)
    full = perturbed(T.Siglip2Model(config))
    bb = fxjax.load_backbone(str(_save(full, tmp_path / "full")))
    assert bb.info["model_type"] == "siglip2"
    inputs = T.Siglip2ImageProcessorPil(patch_size=PATCH, max_num_patches=MAX_PATCHES)(_photos(), return_tensors="np")
    args = (inputs["pixel_values"], inputs["pixel_attention_mask"], inputs["spatial_shapes"])
    assert _max_diff(_outputs(bb, *args)["pooled"], _reference(full.vision_model, *args).pooler_output) <= 1e-4

    headless = _vision(vision_use_head=False)
    bb = fxjax.load_backbone(str(_save(headless, tmp_path / "headless")))
    ref = _reference(headless, *args).last_hidden_state.numpy()
    valid = args[1][:, :, None]
    assert _max_diff(_outputs(bb, *args)["pooled"], (ref * valid).sum(1) / valid.sum(1)) <= 1e-4


@pytest.mark.parametrize("shape", [(2, 7), (6, 3), (4, 4), (1, 1)])
def test_position_resize_is_torch_bilinear_antialias(shape):
    """resize_positions = F.interpolate(mode="bilinear", antialias=True, align_corners=False), down and up."""
    table = np.random.default_rng(1).standard_normal((GRID * GRID, 8)).astype(np.float32)
    grid = torch.from_numpy(table).reshape(1, GRID, GRID, 8).permute(0, 3, 1, 2)
    with torch.no_grad():
        expected = torch.nn.functional.interpolate(grid, size=shape, mode="bilinear", antialias=True)
    expected = expected.permute(0, 2, 3, 1).reshape(-1, 8).numpy()
    length = shape[0] * shape[1] + 3
    out = np.asarray(jax.jit(resize_positions, static_argnums=2)(table, np.asarray([shape]), length))[0]
    assert _max_diff(out[: shape[0] * shape[1]], expected) <= 1e-5
    np.testing.assert_array_equal(out[-3:], np.broadcast_to(out[0], (3, 8)))  # padding: the first position


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="naflex.*patch_size and max_patches"):
        PreprocessSpec(size=(16, 16), resize_mode="naflex")
    with pytest.raises(ValueError, match="more than max_patches=4"):
        naflex_inputs([np.zeros((8, 12, 3), np.float32)], PATCH, 4)
    with pytest.raises(ValueError, match="not divisible by the patch size 4"):
        naflex_inputs([np.zeros((6, 8, 3), np.float32)], PATCH, 16)


def test_naflex_spec_fields_stay_out_of_other_fingerprints():
    """patch_size / max_patches at their defaults are left out of to_dict (older cache fingerprints still match);
    a NaFlex spec at another resolution gets that resolution's patch budget."""
    assert {"patch_size", "max_patches", "resize_mode"}.isdisjoint(PreprocessSpec(size=(8, 8)).to_dict())
    spec = PreprocessSpec(size=(16, 16), patch_size=PATCH, max_patches=16)
    assert spec.to_dict()["max_patches"] == 16
    assert spec.at_size(32).max_patches == 64
