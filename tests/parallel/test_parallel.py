"""FSDP on the 8 simulated CPU devices: the backbone's large tensors split over the `fsdp` axis, and features,
head training and online training equal to the replicated (data=8) layout."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from fxjax import parallel
from fxjax.backbones.backbone import Backbone
from fxjax.backbones.convert import path_str
from fxjax.backbones.families import vit
from fxjax.config import default_config
from fxjax.data.preprocess import PreprocessSpec
from fxjax.features import extract as features
from fxjax.heads.engine import Engine
from fxjax.heads.freeze import frozen_patterns, trainable
from fxjax.heads.heads import Classifier, Head
from fxjax.parallel.sharding import fsdp_shardings, fsdp_spec

T = pytest.importorskip("transformers")

# Every width a multiple of fsdp=4; min_elements=0 so that even these small tensors are split.
TINY = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=8
)
FSDP = partial(fsdp_shardings, min_elements=0)


def _vit() -> nnx.Module:
    return vit.build(T.ViTConfig(**TINY), dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))


def _mesh(data: int, fsdp: int):
    return parallel.make_mesh(data, fsdp)


def _local_shapes(state) -> dict[str, tuple[int, ...]]:
    """Dotted path → the shape one device holds (every device holds the same shape)."""
    return {path_str(p): v.get_value().addressable_shards[0].data.shape for p, v in nnx.to_flat_state(state)}


def _opt(**kw):
    opt = default_config().optimizer
    opt.update(kw)
    return opt


@pytest.mark.parametrize(
    ("shape", "fsdp", "spec"),
    [
        ((32, 64), 4, P(None, "fsdp")),  # out channels preferred
        ((64, 30), 4, P("fsdp", None)),  # else in channels
        ((30, 30), 4, P()),  # neither divides: replicated
        ((3, 3, 1, 24), 4, P(None, None, None, "fsdp")),  # depthwise conv
        ((32, 64), 1, P()),  # no fsdp axis to split over
    ],
)
def test_fsdp_spec_picks_a_divisible_dimension(shape, fsdp, spec):
    assert fsdp_spec(shape, (-1, -2), fsdp) == spec


def test_vit_parameters_are_split_over_fsdp_and_small_ones_replicated():
    _, state = nnx.split(_vit())
    placed = jax.device_put(state, FSDP(state, _mesh(2, 4)))
    shapes = _local_shapes(placed)
    assert shapes["blocks.0.attn.query.kernel"] == (32, 8)  # [in, out / 4]
    assert shapes["blocks.1.mlp.fc1.kernel"] == (32, 16)
    assert shapes["blocks.1.mlp.fc2.kernel"] == (64, 8)
    assert shapes["embeddings.patch_embed.kernel"] == (8, 8, 3, 8)
    assert shapes["embeddings.position"] == (1, 17, 8)
    for name in ("blocks.0.attn.query.bias", "blocks.0.norm1.scale", "norm.bias"):
        assert shapes[name] == (32,), name
    assert shapes["embeddings.cls_token"] == (1, 1, 32)
    # 1/4 of every kernel per device; the default size threshold keeps a tiny model replicated
    default = _local_shapes(jax.device_put(state, fsdp_shardings(state, _mesh(2, 4))))
    assert default["blocks.0.attn.query.kernel"] == (32, 32)


def test_fsdp_features_equal_replicated_features():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(40, 32, 32, 3)).astype(np.float32)
    batches = [{"x": images[i : i + 16], "mask": np.ones(16, bool)} for i in (0, 16)]
    batches.append({"x": np.concatenate([images[32:], images[:8]]), "mask": np.arange(16) < 8})
    backbone = Backbone(_vit(), PreprocessSpec(size=(32, 32)))
    replicated = features.extract(backbone, iter(batches), total=40, mesh=_mesh(8, 1))["pooled"]
    sharded = features.extract(backbone, iter(batches), total=40, mesh=_mesh(2, 4), param_sharding=FSDP)["pooled"]
    assert sharded.shape == (40, 32)
    np.testing.assert_allclose(sharded, replicated, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(replicated, np.asarray(backbone.features(images)), rtol=1e-5, atol=1e-5)


def _train(model, is_trainable, mesh, frozen_sharding, batches, evaluate=True, **opt):
    trainer = Engine(
        {"pooled": model},
        is_trainable,
        num_classes=3,
        opt_config=_opt(learning_rate=0.05, **opt),
        total_steps=4,
        mesh=mesh,
        seed=0,
        frozen_sharding=frozen_sharding,
    )
    state, losses = trainer.init_state(), []
    for batch in batches:
        state, metrics = trainer.train_step(state, batch)
        losses.append(metrics["loss"])
    mask = np.arange(16) < 12
    evaluated = trainer.evaluate(state.params, iter([{**batches[0], "mask": mask}])) if evaluate else None
    if evaluated is not None:
        evaluated = {"count": evaluated["count"], **evaluated["pooled"]}
    return trainer, state, np.asarray(losses), evaluated


def _batches(shape, n=4):
    rng = np.random.default_rng(1)
    return [
        {"x": rng.normal(size=(16, *shape)).astype(np.float32), "label": rng.integers(0, 3, 16).astype(np.int32)}
        for _ in range(n)
    ]


def test_head_on_features_trains_the_same_on_data2_fsdp4_as_on_data8():
    b = _batches((32,))
    runs = [
        _train(Classifier(None, Head(32, 3, hidden_dims=(16,), rngs=nnx.Rngs(1))), trainable(()), _mesh(d, f), s, b)
        for d, f, s in ((8, 1, None), (2, 4, FSDP))
    ]
    (_, a, losses_a, eval_a), (_, b, losses_b, eval_b) = runs
    np.testing.assert_allclose(losses_b, losses_a, rtol=1e-5)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-6)
    assert eval_a["count"] == eval_b["count"] == 12 and np.isclose(eval_a["loss"], eval_b["loss"], rtol=1e-5)
    np.testing.assert_array_equal(eval_a["predictions"], eval_b["predictions"])


def test_online_partly_frozen_vit_with_fsdp_frozen_state_matches_replicated():
    batches = _batches((32, 32, 3), n=3)

    def classifier():
        module = _vit()
        return Classifier(module, Head(32, 3, rngs=nnx.Rngs(1))), trainable(frozen_patterns("2", module.stage_paths()))

    (_, a, losses_a, _), (trainer, b, losses_b, _) = [
        _train(*classifier(), _mesh(d, f), s, batches, evaluate=False) for d, f, s in ((8, 1, None), (2, 4, FSDP))
    ]
    frozen = _local_shapes(trainer.frozen["pooled"])
    assert frozen["backbone.blocks.0.attn.query.kernel"] == (32, 8)  # block 0 frozen, held 1/4 per device
    assert "backbone.blocks.1.attn.query.kernel" not in frozen  # block 1 trains, replicated
    np.testing.assert_allclose(losses_b, losses_a, rtol=1e-5)
    assert losses_a[-1] != losses_a[0]
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-4, atol=1e-5)
