"""Streamed, sharded extraction (tests/features/extract_worker.py in subprocesses): 2 processes with one shared
cache or with per-host caches equal 1 process; SIGKILL at seeded points then a rerun gives bitwise-equal
arrays; and, in process, the chunked entry's reader, its remote (gs://) path and the progress line."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
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


def _spawn(caches: list[Path], out: Path, *extra: str, devices: int = 2) -> list[subprocess.Popen]:
    """One process per cache path (a cluster when more than one)."""
    coordinator = f"127.0.0.1:{_free_port()}"
    procs = []
    for i, cache in enumerate(caches):
        cluster = ["--processes", str(len(caches)), "--process-id", str(i), "--coordinator", coordinator]
        command = [sys.executable, str(WORKER), "--cache", str(cache), "--out", str(out / str(i)), *extra]
        command += cluster if len(caches) > 1 else []
        procs.append(subprocess.Popen(command, env=_env(devices), stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    return procs


def _run(caches: list[Path], out: Path, *extra: str, devices: int = 2) -> list[subprocess.CompletedProcess]:
    """`_spawn`'s processes → their results, all waited for."""
    procs = _spawn(caches, out, *extra, devices=devices)
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
    return {**result, "dir": root / "out" / "0"}


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory) -> Path:
    """Two uninterrupted processes on one fresh shared cache → their outputs (a folder per process)."""
    root = tmp_path_factory.mktemp("two_hosts")
    _ok(_run([root / "cache"] * 2, root / "out"))
    return root / "out"


@pytest.mark.parametrize("layout", ["shared", "per_host"])
def test_two_processes_equal_one(tmp_path, reference, two_hosts, layout):
    out = two_hosts  # one shared cache
    if layout == "per_host":
        caches, out = [tmp_path / "cache0", tmp_path / "cache1"], tmp_path / "out"
        _ok(_run(caches, out))
    halves = []
    for i in range(2):
        got = _read(out / str(i))
        for split in SPLITS:  # every host sees every row (batches are composed differently: float rounding)
            np.testing.assert_allclose(got[split], reference[split], rtol=1e-5, atol=1e-6)
            np.testing.assert_array_equal(got[f"{split}-labels"], reference[f"{split}-labels"])
        halves.append(got["train-host"])
    np.testing.assert_array_equal(np.concatenate(halves), _read(out / "0")["train"])  # own shard
    assert len(halves[0]) == 101
    # head training: each host reads only rows of its own shard, and the global batches equal 1 process's
    local = [np.load(out / str(i) / "train-batch-local-rows.npy") for i in range(2)]
    assert all(((rows >= 0) & (rows < len(half))).all() for rows, half in zip(local, halves, strict=True))
    rows = [rows + np.load(out / str(i) / "train-host-start.npy") for i, rows in enumerate(local)]
    reference_rows = np.load(reference["dir"] / "train-batch-local-rows.npy")  # one host: local rows are global
    np.testing.assert_array_equal(np.concatenate(rows, axis=1), reference_rows)
    batch_x = np.concatenate([np.load(out / str(i) / "train-batch-x.npy") for i in range(2)], axis=1)
    np.testing.assert_allclose(batch_x, np.load(reference["dir"] / "train-batch-x.npy"), rtol=1e-5, atol=1e-6)
    if layout == "per_host":  # each local disk holds its host's shard only, and a rerun on it hits
        assert [p.name for p in next((tmp_path / "cache1").iterdir()).iterdir() if p.is_dir()] == ["1of2"]
        _ok(_run(caches, tmp_path / "again"))
        again = _read(tmp_path / "again" / "1")
        assert again["hits"] == {"train": True, "test": True}
        np.testing.assert_array_equal(again["train"], _read(out / "1")["train"])


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


# Two hosts, each SIGKILLed at its n-th cache write of train (per host: 5 chunks x 2 arrays, then done.json).
_TWO_HOST_POINT = int(np.random.default_rng(23).integers(2, 11))


