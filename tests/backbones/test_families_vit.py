"""Parity of the ViT-family backbones (vit, deit, dinov2, dinov2_with_registers, clip, siglip, blip) with the
transformers PyTorch reference, on tiny random checkpoints written by `save_pretrained`, loaded with
`load_backbone`."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, serialization

import fxjax
from fxjax.backbones.convert import WeightMismatchError, path_str
from fxjax.heads import freeze
from fxjax.heads.heads import Classifier, Head
from tests.support.reference_models import perturbed, random_images

torch = pytest.importorskip("torch")
T = pytest.importorskip("transformers")

VISION = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    image_size=32,
    patch_size=8,
)
TEXT = dict(
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=4,
    intermediate_size=64,
    vocab_size=99,
    max_position_embeddings=16,
)


def _full(config_cls, text_cls, vision_cls, **kw):
    return config_cls(text_config=text_cls(**TEXT).to_dict(), vision_config=vision_cls(**VISION).to_dict(), **kw)


REGISTERS = 4

# case → (reference model factory, whether its vision tower sits under `.vision_model`)
CASES = {
    "vit": (lambda: T.ViTModel(T.ViTConfig(**VISION)), False),
    "deit": (lambda: T.DeiTModel(T.DeiTConfig(**VISION)), False),
    "dinov2": (lambda: T.Dinov2Model(T.Dinov2Config(**VISION, mlp_ratio=2)), False),
    "dinov2_swiglu": (
        lambda: T.Dinov2Model(T.Dinov2Config(**VISION, mlp_ratio=2, use_swiglu_ffn=True)),
        False,
    ),
    "dinov2_with_registers": (
        lambda: T.Dinov2WithRegistersModel(
            T.Dinov2WithRegistersConfig(**VISION, mlp_ratio=2, num_register_tokens=REGISTERS)
        ),
        False,
    ),
    "clip_vision_model": (lambda: T.CLIPVisionModel(T.CLIPVisionConfig(**VISION)), False),
    "clip": (
        lambda: T.CLIPModel(_full(T.CLIPConfig, T.CLIPTextConfig, T.CLIPVisionConfig, projection_dim=16)),
        True,
    ),
    "siglip_vision_model": (lambda: T.SiglipVisionModel(T.SiglipVisionConfig(**VISION)), False),
    "siglip": (lambda: T.SiglipModel(_full(T.SiglipConfig, T.SiglipTextConfig, T.SiglipVisionConfig)), True),
    "blip_vision_model": (lambda: T.BlipVisionModel(T.BlipVisionConfig(**VISION)), False),
    "blip": (lambda: T.BlipModel(_full(T.BlipConfig, T.BlipTextConfig, T.BlipVisionConfig)), True),
}
CLS_POOLED = ("vit", "deit")  # pooled = final-norm CLS; the others use the reference's pooler_output
# tokens before the patch tokens (CLS first where there is one); 1 (CLS) for the cases not listed
PREFIX_TOKENS = {"deit": 2, "dinov2_with_registers": 1 + REGISTERS, "siglip": 0, "siglip_vision_model": 0}


def _reference(name: str):
    torch.manual_seed(0)
    return perturbed(CASES[name][0]())


def _tower(name: str, model):
    return model.vision_model if CASES[name][1] else model


def _run_reference(name: str, model, x: np.ndarray, **kw):
    pixels = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    with torch.no_grad():
        return _tower(name, model)(pixel_values=pixels, output_hidden_states=True, **kw)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """case name → (reference model, folder with its safetensors checkpoint); built on first use."""
    cache = {}

    def get(name: str):
        if name not in cache:
            model = _reference(name)
            folder = tmp_path_factory.mktemp(name)
            model.save_pretrained(folder)
            cache[name] = (model, folder)
        return cache[name]

    return get


def _outputs(bb, x) -> dict:
    """Every output, jitted (the eager `Backbone.outputs` dispatches op by op: slow for a test suite)."""
    return jax.jit(lambda state, x: nnx.merge(bb.graphdef, state)(x))(bb.state, x)


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def _ref_pooled(name: str, ref):
    return ref.last_hidden_state[:, 0] if name in CLS_POOLED else ref.pooler_output


@pytest.mark.parametrize("name", list(CASES))
def test_features_match_reference(saved, name):
    model, folder = saved(name)
    bb = fxjax.load_backbone(str(folder))
    assert bb.info["model_type"] == name.removesuffix("_swiglu")
    x = random_images()
    assert _max_diff(bb.features(x), _ref_pooled(name, _run_reference(name, model, x))) <= 1e-4


@pytest.mark.parametrize(
    "name", ["vit", "deit", "dinov2", "dinov2_with_registers", "clip", "siglip_vision_model", "blip_vision_model"]
)
def test_every_output_matches_reference(saved, name):
    model, folder = saved(name)
    bb = fxjax.load_backbone(str(folder))
    x = random_images()
    ref = _run_reference(name, model, x)
    out = _outputs(bb, x)
    assert _max_diff(out["pooled"], _ref_pooled(name, ref)) <= 1e-4
    assert _max_diff(out["last_hidden_state"], ref.last_hidden_state) <= 1e-4
    assert len(out["hidden_states"]) == len(ref.hidden_states) == 3
    for ours, theirs in zip(out["hidden_states"], ref.hidden_states, strict=True):  # embeddings, middle, last
        assert _max_diff(ours, theirs) <= 1e-4
    prefix = PREFIX_TOKENS.get(name, 1)
    cls = [h[:, 0] if prefix else h.mean(1) for h in ref.hidden_states[1:]]
    assert _max_diff(out["block_cls"], torch.stack(cls, 1)) <= 1e-4
    assert out["patch_tokens"].shape == (2, 16, 32)
    if name != "clip":  # CLIP's last_hidden_state is not final-normed; its patch tokens are
        assert _max_diff(out["patch_tokens"], ref.last_hidden_state[:, prefix:]) <= 1e-4
    else:
        with torch.no_grad():
            image_embeds = model.get_image_features(torch.from_numpy(x.transpose(0, 3, 1, 2))).pooler_output
        assert _max_diff(out["image_embeds"], image_embeds) <= 1e-4
    assert bb.num_stages == 2 + 2  # embeddings, two blocks, final norm (+ head)


@pytest.mark.parametrize(
    ("name", "size"),
    [
        ("vit", (48, 48)),
        ("deit", (24, 40)),
        ("dinov2", (48, 40)),
        ("dinov2_with_registers", (48, 40)),
        ("dinov2_with_registers", (24, 56)),  # its reference resizes with antialiasing: down- and upsample
        ("clip", (40, 40)),
        ("siglip_vision_model", (48, 24)),
        ("blip_vision_model", (56, 56)),
    ],
)
def test_interpolated_positions_match_reference(saved, name, size):
    model, folder = saved(name)
    bb = fxjax.load_backbone(str(folder))
    x = random_images(1, *size, seed=1)
    kw = {} if name.startswith("dinov2") else {"interpolate_pos_encoding": True}  # DINOv2 always interpolates
    ref = _run_reference(name, model, x, **kw)
    out = _outputs(bb, x)
    assert _max_diff(out["last_hidden_state"], ref.last_hidden_state) <= 1e-4
    assert _max_diff(out["pooled"], _ref_pooled(name, ref)) <= 1e-4


def test_registers_classifier_checkpoint(tmp_path):
    """A Dinov2WithRegistersForImageClassification checkpoint (backbone under `dinov2_with_registers.`) loads, and
    `pooled_avgpool` is its classifier's input: CLS and the mean of the patch tokens, registers left out."""
    torch.manual_seed(0)
    config = T.Dinov2WithRegistersConfig(**VISION, mlp_ratio=2, num_register_tokens=REGISTERS, num_labels=3)
    model = perturbed(T.Dinov2WithRegistersForImageClassification(config))
    model.save_pretrained(tmp_path)
    x = random_images()
    with torch.no_grad():
        logits = model(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2))).logits
    feats = fxjax.load_backbone(str(tmp_path)).variants(x, ("pooled_avgpool",))["pooled_avgpool"]
    head = model.classifier
    ours = np.asarray(feats) @ head.weight.detach().numpy().T + head.bias.detach().numpy()
    assert _max_diff(ours, logits) <= 1e-4


