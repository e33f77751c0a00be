"""Parity of the CNN families (ResNet, ConvNeXt, EfficientNet) with transformers' PyTorch models.

Each test builds a tiny random reference model, saves it the way the Hub stores it, loads the folder through
`fxjax.load_backbone` and compares pooled features (and, for ResNet, every hidden state) on random inputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import fxjax
from fxjax.backbones import families as models
from fxjax.backbones.convert import path_str
from fxjax.data.preprocess import preprocess_image
from fxjax.heads import freeze
from fxjax.heads.heads import Classifier, Head

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOLERANCE = 1e-4


def _randomise(model, seed: int = 0):
    """Unit-gain weights (EfficientNet's own init, std 0.02, leaves activations too small to tell paddings
    apart), non-trivial BatchNorm statistics and affine terms, LayerNorm affine terms and layer scales, so
    that a mapping that drops, swaps or mis-pads any of them shows up in the outputs."""
    gen = torch.Generator().manual_seed(seed)

    def uniform(t, low, high):
        return low + (high - low) * torch.rand(t.shape, generator=gen)

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) / fan_in**0.5)
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.copy_(0.2 * torch.randn(module.running_mean.shape, generator=gen))
                module.running_var.copy_(uniform(module.running_var, 0.5, 2.0))
            if isinstance(module, (torch.nn.BatchNorm2d, torch.nn.LayerNorm)):
                module.weight.copy_(uniform(module.weight, 0.5, 1.5))
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=gen))
            scale = getattr(module, "layer_scale_parameter", None)
            if scale is not None:
                scale.copy_(uniform(scale, 0.2, 1.0))
    return model.eval()


def _save(model, folder, *, safe: bool = True):
    """`save_pretrained`; `safe=False` swaps the safetensors file for a torch pickle, as older Hub checkpoints
    ship (transformers 5 writes only safetensors, whatever `safe_serialization` says)."""
    model.save_pretrained(folder)
    if not safe:
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()
    return folder


def _inputs(size: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, 3, size, size)).astype(np.float32)  # NCHW


def _reference(model, x: np.ndarray):
    with torch.inference_mode():
        return model(torch.from_numpy(x), output_hidden_states=True)


def _max_diff(ours, theirs) -> float:
    return float(np.max(np.abs(np.asarray(ours) - theirs.numpy().reshape(np.shape(ours)))))


def _check_pooled(model, folder, size: int, **load_kw):
    x = _inputs(size)
    backbone = fxjax.load_backbone(str(folder), **load_kw)
    ours = backbone.features(jnp.asarray(x.transpose(0, 2, 3, 1)))  # NHWC
    ref = _reference(model, x)
    theirs = ref.pooler_output.reshape(len(x), -1)
    assert ours.shape == tuple(theirs.shape)
    assert _max_diff(ours, theirs) <= TOLERANCE
    return backbone, x, ref


def test_resnet_basic_matches_reference_in_every_hidden_state(tmp_path):
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 24], depths=[1, 2, 1], layer_type="basic")
    model = _randomise(transformers.ResNetModel(config))
    backbone, x, ref = _check_pooled(model, _save(model, tmp_path / "resnet"), 64)

    hidden = jax.jit(lambda s, x: nnx.merge(backbone.graphdef, s)(x)["hidden_states"])(
        backbone.state, jnp.asarray(x.transpose(0, 2, 3, 1))
    )  # Backbone.outputs runs eagerly: slow to test
    assert len(hidden) == len(ref.hidden_states) == backbone.num_stages
    for ours, theirs in zip(hidden, ref.hidden_states):
        assert _max_diff(ours, theirs.permute(0, 2, 3, 1)) <= TOLERANCE


def test_resnet_bottleneck_from_pytorch_bin_matches_reference(tmp_path):
    config = transformers.ResNetConfig(
        embedding_size=8,
        hidden_sizes=[16, 32],
        depths=[2, 1],
        layer_type="bottleneck",
        downsample_in_first_stage=True,
        downsample_in_bottleneck=True,
    )
    model = _randomise(transformers.ResNetModel(config), seed=2)
    _check_pooled(model, _save(model, tmp_path / "resnet", safe=False), 48)


def test_convnext_matches_reference(tmp_path):
    config = transformers.ConvNextConfig(hidden_sizes=[8, 16, 24], depths=[1, 2, 1], num_stages=3)
    model = _randomise(transformers.ConvNextModel(config), seed=3)
    backbone, _, _ = _check_pooled(model, _save(model, tmp_path / "convnext"), 64)
    assert backbone.num_stages == 5  # embeddings, three stages, final norm


def test_convnext_without_layer_scale_matches_reference(tmp_path):
    """`layer_scale_init_value=0`: transformers' ConvNeXt builds (and saves) no layer scale; fxjax holds none."""
    config = transformers.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, layer_scale_init_value=0.0)
    model = _randomise(transformers.ConvNextModel(config), seed=4)
    assert not any("layer_scale" in name for name in model.state_dict())
    backbone, _, _ = _check_pooled(model, _save(model, tmp_path / "convnext"), 32)
    assert not any("layer_scale" in path_str(p) for p, _ in nnx.to_flat_state(backbone.state))


