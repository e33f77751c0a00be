"""Parity of the DINOv3 families (dinov3_vit, dinov3_convnext) with transformers' PyTorch reference, on tiny random
checkpoints written by `save_pretrained` (with the processor's preprocessor_config.json), loaded with
`load_backbone`; and the preprocessing read from that processor config against the processor itself."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

import fxjax
from fxjax.backbones.backbone import VARIANTS
from fxjax.backbones.convert import WeightMismatchError, path_str
from fxjax.data.preprocess import preprocess_image
from tests.support.reference_models import random_images

torch = pytest.importorskip("torch")
T = pytest.importorskip("transformers")

VIT = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8
)
REGISTERS = 2
CASES = {
    "vit": lambda: T.DINOv3ViTModel(T.DINOv3ViTConfig(**VIT, num_register_tokens=REGISTERS)),
    # the gated MLP of the large checkpoints, every projection biased but the MLP's, no registers
    "vit_gated": lambda: T.DINOv3ViTModel(
        T.DINOv3ViTConfig(**VIT, use_gated_mlp=True, hidden_act="silu", key_bias=True, mlp_bias=False)
    ),
    "convnext": lambda: T.DINOv3ConvNextModel(T.DINOv3ConvNextConfig(hidden_sizes=[16, 32], depths=[1, 2])),
    # layer scale initialised to 0: the reference still holds (and saves) every `gamma`
    "convnext_ls0": lambda: T.DINOv3ConvNextModel(
        T.DINOv3ConvNextConfig(hidden_sizes=[16, 32], depths=[1, 2], layer_scale_init_value=0.0)
    ),
}
# tokens before the patches in last_hidden_state
PREFIX = {"vit": 1 + REGISTERS, "vit_gated": 1, "convnext": 1, "convnext_ls0": 1}
TOL = 1e-4


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """case name → (reference model, folder with its safetensors checkpoint and processor config)."""
    cache = {}

    def get(name: str):
        if name not in cache:
            torch.manual_seed(0)
            model = CASES[name]().eval()
            with torch.no_grad():  # move every weight off its init (ones, zeros, 1e-6) so that no mapping hides
                for p in model.parameters():
                    p.add_(0.1 * torch.randn_like(p))
            folder = tmp_path_factory.mktemp(name)
            model.save_pretrained(folder, safe_serialization=True)
            T.DINOv3ViTImageProcessor().save_pretrained(folder)  # what both families' checkpoints ship
            cache[name] = (model, folder)
        return cache[name]

    return get


def _reference(model, x: np.ndarray):
    pixels = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    with torch.no_grad():
        return model(pixel_values=pixels, output_hidden_states=True)


def _outputs(bb, x) -> dict:
    return jax.jit(lambda state, x: nnx.merge(bb.graphdef, state)(x))(bb.state, x)


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def _channels_last(t):
    return t.numpy().transpose(0, 2, 3, 1) if t.ndim == 4 else t.numpy()


@pytest.mark.parametrize(
    ("name", "size"),
    [
        ("vit", (32, 32)),
        ("vit", (48, 40)),
        ("vit_gated", (32, 32)),
        ("convnext", (32, 32)),
        ("convnext", (64, 48)),
        ("convnext_ls0", (32, 32)),
    ],
)
def test_outputs_match_reference(saved, name, size):
    """Pooled features, every hidden state (the intermediate layers), the final-normed tokens and the feature
    VARIANTS (DINOv2's linear evaluation: the final norm on each block's CLS, the mean patch token); the ViT also
    at a patch grid other than the checkpoint's (RoPE on normalised coordinates needs no resizing)."""
    model, folder = saved(name)
    bb = fxjax.load_backbone(str(folder))
    x = random_images(h=size[0], w=size[1])
    ref, ours = _reference(model, x), _outputs(bb, x)
    assert _max_diff(ours["pooled"], ref.pooler_output) <= TOL
    assert len(ours["hidden_states"]) == len(ref.hidden_states)
    for mine, theirs in zip(ours["hidden_states"], ref.hidden_states):
        assert _max_diff(mine, _channels_last(theirs)) <= TOL
    patches = ref.last_hidden_state[:, PREFIX[name] :]
    assert _max_diff(ours["patch_tokens"], patches) <= TOL
    pooled_avgpool = torch.cat([ref.pooler_output, patches.mean(dim=1)], dim=-1)
    assert _max_diff(VARIANTS["pooled_avgpool"](ours), pooled_avgpool) <= TOL
    if name.startswith("convnext"):  # a CNN: no CLS tokens, so no cls_last4 variants
        return
    assert _max_diff(ours["last_hidden_state"], ref.last_hidden_state) <= TOL
    with torch.no_grad():
        cls = torch.cat([model.norm(h)[:, 0] for h in ref.hidden_states[1:]], dim=-1)  # both blocks (of "last 4")
    assert _max_diff(VARIANTS["cls_last4"](ours), cls) <= TOL
    assert _max_diff(VARIANTS["cls_last4_avgpool"](ours), torch.cat([cls, patches.mean(dim=1)], dim=-1)) <= TOL


