"""Crash safety: SIGKILL at random points, SIGTERM, damaged checkpoints, NaN, a busy workdir, a full disk."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest
from tiny_run import tiny_config, tiny_run

from fxjax.heads.engine import NonFiniteLossError
from fxjax.runs import experiment, rundir
from fxjax.runs.checkpoint import Checkpoints
from tests.runs.test_experiment import small_config

ROOT = Path(__file__).resolve().parents[2]
ARGS = [
    "--config",
    "configs/quickstart.py",
    "--config.image_size=32",
    "--config.num_epochs=4",
    "--config.batch_size=32",
]


def _launch(workdir: Path, *, own_cache: bool = True) -> subprocess.Popen:
    # A cache of its own per workdir, so a killed run really extracts (and can be killed while it does); runs
    # signalled once training started share the session's cache instead (their extraction is not under test).
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    if own_cache:
        env["FXJAX_CACHE_DIR"] = str(workdir.parent / f"cache-{workdir.name}")
    return subprocess.Popen(
        [sys.executable, "-m", "launch.train", *ARGS, "--workdir", str(workdir)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _final_params(workdir: Path):
    step = json.loads((workdir / "summary.json").read_text())["total_steps"]
    tree = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "params")
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _eval_records(workdir: Path):
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["split"], r["loss"], r["accuracy"]) for r in records]


def test_sigkill_at_random_points_then_rerun_is_bitwise_identical(tmp_path):
    reference = tmp_path / "reference"
    start = time.monotonic()
    assert _launch(reference).wait(timeout=600) == 0
    duration = time.monotonic() - start
    workdir = tmp_path / "killed"
    rng = np.random.default_rng(1234)
    kills = 0
    # Seeded points across a whole run's length: start-up, feature extraction, training, a checkpoint save.
    for fraction in rng.uniform(0.2, 0.9, size=3):
        proc = _launch(workdir)
        try:
            if proc.wait(timeout=fraction * duration) == 0:
                break
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
    proc = _launch(workdir)
    assert proc.wait(timeout=600) == 0, proc.stderr.read()
    assert kills >= 1
    for a, b in zip(_final_params(reference), _final_params(workdir), strict=True):
        assert np.array_equal(a, b)
    assert _eval_records(workdir) == _eval_records(reference)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
def test_sigterm_and_ctrl_c_save_the_current_step_and_exit_cleanly(tmp_path, sig):
    proc = _launch(tmp_path, own_cache=False)
    deadline = time.time() + 300
    while not (tmp_path / "metrics.jsonl").exists() or not (tmp_path / "metrics.jsonl").read_text():
        assert proc.poll() is None and time.time() < deadline, "the run ended before training started"
        time.sleep(0.05)
    proc.send_signal(sig)
    assert proc.wait(timeout=120) == 75
    stderr = proc.stderr.read()
    assert "preempted at step" in stderr and "Traceback" not in stderr
    steps = Checkpoints(tmp_path / "checkpoints").manager.all_steps()
    assert steps, "no checkpoint was saved on SIGTERM"
    assert _launch(tmp_path, own_cache=False).wait(timeout=600) == 0


@pytest.fixture()
def finished(tmp_path, tmp_path_factory):
    """A copy of the session's finished tiny run (tests/runs/tiny_run.py), for a test to damage."""
    workdir = tmp_path / "run"
    shutil.copytree(tiny_run(tmp_path_factory), workdir)
    return workdir, json.loads((workdir / "summary.json").read_text())


def test_damaged_latest_checkpoint_is_reported_skipped_and_the_previous_restored(finished, caplog):
    workdir, summary = finished
    latest = Checkpoints(workdir / "checkpoints").latest_step()
    for f in (workdir / "checkpoints" / str(latest) / "params").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # truncated mid-file
    again = experiment.run(tiny_config(), workdir)
    assert "is damaged" in caplog.text
    assert (workdir / "checkpoints" / f"damaged-{latest}").exists()
    assert again["total_steps"] == summary["total_steps"]
    experiment.run(tiny_config(), workdir)  # no crash loop: the damaged one is never tried again


def test_nan_loss_stops_naming_the_step_and_the_last_good_checkpoint(tmp_path):
    config = small_config(**{"optimizer.learning_rate": 1e30, "optimizer.grad_clip": 0.0})
    with pytest.raises(NonFiniteLossError, match=r"at step \d+.*last good checkpoint"):
        experiment.run(config, tmp_path)
    for step_dir in (tmp_path / "checkpoints").glob("[0-9]*"):
        import jax

        params = ocp.StandardCheckpointer().restore(step_dir / "params")
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_a_second_run_on_a_live_workdir_refuses(tmp_path):
    holder = rundir.acquire_lock(rundir.prepare(tmp_path))
    try:
        with pytest.raises(rundir.WorkdirBusyError, match="is in use by a live run"):
            experiment.run(small_config(), tmp_path)
    finally:
        holder.close()
    assert experiment.run(small_config(num_epochs=1), tmp_path)["test_accuracy"] > 0  # lock gone: runs


def test_resuming_with_another_class_count_is_refused(finished):
    workdir, _ = finished
    env = json.loads((workdir / "environment.json").read_text())
    env["class_names"] = ["cat", "dog"]
    (workdir / "environment.json").write_text(json.dumps(env))
    with pytest.raises(ValueError, match="holds a run with 2 classes; this config has 10"):
        experiment.run(tiny_config(), workdir)


def test_disk_full_while_saving_is_one_clear_error_and_the_run_resumes(tmp_path, monkeypatch):
    original, calls = Checkpoints.save, {"n": 0}

    def full_disk(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Checkpoints, "save", full_disk)
    with pytest.raises(OSError, match="disk full while writing in .*free space, then rerun"):
        experiment.run(small_config(), tmp_path)
    monkeypatch.setattr(Checkpoints, "save", original)
    assert experiment.run(small_config(), tmp_path)["test_accuracy"] > 0.3
