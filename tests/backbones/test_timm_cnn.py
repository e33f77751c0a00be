"""timm's CNN checkpoints (ConvNeXt V1/V2, ResNet and its C/D/T variants, ResNeXt, EfficientNet) against timm's
PyTorch models.

Each parity test builds a tiny random timm model, saves its state dict as safetensors (what timm pushes to the
Hub), reads it back through `fxjax.backbones.formats.read_checkpoint`, loads it with the architecture's builder
and rules, and compares the pooled features (`forward_head(..., pre_logits=True)`) and one stage's output.
The table test builds full-size timm models on the meta device and checks that every tensor name and shape of
each architecture fits the module its defaults build.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fxjax.backbones.checkpoints import timm_cnn
from fxjax.backbones.convert import WeightMismatchError, load_state, map_names, path_str
from fxjax.backbones.formats import read_checkpoint

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
safetensors_torch = pytest.importorskip("safetensors.torch")

TOLERANCE = 1e-4


def _randomise(model, seed: int = 0):
    """Unit-gain kernels, non-trivial BatchNorm statistics, norm affine terms, layer scales and GRN terms
    (zero at init: the identity), so that a dropped, swapped or mis-padded tensor shows in the outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim > 1:
                param.copy_(torch.randn(param.shape, generator=gen) / param[0].numel() ** 0.5)
            elif name.endswith("bias"):
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))
            else:  # norm scales, layer scales (`gamma`), GRN weights
                param.copy_(0.5 + torch.rand(param.shape, generator=gen))
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.copy_(0.2 * torch.randn(buffer.shape, generator=gen))
            if name.endswith("running_var"):
                buffer.copy_(0.5 + 1.5 * torch.rand(buffer.shape, generator=gen))
    return model.eval()


def _load(model, architecture: str, model_args: dict, tmp_path):
    file = tmp_path / "model.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(file))
    module, rules = timm_cnn.builder(architecture)(architecture, model_args, dtype=jnp.float32, param_dtype=jnp.float32)
    return load_state(lambda: module, read_checkpoint(file), rules, source=str(file))


def _inputs(size: int) -> np.ndarray:
    return np.random.default_rng(1).standard_normal((2, 3, size, size)).astype(np.float32)  # NCHW


def _nhwc(t) -> np.ndarray:
    return t.numpy().transpose(0, 2, 3, 1)


