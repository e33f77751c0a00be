"""The head engine: freezing as a parameter filter on the training step itself, the optimizer over trainable
parameters only, sharded training equal to single-device, and H stacked heads each equal to that head trained
alone (DINOv2-style sweeps), with selection and divergence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fxjax import parallel
from fxjax.backbones.convert import path_str
from fxjax.backbones.families.efficientnet import EfficientNet, EfficientNetConfig
from fxjax.config import default_config
from fxjax.data.features import FeatureBatches, feature_eval_batches
from fxjax.heads import freeze
from fxjax.heads.engine import Engine, head_rows, score, select
from fxjax.heads.heads import Classifier, Head

TINY = EfficientNetConfig(width=0.25, depth=0.3, resolution=32, lite=True)


def _classifier(frozen_stages: int, num_classes: int = 3, init_std: float = 0.0):
    backbone = EfficientNet(TINY, rngs=nnx.Rngs(0))
    head = Head(1280, num_classes, init_std=init_std, rngs=nnx.Rngs(1))
    patterns = freeze.frozen_patterns(str(frozen_stages), backbone.stage_paths())
    return Classifier(backbone, head), freeze.trainable(patterns)


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
    """{dotted path: array}; stacked head arrays [1, ...] of the one group are unstacked."""
    return {path_str(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


def _one(params):
    return _flat(jax.tree.map(lambda a: a[0], params["pooled"]))


def _engine(model, is_trainable, mesh=None, **kw):
    kw.setdefault("opt_config", _opt())
    kw.setdefault("total_steps", 3)
    mesh = mesh or parallel.make_mesh(devices=jax.devices()[:1])
    return Engine({"pooled": model}, is_trainable, num_classes=kw.pop("num_classes", 3), mesh=mesh, seed=0, **kw)


@pytest.mark.parametrize("frozen_stages", [9, 4, 0])
def test_frozen_stages_never_move_and_unfrozen_ones_do(frozen_stages):
    model, is_trainable = _classifier(frozen_stages)
    before = _flat(nnx.state(model))
    engine = _engine(model, is_trainable, opt_config=_opt(learning_rate=0.05, weight_decay=0.1))
    state = engine.init_state()
    for step in range(3):
        state, _ = engine.train_step(state, _batch(seed=step))
    trained = _one(state.params)
    after = {**_flat(engine.frozen["pooled"]), **trained}
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


def test_gradients_reach_exactly_the_trainable_stages():
    """On the step's own function: a gradient for every trainable leaf, none computed for frozen ones."""
    model, is_trainable = _classifier(4, init_std=0.01)  # a zero output layer would pass no gradient back
    engine = _engine(model, is_trainable)
    state = engine.init_state()
    batch = jax.tree.map(jnp.asarray, _batch())
    params = jax.tree.map(lambda a: a[0], state.params["pooled"])

    def loss(p):
        logits = engine._logits("pooled", p, engine.frozen["pooled"], batch["x"], None)
        return jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(8), batch["label"]])

    grads = _flat(jax.jit(jax.grad(loss))(params))
    assert set(grads) == set(_flat(params))  # the differentiated tree is the trainable one alone
    stages = model.backbone.stage_paths()
    assert not any(name.startswith(f"backbone.{p}.") for stage in stages[:4] for p in stage for name in grads)
    assert all(np.abs(g).sum() > 0 for name, g in grads.items() if name.endswith("kernel"))


def test_optimizer_state_holds_only_trainable_leaves():
    model, is_trainable = _classifier(frozen_stages=9)
    state = _engine(model, is_trainable, total_steps=2).init_state()
    n_trainable = sum(x.size for x in jax.tree.leaves(state.params))
    assert n_trainable == 1280 * 3 + 3  # the head alone
    opt_sizes = [x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 1]  # per-head step counts are [H]
    assert sum(opt_sizes) == 2 * n_trainable  # adam's two moments, nothing for the backbone