def test_image_size_not_divisible_by_patch(saved):
    bb = fxjax.load_backbone(str(saved("vit")[1]))
    with pytest.raises(ValueError, match=r"30x32.*patch size 8"):
        bb.features(random_images(1, 30, 32))


def _tensors(folder) -> dict[str, np.ndarray]:
    """The checkpoint as saved (transformers 5 renames modules in memory but writes the published names)."""
    from safetensors.numpy import load_file

    return load_file(str(folder / "model.safetensors"))


def _copy_config(folder, tmp_path) -> None:
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())


def test_pytorch_bin_checkpoint(saved, tmp_path):
    # transformers 5 always saves safetensors; a legacy `pytorch_model.bin` is a torch.save'd state dict.
    model, folder = saved("deit")
    _copy_config(folder, tmp_path)
    torch.save({k: torch.from_numpy(v) for k, v in _tensors(folder).items()}, tmp_path / "pytorch_model.bin")
    x = random_images()
    ref = _run_reference("deit", model, x).last_hidden_state[:, 0]
    assert _max_diff(fxjax.load_backbone(str(tmp_path)).features(x), ref) <= 1e-4


def _flax_params(state: dict, prefix: str = "") -> dict:
    """A PyTorch state dict in HF Flax naming and layout, nested: Linear/Conv `kernel` ([in, out] / HWIO),
    LayerNorm `scale`, nn.Embed `embedding`."""
    nested: dict = {}
    for name, a in state.items():
        stem, _, leaf = name.rpartition(".")
        if leaf == "weight":
            if a.ndim == 4:
                leaf, a = "kernel", a.transpose(2, 3, 1, 0)
            elif stem.endswith("position_embedding"):
                leaf = "embedding"
            else:
                leaf, a = ("kernel", a.T) if a.ndim == 2 else ("scale", a)
        node = nested
        for part in filter(None, (prefix + stem).split(".")):
            node = node.setdefault(part, {})
        node[leaf] = a
    return nested


