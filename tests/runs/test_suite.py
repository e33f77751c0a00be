"""The benchmark-suite runner end to end through its CLI, on the offline suite with fast backbones (raw pixels and a
tiny random ViT folder) and datasets (digits and a generated image folder): the table equals each protocol run
directly on the same cached features; a suite killed mid-way reruns only its unfinished cells (finished ones are
left byte for byte) and ends equal to an uninterrupted run; a meaning-changing rerun is refused in one line; the
report renders in a real browser."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from browser import screenshot
from PIL import Image

from fxjax.cli import main as cli
from fxjax.evaluate import recipes
from fxjax.runs import suite as suite_lib
from fxjax.runs.setup import Setup

ROOT = Path(__file__).resolve().parents[2]
PROTOCOLS = ("dinov2_knn", "dinov2_logreg", "clip_linear_probe", "bigvision_fewshot")
# The reference settings, made CPU-sized: fewer values of C and λ, fewer iterations, fewer bootstrap draws, and
# k and shot counts the 3-class folder (14 training images per class) has.
FAST = (
    "--config.overrides.dinov2_knn.ks=(5,10)",
    "--config.overrides.dinov2_knn.k=10",
    "--config.overrides.dinov2_knn.bootstrap=100",
    "--config.overrides.dinov2_logreg.c_powers=(-1.0,1.0,3)",
    "--config.overrides.dinov2_logreg.max_iter=30",
    "--config.overrides.dinov2_logreg.bootstrap=100",
    "--config.overrides.clip_linear_probe.lambda_powers=(-4.0,2.0)",
    "--config.overrides.clip_linear_probe.per_decade=2",
    "--config.overrides.clip_linear_probe.coarse_stride=4",
    "--config.overrides.clip_linear_probe.spans=(2,1)",
    "--config.overrides.clip_linear_probe.max_iter=30",
    "--config.overrides.clip_linear_probe.bootstrap=100",
    "--config.overrides.bigvision_fewshot.shots=(1,5)",
    "--config.overrides.bigvision_fewshot.bootstrap=100",
)


def _tiny_vit(folder: Path) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(
        hidden_size=192, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=8, patch_size=8
    )  # 192 features, as raw pixels at 8 px: one set of compiled probes per dataset serves both backbones
    torch.manual_seed(0)
    transformers.ViTModel(config, add_pooling_layer=False).eval().save_pretrained(folder)


def _image_folder(folder: Path) -> None:
    """3 classes of 20 noisy 12x12 images, each class its own colour."""
    rng = np.random.default_rng(0)
    for c, colour in enumerate(((200, 40, 40), (40, 200, 40), (40, 40, 200))):
        (folder / f"class_{c}").mkdir(parents=True)
        for i in range(20):
            pixels = np.clip(np.array(colour) + rng.normal(0, 60, (12, 12, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"class_{c}" / f"{i}.png")


@pytest.fixture(scope="module")
def args(tmp_path_factory) -> list[str]:
    """The offline suite's command line with fast backbones and datasets and a feature cache of its own."""
    base = tmp_path_factory.mktemp("suite_inputs")
    _tiny_vit(base / "tiny_vit")
    _image_folder(base / "shapes")
    return [
        "--config",
        "offline",
        f"--config.backbones=pixels,{base / 'tiny_vit'}",
        f"--config.datasets=digits,folder:{base / 'shapes'}",
        "--config.image_size=8",
        f"--config.run.cache_dir={base / 'cache'}",
        *FAST,
    ]


def _suite(entry: list[str], args: list[str], workdir: Path, *extra: str, **popen) -> subprocess.Popen:
    command = [sys.executable, *entry, *args, *extra, "--workdir", str(workdir)]
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        # The killed run's compiled probes serve its rerun (compiling dominates a tiny suite's time).
        "JAX_COMPILATION_CACHE_DIR": str(workdir.parent / "jax_cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }
    return subprocess.Popen(command, cwd=ROOT, env=env, text=True, **popen)


def _cells(workdir: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(workdir)): (p.read_bytes(), p.stat().st_mtime_ns) for p in workdir.glob("cells/*/*/*")}