def test_freeze_patterns_select_parameter_paths():
    model, _ = _classifier(0)
    stages = model.backbone.stage_paths()
    custom = freeze.trainable(freeze.frozen_patterns(r"re:backbone\.(stem|stem_bn)\..*", stages))
    assert (
        not custom("backbone.stem.kernel")
        and custom("backbone.stages.0.0.project.kernel")
        and custom("head.out.kernel")
    )
    assert not freeze.trainable(freeze.frozen_patterns("all", stages))("backbone.head.kernel")
    assert freeze.trainable(freeze.frozen_patterns("none", stages))("backbone.stem.kernel")
    with pytest.raises(ValueError, match="this backbone has 9 stages"):
        freeze.frozen_patterns("10", stages)
    with pytest.raises(ValueError, match="config.freeze='lots'"):
        freeze.frozen_patterns("lots", stages)


def test_weight_decay_touches_kernels_only():
    head = Classifier(None, Head(4, 2, rngs=nnx.Rngs(0)))
    # labels match a uniform prediction, so only the decay changes the parameters.
    opt = _opt(weight_decay=0.5, learning_rate=0.1, grad_clip=0.0, schedule="constant")
    engine = _engine(head, freeze.trainable(()), num_classes=2, opt_config=opt, total_steps=1)
    state = engine.init_state()
    state = state.__class__(0, jax.tree.map(lambda x: jnp.ones_like(x), state.params), state.opt_state)
    state, _ = engine.train_step(state, {"x": np.zeros((2, 4), np.float32), "label": np.array([0, 1], np.int32)})
    flat = _one(state.params)
    assert np.allclose(flat["head.out.bias"], 1.0) and np.all(flat["head.out.kernel"] < 1.0)


def test_eight_devices_give_the_same_losses_as_one():
    assert len(jax.devices()) == 8, "conftest asks for 8 simulated CPU devices"
    losses = {}
    for n in (1, 8):
        model, is_trainable = _classifier(frozen_stages=7)
        mesh = parallel.make_mesh(devices=jax.devices()[:n])
        engine = _engine(model, is_trainable, mesh=mesh, opt_config=_opt(learning_rate=0.01))
        state, run = engine.init_state(), []
        for step in range(3):
            state, metrics = engine.train_step(state, _batch(n=16, seed=step))
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
    c = FeatureBatches(feats, labels, batch_size=8, seed=1)
    c.set_state(b.get_state())
    for want in first[4:]:
        assert np.array_equal(next(c)["x"], want["x"])
    seen = np.concatenate([batch["x"][batch["mask"], 0] for batch in feature_eval_batches(feats, labels, 16)])
    assert np.array_equal(seen, np.arange(50))
    halves = [
        np.concatenate([b["x"][b["mask"], 0] for b in feature_eval_batches(feats, labels, 16, i, 2)]) for i in (0, 1)
    ]
    assert np.array_equal(np.concatenate(halves), np.arange(50))
    variants = next(FeatureBatches({"a": feats, "b": feats * 2}, labels, batch_size=8, seed=1))
    assert np.array_equal(variants["x"]["b"], variants["x"]["a"] * 2)  # one schema, several variants


# ---- many heads at once

N, D, C, BATCH, EPOCHS = 96, 12, 3, 16, 2