def test_two_processes_killed_mid_extraction_resume_bitwise(tmp_path, two_hosts):
    caches = [tmp_path / "cache"] * 2  # one shared store
    procs = _spawn(caches, tmp_path / "killed", "--kill-at", str(_TWO_HOST_POINT))
    try:
        first = _wait_any(procs)[0]  # one host died at its kill point: the other is killed at once
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
        errors = [proc.communicate(timeout=TIMEOUT_S)[1].decode() for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert first.returncode == -9, errors[procs.index(first)][-3000:]
    (entry,) = [p for p in (tmp_path / "cache").iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert not (entry / "manifest.json").exists() and (entry / "0of2").is_dir()  # killed mid-extraction
    _ok(_run(caches, tmp_path / "rerun"))
    for i in range(2):  # against two uninterrupted processes on a fresh shared cache
        got, want = _read(tmp_path / "rerun" / str(i)), _read(two_hosts / str(i))
        for key in (*SPLITS, *(f"{s}-labels" for s in SPLITS), *(f"{s}-host" for s in SPLITS)):
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"host {i} {key}")


def _wait_any(procs: list[subprocess.Popen]):
    """The processes that have exited, once at least one has (polling: they run as one cluster)."""
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        done = [p for p in procs if p.poll() is not None]
        if done:
            return done
        time.sleep(0.2)
    raise TimeoutError(f"no worker exited within {TIMEOUT_S} s")


# ------------------------------------------------------------------------------------------------ in process


def _tiny_data(n: int = 40):
    from fxjax.data.sources import Dataset, Subset, load_dataset

    digits = load_dataset("digits", val_fraction=0.1, test_fraction=0.1, seed=0)
    train = Subset(digits.splits["train"], np.arange(n))
    return Dataset("digits-tiny", digits.class_names, {"train": train}, {"train": f"tiny-{n}"})


def _pixels():
    from fxjax.backbones.hub import load_backbone

    backbone = load_backbone("pixels", dtype="float32", param_dtype="float32")
    backbone.preprocess = backbone.preprocess.at_size(8)
    return backbone


def test_views_equal_the_online_augmentation_and_epochs_cycle_through_them(tmp_path):
    import grain

    from fxjax import parallel
    from fxjax.data.features import epoch_views, view_for
    from fxjax.data.images import _Augment
    from fxjax.features.views import cached_views

    data, backbone, views, seed = _tiny_data(13), _pixels(), 3, 5
    kw = dict(mesh=parallel.make_mesh(), batch_size=8, cache_dir=str(tmp_path), dtype="float32", param_dtype="float32")
    feats, labels, hit = cached_views(backbone, data, views=views, seed=seed, chunk_rows=4, **kw)
    pooled = np.asarray(feats["pooled"])
    assert pooled.shape == (13, views, 8 * 8 * 3) and not hit
    # the online pipeline: grain + _Augment over `views` unshuffled epochs under the same seed
    source = data.splits["train"]
    sampler = grain.samplers.IndexSampler(
        num_records=13, shard_options=grain.sharding.NoSharding(), shuffle=False, num_epochs=views, seed=seed
    )
    loader = grain.DataLoader(data_source=source, sampler=sampler, operations=[_Augment(backbone.preprocess)])
    online = np.stack([r["x"].reshape(-1) for r in loader]).reshape(views, 13, -1)  # [epoch, image, d]
    np.testing.assert_array_equal(pooled, online.transpose(1, 0, 2))
    assert len({pooled[0, k].tobytes() for k in range(views)}) == views  # the views differ
    np.testing.assert_array_equal(labels, [source.label(i) for i in range(13)])
    _, _, hit = cached_views(backbone, data, views=views, seed=seed, chunk_rows=4, **kw)
    assert hit
    picked = np.stack([epoch_views(e, np.arange(100), views, seed) for e in range(views)])  # [epoch, example]
    assert (np.sort(picked, axis=0) == np.arange(views)[:, None]).all()  # every view once per `views` epochs
    assert len(set(picked[0].tolist())) == views  # images are out of step with each other
    assert view_for(2, 7, views, seed) == picked[2, 7]


def test_cached_features_on_a_gs_store_round_trip(gcs, tmp_path):
    from fxjax import parallel
    from fxjax.data.images import eval_batches
    from fxjax.features import extract

    data, backbone, mesh = _tiny_data(), _pixels(), parallel.make_mesh()
    kw = dict(mesh=mesh, batch_size=8, cache_dir=gcs, dtype="float32", param_dtype="float32", chunk_rows=16)
    feats, labels, hits = extract.cached_features(backbone, data, **kw)
    again, _, hits_again = extract.cached_features(backbone, data, **kw)
    batches = eval_batches(data.splits["train"], backbone.preprocess, batch_size=8)
    expected = extract.extract(backbone, batches, total=40, mesh=mesh)["pooled"]
    assert (hits, hits_again) == ({"train": False}, {"train": True})
    np.testing.assert_array_equal(np.asarray(again["train"]["pooled"]), expected)
    np.testing.assert_array_equal(feats["train"]["pooled"][[3, 39, 17]], expected[[3, 39, 17]])
    assert not list(tmp_path.iterdir())  # nothing went to the local disk


def test_extract_command_prints_the_gs_entry_uri(gcs, capsys):
    from etils import epath

    from fxjax.cli import extract as extract_cli

    argv = ["--config", "configs/quickstart.py", "--config.image_size=32", f"--config.cache_dir={gcs}"]
    argv += ["--config.data.few_shot_k=4", "--config.data.val_fraction=0.05", "--config.data.test_fraction=0.05"]
    assert extract_cli.main(argv) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("train:", "val:", "test:"))]
    assert len(lines) == 3, lines
    for line in lines:
        uri = line.rsplit(" ", 1)[1]
        assert uri.startswith(f"{gcs}/") and len(uri) == len(gcs) + 65, line  # the root, then a sha256 key
        assert (epath.Path(uri) / "manifest.json").exists(), uri  # the entry the line names is there
    assert lines[0].startswith("train: pooled 40 x ")  # 4 per class over 10 classes; every row counted


def test_progress_without_a_terminal_prints_one_line_every_interval(capsys):
    from fxjax.progress import Progress

    clock = iter([0.0, 1.0, 2.0, 3.0, 10.0, 25.0])  # start, then one reading per update
    progress = Progress(1000, desc="features[train]", unit="img", every=10.0, clock=lambda: next(clock))
    for _ in range(5):
        progress.update(100)
    progress.close()
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "features[train]: 400/1000 img (40.0 img/s, eta 0:00:15)",  # 400 images in 10 s
        "features[train]: 500/1000 img (20.0 img/s, eta 0:00:25)",
    ]
