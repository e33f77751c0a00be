"""launch/slurm.sbatch on a real Slurm: the test starts munged, slurmctld and slurmd on localhost (one node,
2 CPUs, no cgroups or systemd needed), submits with `sbatch --wait`, and stops them after. Two srun tasks
(2 simulated CPU devices each, joined by JAX's own SLURM detection) must end where one process with 4
devices ends. Needs root and Debian's `slurm-wlm` and `munge` (`apt-get install -y slurm-wlm munge`);
skipped with the reason otherwise."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 420
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "sinfo")
ARGS = [
    "--config.backbone=pixels",
    "--config.num_epochs=1",
    "--config.data.few_shot_k=8",
    "--config.batch_size=16",
    "--config.eval_batch_size=32",
    "--config.data.val_fraction=0.05",
    "--config.data.test_fraction=0.05",
    "--config.log_every_steps=1",
]

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="starting slurmctld, slurmd and munged on localhost needs root"),
    pytest.mark.skipif(
        any(shutil.which(d) is None for d in DAEMONS),
        reason="Slurm or munge is not installed: apt-get install -y slurm-wlm munge",
    ),
]


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _slurm_conf(base: Path, ctld_port: int, slurmd_port: int) -> str:
    return f"""\
ClusterName=fxjaxtest
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={base}/munge/munge.socket
CredType=cred/munge
StateSaveLocation={base}/state
SlurmdSpoolDir={base}/spool
SlurmctldPidFile={base}/slurmctld.pid
SlurmdPidFile={base}/slurmd.pid
SlurmctldLogFile={base}/slurmctld.log
SlurmdLogFile={base}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MpiDefault=none
NodeName=localhost NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A one-node Slurm cluster of our own (its own key, socket, ports, state) → the environment to reach it."""
    base = tmp_path_factory.mktemp("slurm")
    for d in ("munge", "state", "spool"):
        (base / d).mkdir()
    (base / "munge").chmod(0o700)
    key = base / "munge" / "munge.key"
    key.write_bytes(os.urandom(128))
    key.chmod(0o400)
    conf = base / "slurm.conf"
    conf.write_text(_slurm_conf(base, *_free_ports(2)))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    munge = ["--key-file", str(key), "--socket", str(base / "munge" / "munge.socket")]
    munge += ["--pid-file", str(base / "munge" / "munged.pid"), "--log-file", str(base / "munge" / "munged.log")]
    munge += ["--seed-file", str(base / "munge" / "seed")]
    daemons = []
    try:  # in the foreground (-F / -D), so these handles are the daemons themselves
        commands = (["munged", "-F", "--force", *munge], ["slurmctld", "-D", "-i"], ["slurmd", "-D", "-N", "localhost"])
        for command in commands:
            daemons.append(subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            time.sleep(1)
        deadline = time.monotonic() + 60
        while "idle" not in subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True).stdout:
            if time.monotonic() > deadline or any(d.poll() is not None for d in daemons):
                logs = "".join(p.read_text()[-1500:] for p in base.glob("*.log"))
                pytest.fail(f"the local Slurm node did not come up:\n{logs}")
            time.sleep(1)
        yield env
    finally:
        if daemons and daemons[-1].poll() is None:  # jobs (and their srun steps) end before the daemons do
            subprocess.run(["scancel", "--user=root", "--full"], env=env, capture_output=True)
            deadline = time.monotonic() + 30
            while subprocess.run(["squeue", "-h"], env=env, capture_output=True, text=True).stdout.strip():
                if time.monotonic() > deadline:
                    break
                time.sleep(1)
        for daemon in reversed(daemons):
            daemon.terminate()
        for daemon in reversed(daemons):
            try:
                daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()


def _job_env(env: dict, devices: int) -> dict:
    return {
        **env,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "JAX_PLATFORMS": "cpu",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p),
        "PATH": os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", ""))),  # `python` is ours
    }


class _Reference:
    """The one-process run (4 devices) both launchers must match; started at once, waited for on first use."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        command = [sys.executable, "-m", "launch.train", "--config", "configs/quickstart.py", "--workdir", str(workdir)]
        command += [*ARGS, f"--config.cache_dir={workdir}-features"]
        self.proc = subprocess.Popen(
            command, cwd=ROOT, env=_job_env(os.environ, 4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.summary = None

    def get(self) -> dict:
        if self.summary is None:
            _, err = self.proc.communicate(timeout=TIMEOUT_S)
            assert self.proc.returncode == 0, err[-3000:]
            self.summary = json.loads((self.workdir / "summary.json").read_text())
        return self.summary


@pytest.fixture(scope="module")
def reference(slurm, tmp_path_factory):
    ref = _Reference(tmp_path_factory.mktemp("reference") / "single")
    yield ref
    if ref.proc.poll() is None:
        ref.proc.kill()
        ref.proc.communicate()


def _assert_equal_runs(reference: _Reference, multi: Path) -> None:
    env = json.loads((multi / "environment.json").read_text())
    assert env["process_count"] == 2 and len(env["devices"]) == 4
    a, b = reference.get(), json.loads((multi / "summary.json").read_text())
    for key in ("test_accuracy", "val_accuracy", "best_step", "total_steps", "test_examples"):
        assert a[key] == b[key], key
    predictions = [np.load(w / "test_predictions.npy") for w in (reference.workdir, multi)]
    np.testing.assert_array_equal(predictions[1], predictions[0])


def _wait(job: subprocess.Popen, slurm: dict) -> str:
    try:
        _, err = job.communicate(timeout=TIMEOUT_S)
    finally:
        if job.poll() is None:
            job.kill()
            job.communicate()
            subprocess.run(["scancel", "--user=root"], env=slurm)
    return err


def test_sbatch_two_tasks_equal_one_process(slurm, reference, tmp_path):
    multi = tmp_path / "multi"
    # The file's #SBATCH lines are for a GPU cluster; the command line overrides them for this node.
    sbatch = [
        "sbatch", "--wait", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gres=none",
        f"--output={tmp_path}/slurm-%j.out", "launch/slurm.sbatch", "configs/quickstart.py", str(multi),
        *ARGS, f"--config.cache_dir={multi}-features",
    ]  # fmt: skip
    job = subprocess.Popen(sbatch, cwd=ROOT, env=_job_env(slurm, 2), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    err = _wait(job, slurm).decode()
    logs = "".join(p.read_text()[-3000:] for p in tmp_path.glob("slurm-*.out"))
    assert job.returncode == 0, f"sbatch exit {job.returncode}: {err[-1000:]}\n{logs}"
    assert logs.count("test_accuracy=") == 1  # process 0 alone reports
    _assert_equal_runs(reference, multi)


def test_submitit_two_tasks_equal_one_process(slurm, reference, tmp_path):
    multi = tmp_path / "multi"
    submit = [
        sys.executable, "-m", "launch.submit", "--config", "configs/quickstart.py", "--workdir", str(multi),
        "--logs", str(tmp_path / "logs"), "--tasks_per_node", "2", "--time_min", "20", "--wait",
        *ARGS, f"--config.cache_dir={multi}-features",
    ]  # fmt: skip
    job = subprocess.Popen(
        submit, cwd=ROOT, env=_job_env(slurm, 2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    err = _wait(job, slurm)
    logs = "".join(p.read_text()[-2000:] for p in (tmp_path / "logs").glob("*_log.*"))  # not the pickles
    assert job.returncode == 0, f"launch.submit exit {job.returncode}: {err[-2000:]}\n{logs}"
    _assert_equal_runs(reference, multi)