@pytest.mark.parametrize(("size", "pooling"), [(64, "mean"), (53, "max")])
def test_efficientnet_matches_reference(tmp_path, size, pooling):
    # Four stages at a quarter width: stage 0 maps 8 → 8 channels at stride 1 (transformers adds no skip
    # there); 53 px makes the stem and a stride-2 depthwise conv see odd sizes, where transformers' pads are
    # not "SAME"; block 1 is listed in depthwise_padding (symmetric pads).
    config = transformers.EfficientNetConfig(
        width_coefficient=0.25,
        depth_coefficient=1.0,
        image_size=size,
        hidden_dim=320,
        kernel_sizes=[3, 3, 5, 3],
        in_channels=[32, 16, 24, 40],
        out_channels=[16, 24, 40, 80],
        strides=[1, 2, 2, 2],
        num_block_repeats=[1, 2, 2, 1],
        expand_ratios=[1, 6, 6, 6],
        depthwise_padding=[1],
        pooling_type=pooling,
    )
    model = _randomise(transformers.EfficientNetModel(config), seed=4)
    backbone, _, _ = _check_pooled(model, _save(model, tmp_path / "efficientnet"), size)
    assert backbone.num_stages == 6  # stem, four stages, head


def test_efficientnet_for_classification_checkpoint_drops_the_classifier(tmp_path):
    config = transformers.EfficientNetConfig(
        width_coefficient=0.25,
        depth_coefficient=1.0,
        hidden_dim=320,
        kernel_sizes=[3, 3],
        in_channels=[32, 16],
        out_channels=[16, 24],
        strides=[1, 2],
        num_block_repeats=[1, 1],
        expand_ratios=[1, 6],
        num_labels=5,
    )
    classifier = _randomise(transformers.EfficientNetForImageClassification(config), seed=5)
    _check_pooled(classifier.efficientnet, _save(classifier, tmp_path / "efficientnet"), 32)