@pytest.mark.parametrize(
    ("name", "stages"),
    [
        ("vit", [("embeddings",), ("blocks.0",), ("blocks.1",), ("norm",)]),
        ("convnext", [("stages.0",), ("stages.1",), ("layer_norm",)]),
    ],
)
def test_stage_paths_cover_every_parameter_once(saved, name, stages):
    module = fxjax.load_backbone(str(saved(name)[1])).module
    assert module.stage_paths() == stages
    for path, _ in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        key = path_str(path)
        owners = [s for s in stages if any(key == p or key.startswith(p + ".") for p in s)]
        assert len(owners) == 1, key


def test_mismatched_checkpoint_lists_every_problem(saved, tmp_path):
    from safetensors.numpy import load_file, save_file

    folder = saved("vit")[1]
    tensors = load_file(folder / "model.safetensors")
    del tensors["layer.1.attention.q_proj.weight"]
    tensors["layer.0.mlp.up_proj.bias"] = np.zeros(3, np.float32)
    tensors["extra.weight"] = np.zeros(2, np.float32)
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(WeightMismatchError) as err:
        fxjax.load_backbone(str(tmp_path))
    message = str(err.value)
    assert "3 tensor problem(s)" in message
    assert "missing: blocks.1.attn.query.kernel" in message
    assert "mis-shaped: layer.0.mlp.up_proj.bias" in message
    assert "unexpected: extra.weight" in message


def _test_images() -> list[np.ndarray]:
    """Real pictures (sklearn's digits, upscaled) and PIL-drawn ones, in several aspect ratios."""
    from PIL import ImageDraw
    from sklearn.datasets import load_digits

    out = []
    for digit, size in zip(load_digits().images[:2], [(96, 64), (40, 120)]):  # 8x8 grey, 0..16
        image = Image.fromarray(np.uint8(digit * 255 / 16)).resize(size, Image.Resampling.BICUBIC)
        out.append(np.asarray(image.convert("RGB")))
    for i, (w, h) in enumerate([(320, 200), (150, 400), (224, 224), (500, 90)]):
        image = Image.new("RGB", (w, h), (30 * i, 90, 200 - 20 * i))
        draw = ImageDraw.Draw(image)
        draw.ellipse((w // 5, h // 6, w - w // 4, h - h // 3), fill=(250, 40 * i, 20))
        draw.line((0, 0, w, h), fill=(0, 255, 0), width=3)
        out.append(np.asarray(image))
    return out


def test_preprocessing_matches_the_processor(saved):
    """Resize to 224x224 (bilinear), ImageNet mean / std, read from the processor config. The processor rescales
    first and resizes float pixels (torchvision's antialiased bilinear); fxjax resizes uint8 with PIL's same
    filter, whose fixed-point result is rounded to a grey level: pixels differ by at most one grey level
    (1 / 255 / std = 0.0174), and are exact where no resize happens."""
    folder = saved("vit")[1]
    spec = fxjax.load_backbone(str(folder)).preprocess
    processor = T.AutoImageProcessor.from_pretrained(folder)
    assert (spec.size, spec.resize_shortest, spec.resample) == ((224, 224), None, "bilinear")
    assert (spec.mean, spec.std) == (tuple(processor.image_mean), tuple(processor.image_std))
    assert spec.rescale == pytest.approx(processor.rescale_factor)
    for image in _test_images():
        theirs = processor(image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
        ours = preprocess_image(image, spec)
        assert ours.shape == theirs.shape == (224, 224, 3)
        bound = 1e-5 if image.shape[:2] == (224, 224) else 1 / 255 / min(spec.std) + 1e-5
        assert _max_diff(ours, theirs) <= bound, image.shape


def test_bfloat16_compute_is_close(saved):
    """bfloat16 compute (the RoPE tables cast too) stays within bfloat16's precision of the reference."""
    model, folder = saved("vit")
    x = random_images()
    half = fxjax.load_backbone(str(folder), dtype="bfloat16").features(jnp.asarray(x))
    assert half.dtype == jnp.bfloat16
    full = _reference(model, x).pooler_output
    assert _max_diff(half, full) < 0.05 * float(full.abs().max())
