"""Multi-host: when `distributed.initialize` joins a cluster, and a real 2-process run (gloo collectives on
127.0.0.1, 2 simulated CPU devices each) that must equal one process with 4 devices."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from fxjax.parallel import distributed
from fxjax.runs.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 240

SLURM = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}


@pytest.mark.parametrize(
    ("env", "tasks"),
    [
        ({}, 1),
        ({**SLURM, "SLURM_NTASKS": "16", "SLURM_STEP_NUM_TASKS": "16"}, 16),
        ({**SLURM, "SLURM_NTASKS": "1"}, 1),
        ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16"}, 1),  # the batch script's own shell, not an srun task
        ({"OMPI_MCA_orte_hnp_uri": "1;tcp://10.0.0.1:1", "OMPI_COMM_WORLD_SIZE": "4"}, 4),
        ({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}, 4),
    ],
)
def test_cluster_tasks_reads_the_launchers_environment(env, tasks):
    assert distributed.cluster_tasks(env) == tasks


@pytest.fixture
def joins(monkeypatch):
    """Records jax.distributed.initialize calls instead of making them; no cluster in the environment."""
    calls = []
    for key in [k for k in os.environ if k.startswith(("SLURM_", "OMPI_", "TPU_WORKER"))]:
        monkeypatch.delenv(key)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    return calls


def test_a_plain_process_stays_single(joins):
    assert distributed.initialize() is False and joins == []


def test_explicit_flags_or_a_detected_cluster_join(joins, monkeypatch):
    assert distributed.initialize("127.0.0.1:1234", 2, 1)
    assert joins[-1] == {"coordinator_address": "127.0.0.1:1234", "num_processes": 2, "process_id": 1}
    assert distributed.initialize(cluster=True)
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "w0,w1")
    assert distributed.initialize()
    assert joins[1:] == [{"coordinator_address": None, "num_processes": None, "process_id": None}] * 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ARGS = [
    "--config",
    "configs/quickstart.py",
    "--config.image_size=32",
    "--config.num_epochs=1",
    "--config.data.few_shot_k=8",
    "--config.batch_size=16",
    "--config.eval_batch_size=32",
    "--config.data.val_fraction=0.05",
    "--config.data.test_fraction=0.05",
    "--config.log_every_steps=1",
]


def _start(workdir: Path, devices: int, *extra: str) -> subprocess.Popen:
    env = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "JAX_PLATFORMS": "cpu",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(ROOT),
    }
    cache = f"--config.cache_dir={workdir}-features"  # not the user's cache, nor the other run's
    command = [sys.executable, "-m", "launch.train", *ARGS, cache, "--workdir", str(workdir), *extra]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(procs: list[subprocess.Popen]) -> list[str]:
    """Waits for every process (killing all of them on a timeout or a failure) → their stdouts."""
    outputs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=TIMEOUT_S)
            assert proc.returncode == 0, f"exit {proc.returncode}:\n{err[-3000:]}"
            outputs.append(out)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return outputs


def _final_params(workdir: Path, step: int) -> list[np.ndarray]:
    import orbax.checkpoint as ocp

    path = workdir / "checkpoints" / str(step) / "params"
    checkpointer = ocp.StandardCheckpointer()
    here = jax.sharding.SingleDeviceSharding(jax.devices()[0])  # saved on another topology: name this one
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here), checkpointer.metadata(path).item_metadata.tree
    )
    restored = checkpointer.restore(path, target)
    return [np.asarray(x) for x in jax.tree.leaves(restored)]


def test_two_processes_equal_one_process(tmp_path):
    coordinator = f"127.0.0.1:{_free_port()}"
    multi, single = tmp_path / "multi", tmp_path / "single"
    # (data=2 across the processes, fsdp=2 within each) against data=4 in one process
    procs = [
        _start(
            multi,
            2,
            "--config.mesh.fsdp=2",
            "--coordinator_address",
            coordinator,
            "--num_processes",
            "2",
            "--process_id",
            str(i),
        )
        for i in range(2)
    ]
    procs.append(_start(single, 4))
    out0, out1, _ = _finish(procs)
    assert "test_accuracy=" in out0 and "test_accuracy=" not in out1  # process 0 alone reports

    env = json.loads((multi / "environment.json").read_text())
    assert env["process_count"] == 2 and len(env["devices"]) == 4
    a, b = (json.loads((w / "summary.json").read_text()) for w in (single, multi))
    for key in ("test_accuracy", "val_accuracy", "best_step", "total_steps", "test_examples"):
        assert a[key] == b[key], key
    predictions = [np.load(w / "test_predictions.npy") for w in (single, multi)]
    np.testing.assert_array_equal(predictions[1], predictions[0])

    def records(workdir):
        return [(r["step"], r["split"], r["loss"]) for r in read_metrics(workdir) if r["split"] in ("train", "val")]

    ra, rb = records(single), records(multi)
    assert [r[:2] for r in ra] == [r[:2] for r in rb] and len(ra) > 2
    np.testing.assert_allclose([r[2] for r in rb], [r[2] for r in ra], rtol=1e-5)
    step = a["total_steps"]
    for x, y in zip(_final_params(single, step), _final_params(multi, step), strict=True):
        np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6)