@pytest.mark.parametrize(("shortest_edge", "resample"), [(224, 3), (384, 2)])
def test_convnext_processor_gives_the_reference_preprocessing(tmp_path, shortest_edge, resample):
    # ResNet and ConvNeXt checkpoints both ship ConvNextImageProcessor: below 384 px it resizes the shorter
    # side to edge / crop_pct and centre-crops; at 384 px and above it warps to a square without cropping.
    folder = tmp_path / "resnet"
    _save(
        transformers.ResNetModel(
            transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8], depths=[1], layer_type="basic")
        ),
        folder,
    )
    transformers.ConvNextImageProcessor(
        size={"shortest_edge": shortest_edge}, crop_pct=0.875, resample=resample
    ).save_pretrained(folder)
    spec = fxjax.load_backbone(str(folder)).preprocess
    assert spec.size == (shortest_edge, shortest_edge)
    assert spec.resize_shortest == (int(shortest_edge / 0.875) if shortest_edge < 384 else None)

    image = np.random.default_rng(6).integers(0, 256, (300, 420, 3), dtype=np.uint8)
    processor = transformers.AutoImageProcessor.from_pretrained(folder, backend="pil")
    theirs = processor(image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    ours = preprocess_image(image, spec)
    assert ours.shape == theirs.shape
    assert np.max(np.abs(ours - theirs)) < 0.02


@pytest.mark.parametrize(
    "config",
    [
        transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic"),
        transformers.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2),
        transformers.EfficientNetConfig(
            width_coefficient=0.25,
            depth_coefficient=1.0,
            hidden_dim=320,
            kernel_sizes=[3, 3],
            in_channels=[32, 16],
            out_channels=[16, 24],
            strides=[1, 2],
            num_block_repeats=[1, 1],
            expand_ratios=[1, 6],
        ),
    ],
    ids=lambda c: c.model_type,
)
def test_frozen_stages_get_no_gradient_and_stage_paths_cover_every_parameter(config):
    # Built abstractly and filled from numpy: eager random initialisation compiles op by op (seconds).
    rng = np.random.default_rng(7)
    family = models.family(config.model_type)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: family.build(config, rngs=nnx.Rngs(0))))
    state = jax.tree.map(
        lambda v: jnp.asarray(rng.uniform(0.5, 1.5, v.shape) * (0.1 if v.ndim > 1 else 1.0), v.dtype), state
    )
    module = nnx.merge(graphdef, state)
    stages = module.stage_paths()
    frozen = 2
    # Freezing is the training step's parameter filter (fxjax.heads.freeze), never the module's own business.
    model = Classifier(module, Head(module(jnp.zeros((1, 32, 32, 3)))["pooled"].shape[-1], 3, init_std=0.1,
                                    rngs=nnx.Rngs(0)))  # fmt: skip
    is_trainable = freeze.trainable(freeze.frozen_patterns(str(frozen), stages))
    graphdef, params, rest = freeze.split_trainable(model, is_trainable)
    x = jnp.asarray(rng.standard_normal((2, 32, 32, 3)), jnp.float32)

    def loss(params):
        return jnp.sum(nnx.merge(graphdef, params, jax.lax.stop_gradient(rest))(x) ** 2)

    grads = jax.jit(jax.grad(loss))(params)
    norms = [0.0] * len(stages)
    for path, grad in nnx.to_flat_state(grads):
        key = path_str(path)
        if key.startswith("head."):
            continue
        key = key.removeprefix("backbone.")
        owners = [i for i, prefixes in enumerate(stages) if any(key.startswith(f"{p}.") for p in prefixes)]
        assert len(owners) == 1, key
        norms[owners[0]] += float(jnp.sum(jnp.abs(grad.get_value())))
    assert norms[:frozen] == [0.0] * frozen  # frozen stages: not even in the differentiated tree
    assert all(n > 0 for n in norms[frozen:])
    every = {path_str(p).removeprefix("backbone.") for p, _ in nnx.to_flat_state(nnx.state(module, nnx.Param))}
    covered = {k for k in every for prefixes in stages for p in prefixes if k.startswith(f"{p}.")}
    assert covered == every  # stage_paths cover every parameter


def test_efficientnet_processor_constants_match_the_reference(tmp_path):
    """include_top divides by std twice and rescale_offset subtracts 1: the spec must fold both in."""
    from PIL import Image

    from fxjax.backbones.hub import preprocess_spec
    from fxjax.data.preprocess import preprocess_image

    processor = transformers.EfficientNetImageProcessor(
        rescale_offset=True, include_top=True, do_center_crop=False, size={"height": 40, "width": 40}
    )
    processor.save_pretrained(tmp_path)
    spec = preprocess_spec(tmp_path, transformers.EfficientNetConfig(image_size=40))
    image = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    ours = preprocess_image(image, spec)
    reference = transformers.EfficientNetImageProcessorPil(
        rescale_offset=True, include_top=True, do_center_crop=False, size={"height": 40, "width": 40}
    )
    theirs = reference(Image.fromarray(image), return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
