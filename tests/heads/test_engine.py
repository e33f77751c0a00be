"""Freezing, the optimizer over trainable parameters only, and sharded training equal to single-device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fxjax import parallel
from fxjax.backbones.convert import path_str
from fxjax.backbones.families.efficientnet import EfficientNet, EfficientNetConfig
from fxjax.config import default_config
from fxjax.heads.engine import Classifier, FeatureBatches, Trainer, feature_eval_batches
from fxjax.heads.freeze import frozen_prefixes
from fxjax.heads.heads import Head

TINY = EfficientNetConfig(width=0.25, depth=0.3, resolution=32, lite=True)


def _classifier(frozen_stages: int, num_classes: int = 3):
    backbone = EfficientNet(TINY, rngs=nnx.Rngs(0))
    head = Head(1280, num_classes, rngs=nnx.Rngs(1))
    return Classifier(backbone, head, frozen_stages), frozen_prefixes(backbone, frozen_stages)


def _batch(n=8, size=32, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "x": rng.normal(size=(n, size, size, 3)).astype(np.float32),
        "label": rng.integers(0, 3, n).astype(np.int32),
    }


def _opt(**kw):
    opt = default_config().optimizer
    opt.update(kw)
    return opt


def _flat(state):
    return {path_str(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


@pytest.mark.parametrize("frozen_stages", [9, 4, 0])
def test_frozen_stages_never_move_and_unfrozen_ones_do(frozen_stages):
    model, frozen = _classifier(frozen_stages)
    before = _flat(nnx.state(model))
    mesh = parallel.make_mesh(devices=jax.devices()[:1])
    trainer = Trainer(
        model,
        frozen,
        num_classes=3,
        opt_config=_opt(learning_rate=0.05, weight_decay=0.1),
        total_steps=3,
        mesh=mesh,
        seed=0,
    )
    state = trainer.init_state()
    for step in range(3):
        state, _ = trainer.train_step(state, _batch(seed=step))
    trained = _flat(state.params)
    after = {**_flat(trainer.frozen), **trained}
    assert set(after) == set(before)
    stages = model.backbone.stage_paths()
    frozen_paths = {f"backbone.{p}" for stage in stages[:frozen_stages] for p in stage}
    for name, value in before.items():
        in_frozen_stage = any(name.startswith(p + ".") for p in frozen_paths)
        is_batch_stat = name.endswith((".mean", ".var"))
        if in_frozen_stage or is_batch_stat:
            assert np.array_equal(value, after[name]), f"{name} moved although frozen"
            assert name not in trained
        elif name.endswith("kernel") and name.startswith(("head.out", "backbone.head.")):
            assert not np.array_equal(value, after[name]), f"{name} did not train"
    # exactly the unfrozen stages (plus the head) are trainable
    trainable_roots = {n.split(".")[1] if n.startswith("backbone.") else "head" for n in trained}
    expected = {"head"} | {p.split(".")[0] for stage in stages[frozen_stages:] for p in stage}
    assert trainable_roots == expected


def test_optimizer_state_holds_only_trainable_leaves():
    model, frozen = _classifier(frozen_stages=9)
    trainer = Trainer(
        model,
        frozen,
        num_classes=3,
        opt_config=_opt(),
        total_steps=2,
        mesh=parallel.make_mesh(devices=jax.devices()[:1]),
        seed=0,
    )
    state = trainer.init_state()
    n_trainable = sum(x.size for x in jax.tree.leaves(state.params))
    assert n_trainable == 1280 * 3 + 3  # the head alone
    opt_sizes = [x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    assert sum(opt_sizes) == 2 * n_trainable  # adam's two moments, nothing for the frozen backbone


def test_weight_decay_touches_kernels_only():
    head = Head(4, 2, rngs=nnx.Rngs(0))
    mesh = parallel.make_mesh(devices=jax.devices()[:1])
    # learning rate of zero on the gradient path is impossible with adamw; instead a zero batch gradient:
    # labels match a uniform prediction, so only the decay changes the parameters.
    trainer = Trainer(
        head,
        (),
        num_classes=2,
        opt_config=_opt(weight_decay=0.5, learning_rate=0.1, grad_clip=0.0, schedule="constant"),
        total_steps=1,
        mesh=mesh,
        seed=0,
    )
    state = trainer.init_state()
    state = state.__class__(0, jax.tree.map(lambda x: jnp.ones_like(x), state.params), state.opt_state)
    batch = {"x": np.zeros((2, 4), np.float32), "label": np.array([0, 1], np.int32)}
    state, _ = trainer.train_step(state, batch)
    flat = _flat(state.params)
    assert np.allclose(flat["out.bias"], 1.0) and np.all(flat["out.kernel"] < 1.0)


def test_eight_devices_give_the_same_losses_as_one():
    assert len(jax.devices()) == 8, "conftest asks for 8 simulated CPU devices"
    losses = {}
    for n in (1, 8):
        model, frozen = _classifier(frozen_stages=7)
        trainer = Trainer(
            model,
            frozen,
            num_classes=3,
            opt_config=_opt(learning_rate=0.01),
            total_steps=3,
            mesh=parallel.make_mesh(devices=jax.devices()[:n]),
            seed=0,
        )
        state, run = trainer.init_state(), []
        for step in range(3):
            state, metrics = trainer.train_step(state, _batch(n=16, seed=step))
            run.append(metrics["loss"])
        losses[n] = np.asarray(run)
    np.testing.assert_allclose(losses[8], losses[1], rtol=1e-5)


def test_mesh_errors_name_the_numbers():
    with pytest.raises(ValueError, match="fsdp=3"):
        parallel.make_mesh(fsdp=3)
    with pytest.raises(ValueError, match="batch_size=12 must be divisible by the number of devices \\(8\\)"):
        parallel.check_batch_size(12, parallel.make_mesh())


def test_feature_batches_resume_exactly_and_eval_counts_each_example_once():
    feats, labels = np.arange(50, dtype=np.float32)[:, None], np.arange(50, dtype=np.int32) % 3
    a = FeatureBatches(feats, labels, batch_size=8, seed=1)
    first = [next(a) for _ in range(9)]
    b = FeatureBatches(feats, labels, batch_size=8, seed=1)
    [next(b) for _ in range(4)]
    state = b.get_state()
    c = FeatureBatches(feats, labels, batch_size=8, seed=1)
    c.set_state(state)
    for want in first[4:]:
        assert np.array_equal(next(c)["x"], want["x"])
    seen = np.concatenate([batch["x"][batch["mask"], 0] for batch in feature_eval_batches(feats, labels, 16)])
    assert np.array_equal(seen, np.arange(50))
    hosts = [
        np.concatenate([b["x"][b["mask"], 0] for b in feature_eval_batches(feats, labels, 16, i, 2)]) for i in range(2)
    ]
    assert np.array_equal(np.concatenate(hosts), np.arange(50))
