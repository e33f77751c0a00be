"""Streamed, sharded extraction (tests/features/extract_worker.py in subprocesses): 2 processes with one shared
cache or with per-host caches equal 1 process; SIGKILL at seeded points then a rerun gives bitwise-equal
arrays; and, in process, the chunked entry's reader, its remote (gs://) path and the progress line."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("extract_worker.py")
TIMEOUT_S = 300
SPLITS = ("train", "test")


def _env(devices: int) -> dict:
    return {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(caches: list[Path], out: Path, *extra: str, devices: int = 2) -> list[subprocess.CompletedProcess]:
    """One process per cache path (a cluster when more than one) → their results, all waited for."""
    coordinator = f"127.0.0.1:{_free_port()}"
    procs = []
    for i, cache in enumerate(caches):
        cluster = ["--processes", str(len(caches)), "--process-id", str(i), "--coordinator", coordinator]
        command = [sys.executable, str(WORKER), "--cache", str(cache), "--out", str(out / str(i)), *extra]
        command += cluster if len(caches) > 1 else []
        procs.append(subprocess.Popen(command, env=_env(devices), stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    results = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
            results.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr.decode()))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return results


def _ok(results) -> None:
    for r in results:
        assert r.returncode == 0, f"exit {r.returncode}:\n{r.stderr[-3000:]}"


def _read(out: Path) -> dict[str, np.ndarray]:
    arrays = {f"{s}{kind}": np.load(out / f"{s}{kind}.npy") for s in SPLITS for kind in ("", "-labels", "-host")}
    return {**arrays, "hits": json.loads((out / "hits.json").read_text())}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """One uninterrupted process with 4 devices."""
    root = tmp_path_factory.mktemp("reference")
    _ok(_run([root / "cache"], root / "out", devices=4))
    result = _read(root / "out" / "0")
    assert result["train"].shape == (203, 32) and result["hits"] == {"train": False, "test": False}
    return result


@pytest.mark.parametrize("layout", ["shared", "per_host"])
def test_two_processes_equal_one(tmp_path, reference, layout):
    caches = [tmp_path / "cache"] * 2 if layout == "shared" else [tmp_path / "cache0", tmp_path / "cache1"]
    _ok(_run(caches, tmp_path / "out"))
    halves = []
    for i in range(2):
        got = _read(tmp_path / "out" / str(i))
        for split in SPLITS:  # every host sees every row, bitwise
            np.testing.assert_array_equal(got[split], reference[split])
            np.testing.assert_array_equal(got[f"{split}-labels"], reference[f"{split}-labels"])
        halves.append(got["train-host"])
    np.testing.assert_array_equal(np.concatenate(halves), reference["train"])  # rows="host": its own shard
    assert len(halves[0]) == 101
    if layout == "per_host":  # each local disk holds its host's shard only, and a rerun on it hits
        assert [p.name for p in next((tmp_path / "cache1").iterdir()).iterdir() if p.is_dir()] == ["1of2"]
        _ok(_run(caches, tmp_path / "again"))
        again = _read(tmp_path / "again" / "1")
        assert again["hits"] == {"train": True, "test": True}
        np.testing.assert_array_equal(again["train"], reference["train"])


# Kill points: the n-th cache file written (chunk files, done.json, manifest.json), before or after its rename.
# train (the first split) has 203 rows in chunks of 24: 9 chunks x 2 arrays, then done.json (write 19).
_POINTS = sorted({(int(n), phase) for n, phase in zip(np.random.default_rng(17).integers(1, 20, 3), [0, 1, 1])})


@pytest.mark.parametrize(("kill_at", "phase"), _POINTS)
def test_killed_extraction_resumes_bitwise(tmp_path, reference, kill_at, phase):
    phase = ("before_rename", "after_rename")[phase]
    cache = tmp_path / "cache"
    (killed,) = _run([cache], tmp_path / "killed", "--kill-at", str(kill_at), "--kill-phase", phase, devices=4)
    assert killed.returncode == -9, killed.stderr[-3000:]
    (entry,) = [p for p in cache.iterdir() if (p / "0of1").is_dir() and not (p / "manifest.json").exists()]
    inodes = {p.name: p.stat().st_ino for p in (entry / "0of1").iterdir() if p.name.endswith(".npy")}
    complete = [c for c in range(10) if {f"pooled.{c:06d}.npy", f"labels.{c:06d}.npy"} <= set(inodes)]
    (rerun,) = _run([cache], tmp_path / "rerun", devices=4)
    _ok([rerun])
    got = _read(tmp_path / "rerun" / "0")
    for split in SPLITS:
        np.testing.assert_array_equal(got[split], reference[split])
        np.testing.assert_array_equal(got[f"{split}-labels"], reference[f"{split}-labels"])
    assert not list(entry.glob("0of1/.tmp-*"))  # the dead writer's temporary files are gone
    for c in complete:  # chunks complete before the kill were kept as they were, not rewritten from row 0
        for name in (f"pooled.{c:06d}.npy", f"labels.{c:06d}.npy"):
            assert (entry / "0of1" / name).stat().st_ino == inodes[name], name
