"""dinov2_linear / vtab1k through the head engine, against DINOv2's own linear evaluation (`dinov2/eval/linear.py`:
create_linear_input, setup_linear_classifiers, LinearClassifier, SGD + CosineAnnealingLR) and a plain optax loop
per head. Tiny random tokens, a few steps."""

from __future__ import annotations

import contextlib
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from dinov2.layers import MemEffAttention, NestedTensorBlock
from dinov2.models.vision_transformer import DinoVisionTransformer

import fxjax
from fxjax import parallel
from fxjax.data.features import FeatureBatches
from fxjax.evaluate import catalog, linear_eval
from fxjax.evaluate.linear_specs import DINOV2_LEARNING_RATES, DINOV2_LINEAR, DINOV2_VARIANTS
from tests.support import dinov2_eval

dinov2_linear, dinov2_utils = dinov2_eval.load()

CLASSES, DIM, PATCHES, BLOCKS = 4, 6, 5, 4
STEPS, BATCH = 6, 16
# DINOv2 keys its heads by name with the lr to 5 decimals: at a global batch <= 184, 1e-5 x batch / 256 and
# 2e-5 x batch / 256 print alike and its ModuleDict keeps one of them. At 256 the 52 names are distinct.
NAMED_BATCH = 256


def _tokens(n: int, seed: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], np.ndarray]:
    """What DINOv2's ModelWithIntermediateLayers gives its heads: per block (patch tokens [n, p, d], CLS [n, d]),
    with class-dependent CLS tokens so the heads learn something; and labels [n]."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, n)
    centres = np.random.default_rng(99).standard_normal((CLASSES, DIM))
    blocks = []
    for _ in range(BLOCKS):
        cls = centres[labels] + rng.standard_normal((n, DIM))
        patches = rng.standard_normal((n, PATCHES, DIM))
        blocks.append((torch.tensor(patches, dtype=torch.float32), torch.tensor(cls, dtype=torch.float32)))
    return blocks, labels


def _variants(tokens) -> dict[str, np.ndarray]:
    """fxjax's variant names for DINOv2's four linear inputs, made by DINOv2's create_linear_input."""
    return {
        variant: dinov2_linear.create_linear_input(tokens, blocks, avgpool).numpy()
        for variant, blocks, avgpool in DINOV2_VARIANTS
    }


def _torch_heads(tokens, monkeypatch):
    """DINOv2's own 52 classifiers and optimiser groups (setup_linear_classifiers calls .cuda(): made a no-op)."""
    monkeypatch.setattr(torch.nn.Module, "cuda", lambda self, *a, **k: self)
    sample = [(p[:1], c[:1]) for p, c in tokens]
    lrs = np.asarray(DINOV2_LEARNING_RATES)
    return dinov2_linear.setup_linear_classifiers(sample, [1, 4], lrs, NAMED_BATCH, CLASSES)


@partial(jax.jit, static_argnames="steps")
def _alone(kernel, bias, xs, ys, lr, steps):
    """One head alone, a plain optax loop: SGD momentum 0.9, cosine to 0 over `steps`, mean cross-entropy."""
    tx = optax.sgd(optax.cosine_decay_schedule(lr, steps), momentum=0.9)
    params = {"kernel": kernel, "bias": bias}

    def step(carry, batch):
        p, state = carry
        x, y = batch
        grads = jax.grad(
            lambda p: optax.softmax_cross_entropy_with_integer_labels(x @ p["kernel"] + p["bias"], y).mean()
        )(p)
        updates, state = tx.update(grads, state, p)
        return (optax.apply_updates(p, updates), state), None

    (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), (xs, ys))
    return params


