"""The DINOv2 linear-eval and VTAB-1k specs against the reference sources' own constants."""

import ast
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from fxjax.backbones.backbone import VARIANTS
from fxjax.evaluate import linear_specs


def _dinov2_linear_defaults() -> dict:
    """The keyword defaults of dinov2/eval/linear.py's parser.set_defaults(...), read from the installed source."""
    path = Path(importlib.util.find_spec("dinov2").origin).parent / "eval" / "linear.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "set_defaults":
            return {
                k.arg: ast.literal_eval(k.value) for k in node.keywords if isinstance(k.value, ast.Constant | ast.List)
            }
    raise AssertionError("set_defaults not found in dinov2/eval/linear.py")


def test_dinov2_linear_matches_dinov2_defaults():
    ref = _dinov2_linear_defaults()
    spec = linear_specs.DINOV2_LINEAR
    assert list(spec.base_learning_rates) == ref["learning_rates"]
    assert (spec.epochs, spec.epoch_length, spec.batch_size_per_device) == (
        ref["epochs"],
        ref["epoch_length"],
        ref["batch_size"],
    )
    assert spec.steps == 12_500


def test_dinov2_linear_grid_is_52_heads_with_scaled_lr():
    heads = linear_specs.DINOV2_LINEAR.heads(global_batch=1024)
    assert len(heads) == 52 and len({h["name"] for h in heads}) == 52
    assert (
        {h["variant"] for h in heads} == {"pooled", "pooled_avgpool", "cls_last4", "cls_last4_avgpool"} <= set(VARIANTS)
    )
    np.testing.assert_allclose(
        [h["learning_rate"] for h in heads[:13]], np.array(linear_specs.DINOV2_LEARNING_RATES) * 4
    )
    assert heads[0]["name"] == "classifier_1_blocks_avgpool_False_lr_0_00004"
    assert heads[-1]["name"] == "classifier_4_blocks_avgpool_True_lr_0_40000"
    with pytest.raises(ValueError, match="global_batch"):
        linear_specs.DINOV2_LINEAR.heads(0)


def test_vtab1k_lists_the_19_tasks_and_stages():
    spec = linear_specs.VTAB1K
    assert len(spec.tasks) == 19 and len({t.name for t in spec.tasks}) == 19
    assert {t.group for t in spec.tasks} == {"natural", "specialized", "structured"}
    assert [len([t for t in spec.tasks if t.group == g]) for g in ("natural", "specialized", "structured")] == [7, 4, 8]
    assert (spec.train_examples, spec.val_examples) == (800, 200)
    assert [s["train"] for s in spec.stages] == ["train800", "train800val200"]
    assert spec.to_dict()["heads"]["steps"] == 12_500