@pytest.mark.parametrize(("name", "prefix"), [("vit", ""), ("vit", "vit."), ("clip", "")])
def test_flax_msgpack_checkpoint(saved, tmp_path, name, prefix):
    model, folder = saved(name)
    _copy_config(folder, tmp_path)
    params = _flax_params(_tensors(folder), prefix)
    if prefix:  # a FlaxViTForImageClassification: the backbone under `vit`, plus its classifier
        params["classifier"] = {"kernel": np.zeros((32, 5), np.float32), "bias": np.zeros(5, np.float32)}
    (tmp_path / "flax_model.msgpack").write_bytes(serialization.msgpack_serialize(params))
    x = random_images()
    ref_pooled = _ref_pooled(name, _run_reference(name, model, x))
    assert _max_diff(fxjax.load_backbone(str(tmp_path)).features(x), ref_pooled) <= 1e-4


def test_older_checkpoint_buffers_are_dropped(saved):
    from transformers import AutoConfig

    from fxjax.backbones.convert import map_names
    from fxjax.backbones.families import clip

    config = AutoConfig.from_pretrained(saved("clip")[1])
    names = ["vision_model.embeddings.position_ids", "text_model.embeddings.position_ids"]
    mapped, unexpected = map_names({n: np.arange(17)[None] for n in names}, clip.conversion_rules(config))
    assert mapped == {} and unexpected == []