def test_52_heads_each_equal_dinov2s_head_and_that_head_trained_alone(monkeypatch):
    tokens, labels = _tokens(2 * NAMED_BATCH, seed=0)
    feats = _variants(tokens)
    rows = DINOV2_LINEAR.heads(NAMED_BATCH)
    mesh = parallel.make_mesh()
    fitted = linear_eval.fit_heads(
        DINOV2_LINEAR, rows, feats, labels, CLASSES, steps=STEPS, global_batch=NAMED_BATCH, mesh=mesh, seed=0
    )
    assert len(fitted.rows) == 52

    # DINOv2 names the same 52 heads, in the same order, with the same scaled learning rates.
    heads, groups = _torch_heads(tokens, monkeypatch)
    assert list(heads.classifiers_dict) == [r["name"] for r in fitted.rows]
    np.testing.assert_allclose([g["lr"] for g in groups], [r["learning_rate"] for r in fitted.rows], rtol=1e-12)

    # DINOv2's training loop (eval_linear) on the same batches, from the same initial weights.
    init = {g: fitted.engine.params_init[g]["head"]["out"] for g in fitted.engine.groups}
    with torch.no_grad():
        for row, head in zip(fitted.rows, heads.classifiers_dict.values()):
            head.linear.weight.copy_(torch.tensor(np.asarray(init[row["variant"]]["kernel"][row["index"]]).T))
            head.linear.bias.copy_(torch.tensor(np.asarray(init[row["variant"]]["bias"][row["index"]])))
    optimizer = torch.optim.SGD(groups, momentum=0.9, weight_decay=0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, STEPS, eta_min=0)
    order = FeatureBatches(np.arange(len(labels)), labels, batch_size=NAMED_BATCH, seed=0)  # the engine's batches
    index = np.stack([next(order)["x"] for _ in range(STEPS)])  # [steps, batch]
    for idx in index:
        outputs = heads([(p[idx], c[idx]) for p, c in tokens])
        target = torch.tensor(labels[idx])
        loss = sum(torch.nn.CrossEntropyLoss()(v, target) for v in outputs.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()

    test_tokens, _ = _tokens(32, seed=1)
    test_feats = _variants(test_tokens)
    with torch.no_grad():
        torch_logits = heads(test_tokens)
    for row, head in zip(fitted.rows, heads.classifiers_dict.values()):
        ours = fitted.model(row).head.out
        np.testing.assert_allclose(ours.kernel.value, head.linear.weight.detach().numpy().T, atol=1e-5, rtol=0)
        np.testing.assert_allclose(ours.bias.value, head.linear.bias.detach().numpy(), atol=1e-5, rtol=0)
        logits = fitted.logits(row, test_feats[row["variant"]])
        np.testing.assert_allclose(logits, torch_logits[row["name"]].numpy(), atol=1e-5, rtol=0)
        x, y = feats[row["variant"]][index], labels[index]
        k0, b0 = (init[row["variant"]][k][row["index"]] for k in ("kernel", "bias"))
        alone = _alone(jnp.asarray(k0), jnp.asarray(b0), x, y, row["learning_rate"], STEPS)
        np.testing.assert_allclose(ours.kernel.value, alone["kernel"], atol=1e-5, rtol=0)
        np.testing.assert_allclose(ours.bias.value, alone["bias"], atol=1e-5, rtol=0)
    # The heads moved: equal to the references after real training, not at initialisation.
    last = fitted.rows[-1]  # the largest learning rate on cls_last4_avgpool
    moved = np.asarray(fitted.model(last).head.out.kernel.value) - init[last["variant"]]["kernel"][last["index"]]
    assert np.abs(moved).max() > 1e-2


def test_variants_are_dinov2s_linear_inputs(tmp_path):
    """fxjax's four feature variants of a DINOv2 torch-hub checkpoint = create_linear_input over DINOv2's own
    ModelWithIntermediateLayers (final norm on each of the last 4 blocks; avgpool of the last block's patches)."""
    torch.manual_seed(0)
    model = DinoVisionTransformer(
        img_size=56, patch_size=14, embed_dim=128, depth=BLOCKS, num_heads=2, mlp_ratio=4, init_values=1.0,
        block_chunks=0, block_fn=partial(NestedTensorBlock, attn_class=MemEffAttention),
    )  # fmt: skip
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape))
    path = tmp_path / "dinov2_vits14_pretrain.pth"  # width 128: 2 heads of 64
    torch.save(model.eval().state_dict(), path)
    x = np.random.default_rng(0).standard_normal((3, 56, 56, 3)).astype(np.float32)
    ours = fxjax.load_backbone(str(path)).variants(x, tuple(v for v, _, _ in DINOV2_VARIANTS))
    tokens = dinov2_utils.ModelWithIntermediateLayers(model, BLOCKS, contextlib.nullcontext)(
        torch.tensor(x).permute(0, 3, 1, 2)
    )
    for variant, blocks, avgpool in DINOV2_VARIANTS:
        ref = dinov2_linear.create_linear_input(tokens, blocks, avgpool).numpy()
        np.testing.assert_allclose(np.asarray(ours[variant]), ref, atol=1e-4, rtol=0, err_msg=variant)


def _splits():
    feats, labels = {}, {}
    for split, n, seed in (("train", 96, 0), ("val", 48, 1), ("test", 48, 2)):
        tokens, labels[split] = _tokens(n, seed)
        feats[split] = _variants(tokens)
    return feats, labels


def test_run_linear_reports_the_best_on_val_on_test():
    feats, labels = _splits()
    result = catalog.evaluate_protocol(
        "dinov2_linear", feats, labels, CLASSES, overrides={"steps": STEPS, "batch_size": BATCH, "bootstrap": 20}
    )
    assert len(result.rows) == 52 and result.settings["global_batch"] == BATCH == result.splits["global_batch"]
    best = max(result.rows, key=lambda r: r["val_top1"])  # max() keeps the first of equals: DINOv2's order
    chosen = result.selection
    assert (chosen["value"], chosen["variant"], chosen["learning_rate"]) == (
        best["name"], best["variant"], best["learning_rate"],
    )  # fmt: skip
    assert chosen["val_top1"] == best["val_top1"]
    assert result.metrics["top1"]["value"] == pytest.approx(best["test_top1"])
    assert result.metrics["top1"]["ci_low"] <= best["test_top1"] <= result.metrics["top1"]["ci_high"]
    assert len({r["val_top1"] for r in result.rows}) > 1  # the heads differ: the selection chose among them
    assert tuple(result.settings["base_learning_rates"]) == DINOV2_LEARNING_RATES