def _without_timings(summary: dict) -> dict:
    return {**summary, "cells": [{k: v for k, v in c.items() if k != "seconds"} for c in summary["cells"]]}


@pytest.fixture(scope="module")
def runs(args, tmp_path_factory) -> dict:
    """A suite killed after its first cells and rerun with one more protocol (both through the CLI in their own
    processes), then an uninterrupted run."""
    base = tmp_path_factory.mktemp("suites")
    killed = base / "killed"
    first = _suite(["-m", "fxjax.cli", "suite"], args, killed, f"--config.protocols={','.join(PROTOCOLS[:3])}")
    deadline = time.monotonic() + 300
    while not _cells(killed) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    before = _cells(killed)
    resumed = _suite(["-m", "launch.suite"], args, killed, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, resumed_err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, resumed_err
    whole = base / "whole"
    with contextlib.redirect_stdout(io.StringIO()):  # in this process: its compiled probes serve the checks below
        assert cli.main(["suite", *args, "--workdir", str(whole)]) == 0
    return {"killed": killed, "before": before, "whole": whole, "stdout": out, "resumed_stderr": resumed_err}


def test_the_table_equals_each_protocol_run_directly_on_the_cached_features(runs, args):
    whole = runs["whole"]
    summary = json.loads((whole / "suite.json").read_text())
    assert [(c["backbone"].rsplit("/", 1)[-1], c["dataset"].rsplit("/", 1)[-1], c["protocol"]) for c in
            summary["cells"]] == [(b, d, p) for b in ("pixels", "tiny_vit") for d in ("digits", "shapes")
                                  for p in PROTOCOLS]  # fmt: skip
    suite = suite_lib.resolve_suite(_loaded(args))
    table = (whole / "suite.md").read_text()
    for cell in summary["cells"]:
        setup = Setup.from_config(suite_lib.pair_config(suite, cell["backbone"], cell["dataset"]))
        feats, labels, hits = setup.cached_features()
        assert all(hits.values()), "the suite's features are in the cache"
        split = {s: (np.asarray(feats[s]["pooled"]), labels[s]) for s in ("train", "val", "test")}
        direct = recipes.run(
            cell["protocol"], split["train"], split["test"], setup.data.num_classes, split["val"],
            **suite.overrides[cell["protocol"]].to_dict(),
        ).to_dict()  # fmt: skip
        assert cell["result"]["metrics"] == direct["metrics"], cell["protocol"]
        assert cell["result"]["selection"] == direct["selection"]
        top1 = direct["metrics"]["top1" if "top1" in direct["metrics"] else "top1@5shot"]["value"]
        assert f" {100 * top1:.1f} |" in table
    rows = [line for line in table.splitlines() if line.startswith("| pixels | digits |")]
    assert rows[0].count("|") == 2 + len(summary["columns"]) + 1
    assert summary["columns"] == [*PROTOCOLS[:3], "bigvision_fewshot 1-shot", "bigvision_fewshot 5-shot"]
    assert "| tiny_vit | folder:shapes |" in runs["stdout"], "the CLI prints the table"
    digits_knn = next(c for c in summary["cells"] if c["dataset"] == "digits" and c["protocol"] == "dinov2_knn")
    assert digits_knn["result"]["metrics"]["top1"]["value"] > 0.8  # raw pixels of digits: kNN works well
    ci = digits_knn["result"]["metrics"]["top1"]
    assert ci["ci_low"] < ci["value"] < ci["ci_high"]


def _loaded(args: list[str]):
    from fxjax import config as config_lib

    config = config_lib.load_config_file(str(suite_lib.find_suite("offline")))
    for item in args[2:]:
        key, value = item.removeprefix("--config.").split("=", 1)
        suite_lib.suite_override(config, key, value)
    return config


def test_a_killed_suite_reruns_only_its_unfinished_cells_and_ends_as_an_uninterrupted_one(runs):
    before, killed = runs["before"], runs["killed"]
    assert 0 < len(before) < 12, f"the kill landed after {len(before)} of the first run's 12 cells"
    after = _cells(killed)
    assert len(after) == 16
    assert {name: after[name] for name in before} == before, "finished cells were rewritten"
    assert "suite: 16/16 cell" in runs["resumed_stderr"]
    resumed = json.loads((killed / "suite.json").read_text())
    whole = json.loads((runs["whole"] / "suite.json").read_text())
    assert _without_timings(resumed) == _without_timings(whole)
    assert (killed / "suite.md").read_text() == (runs["whole"] / "suite.md").read_text()


def test_a_rerun_that_changes_what_finished_cells_mean_is_refused_in_one_line(runs, args, capsys):
    workdir = str(runs["whole"])
    before = _cells(runs["whole"])
    changes = {
        "--config.image_size=12": "image_size (8 → 12)",
        "--config.overrides.dinov2_knn.temperature=0.1": "settings.temperature (0.07 → 0.1)",
        "--config.run.data.split_seed=1": "data.split_seed (0 → 1)",
    }
    for change, named in changes.items():
        assert cli.main(["suite", *args, change, "--workdir", workdir]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and named in err and "use a new --workdir" in err, err
    assert _cells(runs["whole"]) == before


@pytest.mark.parametrize(
    "change, message",
    [
        ("--config.overrides.dinov2_knn.k=ten", "config.overrides.dinov2_knn.k='ten': expected an integer"),
        ("--config.protocls=dinov2_knn", "unknown config key 'protocls' (did you mean 'protocols'?)"),
        ("--config.overrides.dinov2_knn.kk=3", "unknown config key 'overrides.dinov2_knn.kk'"),
        ("--config.protocols=dinov2_knn,nope", "unknown protocol 'nope'"),
        ("--config.protocols=dinov2_knn,dinov2_knn", "config.protocols lists 'dinov2_knn' twice"),
        ("--config.datasets=vtab:clevr_count", "'vtab:clevr_count' (label 'count_all', derived by task_adaptation)"),
        ("--config.datasets=vtab:nope", "config.datasets: unknown VTAB task 'vtab:nope'"),
    ],
)
def test_bad_suite_values_exit_2_with_one_line(change, message, tmp_path, capsys):
    assert cli.main(["suite", "--config", "offline", change, "--workdir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "w").exists()


def test_sgd_protocols_run_as_cells_on_the_variants_they_read(args, tmp_path):
    """dinov2_linear through the catalog: its 4 feature variants extracted, 52 heads, the global batch recorded."""
    workdir = tmp_path / "linear"
    vit, shapes = args[2].split(",")[1], args[3].split(",")[1]
    settings = {"epochs": 1, "epoch_length": 4, "batch_size": 16, "bootstrap": 100}
    linear = [f"--config.backbones={vit}", f"--config.datasets={shapes}", "--config.protocols=dinov2_linear"]
    linear += [f"--config.overrides.dinov2_linear.{k}={v}" for k, v in settings.items()]
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli.main(["suite", *args[:2], *args[4:], *linear, "--workdir", str(workdir)]) == 0
    (cell,) = json.loads((workdir / "suite.json").read_text())["cells"]
    result = cell["result"]
    assert cell["protocol"] == "dinov2_linear" and len(result["rows"]) == 52
    assert {r["variant"] for r in result["rows"]} == {"pooled", "pooled_avgpool", "cls_last4", "cls_last4_avgpool"}
    assert result["splits"]["global_batch"] > 0 and 0 <= result["metrics"]["top1"]["value"] <= 1


def test_the_report_renders_its_heatmap_in_a_headless_browser(runs, tmp_path):
    page = runs["whole"] / "suite.html"
    text = page.read_text()
    assert text.count("data:image/png;base64,") == 1 and 'id="suite-table"' in text and "<script" not in text
    pixels = screenshot(page, tmp_path / "shot.png")
    r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    viridis_high = (g > 170) & (b < 120) & (r < 240)  # viridis' green to yellow: the heatmap's cells above ~70 %
    assert viridis_high.sum() > 500, "the embedded heatmap did not render"