def _check(model, module, x: np.ndarray, stage, hidden_index: int) -> None:
    """Pooled features and `stage(model, x)` (a stage's output, NCHW) against `hidden_states[hidden_index]`."""
    ours = nnx.jit(lambda m, v: m(v))(module, jnp.asarray(x.transpose(0, 2, 3, 1)))  # one compile, not one per op
    with torch.inference_mode():
        xt = torch.from_numpy(x)
        pooled = model.forward_head(model.forward_features(xt), pre_logits=True).numpy()
        stage_out = _nhwc(stage(model, xt))
    np.testing.assert_allclose(np.asarray(ours["pooled"]), pooled, atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(np.asarray(ours["hidden_states"][hidden_index]), stage_out, atol=TOLERANCE, rtol=0)


def _convnext_stage1(model, x):
    return model.stages[1](model.stages[0](model.stem(x)))


TINY_CONVNEXT = {"depths": (1, 2, 1, 1), "dims": (8, 16, 24, 32)}


@pytest.mark.parametrize(
    "architecture, extra",
    [
        ("convnext_tiny", {}),  # Linear MLP, layer scale
        ("convnext_atto", {"head_hidden_size": 12}),  # 1x1-conv MLP; the MLP pre-logits head
        ("convnextv2_tiny", {}),  # GRN, no layer scale
        ("convnextv2_atto", {}),  # GRN on 1x1 convs
        ("convnext_atto", {"ls_init_value": 0.0}),  # layer scale initialised to 0: timm still holds `gamma`
    ],
)
def test_convnext_matches_timm(architecture, extra, tmp_path):
    model_args = {**TINY_CONVNEXT, **extra}
    torch.manual_seed(0)
    model = _randomise(timm.create_model(architecture, pretrained=False, **model_args))
    module = _load(model, architecture, model_args, tmp_path)
    _check(model, module, _inputs(60), _convnext_stage1, 2)  # 60 px: a floor at every downsampling


def _resnet_layer2(model, x):
    return model.layer2(model.layer1(model.maxpool(model.act1(model.bn1(model.conv1(x))))))


TINY_RESNET = {"layers": (1, 2, 1, 1), "channels": (8, 16, 24, 32)}


@pytest.mark.parametrize(
    "architecture, extra",
    [
        ("resnet50", {}),  # 7x7 stem, bottlenecks with projection shortcuts
        ("resnet50d", {"stem_width": 8}),  # deep stem, average-pooled shortcut
        ("resnet18", {}),  # basic blocks
        ("resnet10t", {"stem_width": 8}),  # tiered deep stem
        ("resnext50_32x4d", {"cardinality": 4, "base_width": 16}),  # grouped 3x3
    ],
)
def test_resnet_matches_timm(architecture, extra, tmp_path):
    model_args = {**TINY_RESNET, **extra}
    torch.manual_seed(0)
    model = _randomise(timm.create_model(architecture, pretrained=False, **model_args))
    module = _load(model, architecture, model_args, tmp_path)
    _check(model, module, _inputs(41), _resnet_layer2, 2)  # 41 px: odd maps, partial average-pool windows


def _efficientnet_blocks3(model, x):
    return model.blocks[:3](model.bn1(model.conv_stem(x)))


@pytest.mark.parametrize("architecture", ["efficientnet_b0", "tf_efficientnet_b0", "efficientnet_lite0"])
def test_efficientnet_matches_timm(architecture, tmp_path):
    from timm.models import efficientnet

    model_args = {"channel_multiplier": 0.25, "depth_multiplier": 0.34}  # 8-80 channels, 1-2 blocks per stage
    defaults = dict(timm_cnn.DEFAULTS[architecture], **model_args)
    make = efficientnet._gen_efficientnet_lite if "lite" in architecture else efficientnet._gen_efficientnet
    torch.manual_seed(0)
    model = _randomise(make(architecture, pretrained=False, **defaults))  # the registry entry fixes the multipliers
    module = _load(model, architecture, model_args, tmp_path)
    _check(model, module, _inputs(45), _efficientnet_blocks3, 3)  # 45 px: where SAME and symmetric pads differ


def test_mismatched_checkpoint_lists_every_problem(tmp_path):
    model_args = dict(TINY_RESNET)
    model = _randomise(timm.create_model("resnet50d", pretrained=False, stem_width=8, **model_args))
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    tensors["layer2.0.conv2.weight"] = tensors["layer2.0.conv2.weight"][:, :-1].contiguous()  # one input channel short
    del tensors["layer3.0.bn1.running_var"]
    tensors["layer3.0.se.fc.weight"] = torch.zeros(2, 2)  # an SE-ResNet tensor this architecture lacks
    file = tmp_path / "model.safetensors"
    safetensors_torch.save_file(tensors, str(file))
    module, rules = timm_cnn.builder("resnet50d")("resnet50d", {**model_args, "stem_width": 8})
    with pytest.raises(WeightMismatchError) as err:
        load_state(lambda: module, read_checkpoint(file), rules, source=str(file))
    message = str(err.value)
    assert "3 tensor problem(s)" in message
    assert "mis-shaped: layer2.0.conv2.weight → stages.1.0.layer.1.conv.kernel" in message
    assert "missing: stages.2.0.layer.0.bn.var" in message
    assert "unexpected: layer3.0.se.fc.weight" in message


def test_unsupported_architecture_and_arguments_are_named():
    with pytest.raises(ValueError, match="'seresnet50' is not one fxjax builds"):
        timm_cnn.builder("seresnet50")
    with pytest.raises(ValueError, match="stem_type='overlap'"):
        timm_cnn.convnext("convnext_nano", {"stem_type": "overlap"})
    with pytest.raises(ValueError, match="attn_layer='se'"):
        timm_cnn.resnet("resnet50", {"attn_layer": "se"})
    with pytest.raises(ValueError, match="model_args mystery=1 not supported"):
        timm_cnn.efficientnet("efficientnet_b0", {"mystery": 1, "drop_rate": 0.3})


# One architecture per table row kind, full size: names and shapes only (meta device, abstract module).
TABLE_SAMPLE = [
    "convnext_large_mlp",
    "convnext_xxlarge",
    "convnextv2_nano",
    "resnet26t",
    "resnet50s",
    "resnext50d_32x4d",
    "wide_resnet50_2",
    "tf_efficientnet_b3",
    "efficientnet_lite2",
]


@pytest.mark.parametrize("architecture", TABLE_SAMPLE)
def test_defaults_table_matches_timm_registry(architecture):
    model = timm.create_model(architecture, pretrained=False, device="meta")
    module, rules = timm_cnn.builder(architecture)(architecture, {})
    views = {k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in model.state_dict().items()}  # no memory
    mapped, unexpected = map_names(views, rules)
    expected = {path_str(p): tuple(v.get_value().shape) for p, v in nnx.to_flat_state(nnx.state(module))}
    assert unexpected == []
    assert {k: tuple(a.shape) for k, (_, a) in mapped.items()} == expected
    if architecture.startswith(("efficientnet", "tf_efficientnet")):  # what shapes do not show: eps and padding
        assert module.config.batch_norm_eps == model.bn1.eps
        assert (module.config.padding == "same") == (type(model.conv_stem).__name__ == "Conv2dSame")
    if architecture.startswith("convnext"):
        assert module.layernorm.epsilon == model.head.norm.eps
        assert module.stages[0].layers[0].layernorm.epsilon == model.stages[0].blocks[0].norm.eps


def test_hub_layout_folder_loads_through_load_backbone(tmp_path):
    """The whole path users take: a folder as timm pushes it to the Hub (config.json + model.safetensors),
    `fxjax.load_backbone(folder)`, the timm layout's dispatch to these builders, and pretrained_cfg's
    preprocessing."""
    from timm.models._hub import save_for_hf

    import fxjax

    model_args = {**TINY_RESNET, "stem_width": 8}
    torch.manual_seed(0)
    model = _randomise(timm.create_model("resnet50d", pretrained=False, **model_args))
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, 41, 41), "crop_pct": 0.875}
    save_for_hf(model, tmp_path / "resnet50d", model_args=model_args)
    backbone = fxjax.load_backbone(str(tmp_path / "resnet50d"))
    x = _inputs(41)  # NCHW
    with torch.no_grad():
        reference = model.forward_head(model.forward_features(torch.from_numpy(x)), pre_logits=True)
    np.testing.assert_allclose(np.asarray(backbone.features(x.transpose(0, 2, 3, 1))), reference.numpy(), atol=1e-4)
    assert backbone.info["model_type"] == "timm:resnet50d"
    assert backbone.preprocess.size == (41, 41) and backbone.preprocess.resize_shortest == 46
