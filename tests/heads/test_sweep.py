"""Many heads at once: each vmapped head equals the head Trainer trains alone; selection; variants; files."""

import json

import numpy as np
import pytest
from flax import nnx

from fxjax import parallel
from fxjax.config import default_config
from fxjax.heads.engine import FeatureBatches, Trainer, feature_eval_batches
from fxjax.heads.heads import Head
from fxjax.heads.sweep import SweepResult, select, train_sweep, write

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


def _opt(name="adamw"):
    opt = default_config().optimizer
    opt.update(name=name, warmup_steps=3, label_smoothing=0.1, grad_clip=1.0)
    return opt


def _mesh():
    return parallel.make_mesh()  # the 8 simulated CPU devices: the batch is sharded


def _sweep(features, labels, lrs, wds, opt, **kw):
    return train_sweep(
        features,
        labels,
        num_classes=C,
        learning_rates=lrs,
        weight_decays=wds,
        opt_config=opt,
        batch_size=BATCH,
        num_epochs=EPOCHS,
        seed=3,
        mesh=_mesh(),
        **kw,
    )


def _trained_alone(train, train_y, lr, wd, optimizer, total_steps):
    """The reference: one Head trained by Trainer on FeatureBatches with the same seed and steps."""
    opt = _opt(optimizer)
    opt.update(learning_rate=lr, weight_decay=wd)
    trainer = Trainer(
        Head(D, C, rngs=nnx.Rngs(0)), (), num_classes=C, opt_config=opt, total_steps=total_steps, mesh=_mesh(), seed=3
    )
    batches, state = FeatureBatches(train, train_y, batch_size=BATCH, seed=3), trainer.init_state()
    for _ in range(total_steps):
        state, _ = trainer.train_step(state, next(batches))
    return trainer, state.params


def _assert_same_head(result, trainer, params, lr, wd):
    row = next(r for r in result.table if (r["learning_rate"], r["weight_decay"]) == (lr, wd))
    for name in ("kernel", "bias"):
        np.testing.assert_allclose(
            result.head(row)[name], np.asarray(params["out"][name].get_value()), rtol=1e-5, atol=1e-6
        )
    return row


def test_vmapped_heads_equal_heads_trained_alone():
    (train, val, test), labels = _data()
    lrs, wds = [0.02, 0.3], [0.0, 0.5]
    result = _sweep({"pooled": (train, val, test)}, labels, lrs, wds, _opt())
    assert result.total_steps == N // BATCH * EPOCHS
    for lr in lrs:
        for wd in wds:
            trainer, params = _trained_alone(train, labels[0], lr, wd, "adamw", result.total_steps)
            row = _assert_same_head(result, trainer, params, lr, wd)
            val_metrics = trainer.evaluate(params, feature_eval_batches(val, labels[1], BATCH))
            assert row["val_accuracy"] == pytest.approx(val_metrics["accuracy"])
            assert row["val_loss"] == pytest.approx(val_metrics["loss"], rel=1e-5)
    assert len({r["val_loss"] for r in result.table}) == 4  # the four heads really differ


def test_sgd_heads_equal_too():
    (train, val, test), labels = _data()
    result = _sweep({"pooled": (train, val, test)}, labels, [0.02, 0.3], [0.0, 0.5], _opt("sgd"))
    trainer, params = _trained_alone(train, labels[0], 0.3, 0.5, "sgd", result.total_steps)
    _assert_same_head(result, trainer, params, 0.3, 0.5)


def test_two_variants_of_different_dims_and_selection():
    (train, val, test), labels = _data()
    (train2, val2, test2), _ = _data(dim=20, seed=1)
    features = {"pooled": (train, val, test), "noise": (train2, val2, test2)}  # "noise" ignores the labels
    result = _sweep(features, labels, [1e-3, 0.1], [0.0, 1e-2], _opt())
    assert [r["variant"] for r in result.table] == ["pooled"] * 4 + ["noise"] * 4
    assert result.params["pooled"]["kernel"].shape == (4, D, C)
    assert result.params["noise"]["kernel"].shape == (4, 20, C)
    assert result.best["val_accuracy"] == max(r["val_accuracy"] for r in result.table)
    assert result.best["variant"] == "pooled" and result.best["val_accuracy"] > 0.6  # chance: 1/3
    assert result.head(result.best)["kernel"].shape == (D, C)


def test_selection_ties_and_divergence():
    def row(variant, lr, wd, acc, diverged=False):
        return {"variant": variant, "learning_rate": lr, "weight_decay": wd, "val_accuracy": acc, "diverged": diverged}

    table = [
        row("b", 0.1, 0.0, 0.9),
        row("a", 0.01, 0.1, 0.9),
        row("a", 0.01, 0.01, 0.9),
        row("b", 0.01, 0.01, 0.9),
        row("a", 1.0, 0.0, 0.95, diverged=True),
        row("a", 0.001, 0.0, 0.5),
    ]
    assert select(table) is table[3]  # best accuracy; smaller lr, smaller wd, then the first variant ("b")
    with pytest.raises(FloatingPointError):
        select([row("a", 1.0, 0.0, 0.9, diverged=True)])


def test_diverged_heads_are_flagged_and_never_selected():
    (train, val, test), labels = _data()
    opt = _opt("sgd")
    opt.update(grad_clip=0.0, momentum=0.0)
    result = _sweep({"pooled": (train, val, test)}, labels, [1e-2, 1e38], [0.0], opt)
    assert [r["diverged"] for r in result.table] == [False, True]
    assert result.best["learning_rate"] == 1e-2


def test_write_files(tmp_path):
    (train, val, test), labels = _data()
    result = _sweep({"pooled": (train, val, test)}, labels, [1e-3, 0.1], [1e-4], _opt())
    write(result, tmp_path)
    saved = json.loads((tmp_path / "sweep.json").read_text())
    assert saved["best"] == result.best and saved["table"] == result.table and saved["num_heads"] == 2
    markdown = (tmp_path / "sweep.md").read_text()
    best_lines = [line for line in markdown.splitlines() if line.startswith("| **best**")]
    assert len(best_lines) == 1 and f"| {result.best['learning_rate']:g} |" in best_lines[0]
    assert len([line for line in markdown.splitlines() if line.startswith("| ")]) == 1 + 2  # header + rows
    assert isinstance(result, SweepResult) and not list(tmp_path.glob(".*tmp*"))


def test_inputs_are_checked():
    (train, val, test), labels = _data()
    with pytest.raises(ValueError, match="split sizes"):
        _sweep({"pooled": (train[:-1], val, test)}, labels, [0.1], [0.0], _opt())
    with pytest.raises(ValueError, match="divisible"):
        train_sweep(
            {"pooled": (train, val, test)},
            labels,
            num_classes=C,
            learning_rates=[0.1],
            weight_decays=[0.0],
            opt_config=_opt(),
            batch_size=12,
            num_epochs=1,
            seed=0,
            mesh=_mesh(),
        )