def test_best_on_val_ties_go_to_dinov2s_first_head():
    rows = [
        {"name": "a", "val_top1": 0.5, "val_loss": 1.0},
        {"name": "b", "val_top1": 0.7, "val_loss": float("nan")},  # diverged: never chosen
        {"name": "c", "val_top1": 0.6, "val_loss": 1.0},
        {"name": "d", "val_top1": 0.6, "val_loss": 0.5},
    ]
    assert linear_eval.best_on_val(rows)["name"] == "c"


def test_vtab1k_selects_on_train800_val200_then_retrains_the_winner_on_both():
    feats, labels = _splits()
    sizes = {"train_examples": 80, "val_examples": 32}
    overrides = {"steps": STEPS, "batch_size": BATCH, "bootstrap": 20, **sizes}
    result = catalog.evaluate_protocol("vtab1k", feats, labels, CLASSES, overrides=overrides)
    assert result.splits == {"train": 80, "val": 32, "test": 48, "fit_on": "train80+val32", "global_batch": BATCH}
    best = max(result.rows, key=lambda r: r["val_top1"])
    assert result.selection["value"] == best["name"] and "test_top1" not in best  # test is scored once, at the end
    # The final head: the winner's variant and learning rate, trained afresh on the 112 selection examples.
    variant = best["variant"]
    both = {variant: np.concatenate([feats["train"][variant][:80], feats["val"][variant][:32]])}
    y = np.concatenate([labels["train"][:80], labels["val"][:32]])
    final = linear_eval.fit_heads(
        DINOV2_LINEAR, [best], both, y, CLASSES, steps=STEPS, global_batch=BATCH, mesh=parallel.make_mesh()
    )
    top1 = np.mean(final.logits(final.rows[0], feats["test"][variant]).argmax(-1) == labels["test"])
    assert result.metrics["top1"]["value"] == pytest.approx(top1)


def test_bad_settings_are_refused_naming_them():
    feats, labels = _splits()
    with pytest.raises(ValueError, match="unknown setting 'lr'"):
        linear_eval.run_linear("dinov2_linear", feats, labels, CLASSES, lr=0.1)
    with pytest.raises(ValueError, match="global batch 128 exceeds the 96 training examples"):
        linear_eval.run_linear("dinov2_linear", feats, labels, CLASSES, batch_size=128, steps=1)
    with pytest.raises(ValueError, match="unknown protocol 'dinov3_linear'"):
        catalog.evaluate_protocol("dinov3_linear", feats, labels, CLASSES)


def _vtab_splits():
    """VTAB-1k's own sizes: train800 and val200 (the spec's defaults), a small test split."""
    feats, labels = {}, {}
    for split, n, seed in (("train", 800, 0), ("val", 200, 1), ("test", 48, 2)):
        tokens, labels[split] = _tokens(n, seed)
        feats[split] = _variants(tokens)
    return feats, labels


def test_vtab1k_default_batch_on_8_devices_is_clipped_to_train800_and_recorded():
    feats, labels = _vtab_splits()
    assert parallel.make_mesh().devices.size == 8  # the default, 128 per device x 8 = 1024, exceeds train800
    result = catalog.evaluate_protocol("vtab1k", feats, labels, CLASSES, overrides={"steps": 2, "bootstrap": 2})
    assert result.settings["global_batch"] == result.splits["global_batch"] == 800
    assert result.settings["global_batch_clipped_from"] == 1024 and result.settings["eval_batch_size"] == 800
    scaled = [base * 800 / 256 for base in DINOV2_LEARNING_RATES] * len(DINOV2_VARIANTS)
    assert [r["learning_rate"] for r in result.rows] == pytest.approx(scaled)  # the batch trained on scales the lrs
    sizes = {"train_examples": 84, "val_examples": 32}  # fewer than a multiple of 8: rounded down to 80
    small = catalog.evaluate_protocol("vtab1k", feats, labels, CLASSES, overrides={"steps": 1, "bootstrap": 2, **sizes})
    assert (small.settings["global_batch"], small.settings["global_batch_clipped_from"]) == (80, 1024)


@pytest.mark.parametrize(
    "batch, message",
    [
        (1024, r"^vtab1k: global batch 1024 exceeds the 800 training examples; set a smaller batch_size override$"),
        (796, r"^vtab1k batch_size=796 must be divisible by the number of devices \(8\); use a multiple of 8, e\.g\."),
    ],
)
def test_vtab1k_batch_size_that_does_not_fit_fails_before_any_head_trains(batch, message, monkeypatch):
    feats, labels = _vtab_splits()

    def no_training(*args, **kwargs):
        raise AssertionError("a head trained before the batch size was checked")

    monkeypatch.setattr(linear_eval, "fit_heads", no_training)
    with pytest.raises(ValueError, match=message):
        linear_eval.run_linear("vtab1k", feats, labels, CLASSES, batch_size=batch, steps=1)