def _data(dim=D, seed=0, n=(N, 40, 40)):
    """Learnable features (class means + noise), scaled so that gradient clipping takes part."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(C, dim)) * 2.0
    splits, labels = [], []
    for size in n:
        y = rng.integers(0, C, size).astype(np.int32)
        splits.append((centers[y] + rng.normal(size=(size, dim)) * 3.0).astype(np.float32))
        labels.append(y)
    return tuple(splits), tuple(labels)


def _sweep_opt(name="adamw", **kw):
    opt = default_config().optimizer
    opt.update(name=name, warmup_steps=3, label_smoothing=0.1, grad_clip=1.0, **kw)
    return opt


def _train(features: dict, labels, hyper: dict, opt):
    """Trains the heads of every variant in `features` ({variant: (train, val, test)}) for EPOCHS."""
    models = {v: Classifier(None, Head(s[0].shape[1], C, rngs=nnx.Rngs(0)), "pooled") for v, s in features.items()}
    total = N // BATCH * EPOCHS
    engine = Engine(
        models, freeze.trainable(()), num_classes=C, opt_config=opt, total_steps=total, mesh=parallel.make_mesh(),
        seed=3, hyper={v: hyper for v in features},
    )  # fmt: skip
    batches = FeatureBatches({v: s[0] for v, s in features.items()}, labels[0], batch_size=BATCH, seed=3)
    state = engine.init_state()
    for _ in range(total):
        state, _ = engine.train_step(state, next(batches))
    rows = head_rows(engine, engine_hyper := {v: hyper for v in features})
    for split, i in (("val", 1), ("test", 2)):
        batches = feature_eval_batches({v: s[i] for v, s in features.items()}, labels[i], BATCH)
        rows = score(rows, split, engine.evaluate(state.params, batches))
    assert engine_hyper
    return engine, state, rows


def _grid(lrs, wds):
    return {"learning_rate": [lr for lr in lrs for _ in wds], "weight_decay": [wd for _ in lrs for wd in wds]}


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_stacked_heads_equal_heads_trained_alone(optimizer):
    (train, val, test), labels = _data()
    hyper = _grid([0.02, 0.3], [0.0, 0.5])
    _, state, rows = _train({"pooled": (train, val, test)}, labels, hyper, _sweep_opt(optimizer))
    for i, row in enumerate(rows):
        alone = {"learning_rate": [row["learning_rate"]], "weight_decay": [row["weight_decay"]]}
        _, single, (reference,) = _train({"pooled": (train, val, test)}, labels, alone, _sweep_opt(optimizer))
        for name in ("kernel", "bias"):
            np.testing.assert_allclose(
                _flat(state.params["pooled"])[f"head.out.{name}"][i],
                _one(single.params)[f"head.out.{name}"],
                rtol=1e-5,
                atol=1e-6,
            )
        assert row["val_accuracy"] == pytest.approx(reference["val_accuracy"])
        assert row["val_loss"] == pytest.approx(reference["val_loss"], rel=1e-5)
    assert len({r["val_loss"] for r in rows}) == 4  # the four heads really differ


def test_two_variants_of_different_dims_and_selection():
    (train, val, test), labels = _data()
    (train2, val2, test2), _ = _data(dim=20, seed=1)
    features = {"pooled": (train, val, test), "noise": (train2, val2, test2)}  # "noise" ignores the labels
    _, state, rows = _train(features, labels, _grid([1e-3, 0.1], [0.0, 1e-2]), _sweep_opt())
    assert [r["variant"] for r in rows] == ["pooled"] * 4 + ["noise"] * 4
    assert _flat(state.params["noise"])["head.out.kernel"].shape == (4, 20, C)
    best = select(rows)
    assert best["val_accuracy"] == max(r["val_accuracy"] for r in rows)
    assert best["variant"] == "pooled" and best["val_accuracy"] > 0.6  # chance: 1/3


def test_selection_ties_and_divergence():
    def row(variant, lr, wd, acc, loss=1.0):
        return {"variant": variant, "learning_rate": lr, "weight_decay": wd, "val_accuracy": acc, "val_loss": loss}

    table = [
        row("b", 0.1, 0.0, 0.9),
        row("a", 0.01, 0.1, 0.9),
        row("a", 0.01, 0.01, 0.9),
        row("b", 0.01, 0.01, 0.9),
        row("a", 1.0, 0.0, 0.95, loss=float("nan")),
        row("a", 0.001, 0.0, 0.5),
    ]
    assert select(table) is table[3]  # best accuracy; smaller lr, smaller wd, then the first variant ("b")
    with pytest.raises(FloatingPointError, match="every head diverged"):
        select([row("a", 1.0, 0.0, 0.9, loss=float("inf"))])


def test_diverged_heads_are_flagged_and_never_selected():
    (train, val, test), labels = _data()
    opt = _sweep_opt("sgd", momentum=0.0)
    opt.update(grad_clip=0.0)
    _, _, rows = _train({"pooled": (train, val, test)}, labels, _grid([1e-2, 1e38], [0.0]), opt)
    assert [np.isfinite(r["val_loss"]) for r in rows] == [True, False]
    assert select(rows)["learning_rate"] == 1e-2