def test_unsupported_model_type_lists_supported(tmp_path):
    T.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64).save_pretrained(
        tmp_path
    )
    with pytest.raises(ValueError, match="unsupported model_type 'bert'") as err:
        fxjax.load_backbone(str(tmp_path))
    for model_type in ("vit", "deit", "dinov2", "dinov2_with_registers", "clip", "clip_vision_model", "siglip", "blip"):
        assert model_type in str(err.value)


def test_mismatched_checkpoint_lists_every_problem(saved, tmp_path):
    from safetensors.numpy import save_file

    folder = saved("vit")[1]
    _copy_config(folder, tmp_path)
    state = _tensors(folder)
    del state["encoder.layer.1.intermediate.dense.bias"]
    state["encoder.layer.0.attention.attention.query.weight"] = np.zeros((32, 16), np.float32)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(WeightMismatchError) as err:
        fxjax.load_backbone(str(tmp_path))
    message = str(err.value)
    assert "2 tensor problem(s)" in message
    assert "missing: blocks.1.mlp.fc1.bias" in message
    assert "mis-shaped: encoder.layer.0.attention.attention.query.weight" in message


@pytest.mark.parametrize("name", ["vit", "siglip_vision_model"])
def test_bfloat16_compute_is_close(saved, name):
    model, folder = saved(name)
    x = random_images()
    ref = _ref_pooled(name, _run_reference(name, model, x)).numpy()
    half = fxjax.load_backbone(str(folder), dtype="bfloat16").features(x)
    assert half.dtype == jnp.bfloat16
    assert _max_diff(half, ref) <= 0.05 * float(np.max(np.abs(ref))) + 0.02


def test_frozen_stages_get_no_gradient(saved):
    """Freezing is a parameter filter of the step: the first K stages are not even differentiated."""
    bb = fxjax.load_backbone(str(saved("dinov2")[1]))
    module = nnx.merge(bb.graphdef, bb.state)
    assert module.stage_paths() == [("embeddings",), ("blocks.0",), ("blocks.1",), ("norm",)]
    model = Classifier(module, Head(bb.feature_dim, 3, init_std=0.1, rngs=nnx.Rngs(0)))
    graphdef, params, rest = freeze.split_trainable(
        model, freeze.trainable(freeze.frozen_patterns("2", module.stage_paths()))
    )
    x = jnp.asarray(random_images())
    grads = jax.jit(jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p, jax.lax.stop_gradient(rest))(x) ** 2)))(params)
    flat = {path_str(p): float(jnp.sum(g.get_value() ** 2)) for p, g in nnx.to_flat_state(grads)}
    assert not any(k.startswith(("backbone.embeddings.", "backbone.blocks.0.")) for k in flat)
    assert sum(v for k, v in flat.items() if k.startswith("backbone.blocks.1.")) > 0
    assert sum(v for k, v in flat.items() if k.startswith("backbone.norm.")) > 0


PROCESSORS = {
    "vit": (lambda: T.ViTImageProcessor(), dict(size=(224, 224), resize_shortest=None, resample="bilinear")),
    "deit": (lambda: T.DeiTImageProcessor(), dict(size=(224, 224), resize_shortest=256, resample="bicubic")),
    "dinov2": (
        lambda: T.BitImageProcessor(
            size={"shortest_edge": 256},
            crop_size={"height": 224, "width": 224},
            image_mean=[0.485, 0.456, 0.406],
            image_std=[0.229, 0.224, 0.225],
        ),
        dict(size=(224, 224), resize_shortest=256, resample="bicubic"),
    ),
    "clip_vision_model": (
        lambda: T.CLIPImageProcessor(),
        dict(size=(224, 224), resize_shortest=224, resample="bicubic"),
    ),
    "siglip_vision_model": (
        lambda: T.SiglipImageProcessor(),
        dict(size=(224, 224), resize_shortest=None, resample="bicubic"),
    ),
    "blip_vision_model": (
        lambda: T.BlipImageProcessor(),
        dict(size=(384, 384), resize_shortest=None, resample="bicubic"),
    ),
}


