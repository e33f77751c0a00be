"""config.protocols in a real cached-features run: a tiny DINOv2 torch-hub checkpoint on the built-in digits; the
protocols run on the run's own cached features (the four DINOv2 variants extracted for dinov2_linear), their
results land in protocols.json / protocols.md, the summary and the report; bad names and settings are refused
before anything loads."""

from __future__ import annotations

import json
from functools import partial

import ml_collections
import pytest
import torch
from dinov2.layers import MemEffAttention, NestedTensorBlock
from dinov2.models.vision_transformer import DinoVisionTransformer
from test_report import _parse

from fxjax import config as config_lib
from fxjax.runs import experiment


def _dinov2_file(path):
    torch.manual_seed(0)
    model = DinoVisionTransformer(
        img_size=28, patch_size=14, embed_dim=64, depth=4, num_heads=1, mlp_ratio=2, init_values=1.0,
        block_chunks=0, block_fn=partial(NestedTensorBlock, attn_class=MemEffAttention),
    )  # fmt: skip
    torch.save(model.state_dict(), path)
    return path


def _config(backbone: str) -> ml_collections.ConfigDict:
    config = config_lib.default_config()
    config.backbone, config.image_size = backbone, 28
    config.num_epochs, config.batch_size = 1, 64
    config.protocols = ("dinov2_knn", "dinov2_linear")
    config.protocol_overrides.dinov2_knn = {"bootstrap": 50}
    config.protocol_overrides.dinov2_linear = {"steps": 8, "batch_size": 64, "bootstrap": 50}
    return config


def test_protocols_run_on_the_runs_features_into_its_files_summary_and_report(tmp_path):
    backbone = _dinov2_file(tmp_path / "dinov2_vits14_pretrain_heads1.pth")
    workdir = tmp_path / "run"
    summary = experiment.run(_config(str(backbone)), workdir)
    results = json.loads((workdir / "protocols.json").read_text())["results"]
    assert [r["protocol"] for r in results] == ["dinov2_knn", "dinov2_linear"]
    knn, linear = results
    assert len(linear["rows"]) == 52 and {r["variant"] for r in linear["rows"]} == {
        "pooled", "pooled_avgpool", "cls_last4", "cls_last4_avgpool",
    }  # fmt: skip
    assert linear["settings"]["global_batch"] == 64 and linear["settings"]["steps"] == 8
    best = max(linear["rows"], key=lambda r: r["val_top1"])
    assert linear["selection"]["learning_rate"] == best["learning_rate"]
    assert linear["metrics"]["top1"]["value"] == pytest.approx(best["test_top1"])
    assert linear["splits"]["test"] == summary["test_examples"]  # the run's own test split
    assert summary["protocols"]["dinov2_linear"]["test_top1"] == linear["metrics"]["top1"]["value"]
    assert summary["protocols"]["dinov2_knn"]["test_top1"] == knn["metrics"]["top1"]["value"]
    table = (workdir / "protocols.md").read_text()
    assert "| dinov2_linear |" in table and "global batch 64" in table
    # The run's own head is untouched by the protocols: it trains on the pooled features alone.
    assert summary["head"]["variant"] == "pooled"

    rows = _parse(workdir / "report.html").rows["protocols-table"]
    assert rows[0][:2] == ["protocol", "chosen"] and [r[0] for r in rows[1:]] == ["dinov2_knn", "dinov2_linear"]
    top1 = linear["metrics"]["top1"]
    assert rows[2][2] == f"{100 * top1['value']:.1f} [{100 * top1['ci_low']:.1f}, {100 * top1['ci_high']:.1f}]"
    assert rows[2][5] == "64"


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: setattr(c, "protocols", ("dinov3_linear",)), "config.protocols=.*unknown 'dinov3_linear'"),
        (lambda c: setattr(c, "protocols", ("dinov2_knn", "dinov2_knn")), "a name is repeated"),
        (
            lambda c: c.protocol_overrides.dinov2_linear.update({"lr": 0.1}),
            r"config.protocol_overrides.dinov2_linear.lr: unknown setting",
        ),
        (
            lambda c: setattr(c, "protocol_overrides", ml_collections.ConfigDict({"dinov2_linear": {"steps": "many"}})),
            r"config.protocol_overrides.dinov2_linear.steps='many': expected",
        ),
        (lambda c: c.protocol_overrides.update({"vtab1k": {"steps": 5}}), "'vtab1k' is not in config.protocols"),
        (lambda c: setattr(c, "data", ml_collections.ConfigDict({"augment": True})), "work on cached features"),
    ],
)
def test_bad_protocols_and_settings_are_refused_before_anything_loads(change, message):
    config = _config("no-such-backbone")
    change(config)
    with pytest.raises(ValueError, match=message):
        config_lib.resolve(config)


def test_protocol_overrides_from_the_command_line():
    config = _config("x")
    config_lib.override(config, "protocol_overrides.dinov2_linear.steps", "100")
    config_lib.override(config, "protocol_overrides.dinov2_knn.ks", "(10,20)")
    resolved = config_lib.resolve(config)
    assert resolved.protocol_overrides.dinov2_linear.steps == 100
    assert tuple(resolved.protocol_overrides.dinov2_knn.ks) == (10, 20)
    assert json.loads(json.dumps(resolved.to_dict()))["protocol_overrides"]["dinov2_linear"]["batch_size"] == 64
    with pytest.raises(ValueError, match="<protocol>.<setting>"):
        config_lib.override(config, "protocol_overrides.dinov2_linear", "5")