@pytest.mark.parametrize("name", list(PROCESSORS))
def test_preprocessing_from_processor_config(saved, tmp_path, name):
    folder = saved(name)[1]
    _copy_config(folder, tmp_path)
    (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    make, expected = PROCESSORS[name]
    proc = make()
    proc.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "preprocessor_config.json").read_text())
    spec = fxjax.load_backbone(str(tmp_path)).preprocess
    assert spec.size == expected["size"]
    assert spec.resize_shortest == expected["resize_shortest"]
    assert spec.resample == expected["resample"]
    np.testing.assert_allclose(spec.mean, proc.image_mean, rtol=1e-6)
    np.testing.assert_allclose(spec.std, proc.image_std, rtol=1e-6)
    assert spec.rescale == pytest.approx(1 / 255)


@pytest.mark.parametrize("n", [1, 5])
def test_cpu_attention_equals_dot_product_attention(n, monkeypatch):
    """The chunked CPU attention, with a chunk that does not divide the batch, equals jax's reference."""
    from fxjax.backbones import transformer

    monkeypatch.setattr(transformer, "_CACHE_BYTES", 2 * 4 * 3 * 7 * 7 * 4)  # chunks of 2 examples
    q, k, v = jax.random.normal(jax.random.key(0), (3, n, 7, 4, 8))
    assert jax.default_backend() == "cpu"
    np.testing.assert_allclose(
        transformer.attention(q, k, v), jax.nn.dot_product_attention(q, k, v), rtol=1e-5, atol=1e-6
    )
    grads = [
        jax.grad(lambda q, f=f: f(q, k, v).sum())(q) for f in (transformer.attention, jax.nn.dot_product_attention)
    ]
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-4, atol=1e-5)


def test_float32_compiles_without_ynnpack_and_bfloat16_with_xla_defaults(saved, monkeypatch):
    """fxjax.backbones.xla.compiler_options: on CPU float32 go to XLA's Eigen kernels (no YNNPACK fusion in the
    compiled program), bfloat16 keeps XLA's defaults, and a user's own XLA_FLAGS setting wins."""
    from fxjax.backbones.xla import compiler_options

    x = jnp.zeros((1, 32, 32, 3))
    f32 = fxjax.load_backbone(str(saved("vit")[1]))
    assert f32.compiler_options == {"xla_cpu_experimental_ynn_fusion_type": ""}
    assert "__ynn_fusion" not in f32._pooled.lower(f32.state, x).compile().as_text()
    assert fxjax.load_backbone(str(saved("vit")[1]), dtype="bfloat16").compiler_options == {}
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=individual_dot")
    assert compiler_options("float32") == {}


def test_block_cls_normed_is_dinov2s_intermediate_layers_with_norm(saved):
    """`block_cls_normed` (behind the cls_last4 variants) = the final layernorm applied to each block's output,
    then its CLS token, as DINOv2's `get_intermediate_layers(norm=True)` gives them to its linear evaluation."""
    model, folder = saved("dinov2")
    x = random_images()
    ref = _run_reference("dinov2", model, x)
    with torch.no_grad():
        normed = torch.stack([model.layernorm(h)[:, 0] for h in ref.hidden_states[1:]], 1)
    bb = fxjax.load_backbone(str(folder))
    assert _max_diff(_outputs(bb, x)["block_cls_normed"], normed) <= 1e-4
    cls_last4 = bb.variants(x, ("cls_last4",))["cls_last4"]  # 2 blocks here: all of them, concatenated
    assert _max_diff(cls_last4, normed.reshape(2, -1)) <= 1e-4
